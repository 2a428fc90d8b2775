"""Graceful shutdown of a real gateway process, and its JSON log lines.

SIGTERM arrives while a large retrieve streams from the demo PACS. The stream is held without any
timing: the client reads its first bytes, then stops reading a series far larger than every buffer
between the PACS and the client, so the retrieve waits for it. Within the grace the stream then
completes; past it the stream is cut (never ended so that it looks complete) and the process exits
on its own, and either way the PACS is left with no association.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.data import generate_large_ct_series
from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

from .test_admission import LARGE_SLICES, held_retrieve, parts_of

EXIT_MARGIN = 30  # seconds beyond the grace within which the process must be gone: generous, never tight


@pytest.fixture(scope="module")
def large_series() -> list[Dataset]:
    return list(generate_large_ct_series(LARGE_SLICES))


@pytest.fixture(scope="module")
def pacs(studies: list[Dataset], large_series: list[Dataset]) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="DRAIN-PACS", datasets=[*studies, *large_series]) as server:
        yield server


def start_gateway(pacs: DemoPACS, grace: float, **server: Any) -> GatewayProcess:
    return GatewayProcess({
        "server": server,
        "limits": {"shutdown_grace": grace},
        "wado": {"stall_timeout": 120},
        "nodes": [{"name": "pacs", "ae_title": "DRAIN-PACS", "host": "127.0.0.1", "port": pacs.port}],
    }).start()


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def ready_status(gw: GatewayProcess) -> int:
    try:
        return httpx.get(gw.base + "/ready", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def exit_code(gw: GatewayProcess, timeout: float) -> int:
    assert gw.proc is not None
    try:
        return gw.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        gw.proc.wait(10)
        pytest.fail(f"the gateway did not exit within {timeout:g} s of SIGTERM:\n{gw.log_text()[-4000:]}")


def test_sigterm_lets_a_stream_within_the_grace_finish_and_log_lines_are_json(
        pacs: DemoPACS, large_series: list[Dataset]) -> None:
    gw = start_gateway(pacs, grace=120, log_json=True, log_level="debug")
    request_id = "drain-within-grace-1"
    url = gw.url(None, f"/studies/{large_series[0].StudyInstanceUID}/series/{large_series[0].SeriesInstanceUID}")
    try:
        with held_retrieve(url, {"X-Request-ID": request_id}) as held:
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            # the load balancer's probe turns at once, while the process keeps answering
            assert wait_until(lambda: ready_status(gw) == 503), "/ready did not turn 503 after SIGTERM"
            ready = httpx.get(gw.base + "/ready", timeout=10)
            assert ready.json() == {"status": "not-ready", "reasons": ["the gateway is shutting down"]}
            assert httpx.get(gw.base + "/health", timeout=10).status_code == 200
            refused = httpx.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0001"}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"] == "shutting-down"
            assert refused.headers["connection"] == "close" and int(refused.headers["retry-after"]) >= 1
            assert gw.proc.poll() is None, "the gateway exited with a stream in flight and the grace not over"
            held["finish"]()
        assert held["body"] is not None, held.get("error")
        assert parts_of(held["response"], held["body"]) == LARGE_SLICES
        assert exit_code(gw, EXIT_MARGIN) in (0, -signal.SIGTERM)
    finally:
        gw.stop()
    assert wait_until(lambda: pacs.associations_current == 0), "the PACS still has associations from the gateway"
    log = gw.log_text()
    assert "shutting down: requests drained" in log
    assert "cutting off" not in log and "aborted" not in log

    records = []
    for line in log.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
    assert records and all({"time", "level", "logger", "request_id", "thread", "message"} <= set(r) for r in records)
    mine = [r for r in records if r["request_id"] == request_id]
    # the DIMSE work runs on worker threads, and their lines carry the request's ID
    dimse = [r for r in mine if r["thread"] != "MainThread" and r["logger"].startswith("gateway.dimse")]
    assert any("association opened" in r["message"] for r in dimse), [r["message"] for r in mine][:20]
    assert any(r["logger"] == "gateway.access" and '" 200 ' in r["message"] for r in mine)


def test_a_stream_longer_than_the_grace_is_cut_and_the_process_exits(
        pacs: DemoPACS, large_series: list[Dataset]) -> None:
    grace = 1.0
    gw = start_gateway(pacs, grace=grace)
    url = gw.url(None, f"/studies/{large_series[0].StudyInstanceUID}/series/{large_series[0].SeriesInstanceUID}")
    try:
        with held_retrieve(url) as held:
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            # the client still reads nothing: the gateway must not wait for it past the grace
            assert exit_code(gw, grace + EXIT_MARGIN) in (0, -signal.SIGTERM)
            held["finish"]()
        # what arrived is a cut stream, not a shorter body that looks complete
        assert held["body"] is None and isinstance(held["error"], httpx.RemoteProtocolError), held.get("error")
    finally:
        gw.stop()
    assert wait_until(lambda: pacs.associations_current == 0), "the PACS still has associations from the gateway"
    log = gw.log_text()
    assert "cutting off 1 request(s)" in log
    assert '"GET /dicom-web/studies/{uid}/series/{uid}" 200' in log and " aborted" in log
    assert "Traceback" not in log


def test_a_second_signal_cuts_at_once(pacs: DemoPACS, large_series: list[Dataset]) -> None:
    gw = start_gateway(pacs, grace=600)  # a grace no test waits out
    url = gw.url(None, f"/studies/{large_series[0].StudyInstanceUID}/series/{large_series[0].SeriesInstanceUID}")
    try:
        with held_retrieve(url) as held:
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: ready_status(gw) == 503)
            gw.proc.send_signal(signal.SIGTERM)
            assert exit_code(gw, EXIT_MARGIN) in (0, -signal.SIGTERM)
            held["finish"]()
        assert held["body"] is None
    finally:
        gw.stop()
    assert wait_until(lambda: pacs.associations_current == 0)
    assert "cutting off 1 request(s)" in gw.log_text()
