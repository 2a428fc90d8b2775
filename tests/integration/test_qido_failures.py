"""A PACS that is down, slow, refusing or stopped: prompt, specific errors, and nothing leaked."""

from __future__ import annotations

import threading
import time
from typing import Callable

import httpx
import pytest

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_pacs_not_running_is_502(gateway: GatewayProcess) -> None:
    r = httpx.get(gateway.url("down", "/studies"), timeout=15)
    assert r.status_code == 502
    assert r.json()["error"] == "pacs-unreachable"
    assert "down" in r.json()["message"]


def test_permanent_reject_is_502(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    chaos.reject = "permanent"
    r = httpx.get(gateway.url("chaos", "/studies"), timeout=15)
    assert r.status_code == 502
    assert r.json()["error"] == "pacs-rejected"


def test_transient_reject_is_503_with_retry_after(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    chaos.reject = "transient"
    r = httpx.get(gateway.url("chaos", "/studies"), timeout=15)
    assert r.status_code == 503
    assert r.json()["error"] == "pacs-busy"
    assert int(r.headers["retry-after"]) >= 1


def test_dimse_timeout_is_504(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    chaos.response_delay = 3.0  # the chaos node's DIMSE timeout is 2 s
    r = httpx.get(gateway.url("chaos", "/studies"), params={"PatientID": "DEMO-0001"}, timeout=15)
    assert r.status_code == 504
    assert r.json()["error"] == "pacs-timeout"


def test_limit_reached_sends_c_cancel(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    chaos.response_delay = 0.1  # a fast PACS has sent everything before the cancel arrives
    r = httpx.get(gateway.url("chaos", "/studies"), params={"limit": "2"}, timeout=15)
    assert r.status_code == 200
    assert len(r.json()) == 2
    assert any("additional results" in w for w in r.headers.get_list("warning"))
    assert wait_for(lambda: chaos.cancels_received == 1), chaos.cancels_received


def test_all_results_within_limit_send_no_cancel(gateway: GatewayProcess, chaos: DemoPACS, studies: list) -> None:
    n = len({d.StudyInstanceUID for d in studies})
    r = httpx.get(gateway.url("chaos", "/studies"), params={"limit": str(n + 5)}, timeout=15)
    assert len(r.json()) == n
    assert not any("additional results" in w for w in r.headers.get_list("warning"))
    time.sleep(0.3)
    assert chaos.cancels_received == 0


def test_client_gone_sends_c_cancel(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    chaos.response_delay = 0.3
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", gateway.url("chaos", "/studies")) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # the first match is out; now walk away
    assert wait_for(lambda: chaos.cancels_received == 1), chaos.cancels_received


def test_full_pool_is_503_with_retry_after(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    """The chaos node allows 2 associations and waits 1 s for one to come free."""
    chaos.response_delay = 1.2
    results: list[int] = []

    def slow() -> None:
        results.append(httpx.get(gateway.url("chaos", "/studies"), params={"PatientID": "DEMO-0001"}, timeout=30).status_code)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: chaos.associations_current >= 2)
    r = httpx.get(gateway.url("chaos", "/studies"), params={"PatientID": "DEMO-0002"}, timeout=15)
    for t in threads:
        t.join()
    assert r.status_code == 503
    assert r.json()["error"] == "pacs-busy"
    assert int(r.headers["retry-after"]) >= 1
    assert results == [200, 200]
    assert chaos.associations_peak <= 2


def test_pacs_stopped_before_the_first_match_is_502(gateway: GatewayProcess, studies: list) -> None:
    victim = DemoPACS(ae_title="VICTIM", port=gateway.victim_port, datasets=studies)
    victim.start()
    victim.response_delay = 1.0
    try:
        timer = threading.Timer(0.3, victim.stop)
        timer.start()
        r = httpx.get(gateway.url("victim", "/studies"), timeout=15)
        timer.join()
    finally:
        victim.stop()
    assert r.status_code == 502, r.text
    assert r.json()["error"] in ("pacs-connection-lost", "pacs-unreachable")


def test_pacs_stopped_mid_stream_aborts_the_response(gateway: GatewayProcess, studies: list) -> None:
    victim = DemoPACS(ae_title="VICTIM", port=gateway.victim_port, datasets=studies)
    victim.start()
    victim.response_delay = 0.3
    try:
        with httpx.Client(timeout=15) as client:
            with client.stream("GET", gateway.url("victim", "/studies")) as r:
                assert r.status_code == 200
                chunks = r.iter_raw()
                next(chunks)
                victim.stop()
                with pytest.raises(httpx.HTTPError):
                    for _ in chunks:
                        pass
    finally:
        victim.stop()

