"""The soak's short variant, as CI runs it: the documented command with a few hundred requests. Every
answer is right, and the gateway's threads, descriptors and associations are back at their baseline
afterwards (its RSS within the soak's tolerance). No timing is asserted; the time limits only bound a
hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.smoke import run_report
from tests.support.realpacs import ORTHANC_BINARY, require_binary

REQUESTS = 300
CLIENTS = 32
TIMEOUT = 240  # the run takes 30-40 s, most of it waiting for the gateway to come to rest twice


@pytest.mark.orthanc
def test_soak_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    out = tmp_path / "soak.json"
    report, output, returncode = run_report(
        "tests.soak.soak", ["--requests", str(REQUESTS), "--clients", str(CLIENTS), "--duration-limit", "150"],
        out, TIMEOUT, what="the soak")
    checks = report["checks"]

    assert checks["all_requests_run"], output[-4000:]
    assert checks["errors"] == 0, report["error_samples"][:5]
    kinds = report["kinds"]
    assert kinds["all"]["requests"] == REQUESTS
    for kind in ("qido", "wado", "stow"):  # the mix reached every service
        assert kinds[kind]["requests"] > 0 and kinds[kind]["errors"] == 0, (kind, kinds[kind])

    gateway = report["gateway"]
    baseline, peak, after = gateway["baseline"], gateway["peak"], gateway["after"]
    assert gateway["samples"] > 0
    # the load did use associations and sockets, so "back to baseline" below is not vacuous
    assert peak["associations"] > 0 and peak["fds"] > baseline["fds"], gateway
    assert after["associations"] == baseline["associations"] == 0, gateway
    assert after["threads"] == baseline["threads"], gateway
    assert after["fds"] == baseline["fds"], gateway
    assert peak["associations"] <= 4, gateway  # the node's max_associations
    assert checks["rss_back"], (checks["rss_growth_mb"], checks["rss_tolerance_mb"])
    assert checks["gateway_log_errors"] == []
    assert checks["ok"] and returncode == 0, output[-4000:]
    assert "Soak: 300 of 300 requests" in output
