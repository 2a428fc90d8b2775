"""Admission control, request-head limits and graceful shutdown: what the gateway takes on at all.

Budgets, global to the process (``[limits]``; a budget of 0 is no limit). A DICOMweb request past
one of them gets 503 + Retry-After at once, naming the budget, instead of slowing every request
already in flight:

- ``max_inflight_retrieves``: WADO-RS and WADO-URI GETs (studies, series, instances, and every
  other retrieve route: metadata, frames, rendered, thumbnail, bulk data);
- ``max_inflight_searches``: QIDO-RS searches;
- ``max_buffer_mb``: the memory requests may buffer. A retrieve counts its hand-off budget
  (gateway/dimse/retrieve.py, 16 MB); a STOW-RS request the smaller of its Content-Length and
  ``(stow.lanes + 1) × stow.max_part_mb`` (all of it without a Content-Length). A request that
  counts more than the whole budget is admitted only while no other request holds any of it;
- ``max_threads``: the DIMSE worker threads requests hold at once: a search counts 1, a retrieve
  2 (the C-GET or C-MOVE and the instance listing beside it), a STOW-RS request ``stow.lanes``.

Per client, with ``rate_limit_per_client`` > 0: a token bucket of that many requests per second and
``rate_limit_burst`` in reserve; past it 429 + Retry-After. The client is the authenticated
identity when there is one (gateway/auth.py puts it into ``scope["state"]``), else the peer address,
or the address a trusted proxy (``server.trusted_proxies``) forwarded in ``Forwarded`` or
``X-Forwarded-For``. ``/health``, ``/ready``, ``/status``, ``/metrics`` and ``/openapi.json`` are
never limited.

The request head is limited before anything is routed (``LimitedHttpToolsProtocol``): a request
target longer than ``max_url_bytes`` gets 414, header fields over ``max_header_bytes`` 431, a head
that does not arrive within ``header_timeout`` 408, a head that cannot be parsed 400; each a JSON
problem with a request ID, on a connection that is then closed.

Shutdown (``GracefulServer``): the first SIGTERM or SIGINT starts a drain. ``/ready`` answers 503 at
once, so a load balancer stops sending; new DICOMweb requests get 503 ``shutting-down`` with
``Connection: close``; requests in flight, streams included, may finish for ``shutdown_grace``
seconds. Then whatever is still running is cut (a started response is aborted, never ended so that
it looks complete), associations still held are aborted, and the process exits. A second signal cuts
at once.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import anyio
import httptools
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .auth import route_path
from .config import LimitsSettings, Settings
from .dicomweb.urls import _networks
from .dimse.retrieve import HANDOFF_BUDGET
from .middleware import StreamAborted, request_id_var
from .problems import HttpProblem, problem_response

log = logging.getLogger("gateway.admission")

MB = 1_000_000
RETRY_AFTER_BUSY = 2  # seconds, for a budget: requests in flight end within seconds
RETRY_AFTER_SHUTDOWN = 5
MAX_CLIENTS = 10_000  # rate-limit buckets kept; the fullest (idlest) go first
CUT_MARGIN = 3.0  # seconds for cut requests and their associations to wind down before abort
SHUTDOWN_MARGIN = 3  # uvicorn's own wait for connections after the drain (timeout_graceful_shutdown)
LINGER = 2.0  # seconds a refused connection is read (and discarded) so the client sees the answer

SEARCH, RETRIEVE, STORE = "search", "retrieve", "store"

_DICOMWEB_RE = re.compile(r"^(?:/nodes/[^/]+)?/(?:dicom-web(?=/|$)(?P<rest>.*)|wado/?$)")
_SEARCH_RE = re.compile(r"^/(?:studies|series|instances|studies/[^/]+/(?:series|instances)"
                        r"|studies/[^/]+/series/[^/]+/instances)/?$")


# ------------------------------------------------------------------------------------------------
# Which requests count against what


def is_dicomweb(path: str) -> bool:
    """A DICOMweb or WADO-URI route, on the default node or a named one."""
    return _DICOMWEB_RE.match(path) is not None


def classify(method: str, path: str) -> str | None:
    """``search``, ``retrieve``, ``store`` or None (not budgeted)."""
    match = _DICOMWEB_RE.match(path)
    if match is None:
        return None
    if method in ("GET", "HEAD"):
        rest = match.group("rest")
        if rest is not None and _SEARCH_RE.match(rest):
            return SEARCH
        return RETRIEVE
    if method == "POST" and match.group("rest") is not None:
        return STORE
    return None


@dataclass(frozen=True)
class Ticket:
    """What one admitted request holds until its response has ended."""

    kind: str
    threads: int
    buffer: int


# ------------------------------------------------------------------------------------------------
# Per-client rate limit


class RateLimiter:
    """Token buckets per client: ``rate`` requests per second, ``burst`` in reserve."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 when the request may go; otherwise the seconds until it could."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)  # most recently seen last
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)  # the least recently seen: refilled longest
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a forwarding header's element: ``1.2.3.4``, ``1.2.3.4:80``,
    ``"[2001:db8::1]:4711"``, ``2001:db8::1``; None for ``unknown`` or an obfuscated name."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forwarded_chain(headers: dict[bytes, bytes]) -> list[str]:
    """The addresses the proxies reported, nearest the client first: RFC 7239 ``Forwarded``
    (``for=``) when present, else ``X-Forwarded-For``."""
    forwarded = headers.get(b"forwarded", b"").decode("latin-1")
    if forwarded:
        out = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                if key.lower() == "for" and value:
                    out.append(value)
        return out
    return [a for a in headers.get(b"x-forwarded-for", b"").decode("latin-1").split(",") if a.strip()]


def client_key(scope: Scope, trusted_proxies: tuple[str, ...]) -> str:
    """Who a request counts against: the authenticated identity, or the client's address."""
    identity = (scope.get("state") or {}).get("identity")
    kind = getattr(identity, "kind", None)
    if identity is not None and kind not in (None, "off"):
        return f"{kind}:{getattr(identity, 'name', identity)}"
    peer = scope.get("client")
    host = peer[0] if peer else ""
    if not trusted_proxies or not host:
        return host or "-"
    networks = _networks(trusted_proxies)
    current = _address(host)
    if current is None or not any(current in net for net in networks):
        return host
    # walk back from the nearest proxy: the first address that is not a trusted proxy is the client
    for element in reversed(_forwarded_chain(dict(scope["headers"]))):
        address = _address(element)
        if address is None:
            return host  # a proxy that hides the client: count it as the proxy
        if not any(address in net for net in networks):
            return str(address)
        current = address
    return str(current)


# ------------------------------------------------------------------------------------------------
# The controller: budgets, the drain


class AdmissionController:
    """Budgets and the drain, for one process. Used from the event loop only."""

    def __init__(self, settings: Settings) -> None:
        lim = settings.limits
        self.limits = lim
        self.trusted_proxies = settings.server.trusted_proxies
        self.store_bound = int((settings.stow.lanes + 1) * settings.stow.max_part_mb * MB)
        self.store_threads = settings.stow.lanes
        self.buffer_budget = int(lim.max_buffer_mb * MB)
        self.rate = RateLimiter(lim.rate_limit_per_client, lim.rate_limit_burst) if lim.rate_limit_per_client else None
        self.counts = {SEARCH: 0, RETRIEVE: 0, STORE: 0}
        self.threads = 0
        self.buffer = 0
        self.in_flight = 0  # every HTTP request being answered, for the drain
        self.draining = False
        self._scopes: set[anyio.CancelScope] = set()

    def _cost(self, kind: str, headers: dict[bytes, bytes]) -> Ticket:
        if kind == SEARCH:
            return Ticket(kind, 1, 0)
        if kind == RETRIEVE:
            return Ticket(kind, 2, HANDOFF_BUDGET)
        try:
            length = int(headers.get(b"content-length", b""))
        except ValueError:
            length = self.store_bound
        return Ticket(kind, self.store_threads, max(0, min(length, self.store_bound)))

    def admit(self, kind: str, headers: dict[bytes, bytes]) -> Ticket | HttpProblem:
        """Reserve what a request of ``kind`` holds, or the 503 that says which budget is spent."""
        ticket = self._cost(kind, headers)
        lim = self.limits
        cap = {SEARCH: lim.max_inflight_searches, RETRIEVE: lim.max_inflight_retrieves, STORE: 0}[kind]
        if cap and self.counts[kind] >= cap:
            setting = "max_inflight_searches" if kind == SEARCH else "max_inflight_retrieves"
            noun = "searches" if kind == SEARCH else "retrieves"
            return _busy(f"the gateway is answering its limit of {cap} {noun} at once (limits.{setting})")
        buffer = min(ticket.buffer, self.buffer_budget)
        if self.buffer_budget and self.buffer + buffer > self.buffer_budget:
            return _busy(f"the memory requests may buffer is in use ({self.buffer / MB:.0f} of "
                         f"{self.buffer_budget / MB:.0f} MB; limits.max_buffer_mb)")
        if lim.max_threads and self.threads + ticket.threads > lim.max_threads and self.threads:
            return _busy(f"the DIMSE threads requests may hold are in use ({self.threads} of {lim.max_threads}; "
                         "limits.max_threads)")
        ticket = Ticket(kind, ticket.threads, buffer if self.buffer_budget else 0)
        self.counts[kind] += 1
        self.threads += ticket.threads
        self.buffer += ticket.buffer
        return ticket

    def release(self, ticket: Ticket) -> None:
        self.counts[ticket.kind] -= 1
        self.threads -= ticket.threads
        self.buffer -= ticket.buffer

    def start_drain(self) -> None:
        self.draining = True

    def cut_all(self) -> int:
        """Cancel every request in flight (the shutdown grace is over); how many there were."""
        scopes = list(self._scopes)
        for scope in scopes:
            scope.cancel()
        return len(scopes)


def _busy(message: str) -> HttpProblem:
    return HttpProblem(503, "gateway-busy", message + "; try again shortly",
                       headers={"Retry-After": str(RETRY_AFTER_BUSY)})


def _shutting_down() -> HttpProblem:
    return HttpProblem(503, "shutting-down", "the gateway is shutting down; send the request again (to another "
                       "instance)", headers={"Retry-After": str(RETRY_AFTER_SHUTDOWN), "Connection": "close"})


class AdmissionMiddleware:
    """Inside the request context (request ID, access log) and authentication: the drain, the
    per-client rate limit, then the budgets; the request runs in a cancel scope the shutdown can
    cut."""

    def __init__(self, app: ASGIApp, controller: AdmissionController) -> None:
        self.app = app
        self.controller = controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctl = self.controller
        path = route_path(scope)
        dicomweb = is_dicomweb(path)
        if ctl.draining and path == "/ready":
            response = JSONResponse({"status": "not-ready", "reasons": ["the gateway is shutting down"]},
                                    status_code=503)
            await response(scope, receive, send)
            return
        if ctl.draining and dicomweb:
            await problem_response(_shutting_down(), request_id_var.get())(scope, receive, send)
            return
        if dicomweb and ctl.rate is not None:
            wait = ctl.rate.take(client_key(scope, ctl.trusted_proxies))
            if wait > 0:
                problem = HttpProblem(429, "rate-limited",
                                      f"more than {ctl.limits.rate_limit_per_client:g} request(s) per second from "
                                      "this client (limits.rate_limit_per_client)",
                                      headers={"Retry-After": str(max(1, math.ceil(wait)))})
                await problem_response(problem, request_id_var.get())(scope, receive, send)
                return
        kind = classify(scope["method"], path)
        ticket: Ticket | None = None
        if kind is not None:
            admitted = ctl.admit(kind, dict(scope["headers"]))
            if isinstance(admitted, HttpProblem):
                log.info("refused a %s: %s", kind, admitted.message)
                await problem_response(admitted, request_id_var.get())(scope, receive, send)
                return
            ticket = admitted
        await self._run(scope, receive, send, ticket)

    async def _run(self, scope: Scope, receive: Receive, send: Send, ticket: Ticket | None) -> None:
        ctl = self.controller
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        ctl.in_flight += 1
        try:
            with anyio.CancelScope() as cancel_scope:
                ctl._scopes.add(cancel_scope)
                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    ctl._scopes.discard(cancel_scope)
        finally:
            ctl.in_flight -= 1
            if ticket is not None:
                ctl.release(ticket)
        if cancel_scope.cancelled_caught:
            if started:
                log.warning("response cut off: the shutdown grace of %g s is over", ctl.limits.shutdown_grace)
                raise StreamAborted("cut off by the shutdown")
            await problem_response(_shutting_down(), request_id_var.get())(scope, receive, send_wrapper)


# ------------------------------------------------------------------------------------------------
# The request head, before anything is routed


class _HeadRefused(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head, which httptools does not
    bound: the request target (414), the header fields (431, counted as received, so a client
    cannot make the gateway hold an endless header), and the time the head takes to arrive (408).
    Every refusal is a JSON problem on a closed connection. ``limits`` is set by
    ``protocol_class``."""

    limits: LimitsSettings = LimitsSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._bytes_before_head = True  # no byte of a request yet on this connection

    # -- connection ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the connection closes, so the client sees the answer
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _HeadRefused):
                self._refuse(refused.status, refused.error, refused.message)
            else:
                log.error("request head callback failed", exc_info=refused)
                self._refuse(400, "bad-request", "the request is not valid HTTP/1.1")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._refuse(400, "bad-request", "the request is not valid HTTP/1.1")
            return
        if self._in_head and self._head_bytes > self._head_allowance():
            self._refuse(431, "header-fields-too-large", self._header_message())

    # -- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._bytes_before_head = False
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            raise _HeadRefused(414, "uri-too-long", f"the request target is longer than {self.limits.max_url_bytes} "
                                                    "bytes (limits.max_url_bytes)")

    def on_headers_complete(self) -> None:
        size = sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            raise _HeadRefused(431, "header-fields-too-large", self._header_message())
        self._in_head = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # whatever comes next is the head of the next request
        self._head_bytes = 0

    # -- limits -------------------------------------------------------------------------------------

    def _head_allowance(self) -> int:
        """Bytes a head may take on the wire before it is complete: target, fields, the request line
        and line ends around them."""
        return self.limits.max_url_bytes + self.limits.max_header_bytes + 4096

    def _header_message(self) -> str:
        return f"the header fields are larger than {self.limits.max_header_bytes} bytes (limits.max_header_bytes)"

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head behind a response under way: judge it once that is done
            return
        if self._bytes_before_head:
            self.transport.close()  # a connection that never sent a request: nobody to answer
            return
        self._refuse(408, "request-timeout", f"the request head did not arrive within {self.limits.header_timeout:g} "
                                             "s (limits.header_timeout)")

    def _refuse(self, status: int, error: str, message: str) -> None:
        """Answer with a JSON problem and close; the rest of what the client sends is dropped."""
        self._refused = True
        self._disarm_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request while a response is under way: no room to answer
            return
        request_id = uuid.uuid4().hex
        token = request_id_var.set(request_id)  # this connection's callback runs in the loop's context
        try:
            log.warning("request refused before routing: %s %s", status, message)
        finally:
            request_id_var.reset(token)
        body = json.dumps({"error": error, "message": message, "requestId": request_id}).encode()
        phrase = http.HTTPStatus(status).phrase.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"x-request-id: " + request_id.encode() + b"\r\n", b"connection: close\r\n", b"\r\n"]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)


def protocol_class(limits: LimitsSettings) -> type[LimitedHttpToolsProtocol]:
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


# ------------------------------------------------------------------------------------------------
# Serving, and the graceful shutdown


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keywords for the limits: the head-limited protocol, the keep-alive timeout,
    and uvicorn's own (short) wait for connections once the drain is over."""
    return {
        "http": protocol_class(settings.limits),
        "timeout_keep_alive": settings.limits.keepalive_timeout,
        "timeout_graceful_shutdown": SHUTDOWN_MARGIN,
    }


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self._signals = 0
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # In a signal handler: only flags here; the event loop acts on them on its next tick.
        self._captured_signals.append(sig)
        self._signals += 1
        if self._signals >= 3 or self._drain is None and not self.started:
            self.should_exit = True
            if self._signals >= 3:
                self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self._signals and self._drain is None and self.started:
            self._drain = asyncio.get_running_loop().create_task(self._run_drain())
        if self._drain is not None:
            return self._drain.done() or self.force_exit
        return should_exit

    async def _run_drain(self) -> None:
        ctl: AdmissionController = self.app.state.admission
        grace = ctl.limits.shutdown_grace
        loop = asyncio.get_running_loop()
        ctl.start_drain()
        log.info("shutting down: /ready answers 503 and new requests are refused; %d request(s) in flight "
                 "have up to %g s", ctl.in_flight, grace)
        deadline = loop.time() + grace
        while ctl.in_flight and loop.time() < deadline and self._signals < 2:
            await asyncio.sleep(0.05)
        if ctl.in_flight:
            log.warning("shutting down: cutting off %d request(s) still in flight", ctl.cut_all())
            await self._wait(lambda: ctl.in_flight == 0, loop.time() + CUT_MARGIN)
            # a cut response's connection is closing with data its client has not taken: drop it now
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None and transport.is_closing():
                    transport.abort()
        nodes = getattr(self.app.state, "nodes", None)
        if nodes is not None:
            pools = [node.pool for node in nodes.by_name.values()]
            await self._wait(lambda: all(p.in_use == 0 for p in pools), loop.time() + CUT_MARGIN)
            aborted = sum(p.abort_held() for p in pools)
            if aborted:
                log.warning("shutting down: aborted %d association(s) still in use", aborted)
        log.info("shutting down: requests drained")

    @staticmethod
    async def _wait(done: Callable[[], bool], until: float) -> None:
        loop = asyncio.get_running_loop()
        while not done() and loop.time() < until:
            await asyncio.sleep(0.05)

