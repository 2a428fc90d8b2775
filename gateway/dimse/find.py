"""C-ECHO and C-FIND over pooled associations.

C-FIND is an async iterator: each identifier is handed over as it arrives, through a small bounded
stream, from the worker thread that iterates pynetdicom's response generator. When the consumer stops
early (limit reached, client gone) the worker sends C-CANCEL, drains the responses up to the final
status (PS3.7 9.3.2.3: pending responses may still arrive), and only then returns the association to
the pool. That draining runs in the pool's task group, so the request that stopped does not wait for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from pydicom.dataset import Dataset

from gateway.metrics import outcome_of_status

from .errors import RETRYABLE, ConnectionLost, DimseError, DimseStatusError
from .pool import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, AssociationPool, PooledAssociation

log = logging.getLogger("gateway.dimse")

STUDY_ROOT = STUDY_ROOT_FIND
PATIENT_ROOT = PATIENT_ROOT_FIND

PENDING = (0xFF00, 0xFF01)
CANCELLED = 0xFE00
_BUFFER = 16
_BACKOFF = (0.1, 0.4, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Match:
    """One pending C-FIND response: the identifier and its status (0xFF00, or 0xFF01 when the PACS
    says it did not support some optional keys)."""

    identifier: Dataset
    status: int
    prepared: Any = None  # what the caller's ``prepare`` made of the identifier, in the DIMSE thread


@dataclass(frozen=True)
class _Final:
    status: int


@dataclass(frozen=True)
class _Failed:
    error: DimseError


class _FindJob:
    """One C-FIND on one association, driven from a worker thread."""

    def __init__(
        self, pool: AssociationPool, pooled: PooledAssociation, identifier: Dataset, model: str,
        send: MemoryObjectSendStream[Match | _Final | _Failed], prepare: Callable[[Dataset], Any] | None = None,
    ) -> None:
        self.prepare = prepare
        self.pool = pool
        self.pooled = pooled
        self.identifier = identifier
        self.model = model
        self.send = send
        self.msg_id = pooled.message_id()
        self._lock = threading.Lock()
        self._cancel_wanted = False
        self._cancel_sent = False
        self.finished = False
        self.matches = 0

    def cancel(self) -> None:
        """Ask the PACS to stop. Safe from any thread; sends at most one C-CANCEL, and none once the
        final response has arrived. It writes one small PDU to a socket that is not blocked by
        the worker's read, so it returns at once."""
        with self._lock:
            self._cancel_wanted = True
            if self._cancel_sent or self.finished or not self.pooled.alive:
                return
            self._cancel_sent = True
        try:
            self.pooled.assoc.cancel(self.model, self.msg_id)
        except DimseError:  # the association went away in between; the worker sees that too
            log.debug("C-CANCEL not sent", exc_info=True)

    def _deliver(self, item: Match | _Final | _Failed) -> None:
        if self._cancel_wanted:
            return
        try:
            anyio.from_thread.run(self.send.send, item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.cancel()

    def run(self) -> None:
        """Iterate the responses (blocking). Never raises: failures are delivered as items."""
        try:
            for status, identifier in self.pooled.assoc.find(self.identifier, self.model, self.msg_id):
                if status in PENDING:
                    self.matches += 1
                    if identifier is not None:
                        prepared = self.prepare(identifier) if self.prepare is not None else None
                        self._deliver(Match(identifier, status, prepared))
                    continue
                with self._lock:
                    self.finished = True
                if status in (0x0000, CANCELLED) or 0xB000 <= status <= 0xBFFF:
                    self._deliver(_Final(status))
                else:
                    self._deliver(_Failed(DimseStatusError(
                        self.pool.name, f"the PACS answered C-FIND with status 0x{status:04X}", status=status)))
                return
        except DimseError as exc:
            self._deliver(_Failed(exc))
        except Exception as exc:  # a bug: never leave the consumer waiting, and never reuse the association
            self.pooled.assoc.abort()
            log.exception("C-FIND worker failed")
            self._deliver(_Failed(DimseError(self.pool.name, f"internal error during C-FIND: {type(exc).__name__}")))
        finally:
            with self._lock:
                self.finished = True
            self.send.close()


async def _run_job(pool: AssociationPool, pooled: PooledAssociation, job: _FindJob) -> None:
    try:
        with anyio.CancelScope(shield=True):
            await pool.run_sync(job.run)
    finally:
        await pool.release(pooled)


class FindService:
    """C-ECHO and C-FIND for one node."""

    def __init__(self, pool: AssociationPool, retries: int) -> None:
        self.pool = pool
        self.retries = retries

    async def echo(self) -> int:
        async def attempt() -> int:
            async with self.pool.query_association() as pooled:
                return await self.pool.run_sync(pooled.assoc.echo, pooled.message_id())

        with self.pool.metrics.operation("echo") as op:
            for delay in (*_BACKOFF[: self.retries], None):
                try:
                    status = await attempt()
                    op.outcome = outcome_of_status(status)
                    return status
                except RETRYABLE:
                    if delay is None:
                        raise
                    await anyio.sleep(delay)
        raise AssertionError("unreachable")

    async def find(self, identifier: Dataset, *, model: str = STUDY_ROOT,
                   prepare: Callable[[Dataset], Any] | None = None) -> AsyncIterator[Match]:
        """Yield each match as it arrives; raise a DimseError on failure.

        ``prepare``, if given, runs on each identifier in the DIMSE worker thread, while the next
        response is on its way, and its result rides along as ``Match.prepared``.

        Use with ``contextlib.aclosing`` (or run it to the end): closing the iterator early sends
        C-CANCEL. A failure before the first match is retried with backoff when it is a connection
        failure (a stale pooled association, a PACS restarting).
        """
        with self.pool.metrics.operation("find") as op:
            delays = list(_BACKOFF[: self.retries])
            while True:
                try:
                    pooled = await self.pool.acquire()
                except RETRYABLE:
                    if not delays:
                        raise
                    await anyio.sleep(delays.pop(0))
                    continue
                send, receive = anyio.create_memory_object_stream[Match | _Final | _Failed](_BUFFER)
                job = _FindJob(self.pool, pooled, identifier, model, send, prepare)
                try:
                    self.pool.spawn(_run_job, self.pool, pooled, job)
                except BaseException:
                    await self.pool.release(pooled)
                    raise
                yielded = False
                retry = False
                try:
                    async with receive:
                        async for item in receive:
                            if isinstance(item, Match):
                                yielded = True
                                yield item
                            elif isinstance(item, _Final):
                                op.outcome = outcome_of_status(item.status)
                                return
                            else:
                                if not yielded and delays and isinstance(item.error, RETRYABLE):
                                    retry = True
                                    break
                                raise item.error
                        else:
                            raise ConnectionLost(self.pool.name, "the C-FIND ended without a final status")
                finally:
                    if not job.finished:
                        job.cancel()
                if retry:
                    await anyio.sleep(delays.pop(0))
