"""The store benchmark's smoke run, as CI runs it: it completes, every path stores every instance,
the ratios and the memory figure are there and finite. No timing and no memory figure is asserted.

Also the memory run's body on its own (no PACS needed): it parses into the expected instances."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.smoke import finite, run_smoke
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    require_binary,
)

TIMEOUT = 150  # the smoke run takes about 5-10 s; this only bounds a hang
STORESCU = "/usr/bin/storescu"


@pytest.mark.bench
@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_stow_benchmark_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    require_binary(STORESCU, "DCMTK storescu (Debian package dcmtk)")
    out = tmp_path / "stow.json"
    report, output, returncode = run_smoke("stow", out, TIMEOUT)
    checks = report["checks"]
    assert checks["problems"] == [], checks["problems"]
    assert returncode == 0, output[-4000:]

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
            assert finite(r[name]) and r[name] > 0, (path, name, r[name])
        if path.startswith("gw-"):
            assert r["requests"] == math.ceil(instances / int(path[3:].partition("x")[0])), (path, r["requests"])
            assert finite(r["cpu_s"]["gateway"]), (path, r["cpu_s"])

    for path in ("gw-1", "gw-10"):
        ratio = report["ratios"][path]
        for name in ("vs_storescu", "vs_pynetdicom"):
            assert finite(ratio[name]) and ratio[name] > 0, (path, name, ratio[name])

    memory = report["memory"]
    assert memory["error"] is None and memory["skipped"] is None, memory
    assert finite(memory["vmhwm_mib"]) and memory["vmhwm_mib"] > 0, memory
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
