"""/ready, /status and the per-node circuit breaker, against a demo PACS that goes down and comes back.

A gateway of its own (not the shared one, which starts Orthanc and dcmqrscp) with two nodes:

- ``pacs``: a demo PACS on a fixed port below the ephemeral range (stopped and started again on the
  same port), with ``breaker_threshold = 3``, ``breaker_cooldown = 1`` and no retries, so each failed
  request is exactly one failed association attempt;
- ``down``: nothing listens there; it retrieves with C-MOVE, so the C-MOVE receiver runs and
  ``/ready`` has it to check.

With the PACS stopped no node is reachable, which is how ``/status`` is seen answering 503.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.pacs import DemoPACS
from tests.integration.conftest import GATEWAY_AE, port_outside_ephemeral_range
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import free_port

THRESHOLD = 3
COOLDOWN = 1.0
UID_LIKE = re.compile(r"\b\d+(?:\.\d+){4,}\b")  # more dots than an IPv4 address


@pytest.fixture(scope="module")
def pacs(studies: list[Dataset]) -> Iterator[DemoPACS]:
    server = DemoPACS(ae_title="HEALTH-PACS", port=port_outside_ephemeral_range(), datasets=studies)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(pacs: DemoPACS) -> Iterator[GatewayProcess]:
    """Named like the shared fixture (which it replaces in this module) so that a failure report
    carries this gateway's log."""
    breaker = {"retries": 0, "breaker_threshold": THRESHOLD, "breaker_cooldown": COOLDOWN}
    settings = {
        "gateway": {"ae_title": GATEWAY_AE, "move_port": free_port()},
        "nodes": [
            {"name": "pacs", "ae_title": "HEALTH-PACS", "host": "127.0.0.1", "port": pacs.port, "default": True,
             "timeouts": {"connect": 2.0, "acse": 2.0, "dimse": 10.0}, **breaker},
            {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "retrieve": "move",
             "timeouts": {"connect": 2.0, "acse": 2.0}, **breaker},
        ],
    }
    with GatewayProcess(settings) as gw:
        yield gw


def status(client: httpx.Client, gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    r = client.get(gw.base + "/status")
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert not UID_LIKE.search(r.text), "no UIDs in /status"
    return r.status_code, {**body, "by_name": {n["name"]: n for n in body["nodes"]}}


def wait_for_status(client: httpx.Client, gw: GatewayProcess, accept: Callable[[dict[str, Any]], bool],
                    timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    """Poll /status (bounded in time and count) until ``accept`` likes what it says."""
    deadline = time.monotonic() + timeout
    code, body = status(client, gw)
    for _ in range(100):
        if accept(body) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
        code, body = status(client, gw)
    return code, body


class CountingListener:
    """A socket that stands in for the stopped PACS: it listens but never answers, and counts the
    connections the kernel completed on its behalf, so a connection attempt cannot go unnoticed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.count = 0

    def accepted(self) -> int:
        for _ in range(100):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            conn.close()
            self.count += 1
        return self.count

    def close(self) -> None:
        self.sock.close()


def test_ready_and_status_with_one_node_down(gateway: GatewayProcess, studies: list[Dataset]) -> None:
    with httpx.Client(timeout=30) as client:
        r = client.get(gateway.base + "/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready"}

        code, body = wait_for_status(client, gateway, lambda b: b["by_name"]["pacs"]["echo"]["ok"])
        assert code == 200 and body["status"] == "degraded"
        assert body["move_receiver"]["configured"] is True and body["move_receiver"]["running"] is True

        pacs = body["by_name"]["pacs"]
        assert (pacs["ae_title"], pacs["host"], pacs["default"], pacs["retrieve"]) == \
            ("HEALTH-PACS", "127.0.0.1", True, "get")
        assert pacs["echo"]["result"] == "ok" and pacs["echo"]["latency_ms"] >= 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", pacs["echo"]["checked_at"])
        assert pacs["breaker"] == {"state": "closed", "consecutive_failures": 0, "threshold": THRESHOLD,
                                   "cooldown": COOLDOWN, "retry_after": None}
        caps = pacs["capabilities"]
        assert caps["c_get"] is True and caps["study_root_find"] is True and caps["relational"] is True
        assert caps["peer_max_pdu"] > 0
        assert pacs["associations"]["max"] == 4 and pacs["associations"]["in_use"] == 0
        assert pacs["last_error"] is None

        down = body["by_name"]["down"]
        assert down["echo"]["ok"] is False and down["echo"]["result"] != "ok"
        assert down["echo"]["latency_ms"] is None
        assert down["capabilities"]["c_get"] is False and down["capabilities"]["study_root_find"] is None
        assert "NodeUnreachable" in down["last_error"]["message"]

        # nothing of the studies' patients in it
        for ds in studies[:5]:
            assert str(ds.PatientName) not in str(body) and str(ds.PatientID) not in str(body)


def test_breaker_opens_fails_fast_and_closes_when_the_pacs_returns(gateway: GatewayProcess, pacs: DemoPACS) -> None:
    url = gateway.url("pacs", "/studies")
    with httpx.Client(timeout=30) as client:
        assert client.get(url, params={"limit": "1"}).status_code == 200
        pacs.stop()
        listener = None
        try:
            # /ready never depends on a PACS
            assert client.get(gateway.base + "/ready").status_code == 200

            # the breaker is closed: requests reach the closed port and fail, until the threshold.
            # (An idle pooled association the PACS aborted may first fail as connection-lost: that
            # is not an attempt to open an association, and does not count.)
            unreachable = 0
            last_failure_sent = 0.0
            for _ in range(THRESHOLD + 3):
                last_failure_sent = time.monotonic()
                r = client.get(url)
                assert r.status_code == 502, r.text
                unreachable += r.json()["error"] == "pacs-unreachable"
                if unreachable == THRESHOLD:
                    break
            assert unreachable == THRESHOLD

            # open: 503 at once, and no connection reaches the PACS's port
            listener = CountingListener(pacs.port)
            window_end = last_failure_sent + COOLDOWN  # the breaker opened after that request was sent
            inside = 0
            for i in range(3):
                started = time.monotonic()
                r = client.get(url)
                finished = time.monotonic()
                if finished >= window_end:
                    # a slow machine: the cooldown may be over, this request may be the probe
                    assert i > 0, (f"the first request after the breaker opened took {finished - started:.2f} s: "
                                   f"{r.status_code} {r.text[:300]}")
                    break
                inside += 1
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "pacs-unavailable"
                assert r.headers["Retry-After"] == "1"
                assert finished - started < 1.0
            assert inside >= 1
            if inside == 3:
                assert listener.accepted() == 0, "a request tried the PACS while the breaker was open"
            listener.close()
            listener = None

            # /status: the breaker open, no node answering
            code, body = status(client, gateway)
            assert code == 503 and body["status"] == "unavailable"
            node = body["by_name"]["pacs"]
            assert node["breaker"]["state"] == "open"
            assert node["breaker"]["consecutive_failures"] >= THRESHOLD
            assert node["echo"]["ok"] is False
            assert "NodeUnreachable" in node["last_error"]["message"]
            assert client.get(gateway.base + "/ready").status_code == 200
        finally:
            if listener is not None:
                listener.close()
            pacs.reset_counters()
            pacs.start()  # the same port: the gateway is not told

        # the next probe (the /status C-ECHO, once the cooldown is over) closes the breaker
        code, body = wait_for_status(
            client, gateway,
            lambda b: b["by_name"]["pacs"]["echo"]["ok"] and b["by_name"]["pacs"]["breaker"]["state"] == "closed",
        )
        node = body["by_name"]["pacs"]
        assert node["echo"]["ok"] is True and node["breaker"]["state"] == "closed", node
        assert node["breaker"]["consecutive_failures"] == 0
        assert code == 200 and body["status"] == "degraded"
        assert pacs.associations_total >= 1

        r = client.get(url, params={"limit": "1"})
        assert r.status_code == 200 and len(r.json()) == 1
