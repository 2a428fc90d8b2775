"""The retrieve benchmark's smoke run, as CI runs it: it completes, every retrieve is right, every path
delivers the same instances and data set bytes, and every number is finite. No timing is asserted.

Also the benchmark's multipart counter on its own (no PACS needed): parts split anywhere across
chunks, with and without Content-Length."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.bench.smoke import finite, run_smoke
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    require_binary,
)

TIMEOUT = 150  # the smoke run takes about 5-10 s; this only bounds a hang
GETSCU = "/usr/bin/getscu"


@pytest.mark.bench
@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_wado_benchmark_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    require_binary(GETSCU, "DCMTK getscu (Debian package dcmtk)")
    out = tmp_path / "wado.json"
    report, output, returncode = run_smoke("wado", out, TIMEOUT)
    checks = report["checks"]
    assert checks["problems"] == [], checks["problems"]
    assert returncode == 0, output[-4000:]

    paths = set(report["paths"])
    assert {"gw-get", "gw-move", "getscu", "pynetdicom", "orthanc"} <= paths
    results = {(r["target"], r["path"]): r for r in report["results"]}
    assert set(results) == {(t, p) for t in report["targets"] for p in paths}

    # same data on every path: the instances and data set bytes the PACS was loaded with
    for target, counts in checks["byte_counts"].items():
        expected = counts["expected"]
        assert expected["instances"] == report["targets"][target]["instances"] > 0
        for path in paths:
            got = counts[path]
            assert got["instances"] == expected["instances"], (target, path, got)
            if got["dataset_bytes"] is not None or path != "getscu-ignore":  # --ignore writes nothing to count
                assert got["dataset_bytes"] == expected["dataset_bytes"], (target, path, got)

    for key, r in results.items():
        assert r["runs"] >= 1 and r["errors"] == 0, (key, r["error_samples"])
        for name in ("median_s", "min_s", "mb_per_s"):
            assert finite(r[name]) and r[name] > 0, (key, name, r[name])
        if key[1] in ("gw-get", "gw-move", "orthanc"):
            assert finite(r["ttfb_ms"]) and r["ttfb_ms"] > 0, (key, r["ttfb_ms"])
    for target, ratio in report["ratios"].items():
        for name in ("gw_get_vs_getscu", "gw_get_vs_pynetdicom", "gw_get_vs_orthanc_wado",
                     "gw_move_vs_getscu", "gw_move_vs_pynetdicom", "gw_move_vs_orthanc_wado"):
            assert finite(ratio[name]) and ratio[name] > 0, (target, name, ratio[name])
    for target, first in report["first_part"].items():
        for name in ("ttfb_ms", "listing_gateway_code_ms", "listing_ul_ms", "listing_pynetdicom_ms",
                     "ttfb_minus_listing_ms", "dimse_first_store_ms", "first_store_to_first_part_upper_bound_ms"):
            assert finite(first[name]), (target, name, first[name])
    slow = report["slow_client"]
    assert slow["error"] is None and slow["within_bound"], slow
    assert finite(slow["vmhwm_mb"]) and slow["vmhwm_mb"] > 0
    assert slow["received_bytes"] > report["targets"]["series"]["dataset_bytes"]
    assert "gateway WADO-RS, C-GET" in output and "getscu" in output


# ------------------------------------------------------------------------------------------------
# The multipart counter alone


def _part10(sop: str, body: bytes) -> bytes:
    from gateway.dicomweb.transcode import file_meta_bytes

    return file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.1") + body


@pytest.mark.parametrize("with_length", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_multipart_counter_splits_anywhere(with_length: bool, seed: int) -> None:
    from tests.bench.wado import MultipartCounter

    rng = random.Random(seed)
    boundary = "b-" + str(seed)
    payloads = []
    for i in range(5):
        # bodies that contain boundary-like bytes and CRLFs, but never the delimiter itself
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000))) + b"\r\n--b" + b"\r\n" * 3
        payloads.append((f"1.2.3.{i}", body))
    wire = b""
    for sop, body in payloads:
        data = _part10(sop, body)
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n"
        if with_length:
            head += f"Content-Length: {len(data)}\r\n"
        wire += head.encode() + b"\r\n" + data + b"\r\n"
    wire += f"--{boundary}--\r\n".encode()

    counter = MultipartCounter(boundary)
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 2, 7, 64, 500, 4096, 10_000])
        counter.feed(wire[pos : pos + step])
        pos += step
    parts, dataset_bytes, uids = counter.finish()
    assert parts == len(payloads)
    assert dataset_bytes == sum(len(body) for _, body in payloads)
    assert uids == {sop for sop, _ in payloads}
    assert counter.wire_bytes == len(wire)
    assert counter.scanned_parts == (0 if with_length else len(payloads))


def test_multipart_counter_refuses_a_body_without_the_closing_boundary() -> None:
    from tests.bench.wado import BenchError, MultipartCounter

    counter = MultipartCounter("x")
    data = _part10("1.2.3", b"\x00" * 10)
    counter.feed(b"--x\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
    with pytest.raises(BenchError):
        counter.finish()
