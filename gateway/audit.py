"""The audit log: one JSON line for every request to a DICOMweb or WADO-URI route, kept apart from
the application log.

The application log carries no patient data; this log is where it goes: who (the token's ``sub``,
the API key's name, ``anonymous`` with authentication off, null when no valid credential came), from
where (the client's address, through trusted proxies), which node, route and UIDs (study, series,
instance from the URL; the instances a handler notes with ``note_instances``), the query string
(``audit.include_query``), and how it ended (status, bytes, duration, outcome). Refused requests
(401, 403) are recorded as well.

Records leave through a queue: the request only enqueues, a listener thread writes them to
``audit.path`` (``-`` is standard output; a file is reopened when logrotate moves it) and, when
``audit.syslog_host`` is set, as RFC 5424 syslog messages over TLS (RFC 5425 octet counting), the
transport of IHE ATNA audit repositories. Records the queue cannot take (it holds ``QUEUE_SIZE``)
are counted and reported in the application log, without their content.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import logging.handlers
import os
import queue
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import IDENTITY_KEY, Identity, route_node, route_path
from .config import AuditSettings, Settings
from .dicomweb.urls import _networks
from .http_metrics import request_route

log = logging.getLogger("gateway.audit")  # the application log's voice about the audit log: never a record

NOTES_KEY = "audit_notes"
QUEUE_SIZE = 10000
MAX_NOTED = 10000  # instances listed in one record; more are counted in instances_not_listed
SYSLOG_FACILITY = 10  # security/authorization messages (authpriv), as IHE ATNA uses
SYSLOG_MSGID = "dicomweb-audit"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PATH_UIDS = (("study", re.compile(r"/studies/([^/]+)")), ("series", re.compile(r"/series/([^/]+)")),
              ("instance", re.compile(r"/instances/([^/]+)")))
_WADO_URI_UIDS = (("study", "studyUID"), ("series", "seriesUID"), ("instance", "objectUID"))


# ------------------------------------------------------------------------------------------------
# What handlers add to the record


@dataclass
class _Notes:
    instances: list[str] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)
    not_listed: int = 0
    _seen: set[str] = field(default_factory=set)

    def add(self, uids: Iterable[str], studies: Iterable[str]) -> None:
        for uid in uids:
            if uid and uid not in self._seen:
                self._seen.add(uid)
                if len(self.instances) < MAX_NOTED:
                    self.instances.append(uid)
                else:
                    self.not_listed += 1
        for study in studies:
            if study and study not in self.studies and len(self.studies) < MAX_NOTED:
                self.studies.append(study)


def note_instances(target: Any, uids: Iterable[str], *, studies: Iterable[str] = ()) -> None:
    """Add the SOP Instance UIDs a request sent or stored (and, for a store, their studies) to its
    audit record. ``target`` is the Request or its ASGI scope; without an audit record (audit off,
    a route that is not audited), nothing happens."""
    scope = getattr(target, "scope", target)
    notes = scope.get("state", {}).get(NOTES_KEY) if isinstance(scope, dict) else None
    if isinstance(notes, _Notes):
        notes.add(uids, studies)


# ------------------------------------------------------------------------------------------------
# Where records go


class _SafeErrors:
    """logging's own handleError prints the record (patient data) to stderr: say only what failed."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        exc = sys.exc_info()[1]
        log.error("audit record not written by %s: %s", type(self).__name__, type(exc).__name__ if exc else "?")


class _StreamHandler(_SafeErrors, logging.StreamHandler):  # type: ignore[type-arg]
    pass


class _FileHandler(_SafeErrors, logging.handlers.WatchedFileHandler):
    pass


class TlsSyslogHandler(_SafeErrors, logging.Handler):
    """RFC 5424 messages over TLS, framed by octet counting (RFC 5425: ``<length> <message>``).
    The MSG is the record's JSON in ASCII (so no BOM is needed); structured data is nil. The
    connection is opened on first use and once more when a send fails; when that fails too, records
    are dropped (the file still has them) for ``RETRY_AFTER`` seconds before the next attempt."""

    RETRY_AFTER = 5.0

    def __init__(self, settings: AuditSettings, timeout: float = 10.0) -> None:
        super().__init__()
        self.host, self.port, self.timeout = settings.syslog_host, settings.syslog_port, timeout
        self.context = ssl.create_default_context(cafile=settings.syslog_ca_file or None)
        if settings.syslog_cert_file:
            self.context.load_cert_chain(settings.syslog_cert_file, settings.syslog_key_file)
        self.hostname = _header_field(socket.gethostname(), 255)
        self.procid = str(os.getpid())
        self.sock: ssl.SSLSocket | None = None
        self._retry_at = 0.0
        self.dropped = 0

    def frame(self, record: logging.LogRecord) -> bytes:
        audit: dict[str, Any] = getattr(record, "audit")
        severity = 5 if audit.get("outcome") == "ok" else 4  # notice, warning
        message = " ".join((
            f"<{SYSLOG_FACILITY * 8 + severity}>1", audit["time"], self.hostname, "dicomweb-gateway", self.procid,
            SYSLOG_MSGID, "-", json.dumps(audit, ensure_ascii=True, separators=(",", ":")),
        )).encode("ascii")
        return str(len(message)).encode("ascii") + b" " + message

    def emit(self, record: logging.LogRecord) -> None:
        if self.sock is None and time.monotonic() < self._retry_at:
            self.dropped += 1
            return
        try:
            frame = self.frame(record)
            for attempt in (1, 2):
                try:
                    if self.sock is None:
                        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
                        self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
                    self.sock.sendall(frame)
                    return
                except OSError:
                    self._drop_connection()
                    if attempt == 2:
                        self._retry_at = time.monotonic() + self.RETRY_AFTER
                        raise
        except Exception:
            self.dropped += 1
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        exc = sys.exc_info()[1]
        log.error("audit records not delivered to syslog at %s:%d (%s); %d dropped so far, next attempt in %g s",
                  self.host, self.port, type(exc).__name__ if exc else "?", self.dropped, self.RETRY_AFTER)

    def _drop_connection(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def close(self) -> None:
        self._drop_connection()
        super().close()


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or the nil value."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


class _JsonLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(getattr(record, "audit"), ensure_ascii=False, separators=(",", ":"))


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks the event loop: a full queue drops the record and counts it."""

    def __init__(self, q: queue.Queue[Any], output: str) -> None:
        super().__init__(q)
        self.output = output
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by each handler in the listener thread

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit queue of %s full: %d record(s) dropped so far", self.output, self.dropped)


class AuditLog:
    """The audit records' way out: a logger of its own (not under the root logger, so nothing
    reaches the application log) and, per output, a bounded queue and a writer thread, so a syslog
    server that is down never holds up the file."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        output: logging.Handler
        if settings.path == "-":
            output = _StreamHandler(sys.stdout)
        else:
            output = _FileHandler(settings.path, encoding="utf-8")
        output.setFormatter(_JsonLine())
        self.handlers: list[logging.Handler] = [output]
        if settings.syslog_host:
            self.handlers.append(TlsSyslogHandler(settings))
        self._logger = logging.Logger("gateway.audit.records", logging.INFO)
        self._logger.propagate = False
        self._queue_handlers: list[_DroppingQueueHandler] = []
        self._listeners: list[logging.handlers.QueueListener] = []
        for handler in self.handlers:
            q: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
            queue_handler = _DroppingQueueHandler(q, type(handler).__name__)
            self._logger.addHandler(queue_handler)
            self._queue_handlers.append(queue_handler)
            self._listeners.append(logging.handlers.QueueListener(q, handler, respect_handler_level=False))
        self._lock = threading.Lock()
        self._running = False

    @property
    def dropped(self) -> int:
        return sum(h.dropped for h in self._queue_handlers)

    def start(self) -> None:
        with self._lock:
            if not self._running:
                for listener in self._listeners:
                    listener.start()
                self._running = True

    def write(self, record: dict[str, Any]) -> None:
        self.start()
        level = logging.INFO if record.get("outcome") == "ok" else logging.WARNING
        self._logger.log(level, "audit", extra={"audit": record})

    def close(self) -> None:
        """Write what is queued, then close the outputs."""
        with self._lock:
            if self._running:
                for listener in self._listeners:
                    listener.stop()
                self._running = False
        for handler in self.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.flush()
            else:
                handler.close()


# ------------------------------------------------------------------------------------------------
# The record of one request


def _address(value: str) -> str:
    """``"[2001:db8::1]:4711"`` or ``192.0.2.1:80`` -> the bare address; anything else as it is."""
    value = value.strip().strip('"')
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":")[0]
    return value


def _trusted(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(scope: Scope, trusted_proxies: tuple[str, ...]) -> str:
    """The real client: the peer, or, when the peer is a trusted proxy, the last address before the
    trusted ones in ``Forwarded`` (for=) or ``X-Forwarded-For``."""
    peer = scope["client"][0] if scope.get("client") else "-"
    networks = _networks(trusted_proxies)
    if not networks or not _trusted(peer, networks):
        return peer
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in (b"forwarded", b"x-forwarded-for"):
            key = name.decode("latin-1")
            headers[key] = (headers[key] + "," if key in headers else "") + value.decode("latin-1")
    chain: list[str] = []
    if "forwarded" in headers:
        for element in headers["forwarded"].split(","):
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                if key.lower() == "for" and value:
                    chain.append(_address(value))
    elif "x-forwarded-for" in headers:
        chain = [_address(v) for v in headers["x-forwarded-for"].split(",") if v.strip()]
    for address in reversed(chain):
        if not _trusted(address, networks):
            return address
    return chain[0] if chain else peer


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def _uids(path: str, scope: Scope) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, pattern in _PATH_UIDS:
        match = pattern.search(path)
        out[key] = match.group(1) if match and _UID_RE.match(match.group(1)) and len(match.group(1)) <= 64 else None
    if path.endswith("/wado"):  # WADO-URI names them in the query
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        for key, parameter in _WADO_URI_UIDS:
            value = query.get(parameter, "")
            if _UID_RE.match(value) and len(value) <= 64:
                out[key] = value
    return out


def _outcome(status: int, started: bool, failed: bool) -> str:
    if failed:
        return "aborted" if started else "error"
    if status in (401, 403):
        return "denied"
    return "ok" if status < 400 else "failed"


class AuditMiddleware:
    """Writes the audit record of each request to a DICOMweb or WADO-URI route, after its response
    ended; sits outside AuthMiddleware, so refusals are recorded too. Owns the AuditLog: opened when
    the middleware is built (at start-up), closed when the lifespan ends."""

    def __init__(self, app: ASGIApp, settings: Settings, sink: AuditLog | None = None) -> None:
        self.app = app
        self.settings = settings
        self.default_node = settings.default_node.name
        self.sink = sink
        if sink is None and settings.audit.enabled:
            self.sink = AuditLog(settings.audit)
            self.sink.start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.sink is None or scope["type"] not in ("http", "lifespan"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                self.sink.close()
            return
        path = route_path(scope)
        node = route_node(path, self.default_node)
        if node is None:
            await self.app(scope, receive, send)
            return
        notes = _Notes()
        state = scope.setdefault("state", {})
        state[NOTES_KEY] = notes
        route = request_route(scope)  # the metrics' meter may have worked it out already
        started_at, started = time.time(), time.perf_counter()
        status = 0
        sent = received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        failed = False
        try:
            await self.app(scope, counting_receive, counting_send)
        except BaseException:
            failed = True
            raise
        finally:
            identity = state.get(IDENTITY_KEY)
            record: dict[str, Any] = {
                "time": _rfc3339(started_at),
                "request_id": state.get("request_id", "-"),
                "identity": identity.name if isinstance(identity, Identity) else None,
                "auth": identity.kind if isinstance(identity, Identity) else "none",
                "client": client_address(scope, self.settings.server.trusted_proxies),
                "node": node,
                "method": scope["method"],
                "route": route,
                **_uids(path, scope),
            }
            if isinstance(identity, Identity) and identity.client_id:
                record["client_id"] = identity.client_id
            query = scope.get("query_string", b"")
            if self.settings.audit.include_query and query:
                record["query"] = query.decode("latin-1")
            if notes.instances:
                record["instances"] = notes.instances
            if notes.not_listed:
                record["instances_not_listed"] = notes.not_listed
            if notes.studies:
                record["studies"] = notes.studies
            record.update(
                status=status or 500,  # nothing sent: RequestContextMiddleware answers 500
                bytes=sent,
                bytes_received=received,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                outcome=_outcome(status or 500, bool(status), failed),
            )
            self.sink.write(record)
