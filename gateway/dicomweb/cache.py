"""The in-memory instance cache and the series prefetch behind metadata, frames, bulk data and
rendered images.

A viewer opening a series asks for its metadata, then for every frame, six requests at a time. With
no store of its own, the gateway would otherwise run one C-GET per frame. Instead:

- ``InstanceCache`` keeps recently retrieved instances (their Part 10 bytes) up to a size cap, for a
  TTL, least recently used first out. Nothing goes to disk. A cap or TTL of 0 turns it off.
- ``Fetcher`` (one per node) runs at most one retrieve per series (``prefetch = "series"``) or per
  instance (``prefetch = "off"``) at a time. Every request for an instance of a series being
  retrieved waits for that retrieve and gets its instance the moment it arrives, cache or no cache;
  a metadata request follows the whole series as it arrives.

The cap is separate from the per-stream bound of the WADO-RS retrieve: what the cache holds stays
under ``max_bytes``; the instances on their way to waiting requests are held only by them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
import anyio

from gateway.dimse.errors import DimseError
from gateway.dimse.node import NodeClient
from gateway.dimse.retrieve import RetrieveDone, RetrieveFailed, RetrieveOutcome, RetrieveRequest
from gateway.dimse.ul import StoreRequest

from . import transcode
from .instance import CachedInstance
from .wado import list_series, study_classes
from .syntaxes import EXPLICIT_VR_LE, web_safe

log = logging.getLogger("gateway.cache")


class InstanceCache:
    """Least recently used instances up to ``max_bytes``, each for at most ``ttl`` seconds."""

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.ttl = float(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (instance, expiry, the size it is counted with)
        self._entries: OrderedDict[tuple[str, str], tuple[CachedInstance, float, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.ttl > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, node: str, sop_uid: str) -> CachedInstance | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get((node, sop_uid))
            if entry is not None and entry[1] > self._clock():
                self._entries.move_to_end((node, sop_uid))
                self.hits += 1
                return entry[0]
            if entry is not None:
                self._drop((node, sop_uid))
            self.misses += 1
            return None

    def put(self, node: str, instance: CachedInstance) -> None:
        size = instance.size
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            key = (node, instance.sop_uid)
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (instance, self._clock() + self.ttl, size)
            self.bytes += size
            self._shrink(self.max_bytes)

    def resize(self, instance: CachedInstance, node: str) -> None:
        """Account for what an entry derived since it was put (its metadata, say)."""
        with self._lock:
            key = (node, instance.sop_uid)
            entry = self._entries.get(key)
            if entry is not None and entry[0] is instance:
                size = instance.size
                self._entries[key] = (instance, entry[1], size)
                self.bytes += size - entry[2]
                self._shrink(self.max_bytes)

    def expire(self) -> None:
        now = self._clock()
        with self._lock:
            for key in [k for k, (_, expires, _) in self._entries.items() if expires <= now]:
                self._drop(key)

    async def expire_forever(self) -> None:
        """Drop expired instances as they expire, so an idle gateway gives their memory back."""
        if not self.enabled:
            return
        while True:
            await anyio.sleep(max(1.0, min(self.ttl / 4, 30.0)))
            self.expire()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _drop(self, key: tuple[str, str]) -> None:
        _, _, size = self._entries.pop(key)
        self.bytes -= size

    def _shrink(self, limit: int) -> None:
        while self.bytes > limit and self._entries:
            key = next(iter(self._entries))
            self._drop(key)
            self.evictions += 1


class NotInSeries(Exception):
    """The instance is not in that series (or the series is not there) on the node."""


class FetchFailed(Exception):
    """The retrieve failed before the instance arrived; ``error`` says why (maps to 502/503/504)."""

    def __init__(self, error: DimseError | None, outcome: RetrieveOutcome | None, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.outcome = outcome


@dataclass(eq=False)
class _Slot:
    """One request waiting for one instance."""

    event: anyio.Event = field(default_factory=anyio.Event)
    instance: CachedInstance | None = None


_MAX_COMPLETE = 10000  # complete-series records kept at most
_FOLLOWER_REFS = 16  # a follower keeps at most this many instances itself; older ones by UID only


@dataclass(eq=False)
class _Follower:
    """A consumer of the whole series (a metadata request): UIDs in arrival order, with the
    instance itself for the latest few."""

    pending: deque[tuple[str, CachedInstance | None]] = field(default_factory=deque)
    wake: anyio.Event = field(default_factory=anyio.Event)

    def push(self, instance: CachedInstance) -> None:
        self.pending.append((instance.sop_uid, instance))
        if len(self.pending) > _FOLLOWER_REFS:
            index = len(self.pending) - _FOLLOWER_REFS - 1
            uid, held = self.pending[index]
            if held is not None:
                self.pending[index] = (uid, None)
        self.wake.set()


class _Fetch:
    """One retrieve (of a series, or of one instance), shared by every request that needs it."""

    def __init__(self, fetcher: "Fetcher", study: str, series: str, sop: str | None) -> None:
        self.fetcher = fetcher
        self.study, self.series, self.sop = study, series, sop
        self.arrived: list[str] = []  # SOP Instance UIDs, in arrival order
        self.waiters: dict[str, list[_Slot]] = {}
        self.followers: list[_Follower] = []
        self.expected: set[str] | None = None  # from the instance listing, when it ran
        self.listed = anyio.Event()  # the listing ended (``expected`` stays None if it failed)
        self._alongside = False  # the listing runs beside the retrieve
        self.done = anyio.Event()
        self.error: FetchFailed | None = None
        self.outcome: RetrieveOutcome | None = None

    # -- delivery (event loop) ----------------------------------------------------------------

    def _arrive(self, instance: CachedInstance) -> None:
        self.arrived.append(instance.sop_uid)
        self.fetcher.cache.put(self.fetcher.node.name, instance)
        for slot in self.waiters.pop(instance.sop_uid, ()):
            slot.instance = instance
            slot.event.set()
        for follower in self.followers:
            follower.push(instance)

    def _finish(self) -> None:
        self.done.set()
        for slots in self.waiters.values():
            for slot in slots:
                slot.event.set()
        for follower in self.followers:
            follower.wake.set()

    def _listed(self, instances: list[tuple[str, str, str]]) -> None:
        self.expected = {sop for _, sop, _ in instances}
        self.listed.set()

    async def _list_alongside(self) -> None:
        """The listing, while the C-GET already runs: what the series must hold to be complete."""
        try:
            self._listed(await self.fetcher.list(self.study, self.series, self.sop))
        except DimseError as exc:
            log.warning("instance listing for completeness failed on node %r: %s", self.fetcher.node.name,
                        exc.message)
        finally:
            self.listed.set()

    async def _instances(self) -> list[tuple[str, str, str]]:
        """What the retrieve proposes storage contexts for. A C-GET of a series needs only the SOP
        classes: it starts after a study-level C-FIND for them, and the instance listing runs
        alongside (on a large series the listing takes as long as a good part of the retrieve)."""
        node = self.fetcher.node
        if node.settings.retrieve == "get" and self.sop is None:
            classes = await study_classes(node, self.study)
            if classes is None:  # no such study
                self._listed([])
                return []
            if classes:
                self._alongside = True
                node.pool.spawn(self._list_alongside)
                return [("", "", c) for c in classes]
        instances = await self.fetcher.list(self.study, self.series, self.sop)
        self._listed(instances)
        return instances

    async def run(self) -> None:
        node = self.fetcher.node
        try:
            instances = await self._instances()
            if not instances:
                return
            request = RetrieveRequest(
                "IMAGE" if self.sop else "SERIES", self.study, self.series, self.sop, instances=instances,
                transfer_syntaxes=list(transcode.PASS_THROUGH_SYNTAXES))
            stream, cancel = node.retriever.start(request, self._prepare, lambda inst: inst.size,
                                                  stall_timeout=self.fetcher.stall_timeout)
            try:
                async for item in stream:
                    if isinstance(item, CachedInstance):
                        self._arrive(item)
                    elif isinstance(item, RetrieveFailed):
                        self.outcome = item.outcome
                        self.error = FetchFailed(item.error, item.outcome, item.error.message)
                        break
                    elif isinstance(item, RetrieveDone):
                        self.outcome = item.outcome
                        break
            finally:
                cancel()
                stream.close()
        except DimseError as exc:
            self.error = FetchFailed(exc, None, exc.message)
        finally:
            if self._alongside:
                # waiters are told why an instance is missing from the listing: let it end first
                with anyio.move_on_after(self.fetcher.stall_timeout, shield=True):
                    await self.listed.wait()
            self.listed.set()
            self.fetcher._forget(self)
            if (self.sop is None and self.error is None and self.expected
                    and self.expected <= set(self.arrived)):
                self.fetcher._remember_complete(self.study, self.series, sorted(self.expected))
            self._finish()

    def _prepare(self, store: StoreRequest) -> CachedInstance:
        """In the DIMSE thread: one Part 10 buffer per instance, in a syntax fit for the web."""
        ts = store.transfer_syntax
        if not web_safe(ts):  # Implicit VR LE, Explicit VR BE: re-encoded once, here
            data, target = transcode.convert(b"".join(store.chunks), ts, EXPLICIT_VR_LE)
            return CachedInstance.from_dataset_bytes(self.study, self.series, store.sop_instance_uid,
                                                     store.sop_class_uid, target, [data])
        return CachedInstance.from_dataset_bytes(self.study, self.series, store.sop_instance_uid,
                                                 store.sop_class_uid, ts, store.chunks)


class Fetcher:
    """The retrieves that fill the cache for one node; see the module's docstring."""

    def __init__(self, node: NodeClient, cache: InstanceCache, *, prefetch: str, stall_timeout: float) -> None:
        self.node = node
        self.cache = cache
        self.prefetch = prefetch
        self.stall_timeout = stall_timeout
        self._running: dict[tuple[str, str, str | None], _Fetch] = {}
        # series retrieved whole: (study, series) -> (their instances, until when that is trusted)
        self._complete: dict[tuple[str, str], tuple[list[str], float]] = {}

    def _remember_complete(self, study: str, series: str, uids: list[str]) -> None:
        """A series that arrived whole: while every instance of it is cached (and for the cache's
        TTL at most), its metadata is served without asking the PACS again."""
        now = time.monotonic()
        if len(self._complete) >= _MAX_COMPLETE:
            for key in [k for k, (_, until) in self._complete.items() if until <= now]:
                del self._complete[key]
            while len(self._complete) >= _MAX_COMPLETE:
                del self._complete[next(iter(self._complete))]
        self._complete[(study, series)] = (uids, now + self.cache.ttl)

    def _cached_series(self, study: str, series: str) -> list[CachedInstance] | None:
        entry = self._complete.get((study, series))
        if entry is None or entry[1] <= time.monotonic():
            self._complete.pop((study, series), None)
            return None
        found = [self.cache.get(self.node.name, uid) for uid in entry[0]]
        if any(inst is None or inst.series_uid != series or inst.study_uid != study for inst in found):
            return None
        return found  # type: ignore[return-value]

    def _forget(self, fetch: _Fetch) -> None:
        key = (fetch.study, fetch.series, fetch.sop)
        if self._running.get(key) is fetch:
            del self._running[key]

    async def list(self, study: str, series: str, sop: str | None = None) -> list[tuple[str, str, str]]:
        """(series, SOP Instance UID, SOP Class UID) of the series' instances (or of one), from an
        IMAGE-level C-FIND: the C-GET proposes contexts for these classes, and the UIDs are what a
        complete series is checked against."""
        return await list_series(self.node, study, series, sop)

    def _start(self, study: str, series: str, sop: str | None) -> _Fetch:
        key = (study, series, sop)
        fetch = self._running.get(key)
        if fetch is None:
            fetch = _Fetch(self, study, series, sop)
            self._running[key] = fetch
            self.node.pool.spawn(fetch.run)
        return fetch

    def _series_fetch(self, study: str, series: str) -> _Fetch | None:
        return self._running.get((study, series, None))

    async def instance(self, study: str, series: str, sop: str) -> CachedInstance:
        """The instance, from the cache, from a retrieve under way, or from a new one."""
        cached = self.cache.get(self.node.name, sop)
        if cached is not None and cached.study_uid == study and cached.series_uid == series:
            return cached
        fetch = self._series_fetch(study, series)
        if fetch is not None and fetch.expected is not None and sop not in fetch.expected:
            raise NotInSeries("no such instance in that series on node " + repr(self.node.name))
        if fetch is not None and sop in fetch.arrived:
            fetch = None  # it came and went (evicted): fetch it alone
        if fetch is None:
            fetch = self._start(study, series, None if self.prefetch == "series" else sop)
        found = await self._wait(fetch, sop)
        if found is not None:
            return found
        if fetch.sop is None and sop in fetch.arrived:  # evicted between arrival and our wake-up
            found = await self._wait(self._start(study, series, sop), sop)
            if found is not None:
                return found
        raise self._why_missing(fetch, sop)

    async def _wait(self, fetch: _Fetch, sop: str) -> CachedInstance | None:
        if fetch.done.is_set():
            return None
        slot = _Slot()
        fetch.waiters.setdefault(sop, []).append(slot)
        try:
            await slot.event.wait()
        finally:
            slots = fetch.waiters.get(sop)
            if slots is not None and slot in slots:
                slots.remove(slot)
                if not slots:
                    del fetch.waiters[sop]
        return slot.instance

    def _why_missing(self, fetch: _Fetch, sop: str) -> Exception:
        if fetch.error is not None and (fetch.expected is None or sop in fetch.expected):
            return fetch.error
        if fetch.expected is not None and sop not in fetch.expected:
            return NotInSeries("no such instance in that series on node " + repr(self.node.name))
        outcome = fetch.outcome
        return FetchFailed(None, outcome, f"node {self.node.name!r} did not send the instance "
                           f"({(outcome.completed if outcome else 0)} sent, "
                           f"{(outcome.failed if outcome else 0)} failed)")

    async def series(self, study: str, series: str, listed: list[str] | None = None) -> AsyncIterator[CachedInstance]:
        """Every instance of the series, as it arrives (or from the cache), each once. ``listed``,
        when given, receives the series' SOP Instance UIDs before the first instance is yielded."""
        fetch = self._series_fetch(study, series)
        if fetch is None:
            cached = self._cached_series(study, series)
            if cached is not None:
                if listed is not None:
                    listed.extend(inst.sop_uid for inst in cached)
                for inst in cached:
                    yield inst
                return
            fetch = self._start(study, series, None)
        follower = _Follower()
        fetch.followers.append(follower)
        seen: set[str] = set()
        try:
            for uid in list(fetch.arrived):  # what came before we joined
                follower.pending.append((uid, None))
            while True:
                while follower.pending:
                    uid, held = follower.pending.popleft()
                    if uid in seen:
                        continue
                    seen.add(uid)
                    instance = held or await self.instance(study, series, uid)
                    if listed is not None and not seen - {uid}:
                        # the first instance: the listing names the series' instances (an ETag)
                        with anyio.move_on_after(self.stall_timeout):
                            await fetch.listed.wait()
                        listed.extend(sorted(fetch.expected or ()))
                    yield instance
                if fetch.done.is_set():
                    break
                follower.wake = anyio.Event()
                if not follower.pending and not fetch.done.is_set():
                    await follower.wake.wait()
        finally:
            if follower in fetch.followers:
                fetch.followers.remove(follower)
        if fetch.error is not None and not seen:
            raise fetch.error
        missing = (fetch.expected or set()) - seen
        if fetch.error is not None or missing:
            raise FetchFailed(fetch.error.error if fetch.error else None, fetch.outcome,
                              f"the retrieve of the series ended with {len(missing)} instance(s) missing")
        if not seen:
            raise NotInSeries("no such series on node " + repr(self.node.name))
