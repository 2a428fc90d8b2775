"""A per-node pool of associations, shared by every request to that node.

- At most ``max_associations`` are open at once, counted over idle and busy ones, because PACSes
  refuse associations past their own limit.
- A request waits for a free association at most ``acquire_timeout`` and then gets ``PoolExhausted``
  (503 + Retry-After on the web side), never a queue of minutes.
- Query associations (C-ECHO, C-FIND) are kept idle for reuse up to ``idle_timeout``; one that the
  PACS closed is noticed when taken (or when it fails before its first answer) and replaced.
- Every new association, pooled or dedicated, passes the node's circuit breaker (breaker.py):
  while it is open, requests fail fast with ``BreakerOpen`` instead of waiting on a dead PACS.
- Every blocking pynetdicom call runs in a worker thread under the node's own CapacityLimiter.
- Work that must outlive the request that started it (draining a cancelled C-FIND, releasing an
  association) runs in the pool's task group, so a client that goes away never leaks a thread or an
  association.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, TypeVar

import anyio
import anyio.abc
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.metrics import NodeMetrics

from .breaker import CircuitBreaker
from .errors import DimseError, PoolExhausted
from .net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Peer
from .ul import VERIFICATION, Association, Proposal, open_association

log = logging.getLogger("gateway.dimse")
T = TypeVar("T")

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
_QUERY_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Capabilities:
    """What the PACS accepted on a query association."""

    study_root_find: bool
    patient_root_find: bool
    relational: bool
    fuzzy: bool
    peer_max_pdu: int


@dataclass(frozen=True)
class LastError:
    """The last failure seen on a node: its message and when (seconds since the epoch)."""

    message: str
    at: float


@dataclass
class PooledAssociation:
    assoc: Association
    capabilities: Capabilities
    last_used: float = field(default_factory=time.monotonic)
    next_msg_id: int = 1

    def message_id(self) -> int:
        msg_id = self.next_msg_id
        self.next_msg_id = msg_id % 65535 + 1
        return msg_id

    @property
    def alive(self) -> bool:
        return self.assoc.established


def connect(peer: Peer, proposal: Proposal) -> Association:
    """Open an association to ``peer`` (blocking: call from a worker thread)."""
    assoc = open_association(
        node=peer.name, host=peer.host, port=peer.port, calling_ae=peer.calling_ae, called_ae=peer.ae_title,
        proposal=proposal, max_pdu=peer.max_pdu, connect_timeout=peer.connect_timeout,
        acse_timeout=peer.acse_timeout, dimse_timeout=peer.dimse_timeout,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        tls=peer.tls,
    )
    log.debug("node %r: association opened (%d presentation context(s) accepted)", peer.name, len(assoc.accepted))
    return assoc


def _capabilities(assoc: Association) -> Capabilities:
    info = assoc.negotiated.extended.get(STUDY_ROOT_FIND, b"")
    return Capabilities(
        study_root_find=assoc.context_for(STUDY_ROOT_FIND) is not None,
        patient_root_find=assoc.context_for(PATIENT_ROOT_FIND) is not None,
        relational=len(info) > 0 and info[0] == 1,
        fuzzy=len(info) > 2 and info[2] == 1,
        peer_max_pdu=assoc.negotiated.peer_max_pdu,
    )


class AssociationPool:
    def __init__(
        self,
        peer: Peer,
        *,
        max_associations: int,
        acquire_timeout: float,
        idle_timeout: float,
        relational: str,
        fuzzy: bool,
        task_group: anyio.abc.TaskGroup,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.peer = peer
        self.name = peer.name
        self.max_associations = max_associations
        self.acquire_timeout = acquire_timeout
        self.idle_timeout = idle_timeout
        self._relational_mode = relational
        self._want_relational = relational != "off"
        self._want_fuzzy = fuzzy
        self._tg = task_group
        self._slots = anyio.Semaphore(max_associations)
        self._idle: list[PooledAssociation] = []
        # Threads: one per busy association plus one per association being opened or closed.
        self.limiter = anyio.CapacityLimiter(max_associations * 2)
        self.in_use = 0
        self._held: set[Association] = set()  # held by an operation now: what a shutdown past its grace aborts
        self.opened_total = 0
        self.last_capabilities: Capabilities | None = None
        # guards every new association (threshold 0: disabled); see gateway/dimse/breaker.py
        self.breaker = breaker or CircuitBreaker(peer.name, 0, 10.0)
        self.last_error: LastError | None = None
        self._closed = False
        # what the node's operations record; bound to the app's registry by Metrics.watch
        self.metrics = NodeMetrics(self.name)

    # -- running blocking work ------------------------------------------------------------------

    async def run_sync(self, func: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` in the pool's task group, independent of the calling request."""
        self._tg.start_soon(func, *args)

    async def _attempt(self, func: Callable[..., T], *args: Any) -> T:
        """Open a new association with ``func`` (in a worker thread) past the circuit breaker: fail
        fast with BreakerOpen while it is open, and tell it how the attempt went."""
        probe = self.breaker.before_attempt()
        try:
            result = await self.run_sync(func, *args)
        except BaseException as exc:
            self.breaker.record(exc, probe)
            if isinstance(exc, DimseError):
                self.note_error(exc)
            raise
        self.breaker.record_success(probe)
        return result

    def note_error(self, exc: DimseError) -> None:
        """Remember a failure for /status (its message holds no patient data)."""
        self.last_error = LastError(f"{type(exc).__name__}: {exc.message}", time.time())

    # -- acquiring --------------------------------------------------------------------------------

    def _proposal(self) -> Proposal:
        extended = {}
        if self._want_relational or self._want_fuzzy:
            info = bytes([int(self._want_relational), 0, int(self._want_fuzzy), 0])
            extended = {STUDY_ROOT_FIND: info, PATIENT_ROOT_FIND: info}
        contexts = [(uid, _QUERY_SYNTAXES) for uid in (VERIFICATION, STUDY_ROOT_FIND, PATIENT_ROOT_FIND)]
        return Proposal(contexts=contexts, extended=extended)

    def _open(self) -> PooledAssociation:
        assoc = connect(self.peer, self._proposal())
        caps = _capabilities(assoc)
        if self._relational_mode != "negotiate":
            # "assume": the PACS answers relational queries without negotiating them (Orthanc does)
            caps = replace(caps, relational=self._relational_mode == "assume")
        self.last_capabilities = caps
        return PooledAssociation(assoc, caps)

    @asynccontextmanager
    async def query_association(self) -> AsyncIterator[PooledAssociation]:
        """Hold a query association for the duration of the block (blocking work goes to threads).

        The association goes back to the idle list afterwards if it is still established.
        """
        pooled = await self.acquire()
        try:
            yield pooled
        finally:
            await self.release(pooled)

    async def _take_slot(self) -> None:
        if self._closed:
            raise PoolExhausted(self.name, "the gateway is shutting down", retry_after=5)
        try:
            with anyio.fail_after(self.acquire_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolExhausted(
                self.name,
                f"all {self.max_associations} associations to the PACS are busy",
                retry_after=max(1, math.ceil(self.acquire_timeout)),
            ) from None
        self.in_use += 1

    def _give_slot(self) -> None:
        self.in_use -= 1
        self._slots.release()

    async def acquire(self) -> PooledAssociation:
        await self._take_slot()
        try:
            while self._idle:
                pooled = self._idle.pop()
                fresh = time.monotonic() - pooled.last_used < self.idle_timeout
                if fresh and pooled.assoc.idle_and_healthy():
                    self._held.add(pooled.assoc)
                    return pooled
                self.spawn(self._close, pooled.assoc)  # the PACS released, aborted or closed it while idle
            pooled = await self._attempt(self._open)
            self.opened_total += 1
            self._held.add(pooled.assoc)
            return pooled
        except BaseException:
            self._give_slot()
            raise

    async def open_dedicated(self, proposal: Proposal) -> Association:
        """An association of its own (a retrieve), counted against the node's cap like pooled ones.
        An idle pooled association is closed first if the cap would be passed. Close it with
        ``close_dedicated``."""
        await self._take_slot()
        try:
            if self._idle and self.in_use + len(self._idle) > self.max_associations:
                await self._close(self._idle.pop(0).assoc)
            assoc = await self._attempt(connect, self.peer, proposal)
            self.opened_total += 1
            self._held.add(assoc)
            return assoc
        except BaseException:
            self._give_slot()
            raise

    async def close_dedicated(self, assoc: Association) -> None:
        self._held.discard(assoc)
        try:
            await self._close(assoc)
        finally:
            self._give_slot()

    async def release(self, pooled: PooledAssociation) -> None:
        self._held.discard(pooled.assoc)
        if pooled.alive and not self._closed:
            pooled.last_used = time.monotonic()
            self._idle.append(pooled)
        else:
            self.spawn(self._close, pooled.assoc)
        self._give_slot()

    async def _close(self, assoc: Association) -> None:
        with anyio.CancelScope(shield=True):
            await self.run_sync(assoc.release)

    # -- housekeeping -----------------------------------------------------------------------------

    async def reap_idle(self) -> None:
        """Close idle associations before the PACS's own idle timeout closes them under us."""
        now = time.monotonic()
        keep = []
        for pooled in self._idle:
            if pooled.alive and now - pooled.last_used < self.idle_timeout:
                keep.append(pooled)
            else:
                self.spawn(self._close, pooled.assoc)
        self._idle = keep

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def abort_held(self) -> int:
        """A-ABORT every association an operation holds (a shutdown past its grace): the threads
        blocked on them wake up with an error at once. How many there were."""
        held = list(self._held)
        for assoc in held:
            assoc.abort()
        return len(held)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for pooled in idle:
            await self._close(pooled.assoc)
