"""``/ready`` and ``/status``.

- ``/ready``: can this process serve requests? The settings are loaded, every node's pool exists and,
  when the C-MOVE receiver is meant to run, it is bound and accepting. No PACS is contacted, so a PACS
  that is down never takes the gateway out of a load balancer (``/status`` says which one is down).
- ``/status``: for every node, a C-ECHO (all nodes at once), its circuit breaker, what the PACS
  accepted on the last query association, the pool's associations and the last failure. 200 when at
  least one node answered the C-ECHO, 503 when none did.

A C-ECHO result is reused for ``ECHO_TTL`` seconds, unless the node failed since or its breaker
changed state. The C-ECHO runs in the node pool's task group, not in the request: ``/status`` waits
for it at most ``ECHO_WAIT`` seconds and then reports the node as not answering, so it answers
promptly however many nodes are down; the C-ECHO still finishes (within the node's own timeouts)
and its result serves the next call. At most one C-ECHO per node is in flight.

The C-ECHO goes through the node's pool like any request: it reuses an idle association, and it
passes the circuit breaker. While the breaker is open it fails fast without contacting the PACS; once
the cooldown is over it is the probe that closes (or re-opens) the breaker.

Nothing here holds patient data or UIDs: names, addresses, states, counts and error messages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.config import Settings
from gateway.dimse.breaker import BreakerSnapshot
from gateway.dimse.errors import BreakerOpen, DimseError
from gateway.dimse.node import NodeClient, Nodes, wants_receiver
from gateway.dimse.pool import LastError

log = logging.getLogger("gateway.status")

ECHO_TTL = 5.0  # seconds a C-ECHO result is reused
ECHO_WAIT = 2.0  # the longest /status waits for a node's C-ECHO
SUCCESS = 0x0000


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------
# /ready


def not_ready_reasons(settings: Settings | None, nodes: Nodes | None) -> list[str]:
    """Why the gateway cannot serve requests yet (or any more); empty when it can."""
    if settings is None:
        return ["no configuration is loaded"]
    if nodes is None:
        return ["the node pools are not open (the gateway is starting or stopping)"]
    reasons = [f"no pool for node {n.name!r}" for n in settings.nodes if nodes.get(n.name) is None]
    if wants_receiver(settings) and (nodes.receiver is None or not nodes.receiver.running):
        g = settings.gateway
        reasons.append(f"the C-MOVE receiver is not running on {g.move_host}:{g.move_port}")
    return reasons


async def ready_endpoint(request: Request) -> Response:
    state = request.app.state
    reasons = not_ready_reasons(getattr(state, "settings", None), getattr(state, "nodes", None))
    if reasons:
        return JSONResponse({"status": "not-ready", "reasons": reasons}, status_code=503)
    return JSONResponse({"status": "ready"})


# ------------------------------------------------------------------------------------------------
# C-ECHO results


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    result: str  # "ok", or what went wrong
    checked_at: float  # seconds since the epoch
    latency_ms: float | None
    # when it was taken (monotonic), and the node's breaker state and last failure just after: a
    # change in either makes the result stale before ECHO_TTL
    taken: float = 0.0
    breaker_state: str = ""
    last_error: LastError | None = None

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "result": self.result, "checked_at": _iso(self.checked_at),
                "latency_ms": self.latency_ms}


class _Echo:
    """One node's C-ECHO: the last result and the one in flight."""

    def __init__(self) -> None:
        self.last: EchoResult | None = None
        self.done: anyio.Event | None = None  # set while a C-ECHO is in flight


class EchoCache:
    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes
        self._echoes = {name: _Echo() for name in nodes.by_name}

    def _fresh(self, node: NodeClient, result: EchoResult | None) -> bool:
        return (
            result is not None
            and time.monotonic() - result.taken < ECHO_TTL
            and result.breaker_state == node.pool.breaker.state
            and result.last_error is node.pool.last_error
        )

    async def result(self, node: NodeClient) -> EchoResult:
        echo = self._echoes[node.name]
        if self._fresh(node, echo.last):
            assert echo.last is not None
            return echo.last
        if echo.done is None:
            echo.done = anyio.Event()
            node.pool.spawn(self._run, node, echo)
        done = echo.done
        with anyio.move_on_after(ECHO_WAIT):
            await done.wait()
        if done.is_set() and echo.last is not None:
            return echo.last
        return EchoResult(False, f"no C-ECHO answer within {ECHO_WAIT:g} s (still waiting)", time.time(), None)

    async def _run(self, node: NodeClient, echo: _Echo) -> None:
        try:
            echo.last = await _echo(node)
        finally:
            done, echo.done = echo.done, None
            if done is not None:
                done.set()


async def _echo(node: NodeClient) -> EchoResult:
    """One C-ECHO over the node's pool, without retries."""
    pool = node.pool
    checked_at = time.time()
    started = time.perf_counter()
    ok, result = False, ""
    try:
        async with pool.query_association() as pooled:
            status = await pool.run_sync(pooled.assoc.echo, pooled.message_id())
        ok = status == SUCCESS
        result = "ok" if ok else f"the PACS answered C-ECHO with status 0x{status:04X}"
    except BreakerOpen as exc:  # not a new failure: the breaker remembers why it opened
        result = f"not checked: {exc.message}"
    except DimseError as exc:
        pool.note_error(exc)
        result = f"{type(exc).__name__}: {exc.message}"
    except Exception as exc:  # a bug: report it, never let it escape into the pool's task group
        log.exception("C-ECHO for /status failed")
        result = f"internal error: {type(exc).__name__}"
    latency = round((time.perf_counter() - started) * 1000, 1)
    return EchoResult(ok, result, checked_at, latency if ok else None, time.monotonic(), pool.breaker.state,
                      pool.last_error)


def _cache(request: Request, nodes: Nodes) -> EchoCache:
    state = request.app.state
    cache: EchoCache | None = getattr(state, "echo_cache", None)
    if cache is None or cache.nodes is not nodes:
        cache = EchoCache(nodes)
        state.echo_cache = cache
    return cache


# ------------------------------------------------------------------------------------------------
# /status


def _breaker_json(b: BreakerSnapshot) -> dict[str, Any]:
    return {"state": b.state, "consecutive_failures": b.consecutive_failures, "threshold": b.threshold,
            "cooldown": b.cooldown, "retry_after": b.retry_after}


def node_status(node: NodeClient, echo: EchoResult) -> dict[str, Any]:
    s = node.settings
    pool = node.pool
    caps = pool.last_capabilities
    last_error = pool.last_error
    return {
        "name": s.name,
        "ae_title": s.ae_title,
        "host": s.host,
        "port": s.port,
        "default": s.default,
        "retrieve": s.retrieve,
        "echo": echo.as_json(),
        "breaker": _breaker_json(pool.breaker.snapshot()),
        "capabilities": {
            "c_get": s.retrieve in ("get", "get-then-move"),  # configured, not negotiated
            # from the last query association; null until one was opened
            "study_root_find": caps.study_root_find if caps else None,
            "patient_root_find": caps.patient_root_find if caps else None,
            "relational": caps.relational if caps else None,
            "fuzzy": caps.fuzzy if caps else None,
            "peer_max_pdu": caps.peer_max_pdu if caps else None,
        },
        "associations": {"in_use": pool.in_use, "idle": pool.idle_count, "max": pool.max_associations},
        "last_error": {"message": last_error.message, "at": _iso(last_error.at)} if last_error else None,
    }


async def status_endpoint(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    nodes: Nodes | None = getattr(request.app.state, "nodes", None)
    if nodes is None:
        return JSONResponse({"status": "unavailable", "nodes": [], "move_receiver": None}, status_code=503)
    cache = _cache(request, nodes)
    clients = list(nodes.by_name.values())
    results: dict[str, EchoResult] = {}

    async def check(node: NodeClient) -> None:
        results[node.name] = await cache.result(node)

    async with anyio.create_task_group() as tg:
        for node in clients:
            tg.start_soon(check, node)
    answered = sum(1 for r in results.values() if r.ok)
    receiver = nodes.receiver
    body = {
        "status": "ok" if answered == len(clients) else "degraded" if answered else "unavailable",
        "nodes": [node_status(node, results[node.name]) for node in clients],
        "move_receiver": {
            "configured": wants_receiver(settings),
            "running": receiver is not None and receiver.running,
            "host": settings.gateway.move_host,
            "port": receiver.port if receiver is not None else settings.gateway.move_port,
        },
    }
    return JSONResponse(body, status_code=200 if answered else 503)
