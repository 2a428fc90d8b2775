"""Request IDs, the access log, and the last line of defence against unexpected errors.

The access log names the route, never the query string and never the UIDs in the path: those are
patient data and belong to the audit log only.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_metrics import RequestMeter
from .metrics import Metrics
from .problems import internal_error_response

access_log = logging.getLogger("gateway.access")
error_log = logging.getLogger("gateway.error")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_UID_SEGMENT_RE = re.compile(r"/[0-9]+(?:\.[0-9]+)+(?=/|$)")
_NUMBER_LIST_RE = re.compile(r"/frames/[^/]+")


def redact_path(path: str) -> str:
    """``/dicom-web/studies/1.2.3/series`` -> ``/dicom-web/studies/{uid}/series``."""
    return _NUMBER_LIST_RE.sub("/frames/{frames}", _UID_SEGMENT_RE.sub("/{uid}", path))


class StreamAborted(Exception):
    """Raised from a response body that has started, so the server drops the connection and no
    client takes a partial result for a complete one. Logged by whoever raised it."""


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0
        sent_bytes = 0
        meter = RequestMeter(self.metrics, scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                meter.started()
            elif message["type"] == "http.response.body":
                size = len(message.get("body", b""))
                sent_bytes += size
                meter.sent(size)
            await send(message)

        outcome = "ok"
        try:
            await self.app(scope, receive, send_wrapper)
        except StreamAborted:
            outcome = "aborted"
            raise
        except Exception:
            if status:
                outcome = "aborted"
                error_log.exception("unexpected error after the response started (request %s)", request_id)
                raise
            error_log.exception("unexpected error (request %s)", request_id)
            response = internal_error_response(request_id)
            await response(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            access_log.info(
                '%s "%s %s" %s %dB %.1fms %s %s',
                scope.get("client", ("-",))[0] if scope.get("client") else "-",
                scope["method"],
                redact_path(scope["path"]),
                status or "-",
                sent_bytes,
                elapsed * 1000,
                request_id,
                outcome,
            )
            meter.finished(status, elapsed, aborted=outcome == "aborted")
            request_id_var.reset(token)


class DropStreamAborted(logging.Filter):
    """The server logs an exception that ends a response; StreamAborted is a planned end, already
    logged in one line by the code that raised it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not _contains_abort(exc)


def _contains_abort(exc: BaseException, depth: int = 0) -> bool:
    """StreamAborted itself, as the cause or context of ``exc``, or inside an exception group."""
    if isinstance(exc, StreamAborted):
        return True
    if depth > 8:
        return False
    inner = [*getattr(exc, "exceptions", ()), exc.__cause__, exc.__context__]
    return any(e is not None and _contains_abort(e, depth + 1) for e in inner)
