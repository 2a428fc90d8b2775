"""Admission control against a real gateway process: past a budget a request gets 503 + Retry-After
at once, naming the budget, while the request holding it goes on; a client past its rate gets 429.

A retrieve is held in flight without any timing: the client reads its first bytes and then stops
reading a series far larger than every buffer between the PACS and the client, so the retrieve
waits for the client until it reads on.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.data import generate_large_ct_series
from gateway.demo.pacs import DemoPACS
from gateway.dimse.retrieve import HANDOFF_BUDGET
from tests.support.gatewayproc import GatewayProcess

from .stow_support import MULTIPART, multipart_body, p10_bytes

LARGE_SLICES = 96  # about 50 MB: more than the hand-off budget and the sockets' buffers together


@pytest.fixture(scope="module")
def large_series() -> list[Dataset]:
    return list(generate_large_ct_series(LARGE_SLICES))


@pytest.fixture(scope="module")
def pacs(studies: list[Dataset], large_series: list[Dataset]) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="ADMIT-PACS", datasets=[*studies, *large_series]) as server:
        yield server


def node_for(pacs: DemoPACS) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": "ADMIT-PACS", "host": "127.0.0.1", "port": pacs.port}


@contextmanager
def held_retrieve(url: str, headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A retrieve whose first bytes arrived and whose client then stops reading. ``finish()`` reads
    the rest; the body is in ``held["body"]`` (None when the stream broke)."""
    held: dict[str, Any] = {}
    with httpx.Client(timeout=120) as client:
        with client.stream("GET", url, headers=headers or {}) as response:
            assert response.status_code == 200, response.read()
            chunks = response.iter_raw()
            first = next(chunks)
            held["response"] = response

            def finish() -> None:
                try:
                    held["body"] = first + b"".join(chunks)
                except httpx.HTTPError as exc:
                    held["body"], held["error"] = None, exc

            held["finish"] = finish
            yield held


def parts_of(response: httpx.Response, body: bytes) -> int:
    """The parts of a complete multipart body; fails when the closing boundary is missing."""
    boundary = re.search(r"boundary=([^;\s]+)", response.headers["content-type"]).group(1).strip('"')
    assert body.endswith(f"--{boundary}--\r\n".encode()), "no closing boundary: the body is not complete"
    return body.count(f"--{boundary}\r\n".encode())


def assert_busy(r: httpx.Response, setting: str) -> None:
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error"] == "gateway-busy" and setting in body["message"], body
    assert int(r.headers["retry-after"]) >= 1 and body["requestId"] == r.headers["x-request-id"]


def stow(client: httpx.Client, url: str, ds: Dataset, *, chunked: bool = False) -> httpx.Response:
    """Store ``ds`` (again: the PACS keeps one copy per SOP Instance UID); ``chunked`` sends no
    Content-Length."""
    body = multipart_body([p10_bytes(ds)])
    return client.post(url, content=iter([body]) if chunked else body, headers={"Content-Type": MULTIPART})


# ------------------------------------------------------------------------------------------------
# Budgets


@pytest.fixture(scope="module")
def budget_gateway(pacs: DemoPACS) -> Iterator[GatewayProcess]:
    # One retrieve holds 16 MB of the 19 and 2 threads of 2; a STOW-RS request without a
    # Content-Length counts (2 lanes + 1) x 1 MB.
    settings = {
        "limits": {"max_inflight_retrieves": 1, "max_threads": 2, "max_buffer_mb": 19},
        "stow": {"lanes": 2, "max_part_mb": 1},
        "wado": {"stall_timeout": 120},
        "nodes": [node_for(pacs)],
    }
    assert HANDOFF_BUDGET / 1e6 + 3 > 19 > HANDOFF_BUDGET / 1e6 + 0.1
    with GatewayProcess(settings) as gw:
        yield gw


def test_past_a_budget_requests_get_503_naming_it_while_the_holder_goes_on(
        budget_gateway: GatewayProcess, pacs: DemoPACS, large_series: list[Dataset], studies: list[Dataset]) -> None:
    gw = budget_gateway
    large = gw.url(None, f"/studies/{large_series[0].StudyInstanceUID}/series/{large_series[0].SeriesInstanceUID}")
    small = studies[0]
    small_url = gw.url(None, f"/studies/{small.StudyInstanceUID}/series/{small.SeriesInstanceUID}")
    with httpx.Client(timeout=60) as client:
        with held_retrieve(large) as held:
            assert_busy(client.get(small_url), "limits.max_inflight_retrieves")
            assert_busy(stow(client, gw.url(None, "/studies"), small, chunked=True), "limits.max_buffer_mb")
            assert_busy(client.get(gw.url(None, "/studies"), params={"PatientID": small.PatientID}), "limits.max_threads")
            # routes outside the budgets are answered as usual
            assert client.get(gw.base + "/ready").status_code == 200
            assert client.get(gw.base + "/metrics").status_code == 200
            held["finish"]()
        assert held["body"] is not None, held.get("error")
        assert parts_of(held["response"], held["body"]) == LARGE_SLICES
        # everything is given back once the holder is done
        r = client.get(small_url)
        assert r.status_code == 200 and parts_of(r, r.content) == sum(
            1 for d in studies if d.SeriesInstanceUID == small.SeriesInstanceUID)
        assert client.get(gw.url(None, "/studies"), params={"PatientID": small.PatientID}).status_code == 200
        assert stow(client, gw.url(None, "/studies"), small, chunked=True).status_code == 200
    log = gw.log_text()
    assert "refused a retrieve" in log and "refused a search" in log and "refused a store" in log


def test_concurrent_retrieves_past_the_budget_are_refused_not_queued(
        budget_gateway: GatewayProcess, studies: list[Dataset]) -> None:
    """Many clients at once: every answer is a complete retrieve or a prompt 503, never an error
    or a truncated body, and the budget is whole again afterwards."""
    gw = budget_gateway
    series = sorted({(d.StudyInstanceUID, d.SeriesInstanceUID) for d in studies})[:8]
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def fetch(study: str, series_uid: str) -> None:
        with httpx.Client(timeout=60) as client:
            r = client.get(gw.url(None, f"/studies/{study}/series/{series_uid}"))
            complete = r.status_code == 200 and parts_of(r, r.content) > 0
            with lock:
                results.append((r.status_code, complete or (r.status_code == 503
                                                            and r.json()["error"] == "gateway-busy")))

    threads = [threading.Thread(target=fetch, args=pair) for pair in series for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(threads) and all(ok for _, ok in results), results
    statuses = {status for status, _ in results}
    assert 200 in statuses and statuses <= {200, 503}
    with httpx.Client(timeout=60) as client:
        study, series_uid = series[0]
        assert client.get(gw.url(None, f"/studies/{study}/series/{series_uid}")).status_code == 200


# ------------------------------------------------------------------------------------------------
# Per-client rate limit


@pytest.fixture(scope="module")
def rate_gateway(pacs: DemoPACS) -> Iterator[GatewayProcess]:
    # 3 requests at once, then one per 100 s: the 4th request of a client is always refused
    settings = {
        "limits": {"rate_limit_per_client": 0.01, "rate_limit_burst": 3},
        "server": {"trusted_proxies": ["127.0.0.1"]},
        "nodes": [node_for(pacs)],
    }
    with GatewayProcess(settings) as gw:
        yield gw


def test_a_client_past_its_rate_gets_429_and_others_are_not_affected(
        rate_gateway: GatewayProcess, studies: list[Dataset]) -> None:
    gw = rate_gateway
    alice = {"X-Forwarded-For": "203.0.113.10"}
    bob = {"X-Forwarded-For": "203.0.113.11"}
    search = gw.url(None, "/studies")
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            assert client.get(search, params={"PatientID": "DEMO-0001"}, headers=alice).status_code == 200
        r = client.get(search, params={"PatientID": "DEMO-0001"}, headers=alice)
        assert r.status_code == 429, r.text
        body = r.json()
        assert body["error"] == "rate-limited" and "limits.rate_limit_per_client" in body["message"]
        assert int(r.headers["retry-after"]) > 1 and body["requestId"] == r.headers["x-request-id"]
        # every DICOMweb route counts; a forged entry in front of the proxy's does not help
        study = studies[0].StudyInstanceUID
        assert client.get(gw.url(None, f"/studies/{study}"), headers=alice).status_code == 429
        forged = {"X-Forwarded-For": "203.0.113.11, 203.0.113.10"}
        assert client.get(search, headers=forged).status_code == 429
        # another client, and the probes and metrics, are not limited
        assert client.get(search, params={"PatientID": "DEMO-0001"}, headers=bob).status_code == 200
        for path in ("/health", "/ready", "/status", "/metrics"):
            assert client.get(gw.base + path, headers=alice).status_code == 200, path
