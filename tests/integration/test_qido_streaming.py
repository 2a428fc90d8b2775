"""Results stream as they arrive, and a stalled C-FIND never blocks the event loop."""

from __future__ import annotations

import threading
import time

import httpx

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

from .test_qido_failures import wait_for


def test_first_bytes_arrive_before_the_last_match(gateway: GatewayProcess, chaos: DemoPACS, studies: list) -> None:
    total = len({d.StudyInstanceUID for d in studies})
    chaos.response_delay = 0.25
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", gateway.url("chaos", "/studies")) as r:
            assert r.status_code == 200
            chunks = r.iter_bytes()
            first = next(chunks)
            sent_when_first_arrived = chaos.find_matches_sent
            body = first + b"".join(chunks)
    assert first.startswith(b"[{")
    assert sent_when_first_arrived < total, "the gateway waited for the last match before answering"
    assert chaos.find_matches_sent == total
    assert body.count(b'"0020000D"') == total


def test_health_answers_while_a_c_find_is_stalled(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    """While the chaos PACS sits on a C-FIND, /health and a query to another node are answered."""
    chaos.response_delay = 1.5  # below the chaos node's 2 s DIMSE timeout: stalled, not failed
    outcome: dict[str, int] = {}

    def stalled_query() -> None:
        outcome["status"] = httpx.get(gateway.url("chaos", "/studies"), params={"PatientID": "DEMO-0001"},
                                      timeout=30).status_code

    worker = threading.Thread(target=stalled_query)
    worker.start()
    assert wait_for(lambda: chaos.find_requests >= 1)
    health = [httpx.get(gateway.base + "/health", timeout=5).status_code for _ in range(5)]
    other = httpx.get(gateway.url("demo", "/studies"), params={"PatientID": "DEMO-0002"}, timeout=5)
    still_running = worker.is_alive()
    worker.join()
    assert health == [200] * 5
    assert other.status_code == 200 and len(other.json()) == 2
    assert still_running, "the stalled query finished before the other requests were answered"
    assert outcome["status"] == 200


def test_many_cancelled_queries_leave_no_thread_or_association_behind(gateway: GatewayProcess, chaos: DemoPACS) -> None:
    """Clients that walk away mid-stream: every worker thread ends and associations stay within the cap."""

    def threads() -> int:
        assert gateway.proc is not None
        with open(f"/proc/{gateway.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))

    httpx.get(gateway.url("chaos", "/studies"), params={"limit": "1"}, timeout=15)  # warm the pool
    time.sleep(0.3)
    baseline = threads()
    chaos.response_delay = 0.1
    for _ in range(6):
        with httpx.Client(timeout=15) as client:
            with client.stream("GET", gateway.url("chaos", "/studies")) as r:
                next(r.iter_raw())
    assert wait_for(lambda: chaos.cancels_received == 6), chaos.cancels_received
    assert chaos.associations_peak <= 2
    # idle associations are reaped after the node's 1 s idle timeout; their threads end with them
    # idle associations hold no thread; anyio may keep one or two idle worker threads until its next
    # job prunes them, while a leak would leave one per cancelled query (six here)
    assert wait_for(lambda: threads() <= baseline + 2, timeout=15), (threads(), baseline)
    assert wait_for(lambda: chaos.associations_current == 0, timeout=15), chaos.associations_current
