"""C-STORE of a stream of instances to one node, over a few associations in parallel.

A STOW-RS request hands its instances over one by one as their parts complete. A ``StoreSession``
keeps up to ``lanes`` associations for that request, each storing one instance at a time in a
worker thread, so reading the next part from the client overlaps with storing the previous ones.
``submit`` waits while every lane is busy: that is the backpressure which bounds memory to about
``lanes + 1`` instances, whatever the size of the upload.

Presentation contexts come from the instances themselves: for each SOP class seen so far, one
context per transfer syntax an instance arrived in (so the encoded bytes can go out as they are),
plus one with the native syntaxes (Explicit and Implicit VR Little Endian) to fall back to after a
conversion. When an instance brings a SOP class, or a compressed transfer syntax, that a lane's
association did not propose, that lane is released and a new association negotiated with
everything seen so far. A class the PACS rejected is not proposed again within the session.

The data set bytes are sent unchanged when the PACS accepted the instance's transfer syntax.
Otherwise ``convert`` (given by the caller, run in the worker thread) re-encodes them into one of
the syntaxes the PACS accepted for that class, or the instance fails with 0xC122.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.metrics import ERROR, outcome_of, outcome_of_status

from .errors import AssociationRejected, DimseError, PoolExhausted, ServiceNotSupported
from .pool import AssociationPool
from .ul import Association, Proposal

log = logging.getLogger("gateway.dimse")

NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128

# Status codes the gateway itself assigns (PS3.4 Annex B, PS3.18 Annex I)
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def is_stored(status: int) -> bool:
    """A C-STORE status under which the PACS holds the instance: success or a warning."""
    return status == 0x0000 or 0xB000 <= status <= 0xBFFF


class ConversionFailed(Exception):
    """``convert`` could not produce any of the accepted transfer syntaxes; str() says why."""


@dataclass(frozen=True)
class StoreItem:
    """One instance to store: its data set bytes (no File Meta) in ``transfer_syntax``."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class StoreOutcome:
    """The C-STORE status (or the one the gateway assigned) and, for failures, a short reason
    without patient data."""

    status: int
    reason: str = ""
    error: DimseError | None = None  # the association-level error, when that is why it failed


Converter = Callable[[bytes | bytearray | memoryview, str, Sequence[str]], tuple[bytes | bytearray | memoryview, str]]


@dataclass
class _Lane:
    assoc: Association | None = None
    proposed: frozenset[tuple[str, str]] = frozenset()  # (class, syntax) pairs proposed
    next_msg_id: int = 1

    def message_id(self) -> int:
        msg_id = self.next_msg_id
        self.next_msg_id = msg_id % 65535 + 1
        return msg_id


@dataclass
class _Wanted:
    """Every (SOP class, transfer syntax) the session has seen, in order of first sight."""

    syntaxes: dict[str, list[str]] = field(default_factory=dict)
    # classes the PACS refused, with the status their instances get: 0x0122 when it does not
    # support the class, 0xC122 when it refused only the transfer syntaxes proposed for it
    rejected: dict[str, int] = field(default_factory=dict)

    def refuse(self, proposed: frozenset[tuple[str, str]], accepted: set[str], results: list[tuple[str, int]],
               node: str) -> None:
        by_class: dict[str, set[int]] = {}
        for abstract, result in results:
            by_class.setdefault(abstract, set()).add(result)
        for sop_class in {c for c, _ in proposed} - accepted:
            if sop_class in self.rejected:
                continue
            reasons = by_class.get(sop_class, set())
            status = TRANSFER_SYNTAX_NOT_SUPPORTED if reasons == {0x04} else SOP_CLASS_NOT_SUPPORTED
            self.rejected[sop_class] = status
            what = "transfer syntaxes" if status == TRANSFER_SYNTAX_NOT_SUPPORTED else "SOP class"
            log.warning("node %r refused the %s proposed for storage of %s", node, what, sop_class)

    def refusal(self, sop_class: str) -> "StoreOutcome":
        status = self.rejected[sop_class]
        if status == TRANSFER_SYNTAX_NOT_SUPPORTED:
            return StoreOutcome(status, reason=f"the PACS accepts none of the transfer syntaxes the gateway can send "
                                               f"for SOP class {sop_class}")
        return StoreOutcome(status, reason=f"the PACS does not accept SOP class {sop_class}")

    def add(self, sop_class: str, ts: str) -> None:
        seen = self.syntaxes.setdefault(sop_class, [])
        if ts not in NATIVE and ts not in seen:
            seen.append(ts)

    def proposal(self, first: str) -> tuple[Proposal, frozenset[tuple[str, str]]]:
        """Contexts for every class seen (``first`` first, in case they do not all fit)."""
        contexts: list[tuple[str, Sequence[str]]] = []
        proposed: set[tuple[str, str]] = set()
        order = [first] + [c for c in self.syntaxes if c != first]
        for sop_class in order:
            if sop_class in self.rejected and sop_class != first:
                continue
            wanted = [(sop_class, (ts,)) for ts in self.syntaxes[sop_class]] + [(sop_class, NATIVE)]
            if contexts and len(contexts) + len(wanted) > MAX_CONTEXTS:
                break
            contexts += wanted[:MAX_CONTEXTS]
            proposed |= {(sop_class, ts) for _, tss in wanted for ts in tss}
        return Proposal(contexts=contexts), frozenset(proposed)


class StoreSession:
    """Stores one request's instances; use as ``async with StoreSession(...) as session``."""

    def __init__(self, pool: AssociationPool, *, lanes: int, convert: Converter) -> None:
        self.pool = pool
        self.convert = convert
        # never more lanes than the node's association cap: a lane would only wait for a slot
        self._lanes = [_Lane() for _ in range(max(1, min(lanes, pool.max_associations)))]
        self._free = list(self._lanes)
        self._ready = anyio.Condition()
        self._wanted = _Wanted()
        self._tg: anyio.abc.TaskGroup | None = None
        # the first association that could not be opened: later instances fail at once with it
        # instead of each waiting for its own connect timeout
        self.open_error: DimseError | None = None

    async def __aenter__(self) -> "StoreSession":
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        try:
            # stores in flight finish even when the request is cancelled (their DIMSE work is
            # shielded): an instance is either stored or not sent at all
            await self._tg.__aexit__(*exc)
        finally:
            with anyio.CancelScope(shield=True):
                for lane in self._lanes:
                    if lane.assoc is not None:
                        await self.pool.close_dedicated(lane.assoc)
                        lane.assoc = None

    async def submit(self, item: StoreItem, done: Callable[[StoreOutcome], None]) -> None:
        """Start storing ``item`` as soon as a lane is free; ``done`` gets the outcome (on the
        event loop). Returns once the store has started."""
        assert self._tg is not None
        async with self._ready:
            while not self._free:
                await self._ready.wait()
            lane = self._free.pop()
        self._wanted.add(item.sop_class_uid, item.transfer_syntax)
        self.pool.metrics.stow_bytes(len(item.data))
        self._tg.start_soon(self._store, lane, item, done)

    async def _store(self, lane: _Lane, item: StoreItem, done: Callable[[StoreOutcome], None]) -> None:
        started = time.perf_counter()
        try:
            with anyio.CancelScope(shield=True):
                outcome = await self._store_on(lane, item)
            label = _outcome_label(outcome)
        except Exception as exc:  # a bug: never leave the caller without an outcome
            log.exception("storing an instance failed")
            outcome = StoreOutcome(PROCESSING_FAILURE, reason=f"internal error: {type(exc).__name__}")
            label = ERROR
        finally:
            async with self._ready:
                self._free.append(lane)
                self._ready.notify()
        self.pool.metrics.observe("store", label, time.perf_counter() - started)
        done(outcome)

    async def _store_on(self, lane: _Lane, item: StoreItem) -> StoreOutcome:
        sop_class, ts = item.sop_class_uid, item.transfer_syntax
        if sop_class in self._wanted.rejected:
            return self._wanted.refusal(sop_class)
        covered = (sop_class, ts) in lane.proposed
        if lane.assoc is None or not lane.assoc.established or not covered:
            if lane.assoc is not None:
                old, lane.assoc = lane.assoc, None
                await self.pool.close_dedicated(old)
            if self.open_error is not None:
                exc = self.open_error
                return StoreOutcome(_status_for(exc), reason=exc.message, error=exc)
            proposal, proposed = self._wanted.proposal(sop_class)
            try:
                lane.assoc = await self.pool.open_dedicated(proposal)
            except ServiceNotSupported as exc:  # the PACS refused every context proposed
                self._wanted.refuse(proposed, set(), exc.rejected, self.pool.name)
                return self._wanted.refusal(sop_class)
            except DimseError as exc:
                if not _transient(exc):  # a PACS that is down stays down for this request
                    self.open_error = exc
                return StoreOutcome(_status_for(exc), reason=exc.message, error=exc)
            lane.proposed = proposed
            lane.next_msg_id = 1
            self._wanted.refuse(proposed, {cx.abstract_syntax for cx in lane.assoc.accepted},
                                lane.assoc.negotiated.rejected, self.pool.name)
            if sop_class in self._wanted.rejected:
                return self._wanted.refusal(sop_class)
        assoc = lane.assoc
        assert assoc is not None
        return await self.pool.run_sync(self._send, assoc, lane, item)

    def _send(self, assoc: Association, lane: _Lane, item: StoreItem) -> StoreOutcome:
        """In a worker thread: pick the context, convert if needed, C-STORE."""
        sop_class, ts = item.sop_class_uid, item.transfer_syntax
        exact = assoc.context_for(sop_class, ts)
        data = item.data
        if exact is not None:
            context = exact
        else:
            accepted = [cx for cx in assoc.accepted if cx.abstract_syntax == sop_class]
            if not accepted:
                return StoreOutcome(SOP_CLASS_NOT_SUPPORTED, reason=f"the PACS does not accept SOP class {sop_class}")
            targets = list(dict.fromkeys(cx.transfer_syntax for cx in accepted))
            try:
                data, target = self.convert(item.data, ts, targets)
            except ConversionFailed as exc:
                return StoreOutcome(TRANSFER_SYNTAX_NOT_SUPPORTED,
                                    reason=f"the PACS does not accept transfer syntax {ts} and {exc}")
            context = next(cx for cx in accepted if cx.transfer_syntax == target)
        try:
            status, comment = assoc.store(context.context_id, sop_class, item.sop_instance_uid, lane.message_id(),
                                          data)
        except DimseError as exc:
            return StoreOutcome(_status_for(exc), reason=exc.message, error=exc)
        reason = f"the PACS answered 0x{status:04X}" + (f": {comment}" if comment else "")
        return StoreOutcome(status, reason="" if status == 0 else reason)


def _outcome_label(outcome: StoreOutcome) -> str:
    """The metrics outcome of one instance: the association's failure when that is why it
    failed, else from the status (the gateway's own refusals count as failures)."""
    if outcome.error is not None:
        return outcome_of(outcome.error)
    return outcome_of_status(outcome.status)


def _transient(exc: DimseError) -> bool:
    return isinstance(exc, PoolExhausted) or (isinstance(exc, AssociationRejected) and exc.transient)


def _status_for(exc: DimseError) -> int:
    """The FailureReason for an instance the association could not carry."""
    if _transient(exc):
        return OUT_OF_RESOURCES
    return PROCESSING_FAILURE
