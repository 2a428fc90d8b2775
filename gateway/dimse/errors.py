"""What can go wrong talking to a PACS, as exceptions that carry no HTTP meaning.

The HTTP side maps them to statuses in one table (gateway/problems.py).
"""

from __future__ import annotations


class DimseError(Exception):
    """Base class. ``node`` is the configured node name; the message never holds patient data."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


class NodeUnreachable(DimseError):
    """The TCP connection could not be made (refused, reset, no route, name not found)."""


class ConnectionLost(DimseError):
    """The PACS closed or aborted the association while an operation was in progress."""


class TlsFailure(DimseError):
    """DICOM TLS did not come up: the PACS's certificate was not accepted (unknown CA, wrong name,
    expired), the PACS refused ours or wanted one, or one side speaks TLS and the other does not.
    Not retried (a retry fails the same way) and not counted by the circuit breaker: the PACS
    answered, and the cause is configuration, which a breaker cannot fix."""


class AssociationRejected(DimseError):
    """A-ASSOCIATE-RJ. ``transient`` is True for result 2 (rejected-transient)."""

    def __init__(self, node: str, message: str, *, transient: bool) -> None:
        super().__init__(node, message)
        self.transient = transient


class ServiceNotSupported(DimseError):
    """The PACS accepted the association but none of the presentation contexts needed.
    ``rejected`` lists (abstract syntax, A-ASSOCIATE-AC result) when it refused every context."""

    def __init__(self, node: str, message: str, *, rejected: list[tuple[str, int]] | None = None) -> None:
        super().__init__(node, message)
        self.rejected = rejected or []


class DimseTimeout(DimseError):
    """No answer within the configured time. ``phase`` is connect, acse or dimse."""

    def __init__(self, node: str, message: str, *, phase: str) -> None:
        super().__init__(node, message)
        self.phase = phase


class PoolExhausted(DimseError):
    """Every association allowed for the node is busy and none came free within the acquire timeout."""

    def __init__(self, node: str, message: str, *, retry_after: int) -> None:
        super().__init__(node, message)
        self.retry_after = retry_after


class BreakerOpen(DimseError):
    """The node's circuit breaker is open (gateway/dimse/breaker.py): after repeated connection
    failures no association is attempted until ``retry_after`` seconds have passed."""

    def __init__(self, node: str, message: str, *, retry_after: int) -> None:
        super().__init__(node, message)
        self.retry_after = retry_after


class DimseStatusError(DimseError):
    """The PACS answered an operation with a failure status (``status``, e.g. 0xA700 or 0xC000)."""

    def __init__(self, node: str, message: str, *, status: int) -> None:
        super().__init__(node, message)
        self.status = status


# Failures where nothing reached the PACS's query engine: retrying an idempotent operation is safe.
RETRYABLE = (NodeUnreachable, ConnectionLost)
