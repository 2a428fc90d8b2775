"""A per-node pool of associations, shared by every request to that node.

- At most ``max_associations`` are open at once, counted over idle and busy ones, because PACSes
  refuse associations past their own limit.
- A request waits for a free association at most ``acquire_timeout`` and then gets ``PoolExhausted``
  (503 + Retry-After on the web side), never a queue of minutes.
- Query associations (C-ECHO, C-FIND) are kept idle for reuse up to ``idle_timeout``; one that the
  PACS closed is noticed when taken (or when it fails before its first answer) and replaced.
- Every blocking pynetdicom call runs in a worker thread under the node's own CapacityLimiter.
- Work that must outlive the request that started it (draining a cancelled C-FIND, releasing an
  association) runs in the pool's task group, so a client that goes away never leaks a thread or an
  association.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, TypeVar

import anyio
import anyio.abc
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from .errors import PoolExhausted
from .net import GatewayAE, Peer, associate, make_ae

log = logging.getLogger("gateway.dimse")
T = TypeVar("T")

# Extended negotiation bytes for C-FIND (PS3.4 Table C.5-1): relational, combined date-time, fuzzy, timezone.
_FIND_MODELS = (StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind)


@dataclass(frozen=True)
class Capabilities:
    """What the PACS accepted on a query association."""

    study_root_find: bool
    patient_root_find: bool
    relational: bool
    fuzzy: bool
    peer_max_pdu: int


@dataclass
class PooledAssociation:
    assoc: Association
    capabilities: Capabilities
    last_used: float = field(default_factory=time.monotonic)
    next_msg_id: int = 1
    broken: bool = False

    def message_id(self) -> int:
        msg_id = self.next_msg_id
        self.next_msg_id = msg_id % 65535 + 1
        return msg_id

    @property
    def alive(self) -> bool:
        return not self.broken and self.assoc.is_established and not self.assoc.is_aborted


def _query_contexts() -> list[PresentationContext]:
    return [build_context(uid) for uid in (Verification, *_FIND_MODELS)]


def _capabilities(assoc: Association) -> Capabilities:
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    ext = assoc.acceptor.sop_class_extended or {}
    info = ext.get(StudyRootQueryRetrieveInformationModelFind, b"") or b""
    return Capabilities(
        study_root_find=StudyRootQueryRetrieveInformationModelFind in accepted,
        patient_root_find=PatientRootQueryRetrieveInformationModelFind in accepted,
        relational=len(info) > 0 and info[0] == 1,
        fuzzy=len(info) > 2 and info[2] == 1,
        peer_max_pdu=int(assoc.acceptor.maximum_length or 0),
    )


class AssociationPool:
    def __init__(
        self,
        peer: Peer,
        *,
        calling_ae: str,
        max_associations: int,
        acquire_timeout: float,
        idle_timeout: float,
        relational: str,
        fuzzy: bool,
        task_group: anyio.abc.TaskGroup,
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
        self._ae: GatewayAE = make_ae(calling_ae, peer)
        self._slots = anyio.Semaphore(max_associations)
        self._idle: list[PooledAssociation] = []
        # Threads: one per busy association plus one per association being opened or closed.
        self.limiter = anyio.CapacityLimiter(max_associations * 2)
        self.in_use = 0
        self.opened_total = 0
        self.last_capabilities: Capabilities | None = None
        self._closed = False

    # -- running blocking work ------------------------------------------------------------------

    async def run_sync(self, func: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` in the pool's task group, independent of the calling request."""
        self._tg.start_soon(func, *args)

    # -- acquiring --------------------------------------------------------------------------------

    def _ext_neg(self) -> list[SOPClassExtendedNegotiation]:
        if not (self._want_relational or self._want_fuzzy):
            return []
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
        item.service_class_application_information = bytes(
            [int(self._want_relational), 0, int(self._want_fuzzy), 0]
        )
        patient = SOPClassExtendedNegotiation()
        patient.sop_class_uid = PatientRootQueryRetrieveInformationModelFind
        patient.service_class_application_information = item.service_class_application_information
        return [item, patient]

    def _open(self) -> PooledAssociation:
        assoc = associate(self._ae, self.peer, _query_contexts(), self._ext_neg())
        caps = _capabilities(assoc)
        if self._relational_mode != "negotiate":
            # "assume": the PACS answers relational queries without negotiating them (Orthanc does)
            caps = replace(caps, relational=self._relational_mode == "assume")
        self.last_capabilities = caps
        return PooledAssociation(assoc, caps)

    @asynccontextmanager
    async def query_association(self) -> AsyncIterator[PooledAssociation]:
        """Hold a query association for the duration of the block (blocking work goes to threads).

        The association goes back to the idle list afterwards unless it was marked broken.
        """
        pooled = await self.acquire()
        try:
            yield pooled
        except BaseException:
            pooled.broken = pooled.broken or not pooled.alive
            raise
        finally:
            await self.release(pooled)

    async def acquire(self) -> PooledAssociation:
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
        try:
            while self._idle:
                pooled = self._idle.pop()
                if pooled.alive and time.monotonic() - pooled.last_used < self.idle_timeout:
                    return pooled
                self.spawn(self._close, pooled)
            pooled = await self.run_sync(self._open)
            self.opened_total += 1
            return pooled
        except BaseException:
            self.in_use -= 1
            self._slots.release()
            raise

    async def release(self, pooled: PooledAssociation) -> None:
        self.in_use -= 1
        if pooled.alive and not self._closed:
            pooled.last_used = time.monotonic()
            self._idle.append(pooled)
        else:
            self.spawn(self._close, pooled)
        self._slots.release()

    async def _close(self, pooled: PooledAssociation) -> None:
        with anyio.CancelScope(shield=True):
            await self.run_sync(_release_or_abort, pooled.assoc)

    # -- housekeeping -----------------------------------------------------------------------------

    async def reap_idle(self) -> None:
        """Close idle associations before the PACS's own idle timeout closes them under us."""
        now = time.monotonic()
        keep = []
        for pooled in self._idle:
            if pooled.alive and now - pooled.last_used < self.idle_timeout:
                keep.append(pooled)
            else:
                self.spawn(self._close, pooled)
        self._idle = keep

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for pooled in idle:
            await self._close(pooled)


def _release_or_abort(assoc: Association) -> None:
    if assoc.is_established:
        try:
            assoc.release()
            return
        except Exception:  # a PACS that vanished mid-release: abort is all that is left
            log.debug("release failed, aborting", exc_info=True)
    if not assoc.is_aborted:
        assoc.abort()


def open_probe_association(peer: Peer, calling_ae: str, contexts: Sequence[PresentationContext], ext_neg: Sequence[Any]) -> Association:
    """A one-off association outside any pool (``dicomweb-gateway echo``); blocking."""
    return associate(make_ae(calling_ae, peer), peer, contexts, ext_neg)
