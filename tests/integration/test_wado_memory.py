"""Bounded memory: a slow client reading a series five times the memory bound, RSS read from outside.

The bound (issue: retrieve) is 200 MB plus twice the largest instance, with no cache. The series here
is 2,400 CT slices of 512x512x16 bits (about 1.26 GB, five times the bound); the client reads at
about 100 MB/s, slower than the PACS sends, so without backpressure the gateway would fill up.
"""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

from .conftest import LARGE_SLICES

SLICES = LARGE_SLICES
MB = 1 << 20


@pytest.fixture
def big_pacs(large_ct: tuple[DemoPACS, list[str], str, str, int]) -> tuple[DemoPACS, str, str, int]:
    pacs, _, study_uid, series_uid, largest = large_ct
    return pacs, study_uid, series_uid, largest


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_slow_client_keeps_the_gateway_within_its_memory_bound(big_pacs: tuple[DemoPACS, str, str, int]) -> None:
    pacs, study, series, largest = big_pacs
    bound = 200 * MB + 2 * largest
    node = {"name": "big", "ae_title": "LARGE-PACS", "host": "127.0.0.1", "port": pacs.port}
    with GatewayProcess({"nodes": [node], "wado": {"stall_timeout": 30}}) as gw:
        assert gw.proc is not None
        received = 0
        started = time.monotonic()
        with httpx.Client(timeout=120) as client:
            with client.stream("GET", gw.url(None, f"/studies/{study}/series/{series}")) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw(MB):
                    received += len(chunk)
                    time.sleep(len(chunk) / (100 * MB))  # about 100 MB/s
                    assert time.monotonic() - started < 300, "bounded in time"
        peak = peak_rss(gw.proc.pid)
    assert received > 5 * bound, (received, bound)
    assert peak < bound, f"peak RSS {peak / MB:.0f} MB over the bound {bound / MB:.0f} MB"
    print(f"\nseries {received / MB:.0f} MB, gateway peak RSS {peak / MB:.0f} MB, bound {bound / MB:.0f} MB")


def test_a_client_that_stops_reading_is_dropped_after_the_stall_timeout(
    big_pacs: tuple[DemoPACS, str, str, int],
) -> None:
    """The client takes the first bytes and then nothing: after wado.stall_timeout the gateway
    aborts the response and cancels the retrieve, before the PACS's own timeout could fire.

    The node's idle timeout is short so that the pooled C-FIND association of the listing is gone
    too by the end: every association the PACS still holds after that would be a leak."""
    pacs, study, series, _ = big_pacs
    pacs.reset_counters()
    node = {"name": "big", "ae_title": "LARGE-PACS", "host": "127.0.0.1", "port": pacs.port, "idle_timeout": 1}
    with GatewayProcess({"nodes": [node], "wado": {"stall_timeout": 2}}) as gw:
        with httpx.Client(timeout=60) as client:
            with client.stream("GET", gw.url(None, f"/studies/{study}/series/{series}")) as r:
                assert r.status_code == 200
                chunks = r.iter_raw(MB)
                next(chunks)
                time.sleep(8)  # well past the stall timeout
                received = 0
                with pytest.raises(httpx.HTTPError):
                    for chunk in chunks:
                        received += len(chunk)
        assert received < SLICES * 512 * 512 * 2 // 2, "the whole series arrived: the stall went unnoticed"
        deadline = time.monotonic() + 15
        while pacs.associations_current and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pacs.associations_current == 0
        assert pacs.cancels_received >= 1, "the PACS was never told to stop"
        assert "treated as gone" in gw.log_text()
