"""The QIDO benchmark's smoke run, as CI runs it: it completes, every answer is right, the gateway never
holds more associations than its cap, and every cell has numbers. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.smoke import run_smoke
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    require_binary,
)

TIMEOUT = 120  # the smoke run takes about 10 s; this only bounds a hang


@pytest.mark.bench
@pytest.mark.orthanc
def test_qido_benchmark_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    out = tmp_path / "qido.json"
    report, output, returncode = run_smoke("run", out, TIMEOUT)
    checks = report["checks"]
    assert checks["peak_associations"] <= checks["association_cap"] == 8, report.get("over_cap_snapshots")
    if report["gateway_process"]["sampled"]:  # /proc exists (Linux)
        assert report["gateway_process"]["samples"] > 0
    assert checks["problems"] == [], checks["problems"]
    assert checks["skipped_by_run_cap"] == []
    assert returncode == 0, output[-4000:]

    expected = {(q["name"], p, c) for q in report["queries"] for p in ("gateway", "direct", "orthanc")
                for c in report["concurrencies"]}
    cells = {(c["query"], c["path"], c["concurrency"]): c for c in report["cells"]}
    assert set(cells) == expected
    for key, cell in cells.items():
        assert cell["requests"] > 0, key
        for field in ("p50_ms", "p95_ms"):
            value = cell[field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, field, value)
    for ratio in report["ratios"]:
        for field in ("gateway_over_direct_p50", "gateway_over_orthanc_p50"):
            assert isinstance(ratio[field], (int, float)) and math.isfinite(ratio[field]), ratio
    assert "gateway QIDO" in output and "direct C-FIND" in output
