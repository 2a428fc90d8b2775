"""Running a benchmark's ``--smoke`` variant from a test, as CI does: the part the three smoke tests
share. Each test then asserts on the report what its benchmark promises."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_smoke(module: str, out: Path, timeout: float) -> tuple[dict[str, Any], str, int]:
    """``python -m tests.bench.<module> --smoke --out OUT`` in a process of its own (the benchmark
    configures pynetdicom process-wide, as the gateway does), bounded by ``timeout``. Returns the
    report, the output and the exit status, after checking that a report was written and that it
    counts no error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"tests.bench.{module}", "--smoke", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # lets it stop Orthanc and the gateways
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the smoke benchmark did not finish within {timeout} s:\n{output[-4000:]}")

    assert out.exists(), f"no results file; exit {proc.returncode}:\n{output[-4000:]}"
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["errors_total"] == 0, (checks["error_samples"], output[-4000:])
    return report, output, proc.returncode
