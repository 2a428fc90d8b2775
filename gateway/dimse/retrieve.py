"""C-GET and C-MOVE retrieves, streamed: each instance is handed on as it arrives.

The caller (the WADO side) says what to retrieve, which instances it expects (from an IMAGE-level
C-FIND: their SOP classes decide the storage contexts), which transfer syntaxes it prefers, and a
``prepare`` function that turns a received instance into what it will send on (run in the DIMSE
thread, so CPU work stays off the event loop). Instances go through a bounded stream: a slow client
slows the PACS instead of growing memory, and one that stalls past ``stall_timeout`` is treated as
gone. A consumer that goes away makes the retrieve send C-CANCEL and answer the PACS's C-STOREs with
a failure, and every thread and association is released.

Per node the mode is ``get``, ``move`` or ``get-then-move``: C-MOVE takes over only before any
instance was handed on (the GET context or every storage context rejected, or the C-GET failed
before its first sub-operation).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.metrics import CANCEL, ERROR, FAILURE, outcome_of, outcome_of_status
from gateway.metrics import WARNING as WARNING_OUTCOME

from .errors import DimseError, DimseStatusError, ServiceNotSupported
from .pool import AssociationPool
from .receiver import MoveReceiver
from .storage_classes import CURATED_STORAGE_CLASSES
from .ul import (
    COMPLETED,
    FAILED,
    STATUS,
    WARNING,
    Association,
    Proposal,
    StoreRequest,
)

log = logging.getLogger("gateway.dimse")
T = TypeVar("T")

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
MAX_CONTEXTS = 128
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
CANCELLED = 0xFE00
HANDOFF_BUDGET = 16 << 20  # bytes a retrieve may queue between its DIMSE thread and the response


@dataclass(frozen=True)
class RetrieveRequest:
    level: str  # STUDY, SERIES or IMAGE
    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    # (series UID, SOP Instance UID, SOP Class UID or "" when the PACS did not say) from a C-FIND
    instances: Sequence[tuple[str, str, str]] = ()
    # transfer syntaxes the client can use, most wanted first; the native ones are always added
    transfer_syntaxes: Sequence[str] = (ExplicitVRLittleEndian,)

    def identifier(self, sop_uids: Sequence[str] | None = None, series_uid: str | None = None) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if sop_uids else self.level
        ds.StudyInstanceUID = self.study_uid
        if series_uid or self.series_uid:
            ds.SeriesInstanceUID = series_uid or self.series_uid
        if sop_uids:
            ds.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
        elif self.sop_uid:
            ds.SOPInstanceUID = self.sop_uid
        return ds


@dataclass
class RetrieveOutcome:
    """How a retrieve ended, from the PACS's final response(s) and what was handed on."""

    mode: str = "get"
    status: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    rejected_classes: list[str] = field(default_factory=list)
    delivered: int = 0
    consumer_gone: bool = False
    stalled: bool = False

    @property
    def complete(self) -> bool:
        return self.status in (SUCCESS,) and self.failed == 0 and not self.consumer_gone


@dataclass(frozen=True)
class RetrieveDone:
    outcome: RetrieveOutcome


@dataclass(frozen=True)
class RetrieveFailed:
    error: DimseError
    outcome: RetrieveOutcome


class Handoff:
    """Prepared instances from DIMSE threads to the event loop, bounded in bytes.

    A producer thread queues an instance and answers its C-STORE at once, so receiving the next
    instance overlaps with writing this one to the client; it blocks only while ``budget`` bytes
    are queued, and a consumer that takes nothing for ``stall_timeout`` is treated as gone. The
    event loop is woken only when it waits for more, and takes everything queued at each wake-up.
    """

    def __init__(self, budget: int, stall_timeout: float) -> None:
        self.budget = budget
        self.stall_timeout = stall_timeout
        self._cond = threading.Condition()
        self._items: deque[tuple[Any, int]] = deque()
        self._queued = 0
        self._ended = False
        self._gone = False
        self._waiting = False
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._taken: deque[Any] = deque()

    # -- producer side (any thread) -----------------------------------------------------------

    def put(self, item: Any, size: int) -> bool:
        """Queue ``item``; False when the consumer is gone or stalled past the stall timeout."""
        deadline = time.monotonic() + self.stall_timeout
        with self._cond:
            while not self._gone and self._queued and self._queued + size > self.budget:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._gone = True
                    raise _Stalled()
                self._cond.wait(remaining)
            if self._gone:
                return False
            self._items.append((item, size))
            self._queued += size
            wake, self._waiting = self._waiting, False
        if wake:
            self._loop.call_soon_threadsafe(self._event.set)
        return True

    def end(self, item: Any) -> None:
        """Queue the final item and close; safe from any thread."""
        with self._cond:
            if not self._gone:
                self._items.append((item, 0))
            self._ended = True
            wake, self._waiting = self._waiting, False
        if wake:
            self._loop.call_soon_threadsafe(self._event.set)

    # -- consumer side (the event loop) ---------------------------------------------------------

    async def receive(self) -> Any:
        """The next item; raises anyio.EndOfStream when the producers ended and all was taken."""
        while not self._taken:
            with self._cond:
                if self._items:
                    self._taken.extend(item for item, _ in self._items)
                    self._items.clear()
                    self._queued = 0
                    self._cond.notify_all()
                    break
                if self._ended or self._gone:
                    raise anyio.EndOfStream
                self._waiting = True
                self._event.clear()
            await self._event.wait()
        return self._taken.popleft()

    def __aiter__(self) -> "Handoff":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """The consumer is gone: producers stop at once."""
        with self._cond:
            self._gone = True
            self._items.clear()
            self._queued = 0
            self._cond.notify_all()

    @property
    def gone(self) -> bool:
        return self._gone


class _Stalled(Exception):
    pass


class _Delivery(Generic[T]):
    """Prepares each received instance (in the DIMSE thread) and hands it over."""

    def __init__(self, handoff: Handoff, prepare: Callable[[StoreRequest], T], size: Callable[[T], int],
                 outcome: RetrieveOutcome) -> None:
        self.handoff = handoff
        self.prepare = prepare
        self.size = size
        self.outcome = outcome
        self.lock = threading.Lock()
        self.on_gone: Callable[[], None] = lambda: None

    def deliver(self, request: StoreRequest) -> int:
        """Prepare and hand on one instance; the C-STORE status to answer."""
        if self.handoff.gone:
            self._gone()
            return OUT_OF_RESOURCES
        try:
            item = self.prepare(request)
        except Exception:
            log.exception("preparing a retrieved instance failed")
            return 0xC000
        try:
            accepted = self.handoff.put(item, self.size(item))
        except _Stalled:
            self.outcome.stalled = True
            accepted = False
        if not accepted:
            self._gone()
            return OUT_OF_RESOURCES
        with self.lock:
            self.outcome.delivered += 1
        return SUCCESS

    def _gone(self) -> None:
        if not self.outcome.consumer_gone:
            self.outcome.consumer_gone = True
            self.on_gone()


def storage_proposals(request: RetrieveRequest) -> list[Proposal]:
    """The storage contexts for a C-GET: exactly the SOP classes the C-FIND reported (the curated
    list when it did not say), each with the native syntaxes and, where the client takes them, one
    context per compressed syntax so the PACS can send its stored form. Split over associations
    when they do not fit in one (128 contexts, one of them the GET context)."""
    classes = sorted({c for _, _, c in request.instances if c})
    if not classes or any(not c for _, _, c in request.instances):
        classes = sorted(set(classes) | set(CURATED_STORAGE_CLASSES))
    compressed = [ts for ts in request.transfer_syntaxes if ts not in NATIVE]
    per_class = 1 + len(compressed)
    if len(classes) * per_class > MAX_CONTEXTS - 1:
        per_class = 1  # the PACS converts to a native syntax; we transcode if the client needs to
    per_association = max(1, (MAX_CONTEXTS - 1) // per_class)
    proposals = []
    for start in range(0, len(classes), per_association):
        chunk = classes[start : start + per_association]
        contexts: list[tuple[str, Sequence[str]]] = [(STUDY_ROOT_GET, NATIVE)]
        for uid in chunk:
            contexts.append((uid, NATIVE))
            if per_class > 1:
                contexts += [(uid, (ts,)) for ts in compressed]
        proposals.append(Proposal(contexts=contexts, scp_roles=tuple(chunk)))
    return proposals


class Retriever:
    """Retrieves for one node, over its pool (for the association cap) and the move receiver."""

    def __init__(self, pool: AssociationPool, mode: str, receiver: MoveReceiver | None, calling_ae: str) -> None:
        self.pool = pool
        self.mode = mode
        self.receiver = receiver
        self.calling_ae = calling_ae

    def start(
        self, request: RetrieveRequest, prepare: Callable[[StoreRequest], T], size: Callable[[T], int], *,
        stall_timeout: float, budget: int = HANDOFF_BUDGET,
    ) -> tuple[Handoff, Callable[[], None]]:
        """Start a retrieve in the pool's task group (call from the event loop). The hand-off yields
        prepared instances, then one ``RetrieveDone`` or ``RetrieveFailed`` item; ``size`` tells the
        bytes each prepared instance holds, for the ``budget``. The returned function cancels
        (idempotent); close the hand-off when the consumer goes away."""
        handoff = Handoff(budget, stall_timeout)
        outcome = RetrieveOutcome(mode="get" if self.mode != "move" else "move")
        delivery = _Delivery(handoff, prepare, size, outcome)
        job = _Job(self, request, delivery)
        self.pool.spawn(job.run)
        return handoff, job.cancel


class _Job:
    def __init__(self, retriever: Retriever, request: RetrieveRequest, delivery: _Delivery[Any]) -> None:
        self.r = retriever
        self.request = request
        self.delivery = delivery
        self.outcome = delivery.outcome
        self._lock = threading.Lock()
        self._active: tuple[Association, str, int] | None = None
        self._cancelled = False
        self._started = time.perf_counter()  # of the C-GET or C-MOVE under way, for the metrics
        delivery.on_gone = self.cancel

    def cancel(self) -> None:
        """C-CANCEL the operation in flight; safe from any thread."""
        with self._lock:
            self._cancelled = True
            active = self._active
        if active is not None:
            assoc, model, msg_id = active
            try:
                assoc.cancel(model, msg_id)
            except DimseError:
                pass

    async def run(self) -> None:
        with anyio.CancelScope(shield=True):
            self._started = time.perf_counter()
            try:
                await self._run()
            except DimseError as exc:
                self._record(self._outcome_label(exc))
                await self._finish(RetrieveFailed(exc, self.outcome))
            except Exception as exc:  # a bug: make sure the consumer is not left waiting
                log.exception("retrieve failed")
                self._record(ERROR)
                await self._finish(RetrieveFailed(DimseError(self.r.pool.name, f"internal error: {type(exc).__name__}"),
                                           self.outcome))
            else:
                self._record(self._outcome_label(None))
                await self._finish(RetrieveDone(self.outcome))

    def _record(self, outcome: str, kind: str | None = None) -> None:
        """One C-GET or C-MOVE in the metrics (before the consumer hears the end)."""
        now = time.perf_counter()
        self.r.pool.metrics.observe(kind or self.outcome.mode, outcome, now - self._started)
        self._started = now

    def _outcome_label(self, exc: DimseError | None) -> str:
        if self._cancelled or self.outcome.consumer_gone:
            return CANCEL
        if exc is not None:
            return outcome_of(exc)
        label = outcome_of_status(self.outcome.status)
        if label != FAILURE and (self.outcome.failed or self.outcome.rejected_classes):
            return WARNING_OUTCOME
        return label

    async def _finish(self, item: RetrieveDone | RetrieveFailed) -> None:
        self.delivery.handoff.end(item)

    async def _run(self) -> None:
        if self.r.mode in ("get", "get-then-move"):
            try:
                await self._get()
                return
            except _FallBack as reason:
                # C-MOVE takes over only before any instance was handed on, and never for a client
                # that has gone
                if self.r.mode == "get" or self.outcome.delivered or self._cancelled or self.outcome.consumer_gone:
                    raise reason.error from None
                log.info("C-GET not possible on node %r (%s); falling back to C-MOVE", self.r.pool.name, reason.error.message)
                self._record(outcome_of(reason.error), "get")
                self.outcome.mode = "move"
        await self._move()

    # -- C-GET ----------------------------------------------------------------------------------

    async def _get(self) -> None:
        proposals = storage_proposals(self.request)
        try:
            await self._get_all(proposals)
        finally:
            if self.outcome.failed and any(not c for _, _, c in self.request.instances):
                log.warning(
                    "node %r: %d C-GET sub-operation(s) failed (%d listed by UID). The PACS did not say which SOP "
                    "classes the request covers, so the gateway proposed its curated list of %d storage classes: "
                    "the failed instances are likely of a class outside that list (use C-MOVE for this node, or a "
                    "PACS that returns SOPClassUID from C-FIND)", self.r.pool.name, self.outcome.failed,
                    len(self.outcome.failed_uids), len(CURATED_STORAGE_CLASSES))

    async def _get_all(self, proposals: list[Proposal]) -> None:
        for proposal, target in zip(proposals, self._targets(proposals)):
            if self._cancelled:
                return
            assoc = await self.r.pool.open_dedicated(proposal)
            try:
                self._check_contexts(assoc, proposal)
                for identifier in target:
                    await self.r.pool.run_sync(self._get_on, assoc, identifier)
                    if self._cancelled:
                        break
            finally:
                await self.r.pool.close_dedicated(assoc)

    def _targets(self, proposals: list[Proposal]) -> list[list[Dataset]]:
        """One identifier for the whole resource when one association holds every context;
        otherwise IMAGE-level identifiers per series for each association's classes."""
        if len(proposals) == 1:
            return [[self.request.identifier()]]
        out = []
        for proposal in proposals:
            classes = set(proposal.scp_roles)
            by_series: dict[str, list[str]] = {}
            for series, sop, cls in self.request.instances:
                if cls in classes:
                    by_series.setdefault(series, []).append(sop)
            out.append([self.request.identifier(sops, series) for series, sops in by_series.items()])
        return out

    def _check_contexts(self, assoc: Association, proposal: Proposal) -> None:
        if assoc.context_for(STUDY_ROOT_GET) is None:
            raise _FallBack(ServiceNotSupported(self.r.pool.name, "the PACS did not accept Study Root C-GET"))
        accepted = {cx.abstract_syntax for cx in assoc.accepted if cx.scp_role is not False}
        proposed = set(proposal.scp_roles)
        rejected = sorted(proposed - accepted)
        if rejected:
            needed = {c for _, _, c in self.request.instances if c}
            missing = sorted(set(rejected) & needed)
            self.outcome.rejected_classes += missing
            if missing:
                log.warning("node %r rejected the storage contexts (or the SCP role) for %s", self.r.pool.name,
                            ", ".join(missing))
        if not accepted & proposed:
            raise _FallBack(ServiceNotSupported(self.r.pool.name, "the PACS rejected every storage context for C-GET"))

    def _get_on(self, assoc: Association, identifier: Dataset) -> None:
        msg_id = 1
        with self._lock:
            self._active = (assoc, STUDY_ROOT_GET, msg_id)
        try:
            final = None
            for response in assoc.get(identifier, STUDY_ROOT_GET, msg_id, self.delivery.deliver):
                final = response
            assert final is not None
            self._count(final)
            status = int(final.get(STATUS, 0xFFFF))
            if self.outcome.delivered == 0 and self.outcome.completed == 0 and _is_failure(status) \
                    and status != CANCELLED:
                raise _FallBack(DimseStatusError(self.r.pool.name, f"C-GET failed with status 0x{status:04X}",
                                                 status=status))
        finally:
            with self._lock:
                self._active = None

    def _count(self, final: dict[Any, Any]) -> None:
        status = int(final.get(STATUS, 0xFFFF))
        self.outcome.status = status if self.outcome.status in (None, SUCCESS) else self.outcome.status
        self.outcome.completed += int(final.get(COMPLETED, 0) or 0)
        self.outcome.failed += int(final.get(FAILED, 0) or 0)
        self.outcome.warning += int(final.get(WARNING, 0) or 0)
        self.outcome.failed_uids += list(final.get("failed_uids", []))

    # -- C-MOVE ---------------------------------------------------------------------------------

    async def _move(self) -> None:
        receiver = self.r.receiver
        if receiver is None or not receiver.running:
            raise ServiceNotSupported(self.r.pool.name, "C-MOVE needs the gateway's receiver, which is not running")
        expected = {sop for _, sop, _ in self.request.instances} or None
        msg_id = receiver.register(self.delivery.deliver, expected)
        proposal = Proposal(contexts=[(STUDY_ROOT_MOVE, NATIVE)])
        try:
            assoc = await self.r.pool.open_dedicated(proposal)
            try:
                if assoc.context_for(STUDY_ROOT_MOVE) is None:
                    raise ServiceNotSupported(self.r.pool.name, "the PACS did not accept Study Root C-MOVE")
                await self.r.pool.run_sync(self._move_on, assoc, msg_id, receiver.ae_title)
            finally:
                await self.r.pool.close_dedicated(assoc)
            # the final response can overtake the last C-STORE still being handed on
            deadline = time.monotonic() + 5
            while self.outcome.delivered < self.outcome.completed and time.monotonic() < deadline \
                    and not self.outcome.consumer_gone:
                await anyio.sleep(0.01)
        finally:
            receiver.unregister(msg_id)

    def _move_on(self, assoc: Association, msg_id: int, destination: str) -> None:
        with self._lock:
            self._active = (assoc, STUDY_ROOT_MOVE, msg_id)
        try:
            final = None
            seen = -1

            def progressing() -> bool:
                """C-MOVE pending responses are optional: silence is fine while instances arrive."""
                nonlocal seen
                moved, seen = self.outcome.delivered != seen, self.outcome.delivered
                return moved

            for response in assoc.move(self.request.identifier(), STUDY_ROOT_MOVE, msg_id, destination,
                                       on_idle=progressing):
                final = response
            assert final is not None
            self._count(final)
            status = int(final.get(STATUS, 0xFFFF))
            if _is_failure(status) and self.outcome.delivered == 0 and status != CANCELLED:
                raise DimseStatusError(self.r.pool.name, f"C-MOVE failed with status 0x{status:04X}", status=status)
        finally:
            with self._lock:
                self._active = None


class _FallBack(Exception):
    def __init__(self, error: DimseError) -> None:
        super().__init__(error.message)
        self.error = error


def _is_failure(status: int) -> bool:
    return not (status == SUCCESS or 0xB000 <= status <= 0xBFFF or status in (0xFF00, 0xFF01))
