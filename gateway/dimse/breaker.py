"""A circuit breaker per node: stop knocking on a PACS that does not answer.

States:

- **closed**: associations are opened as usual. Each connection-level failure to open one (see
  ``is_connection_failure``) adds one to a count of consecutive failures; any association that opens
  (or any answer from the PACS, even a rejection) sets it back to 0. At ``threshold`` consecutive
  failures the breaker opens.
- **open**: no association is attempted; every request that needs a new association fails at once
  with ``BreakerOpen`` (503 + Retry-After, the cooldown left). Associations already open and idle
  ones in the pool are still used.
- **half-open**: ``cooldown`` seconds after it opened, the next request that needs a new association
  is let through as the probe (a C-ECHO when it is ``/status`` that asks, otherwise the request's own
  association). While that probe runs, other requests still fail fast. The probe's association opens:
  closed again; it fails: open again, for another cooldown.

The probe is the next request rather than a background C-ECHO: no traffic goes to a PACS nobody
uses, the probe opens the same association a request would, and a monitored node recovers on its
own because ``/status`` echoes every node every few seconds.

A pure state machine: the clock is injectable, nothing here does I/O. The pool calls it from the
event loop; a lock makes it safe from worker threads as well.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import AssociationRejected, BreakerOpen, ConnectionLost, DimseError, DimseTimeout, NodeUnreachable

log = logging.getLogger("gateway.dimse")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
DISABLED = "disabled"


def is_connection_failure(exc: BaseException) -> bool | None:
    """How an exception raised while opening an association counts.

    True: a connection-level failure (counts against the node). False: the PACS answered, even if
    to say no (counts as a success). None: says nothing about the node (a bug, a cancellation).
    """
    if isinstance(exc, BreakerOpen):
        return None
    if isinstance(exc, (NodeUnreachable, ConnectionLost)):
        return True
    if isinstance(exc, DimseTimeout):
        return True if exc.phase in ("connect", "acse") else None
    if isinstance(exc, AssociationRejected):
        return not exc.transient  # rejected-transient: the PACS is there, only busy
    if isinstance(exc, DimseError):
        return False  # no acceptable presentation context, a failure status: the PACS answered
    if isinstance(exc, OSError):
        return True  # a socket error the upper layer did not classify
    return None


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker as ``/status`` shows it."""

    state: str
    consecutive_failures: int
    threshold: int
    cooldown: float
    retry_after: int | None  # seconds until a probe is let through, while open


class CircuitBreaker:
    """One node's breaker. ``threshold`` 0 disables it (failures are still counted, for ``/status``)."""

    def __init__(self, node: str, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    # -- before an attempt ---------------------------------------------------------------------

    def before_attempt(self) -> bool:
        """Call before opening an association. Raises ``BreakerOpen`` when the attempt must not be
        made; returns True when this attempt is the half-open probe (pass that to the ``record_*``
        call that follows)."""
        with self._lock:
            if not self.enabled or self._state == CLOSED:
                return False
            now = self._clock()
            if self._state == OPEN and now - self._opened_at >= self.cooldown:
                self._state = HALF_OPEN
            if self._state == HALF_OPEN and not self._probing:
                self._probing = True
                log.info("node %r: circuit breaker half-open, letting one association attempt through", self.node)
                return True
            retry_after = self._retry_after(now)
            failures = self._failures
        raise BreakerOpen(
            self.node,
            f"the PACS is treated as unavailable after {failures} consecutive connection failures; "
            f"no association is attempted for {retry_after} s",
            retry_after=retry_after,
        )

    # -- after an attempt ----------------------------------------------------------------------

    def record_success(self, probe: bool = False) -> None:
        """An association opened (or the PACS answered the attempt in some other way)."""
        with self._lock:
            was = self._state
            self._failures = 0
            self._state = CLOSED
            self._probing = False
        if was != CLOSED:
            log.warning("node %r: circuit breaker closed, the PACS answers again", self.node)

    def record_failure(self, reason: str = "", probe: bool = False) -> None:
        """A connection-level failure to open an association."""
        with self._lock:
            self._failures += 1
            if probe:
                self._probing = False
            if not self.enabled:
                return
            if (self._state == CLOSED and self._failures >= self.threshold) or (self._state == HALF_OPEN and probe):
                reopened = self._state == HALF_OPEN
                self._state = OPEN
                self._opened_at = self._clock()
                failures = self._failures
            else:
                return
        if reopened:
            log.warning("node %r: circuit breaker probe failed (%s); open for another %g s", self.node, reason,
                        self.cooldown)
        else:
            log.warning("node %r: circuit breaker open after %d consecutive connection failures (last: %s); "
                        "requests fail fast for %g s", self.node, failures, reason, self.cooldown)

    def record_inconclusive(self, probe: bool = False) -> None:
        """The attempt ended in a way that says nothing about the node: free the probe slot, so the
        next attempt probes instead."""
        if probe:
            with self._lock:
                self._probing = False

    def record(self, exc: BaseException, probe: bool = False) -> None:
        """Classify an exception raised while opening an association and record it."""
        verdict = is_connection_failure(exc)
        if verdict is True:
            self.record_failure(getattr(exc, "message", None) or type(exc).__name__, probe)
        elif verdict is False:
            self.record_success(probe)
        else:
            self.record_inconclusive(probe)

    # -- reading -------------------------------------------------------------------------------

    def _retry_after(self, now: float) -> int:
        if self._state == OPEN:
            return max(1, math.ceil(self._opened_at + self.cooldown - now))
        return 1  # half-open, a probe running

    @property
    def state(self) -> str:
        """closed, open, half-open (the cooldown is over: the next attempt probes, or is probing),
        or disabled."""
        return self.snapshot().state

    def snapshot(self) -> BreakerSnapshot:
        with self._lock:
            now = self._clock()
            if not self.enabled:
                state = DISABLED
            elif self._state == OPEN and now - self._opened_at >= self.cooldown:
                state = HALF_OPEN
            else:
                state = self._state
            retry_after = self._retry_after(now) if state == OPEN else None
            return BreakerSnapshot(state, self._failures, self.threshold, self.cooldown, retry_after)
