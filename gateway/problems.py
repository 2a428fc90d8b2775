"""The one table from failures to HTTP status and JSON body.

Bad input and PACS failures become a JSON body ``{"error": ..., "message": ..., "requestId": ...}``
with the right status. Anything else is a bug: 500 with the request ID and no traceback, never
dressed up as a 400 or a 502.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from starlette.responses import Response

from gateway.dimse.errors import (
    AssociationRejected,
    BreakerOpen,
    ConnectionLost,
    DimseError,
    DimseStatusError,
    DimseTimeout,
    NodeUnreachable,
    PoolExhausted,
    ServiceNotSupported,
    TlsFailure,
)

log = logging.getLogger("gateway.http")


@dataclass
class HttpProblem(Exception):
    """An answer that is not a success: ``status``, a machine-readable ``error`` and a sentence."""

    status: int
    error: str
    message: str
    parameter: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.message}"


def bad_request(message: str, parameter: str | None = None) -> HttpProblem:
    return HttpProblem(400, "bad-request", message, parameter)


def not_found(message: str) -> HttpProblem:
    return HttpProblem(404, "not-found", message)


def not_acceptable(message: str) -> HttpProblem:
    return HttpProblem(406, "not-acceptable", message)


def from_dimse(exc: DimseError) -> HttpProblem:
    """DIMSE outcome -> HTTP, per the gateway's policy (conformance statement, 'Status codes')."""
    where = f"node {exc.node!r}: {exc.message}"
    log.warning("%s: %s", type(exc).__name__, where)
    if isinstance(exc, PoolExhausted):
        return HttpProblem(503, "pacs-busy", where, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, BreakerOpen):
        return HttpProblem(503, "pacs-unavailable", where, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, AssociationRejected):
        if exc.transient:
            return HttpProblem(503, "pacs-busy", where, headers={"Retry-After": "5"})
        return HttpProblem(502, "pacs-rejected", where)
    if isinstance(exc, DimseTimeout):
        return HttpProblem(504, "pacs-timeout", where)
    if isinstance(exc, NodeUnreachable):
        return HttpProblem(502, "pacs-unreachable", where)
    if isinstance(exc, TlsFailure):
        return HttpProblem(502, "pacs-tls-failure", where)
    if isinstance(exc, ConnectionLost):
        return HttpProblem(502, "pacs-connection-lost", where)
    if isinstance(exc, ServiceNotSupported):
        return HttpProblem(502, "pacs-service-not-supported", where)
    if isinstance(exc, DimseStatusError):
        if exc.status in (0xA700, 0xA701, 0xA702):
            return HttpProblem(503, "pacs-out-of-resources", where, headers={"Retry-After": "5"})
        if exc.status == 0x0124:
            return HttpProblem(403, "pacs-not-authorized", where)
        return HttpProblem(502, "pacs-failure", where)
    raise exc  # an unclassified DimseError is a bug in the gateway: let it become a 500


def problem_response(problem: HttpProblem, request_id: str) -> Response:
    body = {"error": problem.error, "message": problem.message, "requestId": request_id}
    if problem.parameter:
        body["parameter"] = problem.parameter
    return Response(
        json.dumps(body, ensure_ascii=False).encode(),
        status_code=problem.status,
        media_type="application/json",
        headers=problem.headers,
    )


def internal_error_response(request_id: str) -> Response:
    body = {"error": "internal-error", "message": "The gateway failed unexpectedly; the request ID identifies the log entry.", "requestId": request_id}
    return Response(json.dumps(body).encode(), status_code=500, media_type="application/json")
