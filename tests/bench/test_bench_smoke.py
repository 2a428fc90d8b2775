"""The QIDO benchmark's smoke run, as CI runs it: it completes, every answer is right, the gateway never
holds more associations than its cap, and every cell has numbers. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    require_binary,
)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # the smoke run takes about 10 s; this only bounds a hang


@pytest.mark.bench
@pytest.mark.orthanc
def test_qido_benchmark_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    out = tmp_path / "qido.json"
    # A process of its own: the benchmark configures pynetdicom process-wide, as the gateway does.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.run", "--smoke", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # lets it stop Orthanc and the gateway
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the smoke benchmark did not finish within {TIMEOUT} s:\n{output[-4000:]}")

    assert out.exists(), f"no results file; exit {proc.returncode}:\n{output[-4000:]}"
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["errors_total"] == 0, (checks["error_samples"], output[-4000:])
    assert checks["peak_associations"] <= checks["association_cap"] == 8, report.get("over_cap_snapshots")
    if report["gateway_process"]["sampled"]:  # /proc exists (Linux)
        assert report["gateway_process"]["samples"] > 0
    assert checks["problems"] == [], checks["problems"]
    assert checks["skipped_by_run_cap"] == []
    assert proc.returncode == 0, output[-4000:]

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
