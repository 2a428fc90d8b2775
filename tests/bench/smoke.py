"""Running a benchmark's ``--smoke`` variant (or the soak's short one) from a test, as CI does: the
part the smoke tests share. Each test then asserts on the report what its benchmark promises."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_report(module: str, args: Sequence[str], out: Path, timeout: float,
               what: str = "the smoke benchmark") -> tuple[dict[str, Any], str, int]:
    """``python -m <module> ARGS --out OUT`` in a process of its own (the benchmarks configure
    pynetdicom process-wide, as the gateway does), bounded by ``timeout`` (then SIGTERM, which lets it
    stop Orthanc and the gateways). Returns the report, the output and the exit status, after
    checking that a report was written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--out", str(out)],
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
        pytest.fail(f"{what} did not finish within {timeout} s:\n{output[-4000:]}")

    assert out.exists(), f"no report; exit {proc.returncode}:\n{output[-4000:]}"
    return json.loads(out.read_text()), output, proc.returncode


def run_smoke(module: str, out: Path, timeout: float) -> tuple[dict[str, Any], str, int]:
    """``python -m tests.bench.<module> --smoke --out OUT`` (see ``run_report``), after which the
    report must count no error."""
    report, output, returncode = run_report(f"tests.bench.{module}", ["--smoke"], out, timeout)
    checks = report["checks"]
    assert checks["errors_total"] == 0, (checks["error_samples"], output[-4000:])
    return report, output, returncode
