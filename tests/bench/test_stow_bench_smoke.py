"""The store benchmark's smoke run, as CI runs it: it completes, every path stores every instance,
the ratios and the memory figure are there and finite. No timing and no memory figure is asserted.

Also the memory run's body on its own (no PACS needed): it parses into the expected instances."""

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
TIMEOUT = 150  # the smoke run takes about 5-10 s; this only bounds a hang
STORESCU = "/usr/bin/storescu"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.bench
@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_stow_benchmark_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    require_binary(STORESCU, "DCMTK storescu (Debian package dcmtk)")
    out = tmp_path / "stow.json"
    # A process of its own: the benchmark configures pynetdicom process-wide, as the gateway does.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.stow", "--smoke", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # lets it stop Orthanc and the gateways
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
    assert checks["problems"] == [], checks["problems"]
    assert proc.returncode == 0, output[-4000:]

    paths = set(report["paths"])
    assert {"gw-1", "gw-10", "storescu", "pynetdicom"} <= paths
    results = {r["path"]: r for r in report["results"]}
    assert set(results) == paths

    # every path stored every instance (checked in Orthanc after each store, and in the responses)
    instances = report["data"]["instances"]
    assert instances > 0
    for path, r in results.items():
        assert r["runs"] >= 1 and r["errors"] == 0, (path, r["error_samples"])
        assert r["stored"] == instances, (path, r["stored"])
        for run in r["detail"] + r["warmup"]:
            assert run["stored"] == instances, (path, run)
        for name in ("median_s", "min_s", "instances_per_s", "mb_per_s"):
            assert _finite(r[name]) and r[name] > 0, (path, name, r[name])
        if path.startswith("gw-"):
            assert r["requests"] == math.ceil(instances / int(path[3:].partition("x")[0])), (path, r["requests"])
            assert _finite(r["cpu_s"]["gateway"]), (path, r["cpu_s"])

    for path in ("gw-1", "gw-10"):
        ratio = report["ratios"][path]
        for name in ("vs_storescu", "vs_pynetdicom"):
            assert _finite(ratio[name]) and ratio[name] > 0, (path, name, ratio[name])

    memory = report["memory"]
    assert memory["error"] is None and memory["skipped"] is None, memory
    assert _finite(memory["vmhwm_mib"]) and memory["vmhwm_mib"] > 0, memory
    assert memory["vmhwm_mib"] >= memory["start_hwm_mib"] > 0, memory
    assert memory["body_bytes"] > 50_000_000, memory
    assert "gateway STOW-RS, 1/request" in output and "storescu" in output


# ------------------------------------------------------------------------------------------------
# The memory run's body alone


def test_memory_body_parses_into_distinct_instances() -> None:
    from gateway.dicomweb import p10
    from gateway.dicomweb.multipart import PartData, PartEnd, PartStart, RelatedParser
    from tests.bench.stow import BOUNDARY, CLOSE, memory_body, memory_template, memory_uid, part_head

    head, tail, placeholder = memory_template(16, 16)
    count = 5
    wire = b"".join(bytes(c) for c in memory_body(count, head, tail, placeholder))
    assert len(wire) == count * (len(part_head()) + len(head) + len(tail) + 2) + len(CLOSE)

    parser = RelatedParser(BOUNDARY)
    parts: list[bytearray] = []
    for event in parser.feed(wire):
        if isinstance(event, PartStart):
            parts.append(bytearray())
        elif isinstance(event, PartData):
            parts[-1] += event.data
        else:
            assert isinstance(event, PartEnd)
    parser.close()
    assert len(parts) == count
    uids = []
    for data in parts:
        info = p10.inspect(data)
        assert info.sop_instance_uid == info.media_sop_instance
        assert len(data) == len(head) + len(tail)
        uids.append(info.sop_instance_uid)
    assert uids == [memory_uid(i) for i in range(count)]
