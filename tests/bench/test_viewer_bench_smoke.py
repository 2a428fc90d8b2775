"""The viewer benchmark's smoke run, as CI runs it: it completes, every path answers the metadata and
every frame right (the frames' bytes are the slices' pixel data), the warm phase is served from the
gateway's cache, and every number is finite. No timing is asserted.

Also the benchmark's one-part multipart reader on its own (no PACS needed): it takes the payload by
Content-Length or by the closing delimiter, and refuses what is not one whole part."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.smoke import finite, run_smoke
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    require_binary,
)

TIMEOUT = 90  # the smoke run takes about 3-15 s; this only bounds a hang


@pytest.mark.bench
@pytest.mark.orthanc
def test_viewer_benchmark_smoke(tmp_path: Path) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    out = tmp_path / "viewer.json"
    report, output, returncode = run_smoke("viewer", out, TIMEOUT)
    checks = report["checks"]
    assert checks["problems"] == [], checks["problems"]
    assert returncode == 0, output[-4000:]

    paths = {"orthanc", "gw-get", "gw-move"}
    assert set(report["paths"]) == set(report["cold"]) == paths | {"gw-retrieve"}
    slices = report["series"]["slices"]
    assert slices > 0

    # the diagnostic: the same copies through the gateway's WADO-RS retrieve, every instance and byte
    retrieve = report["cold"]["gw-retrieve"]
    assert retrieve["runs"] == report["rounds"] and retrieve["errors"] == 0, retrieve["error_samples"]
    assert checks["retrieves_checked"] == report["rounds"] + report["warmup"]
    for name in ("total_ms", "ttfb_ms", "mb_per_s"):
        assert finite(retrieve[name]) and retrieve[name] > 0, (name, retrieve[name])

    # every cold session (warm-up and timed) of every viewer path was checked frame by frame
    sessions = 0
    for path in paths:
        cold = report["cold"][path]
        assert cold["runs"] == report["rounds"] and cold["errors"] == 0, (path, cold["error_samples"])
        assert len(cold["warmup"]) == report["warmup"], (path, cold["warmup"])
        sessions += cold["runs"] + len(cold["warmup"])
        for name in ("metadata_ms", "metadata_ttfb_ms", "frames_ms", "total_ms", "frames_per_s",
                     "frame_p50_ms", "frame_p95_ms"):
            assert finite(cold[name]) and cold[name] > 0, (path, name, cold[name])
        for run in cold["detail"]:
            assert run["total_ms"] >= run["metadata_ms"] + run["frames_ms"] - 0.05, (path, run)  # one span
        if path != "orthanc":
            assert finite(cold["cpu_s"]["gateway"]) and finite(cold["cpu_s"]["gateway_metadata"]), (path, cold["cpu_s"])
    assert checks["cold_sessions"] == sessions == len(paths) * (report["rounds"] + report["warmup"])

    # warm: every frame twice (sequentially and in parallel) per round, every one from the gateway's cache
    warm = report["warm"]
    assert set(warm["results"]) == {"orthanc", "gw-get"}
    assert warm["gateway_cache"]["misses"] == 0 and warm["gateway_cache"]["hits"] >= slices
    for path, r in warm["results"].items():
        assert r["errors"] == 0, (path, r["error_samples"])
        assert r["rounds"] == report["warm_rounds"] >= 1
        assert r["sequential_frames"] == r["parallel_frames"] == slices * r["rounds"], (path, r)
        for name in ("metadata_ms", "sequential_p50_ms", "sequential_p95_ms", "parallel_p50_ms",
                     "parallel_p95_ms", "parallel_frames_per_s"):
            assert finite(r[name]) and r[name] > 0, (path, name, r[name])
    for name, value in warm["ratios_gw_get_vs_orthanc"].items():
        assert finite(value) and value > 0, (name, value)

    # frames checked: each cold session and each warm pass covers every slice
    warm_frames = sum(r["sequential_frames"] + r["parallel_frames"] for r in warm["results"].values())
    assert checks["frames_checked"] == sessions * slices + warm_frames

    for path in ("gw-get", "gw-move"):
        ratio = report["ratios"][path]
        for name in ("total", "metadata", "frames", "total_paired_median"):
            assert finite(ratio[name]) and ratio[name] > 0, (path, name, ratio[name])
        assert ratio["target"] == 1.5 and isinstance(ratio["within_target"], bool)
    gw = report["gateway_process"]
    assert finite(gw["cold_hwm_mb"]) and gw["cold_hwm_mb"] > 0
    assert gw["end_hwm_mb"] >= gw["cold_hwm_mb"] >= gw["start_hwm_mb"] > 0
    assert "gateway, C-GET" in output and "target <= 1.5" in output


# ------------------------------------------------------------------------------------------------
# The one-part multipart reader alone


def _multipart(payloads: list[bytes], boundary: str, with_length: bool, preamble: bytes = b"") -> bytes:
    body = preamble
    for payload in payloads:
        head = f"--{boundary}\r\nContent-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n"
        if with_length:
            head += f"Content-Length: {len(payload)}\r\n"
        body += head.encode() + b"\r\n" + payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("with_length", [True, False])
def test_single_part_reads_the_payload(with_length: bool) -> None:
    from tests.bench.viewer import single_part

    payload = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    body = _multipart([payload], "abc-123", with_length, preamble=b"" if with_length else b"ignored\r\n")
    part_type, got = single_part('multipart/related; type="application/octet-stream"; boundary="abc-123"', body)
    assert got == payload
    assert part_type.startswith("application/octet-stream")


@pytest.mark.parametrize("with_length", [True, False])
def test_single_part_refuses_two_parts(with_length: bool) -> None:
    from tests.bench.viewer import BenchError, single_part

    body = _multipart([b"\x01" * 100, b"\x02" * 100], "b", with_length)
    with pytest.raises(BenchError):
        single_part("multipart/related; boundary=b", body)


def test_single_part_refuses_a_truncated_body_and_a_wrong_type() -> None:
    from tests.bench.viewer import BenchError, single_part

    body = _multipart([b"\x00" * 64], "b", True)
    assert single_part("multipart/related; boundary=b", body)[1] == b"\x00" * 64
    with pytest.raises(BenchError):
        single_part("multipart/related; boundary=b", body[:-12])
    with pytest.raises(BenchError):
        single_part("application/octet-stream", body)
    with pytest.raises(BenchError):
        single_part("multipart/related; boundary=other", body)
