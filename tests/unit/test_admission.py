"""Admission control (gateway/admission.py), query guards (gateway/guards.py), the [limits] and guard
settings, and request IDs on threads that are not the request's own. No sockets: the middleware runs
under httpx's ASGI transport."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admission import (
    RETRIEVE,
    SEARCH,
    STORE,
    AdmissionController,
    AdmissionMiddleware,
    RateLimiter,
    Ticket,
    classify,
    client_key,
    is_dicomweb,
)
from gateway.config import ConfigError, LimitsSettings, load_settings
from gateway.dicomweb.query import parse_query
from gateway.dimse.receiver import MoveReceiver
from gateway.dimse.retrieve import HANDOFF_BUDGET
from gateway.dimse.ul import StoreRequest
from gateway.guards import Refusal, check_search, parse_required_keys
from gateway.middleware import RequestContextMiddleware, request_id_var
from gateway.problems import HttpProblem

NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "10.1.2.3", "port": 104}
MB = 1_000_000


pytestmark = pytest.mark.usefixtures("auth_off")


def settings_with(limits: dict[str, Any] | None = None, **sections: Any) -> Any:
    return load_settings(data={"limits": limits or {}, "nodes": [NODE], **sections})


# ------------------------------------------------------------------------------------------------
# Which requests count as what


@pytest.mark.parametrize("method, path, kind", [
    ("GET", "/dicom-web/studies", SEARCH),
    ("GET", "/dicom-web/series", SEARCH),
    ("GET", "/dicom-web/instances", SEARCH),
    ("GET", "/dicom-web/studies/1.2/series", SEARCH),
    ("GET", "/dicom-web/studies/1.2/instances", SEARCH),
    ("GET", "/nodes/pacs/dicom-web/studies/1.2/series/1.3/instances", SEARCH),
    ("HEAD", "/dicom-web/studies", SEARCH),
    ("GET", "/dicom-web/studies/1.2", RETRIEVE),
    ("GET", "/dicom-web/studies/1.2/series/1.3", RETRIEVE),
    ("GET", "/nodes/pacs/dicom-web/studies/1.2/series/1.3/instances/1.4", RETRIEVE),
    ("GET", "/dicom-web/studies/1.2/metadata", RETRIEVE),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1,2", RETRIEVE),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/rendered", RETRIEVE),
    ("GET", "/dicom-web/studies/1.2/series/1.3/thumbnail", RETRIEVE),
    ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/bulkdata/7FE00010", RETRIEVE),
    ("GET", "/wado", RETRIEVE),
    ("GET", "/nodes/pacs/wado", RETRIEVE),
    ("POST", "/dicom-web/studies", STORE),
    ("POST", "/nodes/pacs/dicom-web/studies/1.2", STORE),
    ("DELETE", "/dicom-web/studies/1.2", None),
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/status", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/dicom-webby/studies", None),
    ("GET", "/nodes/pacs/other", None),
])
def test_requests_are_classified_by_route(method: str, path: str, kind: str | None) -> None:
    assert classify(method, path) == kind


def test_only_dicomweb_and_wado_routes_are_rate_limited() -> None:
    assert is_dicomweb("/dicom-web/studies") and is_dicomweb("/nodes/x/dicom-web") and is_dicomweb("/wado")
    for path in ("/health", "/ready", "/status", "/metrics", "/openapi.json", "/"):
        assert not is_dicomweb(path), path


# ------------------------------------------------------------------------------------------------
# Per-client rate limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_the_burst_then_asks_to_wait_until_a_token_is_back() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # every client has a bucket of its own
    clock.now += 0.5  # one token back (the refused request did not spend one)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.now += 60  # refilled, but never past the burst
    assert [limiter.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0] and limiter.take("a") > 0


def test_rate_limiter_default_burst_is_one_second_of_requests() -> None:
    limiter = RateLimiter(rate=0.1, burst=0, clock=Clock())
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(10.0)
    limiter = RateLimiter(rate=5, burst=0, clock=Clock())
    assert [limiter.take("a") for _ in range(5)] == [0.0] * 5 and limiter.take("a") > 0


def test_rate_limiter_keeps_a_bounded_table_dropping_the_least_recently_seen() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock, max_clients=100)
    limiter.take("busy")
    for i in range(500):
        clock.now += 0.001
        limiter.take(f"client-{i}")
        assert len(limiter) <= 100
    # "busy" was dropped long ago: it starts again with a full bucket
    assert limiter.take("busy") == 0.0


def scope_from(client: str, headers: dict[str, str] | None = None, identity: Any = None) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "client": (client, 50000),
                             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
                             "state": {}}
    if identity is not None:
        scope["state"]["identity"] = identity
    return scope


class FakeIdentity:
    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name


def test_client_is_the_peer_address_unless_a_trusted_proxy_forwarded_one() -> None:
    xff = {"X-Forwarded-For": "203.0.113.9"}
    assert client_key(scope_from("198.51.100.7", xff), ()) == "198.51.100.7"  # no proxy trusted
    assert client_key(scope_from("198.51.100.7", xff), ("10.0.0.0/8",)) == "198.51.100.7"  # not from a proxy
    assert client_key(scope_from("10.1.1.1", xff), ("10.0.0.0/8",)) == "203.0.113.9"
    assert client_key(scope_from("10.1.1.1"), ("10.0.0.0/8",)) == "10.1.1.1"  # a proxy that forwarded nothing


def test_a_spoofed_forwarding_entry_before_the_real_client_is_not_believed() -> None:
    # the client sent "X-Forwarded-For: 1.1.1.1" itself; its proxy appended the real address
    scope = scope_from("10.0.0.2", {"X-Forwarded-For": "1.1.1.1, 203.0.113.9, 10.0.0.1"})
    assert client_key(scope, ("10.0.0.0/8",)) == "203.0.113.9"


def test_rfc_7239_forwarded_wins_over_x_forwarded_for_and_takes_ipv6() -> None:
    scope = scope_from("10.0.0.2", {"Forwarded": 'for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.1',
                                    "X-Forwarded-For": "192.0.2.1"})
    assert client_key(scope, ("10.0.0.0/8",)) == "2001:db8:cafe::17"
    hidden = scope_from("10.0.0.2", {"Forwarded": "for=_hidden"})
    assert client_key(hidden, ("10.0.0.0/8",)) == "10.0.0.2"  # obfuscated: counted as the proxy


def test_an_authenticated_identity_is_the_client_wherever_it_comes_from() -> None:
    alice = FakeIdentity("token", "alice")
    assert client_key(scope_from("198.51.100.7", identity=alice), ()) == "token:alice"
    assert client_key(scope_from("198.51.100.8", identity=alice), ()) == "token:alice"
    # authentication off: everyone is "anonymous", so the address decides
    anonymous = FakeIdentity("off", "anonymous")
    assert client_key(scope_from("198.51.100.7", identity=anonymous), ()) == "198.51.100.7"


# ------------------------------------------------------------------------------------------------
# Budgets


def headers(content_length: int | None = None) -> dict[bytes, bytes]:
    return {} if content_length is None else {b"content-length": str(content_length).encode()}


def test_retrieve_budget_refuses_past_the_cap_and_names_it() -> None:
    ctl = AdmissionController(settings_with({"max_inflight_retrieves": 2}))
    first, second = ctl.admit(RETRIEVE, headers()), ctl.admit(RETRIEVE, headers())
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    third = ctl.admit(RETRIEVE, headers())
    assert isinstance(third, HttpProblem)
    assert third.status == 503 and third.error == "gateway-busy" and int(third.headers["Retry-After"]) >= 1
    assert "limits.max_inflight_retrieves" in third.message
    assert isinstance(ctl.admit(SEARCH, headers()), Ticket)  # searches have a budget of their own
    ctl.release(first)
    assert isinstance(ctl.admit(RETRIEVE, headers()), Ticket)


def test_search_budget_is_separate() -> None:
    ctl = AdmissionController(settings_with({"max_inflight_searches": 1}))
    assert isinstance(ctl.admit(SEARCH, headers()), Ticket)
    refused = ctl.admit(SEARCH, headers())
    assert isinstance(refused, HttpProblem) and "limits.max_inflight_searches" in refused.message
    assert isinstance(ctl.admit(RETRIEVE, headers()), Ticket)


def test_buffer_budget_counts_hand_off_budgets_and_store_bodies() -> None:
    budget_mb = 2 * HANDOFF_BUDGET / MB + 1  # two retrieves and 1 MB
    ctl = AdmissionController(settings_with({"max_buffer_mb": budget_mb, "max_inflight_retrieves": 0}))
    retrieves = [ctl.admit(RETRIEVE, headers()) for _ in range(2)]
    assert all(isinstance(t, Ticket) and t.buffer == HANDOFF_BUDGET for t in retrieves)
    refused = ctl.admit(RETRIEVE, headers())
    assert isinstance(refused, HttpProblem) and "limits.max_buffer_mb" in refused.message
    small = ctl.admit(STORE, headers(500_000))
    assert isinstance(small, Ticket) and small.buffer == 500_000
    big = ctl.admit(STORE, headers(900_000))
    assert isinstance(big, HttpProblem) and "limits.max_buffer_mb" in big.message
    for ticket in [*retrieves, small]:
        assert isinstance(ticket, Ticket)
        ctl.release(ticket)
    assert ctl.buffer == 0 and ctl.threads == 0 and all(v == 0 for v in ctl.counts.values())


def test_a_store_without_content_length_counts_its_bound_and_runs_alone_when_that_passes_the_budget() -> None:
    ctl = AdmissionController(settings_with({"max_buffer_mb": 100}, stow={"max_part_mb": 40, "lanes": 2}))
    chunked = ctl.admit(STORE, headers())
    assert isinstance(chunked, Ticket) and chunked.buffer == 100 * MB  # (2 + 1) x 40 MB, capped at the budget
    assert isinstance(ctl.admit(STORE, headers(10)), HttpProblem)
    ctl.release(chunked)
    bounded = ctl.admit(STORE, headers(10**12))  # a Content-Length beyond what is ever held at once
    assert isinstance(bounded, Ticket) and bounded.buffer == 100 * MB


def test_thread_budget_counts_searches_retrieves_and_store_lanes() -> None:
    ctl = AdmissionController(settings_with({"max_threads": 4}, stow={"lanes": 3}))
    retrieve, search = ctl.admit(RETRIEVE, headers()), ctl.admit(SEARCH, headers())
    assert isinstance(retrieve, Ticket) and retrieve.threads == 2
    assert isinstance(search, Ticket) and search.threads == 1
    refused = ctl.admit(STORE, headers(1000))
    assert isinstance(refused, HttpProblem) and "limits.max_threads" in refused.message
    assert isinstance(ctl.admit(SEARCH, headers()), Ticket)
    assert isinstance(ctl.admit(SEARCH, headers()), HttpProblem)


def test_zero_means_no_limit() -> None:
    ctl = AdmissionController(settings_with({"max_inflight_retrieves": 0, "max_inflight_searches": 0,
                                             "max_buffer_mb": 0, "max_threads": 0}))
    for _ in range(1000):
        assert isinstance(ctl.admit(RETRIEVE, headers()), Ticket)
        assert isinstance(ctl.admit(SEARCH, headers()), Ticket)
        assert isinstance(ctl.admit(STORE, headers()), Ticket)


# ------------------------------------------------------------------------------------------------
# The middleware, in process


async def search_endpoint(request: Request) -> Response:
    return JSONResponse([])


async def plain(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def small_app(settings: Any) -> tuple[Starlette, AdmissionController]:
    ctl = AdmissionController(settings)
    app = Starlette(
        routes=[Route("/dicom-web/studies", search_endpoint), Route("/health", plain), Route("/ready", plain),
                Route("/metrics", plain)],
        middleware=[Middleware(RequestContextMiddleware), Middleware(AdmissionMiddleware, controller=ctl)],
    )
    return app, ctl


@pytest.mark.anyio
async def test_rate_limit_answers_429_with_retry_after_on_dicomweb_routes_only() -> None:
    app, _ = small_app(settings_with({"rate_limit_per_client": 0.001, "rate_limit_burst": 2}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("192.0.2.5", 1234)),
                                 base_url="http://gw") as client:
        assert [(await client.get("/dicom-web/studies")).status_code for _ in range(2)] == [200, 200]
        r = await client.get("/dicom-web/studies")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 900
        body = r.json()
        assert body["error"] == "rate-limited" and "limits.rate_limit_per_client" in body["message"]
        assert body["requestId"] == r.headers["x-request-id"]
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


@pytest.mark.anyio
async def test_draining_turns_ready_to_503_and_refuses_new_dicomweb_requests_with_connection_close() -> None:
    app, ctl = small_app(settings_with())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.get("/ready")).status_code == 200
        ctl.start_drain()
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not-ready"
        r = await client.get("/dicom-web/studies")
        assert r.status_code == 503 and r.json()["error"] == "shutting-down"
        assert r.headers["connection"] == "close" and int(r.headers["retry-after"]) >= 1
        assert (await client.get("/health")).status_code == 200  # alive: a liveness probe must not kill it
    assert ctl.in_flight == 0


@pytest.mark.anyio
async def test_a_refused_request_holds_nothing() -> None:
    app, ctl = small_app(settings_with({"max_inflight_searches": 1}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        for _ in range(5):
            assert (await client.get("/dicom-web/studies")).status_code == 200
    assert ctl.counts[SEARCH] == 0 and ctl.threads == 0 and ctl.in_flight == 0


# ------------------------------------------------------------------------------------------------
# Settings


def test_limits_defaults_and_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_with().limits == LimitsSettings()
    monkeypatch.setenv("DWG_LIMITS_MAX_THREADS", "12")
    monkeypatch.setenv("DWG_LIMITS_RATE_LIMIT_PER_CLIENT", "2.5")
    monkeypatch.setenv("DWG_NODE_PACS_REQUIRED_KEYS", "PatientID|AccessionNumber,StudyDate")
    s = settings_with()
    assert s.limits.max_threads == 12 and s.limits.rate_limit_per_client == 2.5
    assert s.nodes[0].required_keys == ("PatientID|AccessionNumber", "StudyDate")


@pytest.mark.parametrize("limits, setting", [
    ({"max_threads": -1}, "limits.max_threads"),
    ({"max_buffer_mb": -5}, "limits.max_buffer_mb"),
    ({"rate_limit_per_client": float("inf")}, "limits.rate_limit_per_client"),
    ({"max_url_bytes": 100}, "limits.max_url_bytes"),
    ({"max_header_bytes": 10 << 20}, "limits.max_header_bytes"),
    ({"header_timeout": 0}, "limits.header_timeout"),
    ({"keepalive_timeout": -1}, "limits.keepalive_timeout"),
    ({"shutdown_grace": -1}, "limits.shutdown_grace"),
    ({"max_inflight_retrieves": "many"}, "limits.max_inflight_retrieves"),
])
def test_bad_limits_name_the_setting(limits: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_with(limits)
    assert info.value.setting == setting


@pytest.mark.parametrize("node, setting", [
    ({"required_keys": ["PatientID|NoSuchKeyword"]}, "nodes[0].required_keys"),
    ({"required_keys": ["PatientID|"]}, "nodes[0].required_keys"),
    ({"min_wildcard_chars": 65}, "nodes[0].min_wildcard_chars"),
    ({"min_wildcard_chars": -1}, "nodes[0].min_wildcard_chars"),
])
def test_bad_guards_name_the_setting(node: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(data={"nodes": [{**NODE, **node}]})
    assert info.value.setting == setting


# ------------------------------------------------------------------------------------------------
# Query guards

REQUIRED = parse_required_keys(["PatientID|StudyDate|AccessionNumber"])


def guard(query: str, *, scoped: bool = False, required: Any = REQUIRED, chars: int = 3) -> Refusal | None:
    try:
        check_search(parse_query(query), scoped, "pacs", required, chars)
    except Refusal as refusal:
        return refusal
    return None


def test_parse_required_keys() -> None:
    assert parse_required_keys(["PatientID | StudyDate", "Modality"]) == (("PatientID", "StudyDate"), ("Modality",))
    for bad in (["Nope"], [""], ["PatientID||StudyDate"]):
        with pytest.raises(ValueError):
            parse_required_keys(bad)


def test_a_search_must_give_a_value_to_one_key_of_each_group() -> None:
    refusal = guard("")
    assert refusal is not None and refusal.rule == "required_keys"
    assert "PatientID, StudyDate, AccessionNumber" in refusal.message and "nodes.required_keys" in refusal.message
    assert guard("PatientName=SMITH*") is not None
    assert guard("PatientID=*") is not None  # "*" alone is universal matching: it narrows nothing
    assert guard("PatientID=") is not None and guard("includefield=PatientID") is not None
    assert guard("PatientID=DEMO-0001") is None
    assert guard("StudyDate=20150101-20151231") is None
    assert guard("AccessionNumber=ACC*") is None
    two_groups = parse_required_keys(["PatientID|AccessionNumber", "StudyDate"])
    assert guard("PatientID=X1", required=two_groups) is not None
    assert guard("PatientID=X1&StudyDate=20150314", required=two_groups) is None


def test_a_study_scope_or_a_unique_key_passes_every_group() -> None:
    assert guard("", scoped=True) is None
    assert guard("StudyInstanceUID=1.2.3") is None
    assert guard("SeriesInstanceUID=1.2.3,1.2.4") is None
    assert guard("SOPInstanceUID=1.2.3") is None


def test_wildcards_need_enough_characters_before_them() -> None:
    short = guard("PatientID=DEMO-0001&PatientName=A*")
    assert short is not None and short.rule == "min_wildcard_chars" and short.parameter == "PatientName"
    assert "3 characters before a wildcard" in short.message and "nodes.min_wildcard_chars" in short.message
    assert guard("PatientID=DEMO-0001&PatientName=SMI*") is None
    assert guard("PatientID=DEMO-0001&PatientName=*SMITH") is not None  # a leading wildcard scans everything
    assert guard("PatientID=DEMO-0001&PatientName=S?ITH") is not None
    assert guard("PatientID=DEMO-0001&PatientName=^^^A*") is not None  # separators are not characters
    assert guard("PatientID=DEMO-0001&PatientName=SM^I*") is None
    assert guard("PatientID=DEM*") is None
    assert guard("PatientID=DE*") is not None
    assert guard("PatientID=DEMO-0001&Modality=*") is None  # universal, not a wildcard match
    assert guard("PatientID=DEMO-0001&PatientName=A*", chars=0) is None
    assert guard("PatientName=A*", required=(), chars=0) is None


# ------------------------------------------------------------------------------------------------
# Request IDs on threads the request did not start


def test_a_move_receiver_thread_works_in_the_context_of_the_request_that_registered_the_move() -> None:
    receiver = MoveReceiver("GW", "127.0.0.1", 0)  # never started: only its table of moves is used
    seen: list[str] = []

    def sink(store: StoreRequest) -> int:
        seen.append(request_id_var.get())
        return 0x0000

    token = request_id_var.set("request-42")
    try:
        msg_id = receiver.register(sink, {"1.2.3"})
    finally:
        request_id_var.reset(token)
    assert request_id_var.get() == "-"
    store = StoreRequest("1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2.840.10008.1.2.1", [], move_originator_id=msg_id)
    worker = threading.Thread(target=lambda: seen.append(str(receiver._on_store(store))))
    worker.start()
    worker.join(10)
    assert seen == ["request-42", "0"]


def test_json_log_lines_carry_the_request_id_warnings_and_thread_errors() -> None:
    """Every line on stderr is one JSON object, whatever wrote it."""
    code = """
import contextvars, logging, threading, warnings
from gateway.logs import configure_logging
from gateway.middleware import request_id_var

configure_logging("info", json_lines=True)
request_id_var.set("request-7")
log = logging.getLogger("gateway.dimse")
log.info("on the event loop's thread")

def work():
    log.info("on a worker thread")
    raise RuntimeError("a bug in a thread")

context = contextvars.copy_context()  # what anyio's to_thread.run_sync does for its workers
worker = threading.Thread(target=context.run, args=(work,), name="dimse-worker")
worker.start()
worker.join()
warnings.warn("something deprecated")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # fails on a line that is not JSON
    by_message = {r["message"]: r for r in records}
    assert by_message["on the event loop's thread"]["request_id"] == "request-7"
    worker = by_message["on a worker thread"]
    assert worker["request_id"] == "request-7" and worker["thread"] == "dimse-worker"
    [crash] = [r for r in records if r["level"] == "error"]
    assert "dimse-worker" in crash["message"] and "RuntimeError: a bug in a thread" in crash["exception"]
    assert any("something deprecated" in r["message"] and r["logger"] == "py.warnings" for r in records)
