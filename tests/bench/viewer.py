"""Viewer benchmark: what a web viewer does with a series, through the gateway and through Orthanc's
own DICOMweb plugin on the same data.

    python -m tests.bench.viewer [--smoke] [--out bench-results/viewer.json] [--py-spy DIR]

What runs:

1. Orthanc (with its DICOMweb plugin) on free ports, loaded with several copies of one CT series
   (500 slices of 512x512x16 bits, about 262 MB, from ``generate_large_ct_series``), each copy under
   its own Series and SOP Instance UIDs, same pixel data. One copy per round: every round is cold
   for every path (the gateway's cache has never seen that series, Orthanc's plugin has never
   served it) while the processes, their connections and thread pools stay warm.
2. The gateway as its own process with two nodes for that Orthanc: ``orthanc`` retrieves with C-GET,
   ``orthanc-move`` with C-MOVE to the gateway's receiver; both ``prefetch = "series"``, the cache at
   its defaults (``[cache] max_mb = 512``, ``ttl = 300``). The cache is per node, so one copy is cold
   for each node.
3. Cold, per path (Orthanc's plugin, the gateway by C-GET, by C-MOVE), paths interleaved round by
   round (the first path of a round rotates), after one warm-up round on a copy of its own:
   ``GET .../series/{se}/metadata`` to the last byte of the JSON, then frame 1 of every slice
   (``Accept: multipart/related; type="application/octet-stream"; transfer-syntax=*``, as OHIF asks)
   with 6 requests in parallel, one keep-alive connection each (a browser's 6 connections per
   origin), each connection taking the next slice when its request is done. Total = metadata +
   frames; the ratio gateway / Orthanc is printed against the target of 1.5. In the same rotation,
   as a diagnostic, the round's copy through the gateway's own WADO-RS series retrieve (PS3.10
   parts, no cache, no JSON): the retrieve a cold metadata request waits for, timed alone.
4. Warm: the last round's copy, once the gateway holds it (a metadata request first; its cache
   counters then show no miss): series metadata again, then every frame once sequentially (one
   connection) and once with 6 in parallel; frame latency p50 and p95, against Orthanc on the same
   copy.
5. Every answer is checked: status, each frame's bytes equal to the pixel data of its slice as
   generated, the metadata's instances (count, SOP Instance UIDs, series, a bulk data URI for the
   pixel data). A wrong answer makes the run exit non-zero; timing never does.
6. The gateway's peak RSS (``VmHWM`` from ``/proc/<pid>/status``) after the cold rounds and at the
   end.
7. ``--py-spy DIR``: after the timed rounds, py-spy (``record -f raw -r 250 --threads``, once with
   ``--gil`` and once without) on the gateway during a cold C-GET session on a copy of its own each,
   the metadata request and the frames recorded apart, summarised per thread (where the time goes).

Requests send ``Accept-Encoding: gzip, deflate`` as a browser does; each server compresses or not
as configured (the report says which did). Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.config import CacheSettings
from gateway.demo.data import UID_ROOT, generate_large_ct_series, instance_bytes
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    OrthancServer,
    free_port,
    orthanc_version,
)

from . import procstat
from .common import bench_main, log_problems, py_spy_exe, py_spy_recording
from .run import BenchGateway, _provenance
from .wado import (
    _ROLE_MARKERS,
    CT_IMAGE,
    GATEWAY_AE,
    GET_NODE,
    MAX_PDU,
    MOVE_NODE,
    ORTHANC_AE,
    HttpPath,
    Target,
    _fmt,
    gateway_settings,
    loadavg,
    meta_info,
)

MB = 1_000_000
DEFAULT_OUT = "bench-results/viewer.json"
META_ACCEPT = "application/dicom+json"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
ACCEPT_ENCODING = "gzip, deflate"
TARGET_RATIO = 1.5
PARALLEL = 6
COPY_BASE = 100  # copy c: Series UID <root>9.2.(100+c), SOP Instance UIDs <root>9.3.(100+c).<slice>
MAX_ERRORS_PER_PASS = 20

PATHS = ("orthanc", "gw-get", "gw-move", "gw-retrieve")
VIEWER_PATHS = ("orthanc", "gw-get", "gw-move")
WARM_PATHS = ("orthanc", "gw-get")
GATEWAY_PATHS = ("gw-get", "gw-move")
PATH_LABELS = {
    "orthanc": "Orthanc DICOMweb plugin",
    "gw-get": "gateway, C-GET",
    "gw-move": "gateway, C-MOVE",
    "gw-retrieve": "gateway WADO-RS retrieve",
}
PATH_NOTES = {
    "orthanc": "Orthanc's DICOMweb plugin on the same Orthanc: series metadata ('Full' mode) and frames "
               "read from its storage",
    "gw-get": "GET /nodes/orthanc/dicom-web/...: the metadata request lists the series (IMAGE-level C-FIND), "
              "retrieves it whole by C-GET into the cache and streams the JSON as instances arrive; "
              "frames come from the cache",
    "gw-move": "as gw-get, node retrieve = move: C-MOVE to the gateway's receiver",
    "gw-retrieve": "diagnostic, not a viewer: the round's copy as PS3.10 parts through the gateway's WADO-RS "
                   "series retrieve (C-GET node, Accept multipart/related; type=\"application/dicom\"; no cache, "
                   "no JSON), parts counted by Content-Length and checked (instances, data set bytes, UIDs), "
                   "bodies dropped: the retrieve a cold metadata request waits for, timed alone",
}
VIEWER_ROLES = (
    ("metadata JSON", ("metadata_json (",)),
    ("frame parts", ("_frame_parts (", "_check_frames (")),
    *_ROLE_MARKERS,
)


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    slices: int
    rows: int
    cols: int
    warmup: int  # warm-up rounds (cold, each on a copy of its own)
    rounds: int  # timed cold rounds
    warm_rounds: int
    session_cap: float  # one cold session, or one warm pass, seconds
    run_cap: float  # no new round or phase after this, seconds since start


FULL = Profile("full", 500, 512, 512, warmup=1, rounds=5, warm_rounds=3, session_cap=120.0, run_cap=600.0)
SMOKE = Profile("smoke", 20, 256, 256, warmup=1, rounds=1, warm_rounds=1, session_cap=30.0, run_cap=60.0)
PROFILE_COPIES = 2  # --py-spy: one cold session with --gil, one without


# ------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class SeriesCopy:
    """One copy of the series in Orthanc: its UIDs; slice ``i`` is ``sops[i]``."""

    index: int
    study_uid: str
    series_uid: str
    sops: tuple[str, ...]
    dataset_sizes: tuple[int, ...]  # data set bytes (PS3.10 file without its meta) of each slice

    @property
    def series_path(self) -> str:
        return f"/studies/{self.study_uid}/series/{self.series_uid}"

    def frame_path(self, slice_index: int) -> str:
        return f"{self.series_path}/instances/{self.sops[slice_index]}/frames/1"


@dataclass
class Data:
    copies: list[SeriesCopy]
    pixels: list[bytes]  # the pixel data of each slice as generated (the same for every copy)
    dataset_bytes: int  # one copy's PS3.10 bytes as loaded
    load_seconds: float

    @property
    def slices(self) -> int:
        return len(self.pixels)


def load_copies(server: OrthancServer, profile: Profile, count: int, threads: int = 4) -> Data:
    """Generate the series once, then POST ``count`` copies of it to Orthanc under new UIDs."""
    started = time.monotonic()
    datasets = list(generate_large_ct_series(profile.slices, profile.rows, profile.cols))
    pixels = [bytes(ds.PixelData) for ds in datasets]
    study_uid = str(datasets[0].StudyInstanceUID)
    copies: list[SeriesCopy] = []
    file_bytes = 0
    for c in range(count):
        series_uid = f"{UID_ROOT}9.2.{COPY_BASE + c}"
        sops = tuple(f"{UID_ROOT}9.3.{COPY_BASE + c}.{n}" for n in range(1, profile.slices + 1))
        for ds, sop in zip(datasets, sops):
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = COPY_BASE + c
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
        sizes = _post_all(server, datasets, threads)
        if c == 0:
            file_bytes = sum(size for size, _ in sizes)
        copies.append(SeriesCopy(c, study_uid, series_uid, sops, tuple(ds_size for _, ds_size in sizes)))
    stats = server.rest("GET", "/statistics").json()
    if int(stats["CountInstances"]) != count * profile.slices:
        raise RuntimeError(f"Orthanc holds {stats['CountInstances']} instances, expected {count * profile.slices}")
    return Data(copies, pixels, file_bytes, time.monotonic() - started)


def _post_all(server: OrthancServer, datasets: Sequence[Any], threads: int) -> list[tuple[int, int]]:
    """POST every data set to Orthanc's REST API from ``threads`` threads; (PS3.10 bytes, data set
    bytes) of each."""
    lock = threading.Lock()
    pending = iter(range(len(datasets)))
    sizes = [(0, 0)] * len(datasets)
    failures: list[str] = []

    def post() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as client:
            while not failures:
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                data = instance_bytes(datasets[i])
                sizes[i] = (len(data), len(data) - meta_info(data[:4096])[0])
                r = client.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
                if r.status_code != 200:
                    failures.append(f"slice {i + 1}: HTTP {r.status_code}")

    workers = [threading.Thread(target=post, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    if failures or any(w.is_alive() for w in workers):
        raise RuntimeError(f"loading Orthanc failed: {failures[:3] or 'timeout'}")
    return sizes


# ------------------------------------------------------------------------------------------------
# A browser's requests


class Browser:
    """What a browser tab holds for one origin: ``parallel`` keep-alive connections, one httpx
    client each, sending a browser's Accept-Encoding."""

    def __init__(self, service_root: str, parallel: int) -> None:
        self.root = service_root.rstrip("/")
        self.clients = [
            httpx.Client(timeout=httpx.Timeout(60.0), trust_env=False, headers={"Accept-Encoding": ACCEPT_ENCODING},
                         limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            for _ in range(parallel)
        ]

    def close(self) -> None:
        for c in self.clients:
            c.close()


def single_part(content_type: str, body: bytes) -> tuple[str, bytes]:
    """(part Content-Type, payload) of a multipart/related body that must hold exactly one part
    (one frame): by the part's Content-Length when it has one, else up to the closing delimiter."""
    if not content_type.lower().startswith("multipart/related"):
        raise BenchError(f"not multipart/related: {content_type!r}")
    match = re.search(r'boundary="?([^";,\s]+)"?', content_type)
    if not match:
        raise BenchError(f"no boundary in {content_type!r}")
    dash = b"--" + match.group(1).encode("ascii")
    if body.startswith(dash):
        start = 0
    else:  # after a preamble
        start = body.find(b"\r\n" + dash)
        if start < 0:
            raise BenchError("multipart: no opening boundary")
        start += 2
    head_end = body.find(b"\r\n\r\n", start)
    if head_end < 0:
        raise BenchError("multipart: part headers do not end")
    headers = {}
    for line in body[start + len(dash) : head_end].decode("latin-1").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    begin = head_end + 4
    closing = b"\r\n" + dash + b"--"
    if "content-length" in headers:
        end = begin + int(headers["content-length"])
        if body[end : end + len(closing)] != closing:
            raise BenchError("multipart: the part is not followed by the closing boundary (more than one part, "
                             "or a wrong Content-Length)")
    else:
        end = body.rfind(closing)
        if end < begin:
            raise BenchError("multipart: no closing boundary")
        if body.find(b"\r\n" + dash, begin, end) >= 0:
            raise BenchError("multipart: more than one part")
    return headers.get("content-type", ""), body[begin:end]


def check_metadata(items: Any, copy: SeriesCopy) -> None:
    """The series' instances, each once, with a bulk data URI for the pixel data."""
    if not isinstance(items, list):
        raise BenchError(f"metadata is a {type(items).__name__}, not a list")
    if len(items) != len(copy.sops):
        raise BenchError(f"metadata of {len(items)} instances, expected {len(copy.sops)}")
    uids = []
    for item in items:
        uids.append(_first(item, "00080018"))
        if _first(item, "0020000E") != copy.series_uid:
            raise BenchError("metadata: an instance of another series")
        pixel = item.get("7FE00010") or {}
        if not isinstance(pixel, dict) or not pixel.get("BulkDataURI"):
            raise BenchError("metadata: no BulkDataURI for the pixel data")
    if sorted(uids) != sorted(copy.sops):
        raise BenchError(f"metadata: SOP Instance UIDs differ ({len(set(uids) ^ set(copy.sops))} not matching)")


def _first(item: Any, tag: str) -> Any:
    value = (item.get(tag) or {}).get("Value") if isinstance(item, dict) else None
    return value[0] if value else None


def fetch_metadata(browser: Browser, copy: SeriesCopy, cap: float) -> dict[str, Any]:
    """Series metadata on the first connection, timed to its last byte; then checked."""
    url = browser.root + copy.series_path + "/metadata"
    chunks: list[bytes] = []
    started = time.perf_counter()
    with browser.clients[0].stream("GET", url, headers={"Accept": META_ACCEPT}) as r:
        headers_at = time.perf_counter()
        if r.status_code != 200:
            r.read()
            raise BenchError(f"metadata: HTTP {r.status_code}: {r.text[:200]}")
        for chunk in r.iter_bytes(1 << 16):
            chunks.append(chunk)
            if time.perf_counter() - started > cap:
                raise BenchError(f"metadata cut at the {cap:g} s cap")
        wire = r.num_bytes_downloaded
        encoding = r.headers.get("content-encoding", "identity")
    ended = time.perf_counter()
    body = b"".join(chunks)
    try:
        items = json.loads(body)
    except ValueError as exc:
        raise BenchError(f"metadata is not JSON: {exc}") from None
    check_metadata(items, copy)
    return {"metadata_ms": round((ended - started) * 1000, 2), "metadata_ttfb_ms": round((headers_at - started) * 1000, 2),
            "metadata_bytes": len(body), "metadata_wire_bytes": wire, "metadata_encoding": encoding}


@dataclass
class FramePass:
    seconds: float
    latencies: list[float]  # seconds, one per frame answered right
    errors: list[str]


def fetch_frames(browser: Browser, copy: SeriesCopy, pixels: Sequence[bytes], parallel: int,
                 executor: ThreadPoolExecutor, cap: float) -> FramePass:
    """Frame 1 of every slice, in slice order, ``parallel`` requests at a time (one per connection;
    each takes the next slice when its answer is in). Each answer is checked after its latency is
    taken."""
    lock = threading.Lock()
    pending = iter(range(len(copy.sops)))
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + cap

    def worker(client: httpx.Client) -> None:
        while len(errors) < MAX_ERRORS_PER_PASS:
            with lock:
                i = next(pending, None)
            if i is None:
                return
            if time.monotonic() > deadline:
                errors.append(f"frames cut at the {cap:g} s cap")
                return
            started = time.perf_counter()
            try:
                r = client.get(browser.root + copy.frame_path(i), headers={"Accept": FRAME_ACCEPT})
                elapsed = time.perf_counter() - started
                if r.status_code != 200:
                    raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
                part_type, payload = single_part(r.headers.get("content-type", ""), r.content)
                if not part_type.startswith("application/octet-stream"):
                    raise BenchError(f"part type {part_type!r}")
                if payload != pixels[i]:
                    raise BenchError(f"{len(payload)} bytes, not the slice's pixel data ({len(pixels[i])} bytes)")
            except Exception as exc:
                errors.append(f"frame of slice {i + 1}: {type(exc).__name__}: {exc}")
                continue
            latencies.append(elapsed)

    started = time.perf_counter()
    futures = [executor.submit(worker, client) for client in browser.clients[:parallel]]
    for f in futures:
        f.result(timeout=cap + 90)  # past the cap, a request can still take its own timeout
    seconds = time.perf_counter() - started
    if not errors and len(latencies) != len(copy.sops):
        errors.append(f"{len(latencies)} frames answered, expected {len(copy.sops)}")
    return FramePass(seconds, latencies, errors)


def pct(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile ``p`` (0-100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _ms(value: float | None) -> float | None:
    return round(value * 1000, 2) if value is not None else None


# ------------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Context:
    profile: Profile
    data: Data
    browsers: dict[str, Browser]
    executor: ThreadPoolExecutor
    gateway_pid: int
    orthanc_pid: int | None
    began: float
    retriever: HttpPath | None = None  # the gw-retrieve diagnostic
    checked: dict[str, int] = field(default_factory=lambda: {"frames": 0, "metadata": 0, "retrieves": 0})


def cold_session(ctx: Context, path: str, copy: SeriesCopy) -> dict[str, Any]:
    """A viewer opening ``copy``: series metadata, then every frame with 6 connections."""
    cap = ctx.profile.session_cap
    gw0, pacs0, own0 = procstat.cpu_seconds(ctx.gateway_pid), procstat.cpu_seconds(ctx.orthanc_pid), time.process_time()
    load = loadavg()
    started = time.perf_counter()
    meta = fetch_metadata(ctx.browsers[path], copy, cap)
    gw_meta = procstat.cpu_seconds(ctx.gateway_pid) - gw0
    ctx.checked["metadata"] += 1
    frames = fetch_frames(ctx.browsers[path], copy, ctx.data.pixels, PARALLEL, ctx.executor, cap)
    total = time.perf_counter() - started
    ctx.checked["frames"] += len(frames.latencies)
    if frames.errors:
        raise BenchError(f"{len(frames.errors)} frame error(s), e.g. {frames.errors[0]}")
    return {
        "copy": copy.index,
        **meta,
        "frames_ms": _ms(frames.seconds),
        "total_ms": _ms(total),
        "frames_per_s": round(len(frames.latencies) / frames.seconds, 1) if frames.seconds > 0 else None,
        "frame_p50_ms": _ms(pct(frames.latencies, 50)),
        "frame_p95_ms": _ms(pct(frames.latencies, 95)),
        "cpu_s": {
            "gateway": round(procstat.cpu_seconds(ctx.gateway_pid) - gw0, 3) if path in GATEWAY_PATHS else None,
            "gateway_metadata": round(gw_meta, 3) if path in GATEWAY_PATHS else None,
            "orthanc": round(procstat.cpu_seconds(ctx.orthanc_pid) - pacs0, 3),
            "client": round(time.process_time() - own0, 3),
        },
        "loadavg_1m": load[0] if load else None,
    }


def retrieve_session(ctx: Context, copy: SeriesCopy) -> dict[str, Any]:
    """The diagnostic: the copy through the gateway's WADO-RS series retrieve, checked part by part."""
    assert ctx.retriever is not None
    sizes = dict(zip(copy.sops, copy.dataset_sizes))
    target = Target("series", "series", "SERIES", copy.study_uid, copy.series_uid, None, CT_IMAGE, sizes)
    gw0, pacs0, own0 = procstat.cpu_seconds(ctx.gateway_pid), procstat.cpu_seconds(ctx.orthanc_pid), time.process_time()
    load = loadavg()
    got = ctx.retriever.retrieve(target)
    if got.instances != target.instances or got.dataset_bytes != target.total_dataset_bytes or got.uids != set(sizes):
        raise BenchError(f"retrieve: {got.instances} instances, {got.dataset_bytes} data set bytes, expected "
                         f"{target.instances}, {target.total_dataset_bytes} (UIDs {'' if got.uids == set(sizes) else 'not '}"
                         "matching)")
    ctx.checked["retrieves"] += 1
    return {
        "copy": copy.index,
        "total_ms": _ms(got.seconds),
        "ttfb_ms": _ms(got.ttfb),
        "mb_per_s": round(target.total_dataset_bytes / MB / got.seconds, 1) if got.seconds > 0 else None,
        "cpu_s": {
            "gateway": round(procstat.cpu_seconds(ctx.gateway_pid) - gw0, 3),
            "orthanc": round(procstat.cpu_seconds(ctx.orthanc_pid) - pacs0, 3),
            "client": round(time.process_time() - own0, 3),
        },
        "loadavg_1m": load[0] if load else None,
    }


def _rotated(paths: Sequence[str], round_no: int) -> list[str]:
    k = round_no % len(paths) if paths else 0
    return [*paths[k:], *paths[:k]]


def run_cold(ctx: Context, paths: Sequence[str], print_fn: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Warm-up rounds, then timed rounds; each round on a copy of its own, paths in rotated order."""
    profile = ctx.profile
    cells: dict[str, dict[str, Any]] = {p: {"runs": [], "warmup": [], "errors": [], "truncated": False} for p in paths}
    for round_no in range(profile.warmup + profile.rounds):
        timed = round_no >= profile.warmup
        if timed and round_no > profile.warmup and time.monotonic() - ctx.began > profile.run_cap:
            for cell in cells.values():
                cell["truncated"] = True
            break
        copy = ctx.data.copies[round_no]
        key = "runs" if timed else "warmup"
        for p in _rotated(paths, round_no):
            try:
                result = retrieve_session(ctx, copy) if p == "gw-retrieve" else cold_session(ctx, p, copy)
            except Exception as exc:
                cells[p]["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            result["round"] = round_no - profile.warmup if timed else None
            cells[p][key].append(result)
        done = {p: cells[p][key][-1]["total_ms"] for p in paths
                if cells[p][key] and cells[p][key][-1]["copy"] == copy.index}
        print_fn(f"  cold round {round_no - profile.warmup + 1 if timed else 'warm-up'}: "
                 + ", ".join(f"{p} {_fmt(done.get(p), 0)} ms" for p in paths) + f"; load average {loadavg()[:1]}")
    return cells


def summarise_cold(path: str, cell: dict[str, Any]) -> dict[str, Any]:
    runs = cell["runs"]

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    def med_cpu(key: str) -> float | None:
        values = [r["cpu_s"][key] for r in runs if r["cpu_s"].get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    totals = [r["total_ms"] for r in runs]
    return {
        "path": path,
        "label": PATH_LABELS[path],
        "runs": len(runs),
        "metadata_ms": med("metadata_ms"),
        "metadata_ttfb_ms": med("metadata_ttfb_ms"),
        "frames_ms": med("frames_ms"),
        "total_ms": med("total_ms"),
        "total_min_ms": min(totals) if totals else None,
        "total_max_ms": max(totals) if totals else None,
        "frames_per_s": med("frames_per_s"),
        "frame_p50_ms": med("frame_p50_ms"),
        "frame_p95_ms": med("frame_p95_ms"),
        "ttfb_ms": med("ttfb_ms"),
        "mb_per_s": med("mb_per_s"),
        "metadata_encoding": runs[0].get("metadata_encoding") if runs else None,
        "metadata_wire_bytes": runs[0].get("metadata_wire_bytes") if runs else None,
        "cpu_s": {"gateway": med_cpu("gateway"), "gateway_metadata": med_cpu("gateway_metadata"),
                  "orthanc": med_cpu("orthanc"), "client": med_cpu("client")},
        "errors": len(cell["errors"]),
        "error_samples": sorted(set(cell["errors"]))[:5],
        "truncated_by_time_cap": cell["truncated"],
        "detail": runs,
        "warmup": cell["warmup"],
    }


def cold_ratios(cold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Gateway / Orthanc (above 1: the gateway is slower), from the medians and paired per round."""
    base = cold.get("orthanc")
    out: dict[str, Any] = {}
    for p in GATEWAY_PATHS:
        gw = cold.get(p)
        if not gw or not base:
            continue
        entry: dict[str, Any] = {}
        for key in ("total_ms", "metadata_ms", "frames_ms"):
            entry[key.removesuffix("_ms")] = (round(gw[key] / base[key], 3)
                                               if gw[key] and base[key] else None)
        by_round = {r["round"]: r["total_ms"] for r in base["detail"]}
        paired = [r["total_ms"] / by_round[r["round"]] for r in gw["detail"] if by_round.get(r["round"])]
        entry["total_paired_median"] = round(statistics.median(paired), 3) if paired else None
        entry["total_paired"] = [round(x, 3) for x in paired]
        entry["target"] = TARGET_RATIO
        entry["within_target"] = entry["total"] is not None and entry["total"] <= TARGET_RATIO
        entry["over_target_pct"] = (round((entry["total"] / TARGET_RATIO - 1) * 100, 1)
                                    if entry["total"] is not None else None)
        out[p] = entry
    return out


def cache_counters(gateway: BenchGateway) -> dict[str, float]:
    """The gateway's instance cache counters from its /metrics."""
    text = httpx.get(gateway.base + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'dicomweb_gateway_cache_(lookups_total\{result="(hit|miss)"\}|bytes|instances|evictions_total)'
                     r"\s+(\S+)$", line)
        if m:
            out[m.group(2) or m.group(1).removesuffix("_total")] = float(m.group(3))
    return out


def run_warm(ctx: Context, gateway: BenchGateway, paths: Sequence[str], copy: SeriesCopy,
             print_fn: Callable[[str], None]) -> dict[str, Any]:
    """Frame latency once the series is cached: every frame sequentially, then with 6 in parallel."""
    profile = ctx.profile
    cap = profile.session_cap
    cells: dict[str, dict[str, Any]] = {p: {"metadata_ms": [], "seq": [], "par": [], "par_s": [], "errors": []}
                                        for p in paths}
    prime: dict[str, Any] = {}
    for p in paths:  # the gateway fetches the copy again if the other node's copy pushed it out
        try:
            prime[p] = fetch_metadata(ctx.browsers[p], copy, cap)["metadata_ms"]
        except Exception as exc:
            cells[p]["errors"].append(f"priming: {type(exc).__name__}: {exc}")
    before = cache_counters(gateway)
    truncated = False
    for round_no in range(profile.warm_rounds):
        if round_no and time.monotonic() - ctx.began > profile.run_cap:
            truncated = True
            break
        for p in _rotated(paths, round_no):
            cell = cells[p]
            try:
                cell["metadata_ms"].append(fetch_metadata(ctx.browsers[p], copy, cap)["metadata_ms"])
                ctx.checked["metadata"] += 1
            except Exception as exc:
                cell["errors"].append(f"metadata: {type(exc).__name__}: {exc}")
            for parallel, key in ((1, "seq"), (PARALLEL, "par")):
                got = fetch_frames(ctx.browsers[p], copy, ctx.data.pixels, parallel, ctx.executor, cap)
                ctx.checked["frames"] += len(got.latencies)
                cell["errors"] += got.errors[:5]
                if not got.errors:
                    cell[key] += got.latencies
                    if key == "par":
                        cell["par_s"].append(got.seconds)
    after = cache_counters(gateway)
    results: dict[str, Any] = {}
    for p in paths:
        c = cells[p]
        results[p] = {
            "path": p, "label": PATH_LABELS[p], "rounds": len(c["par_s"]),
            "prime_metadata_ms": prime.get(p),
            "metadata_ms": round(statistics.median(c["metadata_ms"]), 2) if c["metadata_ms"] else None,
            "sequential_p50_ms": _ms(pct(c["seq"], 50)), "sequential_p95_ms": _ms(pct(c["seq"], 95)),
            "sequential_frames": len(c["seq"]),
            "parallel_p50_ms": _ms(pct(c["par"], 50)), "parallel_p95_ms": _ms(pct(c["par"], 95)),
            "parallel_frames": len(c["par"]),
            "parallel_frames_per_s": round(len(copy.sops) / statistics.median(c["par_s"]), 1) if c["par_s"] else None,
            "errors": len(c["errors"]), "error_samples": sorted(set(c["errors"]))[:5],
        }
        r = results[p]
        print_fn(f"  warm {p:<8} metadata {_fmt(r['metadata_ms'])} ms, frame p50 {_fmt(r['sequential_p50_ms'], 2)} ms "
                 f"sequential, {_fmt(r['parallel_p50_ms'], 2)} ms with {PARALLEL} in parallel "
                 f"({_fmt(r['parallel_frames_per_s'])} frames/s), errors {r['errors']}")
    ratio = None
    if "gw-get" in results and "orthanc" in results:
        g, o = results["gw-get"], results["orthanc"]
        ratio = {key: (round(g[key] / o[key], 3) if g[key] and o[key] else None)
                 for key in ("metadata_ms", "sequential_p50_ms", "parallel_p50_ms")}
    return {
        "copy": copy.index,
        "results": results,
        "ratios_gw_get_vs_orthanc": ratio,
        "gateway_cache": {"before": before, "after": after,
                          "misses": after.get("miss", 0) - before.get("miss", 0),
                          "hits": after.get("hit", 0) - before.get("hit", 0)},
        "truncated_by_time_cap": truncated,
    }


# ------------------------------------------------------------------------------------------------
# py-spy


def profile_cold(ctx: Context, out_dir: Path, copies: Sequence[SeriesCopy]) -> dict[str, Any]:
    """py-spy ``record -f raw -r 250 --threads`` on the gateway during a cold C-GET session, with
    ``--gil`` (the thread holding the GIL) and without (every thread on a CPU), each on a copy of its
    own. The metadata request and the frames are recorded apart, so that each phase's time shows."""
    exe = py_spy_exe()
    if exe is None:
        return {"error": "py-spy is not installed"}
    out_dir.mkdir(parents=True, exist_ok=True)
    cap = ctx.profile.session_cap
    browser = ctx.browsers["gw-get"]
    results: dict[str, Any] = {}
    for mode, copy in zip(("gil", "nogil"), copies):
        entry: dict[str, Any] = {"copy": copy.index}
        for phase in ("metadata", "frames"):
            raw = out_dir / f"gateway-viewer-cold-{phase}-{mode}.txt"
            with py_spy_recording(exe, ctx.gateway_pid, raw, mode == "gil", VIEWER_ROLES) as got:
                try:
                    if phase == "metadata":
                        got["ms"] = fetch_metadata(browser, copy, cap)["metadata_ms"]
                        ctx.checked["metadata"] += 1
                    else:
                        frames = fetch_frames(browser, copy, ctx.data.pixels, PARALLEL, ctx.executor, cap)
                        ctx.checked["frames"] += len(frames.latencies)
                        got["ms"] = _ms(frames.seconds)
                        if frames.errors:
                            got["error"] = frames.errors[0]
                except Exception as exc:
                    got["error"] = f"{type(exc).__name__}: {exc}"
            entry[phase] = got
            if "error" in got:
                break
        results[mode] = entry
    return results


# ------------------------------------------------------------------------------------------------
# Output


def render(report: dict[str, Any]) -> str:
    setup, series = report["setup"], report["series"]
    lines = [
        (f"Viewer benchmark ({report['profile']}): Orthanc {setup['orthanc_version']} with DICOMweb plugin "
         f"{setup['dicomweb_plugin_version']}, {setup['cpus']} CPUs, load average {report['load_average']['start']} "
         f"at start, {report['load_average']['end']} at end"),
        (f"  series: {series['slices']} CT slices {series['rows']}x{series['cols']}x16 bits "
         f"({series['dataset_mb']} MB), {series['copies']} copies under their own UIDs, one per round"),
        "",
        (f"== cold: series metadata, then frame 1 of every slice with {PARALLEL} connections; median of "
         f"{report['rounds']} round(s) after {report['warmup']} warm-up, each on a fresh copy =="),
        (f"{'path':<25}{'metadata':>9}{'TTFB':>7}{'frames':>8}{'total':>8}{'frames/s':>9}{'p50':>7}{'p95':>7}"
         f"{'CPU s gw':>9}{'(meta)':>7}{'Orthanc':>8}{'client':>7}{'errors':>7}"),
        f"{'':<25}{'ms':>9}{'ms':>7}{'ms':>8}{'ms':>8}{'':>9}{'ms':>7}{'ms':>7}",
    ]
    for s in report["cold"].values():
        if s["path"] not in VIEWER_PATHS:
            continue
        lines.append(
            f"{s['label']:<25}{_fmt(s['metadata_ms'], 0):>9}{_fmt(s['metadata_ttfb_ms'], 0):>7}{_fmt(s['frames_ms'], 0):>8}"
            f"{_fmt(s['total_ms'], 0):>8}{_fmt(s['frames_per_s'], 0):>9}{_fmt(s['frame_p50_ms']):>7}"
            f"{_fmt(s['frame_p95_ms']):>7}{_fmt(s['cpu_s']['gateway'], 2):>9}{_fmt(s['cpu_s']['gateway_metadata'], 2):>7}"
            f"{_fmt(s['cpu_s']['orthanc'], 2):>8}{_fmt(s['cpu_s']['client'], 2):>7}{s['errors']:>7}")
    for p, r in report["ratios"].items():
        verdict = ("within the target" if r["within_target"]
                   else f"over the target by {_fmt(r['over_target_pct'], 0)}%") if r["total"] is not None else "-"
        lines.append(f"ratio {PATH_LABELS[p]} / Orthanc (target <= {TARGET_RATIO}): total {_fmt(r['total'], 2)} "
                     f"({verdict}; per round {r['total_paired']}), metadata {_fmt(r['metadata'], 2)}, "
                     f"frames {_fmt(r['frames'], 2)}")
    retrieve, get = report["cold"].get("gw-retrieve"), report["cold"].get("gw-get")
    if retrieve:
        lines.append(f"diagnostic: the same copies through the gateway's WADO-RS series retrieve (C-GET, no cache, no "
                     f"JSON): {_fmt(retrieve['total_ms'], 0)} ms (TTFB {_fmt(retrieve['ttfb_ms'], 0)} ms, "
                     f"{_fmt(retrieve['mb_per_s'], 0)} MB/s, gateway CPU {_fmt(retrieve['cpu_s']['gateway'], 2)} s, "
                     f"errors {retrieve['errors']})"
                     + (f"; the C-GET metadata took {_fmt(get['metadata_ms'], 0)} ms" if get else ""))
    enc = {s["path"]: s["metadata_encoding"] for s in report["cold"].values() if s["path"] in VIEWER_PATHS}
    lines.append(f"metadata Content-Encoding: {enc}")
    warm = report.get("warm")
    if warm:
        lines += ["", (f"== warm: the same copy again, the gateway serving it from its cache "
                       f"({warm['gateway_cache']['misses']:.0f} cache misses, {warm['gateway_cache']['hits']:.0f} hits); "
                       f"every frame sequentially, then with {PARALLEL} in parallel =="),
                  (f"{'path':<25}{'metadata ms':>12}{'seq p50':>9}{'seq p95':>9}{'par p50':>9}{'par p95':>9}"
                   f"{'frames/s':>10}{'errors':>7}")]
        for r in warm["results"].values():
            lines.append(f"{r['label']:<25}{_fmt(r['metadata_ms'], 0):>12}{_fmt(r['sequential_p50_ms'], 2):>9}"
                         f"{_fmt(r['sequential_p95_ms'], 2):>9}{_fmt(r['parallel_p50_ms'], 2):>9}"
                         f"{_fmt(r['parallel_p95_ms'], 2):>9}{_fmt(r['parallel_frames_per_s'], 0):>10}{r['errors']:>7}")
        wr = warm.get("ratios_gw_get_vs_orthanc")
        if wr:
            lines.append(f"ratio gateway / Orthanc, warm: metadata {_fmt(wr['metadata_ms'], 2)}, frame p50 "
                         f"{_fmt(wr['sequential_p50_ms'], 2)} sequential, {_fmt(wr['parallel_p50_ms'], 2)} in parallel")
    gw = report["gateway_process"]
    lines += ["", (f"gateway VmHWM: {gw['start_hwm_mb']} MiB after start-up, {gw['cold_hwm_mb']} MiB after the cold "
                   f"rounds, {gw['end_hwm_mb']} MiB at the end; VmRSS {gw['end_rss_mb']} MiB at the end, when the cache "
                   f"held {gw['cache_end_mb']} MB (cap {setup['gateway']['cache_max_mb']} MB)")]
    prof = report.get("py_spy")
    if prof:
        if prof.get("error"):
            lines.append(f"py-spy: {prof['error']}")
        for mode in ("gil", "nogil"):
            for phase in ("metadata", "frames"):
                entry = (prof.get(mode) or {}).get(phase)
                summary = entry.get("summary") if isinstance(entry, dict) else None
                if not summary:
                    continue
                what = "--gil: the thread holding the GIL" if mode == "gil" else "no --gil: every thread seen active"
                lines.append(f"py-spy ({what}), cold C-GET {phase} ({_fmt(entry.get('ms'), 0)} ms), "
                             f"{summary['samples']} samples:")
                busy = sorted(summary["threads"], key=lambda t: (t["role"] == "idle or other", -t["samples"]))
                for t in busy[:4]:
                    lines.append(f"  {t['role']:<30} {t['thread']:<34} {t['share'] * 100:5.1f}%  self: "
                                 + ", ".join(f"{n} {c * 100:.0f}%" for n, _, c in t["self"][:4]))
    checks = report["checks"]
    lines += ["", (f"checked: {checks['frames_checked']} frames (bytes equal to the slice's pixel data), "
                   f"{checks['metadata_checked']} metadata answers; errors: {checks['errors_total']}"
                   + (f"  e.g. {checks['error_samples']}" if checks["error_samples"] else "")),
              (f"data load {setup['load_seconds']} s; benchmark {report['elapsed_seconds']} s; "
               f"results in {report['out']}")]
    if checks.get("notes"):
        lines.append("notes: " + "; ".join(checks["notes"]))
    if checks["problems"]:
        lines.append("PROBLEMS: " + "; ".join(checks["problems"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def viewer_gateway_settings(dicom_port: int, move_port: int, log_level: str) -> dict[str, Any]:
    """The retrieve benchmark's two nodes, with the viewer settings stated (their defaults)."""
    settings = gateway_settings(dicom_port, move_port, log_level)
    defaults = CacheSettings()
    settings["cache"] = {"max_mb": defaults.max_mb, "ttl": defaults.ttl}
    for node in settings["nodes"]:
        node["prefetch"] = "series"
    return settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.viewer", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 20-slice series, one round")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    parser.add_argument("--runs", type=int, help="timed cold rounds (default 5; smoke 1)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--orthanc-dicom-threads", type=int, default=64, help="Orthanc's DicomThreadsCount")
    parser.add_argument("--gateway-log-level", default="info", help="the gateway's server.log_level")
    parser.add_argument("--py-spy", metavar="DIR", help="profile a cold C-GET session with py-spy into DIR")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    profile = SMOKE if args.smoke else FULL
    if args.runs:
        profile = dataclasses.replace(profile, rounds=args.runs)
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            raise SystemExit(f"unknown path {p!r}")
    began = time.monotonic()
    load_start = loadavg()
    move_port = free_port()
    server = OrthancServer(aet=ORTHANC_AE, modalities={"gateway": (GATEWAY_AE, "127.0.0.1", move_port)},
                           stop_timeout=0, extra_config={"DicomThreadsCount": args.orthanc_dicom_threads})
    problems: list[str] = []
    cold: dict[str, dict[str, Any]] = {}
    warm: dict[str, Any] | None = None
    spy: dict[str, Any] | None = None
    with server:
        wanted = profile.warmup + profile.rounds + (PROFILE_COPIES if args.py_spy else 0)
        data = load_copies(server, profile, wanted)
        plugin_version = server.rest("GET", "/plugins/dicom-web").json().get("Version", "?")
        print_fn(f"Orthanc {'.'.join(map(str, orthanc_version()))} (DICOMweb plugin {plugin_version}) on DICOM port "
                 f"{server.dicom_port}: loaded {len(data.copies)} copies of {data.slices} CT slices "
                 f"({data.dataset_bytes / MB:.0f} MB each) in {data.load_seconds:.1f} s; load average {loadavg()}")
        settings = viewer_gateway_settings(server.dicom_port, move_port, args.gateway_log_level)
        gateway = BenchGateway(settings)
        with gateway:
            assert gateway.proc is not None
            gw_pid = gateway.proc.pid
            start_status = procstat.status_fields(gw_pid)
            roots = {"orthanc": server.dicomweb_url, "gw-get": gateway.url(GET_NODE, ""),
                     "gw-move": gateway.url(MOVE_NODE, "")}
            browsers = {p: Browser(roots[p], PARALLEL) for p in paths if p in VIEWER_PATHS}
            executor = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="browser")
            ctx = Context(profile, data, browsers, executor, gw_pid, server.pid, began)
            if "gw-retrieve" in paths:
                ctx.retriever = HttpPath(gateway.url(GET_NODE, ""), profile.session_cap)
            cold_status: dict[str, int] = {}
            cache_end: dict[str, float] = {}
            try:
                cells = run_cold(ctx, paths, print_fn)
                cold = {p: summarise_cold(p, cells[p]) for p in paths}
                cold_status = procstat.status_fields(gw_pid)
                warm_paths = [p for p in WARM_PATHS if p in paths]
                last = data.copies[profile.warmup + profile.rounds - 1]
                if warm_paths and time.monotonic() - began < profile.run_cap:
                    warm = run_warm(ctx, gateway, warm_paths, last, print_fn)
                elif warm_paths:
                    problems.append("warm phase skipped by the run cap")
                if args.py_spy and "gw-get" in paths:
                    spy = profile_cold(ctx, Path(args.py_spy), data.copies[-PROFILE_COPIES:])
                    print_fn(f"  py-spy: raw stacks in {args.py_spy}")
                cache_end = cache_counters(gateway)
            finally:
                for b in browsers.values():
                    b.close()
                if ctx.retriever is not None:
                    ctx.retriever.close()
                executor.shutdown(wait=True, cancel_futures=True)
                end_status = procstat.status_fields(gw_pid)
                gateway_log = gateway.log_text()

    errors = [e for s in cold.values() for e in s["error_samples"]]
    errors_total = sum(s["errors"] for s in cold.values())
    if warm:
        errors_total += sum(r["errors"] for r in warm["results"].values())
        errors += [e for r in warm["results"].values() for e in r["error_samples"]]
    if errors_total:
        problems.append(f"{errors_total} failed or wrong answers")
    missing = [p for p, s in cold.items() if not s["total_ms"]]
    if missing:
        problems.append(f"cold paths without numbers: {', '.join(missing)}")
    if warm:
        if "hit" not in warm["gateway_cache"]["after"] or "miss" not in warm["gateway_cache"]["after"]:
            problems.append("the gateway's /metrics shows no cache lookups: the warm phase cannot be checked")
        elif warm["gateway_cache"]["misses"]:
            problems.append(f"warm phase: {warm['gateway_cache']['misses']:.0f} gateway cache misses (the series "
                            "did not stay cached, so the warm figures are not warm)")
        no_numbers = [p for p, r in warm["results"].items() if not r["sequential_p50_ms"] or not r["parallel_p50_ms"]]
        if no_numbers:
            problems.append(f"warm paths without numbers: {', '.join(no_numbers)}")
    notes = ["cold rounds cut by the run cap"] if any(s["truncated_by_time_cap"] for s in cold.values()) else []
    if warm and warm["truncated_by_time_cap"]:
        notes.append("warm rounds cut by the run cap")
    ran_cold = sum(len(s["detail"]) + len(s["warmup"]) for p, s in cold.items() if p in VIEWER_PATHS)

    mib = (lambda kb: round(kb / 1024, 1))
    report: dict[str, Any] = {
        "benchmark": "viewer",
        "profile": profile.name,
        "rounds": profile.rounds,
        "warmup": profile.warmup,
        "warm_rounds": profile.warm_rounds,
        "parallel": PARALLEL,
        "paths": {p: {"label": PATH_LABELS[p], "how": PATH_NOTES[p]} for p in paths},
        "series": {"slices": profile.slices, "rows": profile.rows, "cols": profile.cols, "copies": wanted,
                   "file_bytes": data.dataset_bytes, "dataset_mb": round(data.dataset_bytes / MB, 1),
                   "uids": f"study {data.copies[0].study_uid}; copy c: series {UID_ROOT}9.2.({COPY_BASE}+c)"},
        "setup": {
            "orthanc_version": ".".join(map(str, orthanc_version())),
            "orthanc_binary": ORTHANC_BINARY,
            "dicomweb_plugin": ORTHANC_DICOMWEB_PLUGIN,
            "dicomweb_plugin_version": plugin_version,
            "orthanc_dicom_threads": args.orthanc_dicom_threads,
            "orthanc_config": {k: server.config.get(k) for k in ("StorageAccessOnFind", "HttpCompressionEnabled",
                                                                  "MaximumStorageCacheSize", "KeepAlive", "TcpNoDelay")}
            | {"SeriesMetadata": server.config.get("DicomWeb", {}).get("SeriesMetadata")},
            "gateway": {"max_pdu": MAX_PDU, "max_associations": 4, "log_level": args.gateway_log_level,
                        "cache_max_mb": settings["cache"]["max_mb"], "cache_ttl": settings["cache"]["ttl"],
                        "prefetch": "series",
                        "nodes": {GET_NODE: "retrieve = get", MOVE_NODE: "retrieve = move"}, **_provenance()},
            "http_client": (f"httpx {httpx.__version__}; per path {PARALLEL} clients of one keep-alive connection "
                            f"each; Accept-Encoding: {ACCEPT_ENCODING}; frames Accept: {FRAME_ACCEPT}"),
            "timing": ("metadata: from the request to its last byte (TTFB: response headers); frames: from the first "
                       "request to the last answer; total: metadata start to last frame; a frame's latency: "
                       "request to its whole body. Checks run outside the timed spans."),
            "cold_method": ("one copy of the series per round (warm-up included), the same copy for every path in "
                            "that round; the gateway's cache is per node, so the copy is cold for the C-GET and the "
                            "C-MOVE node alike; Orthanc's plugin has not served it before either"),
            "load_seconds": round(data.load_seconds, 1),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_average": {"start": load_start, "end": loadavg()},
        "cold": cold,
        "ratios": cold_ratios(cold),
        "target_ratio": TARGET_RATIO,
        "warm": warm,
        "gateway_process": {
            "start_hwm_mb": mib(start_status.get("hwm_kb", 0)),
            "cold_hwm_mb": mib(cold_status.get("hwm_kb", 0)),
            "end_hwm_mb": mib(end_status.get("hwm_kb", 0)),
            "end_rss_mb": mib(end_status.get("rss_kb", 0)),
            "cache_end_mb": round(cache_end.get("bytes", 0) / MB, 1),
            "cache_end_instances": cache_end.get("instances"),
            "cache_evictions": cache_end.get("evictions"),
        },
        "py_spy": spy,
        "checks": {
            "errors_total": errors_total,
            "error_samples": sorted(set(errors))[:5],
            "frames_checked": ctx.checked["frames"],
            "metadata_checked": ctx.checked["metadata"],
            "cold_sessions": ran_cold,
            "retrieves_checked": ctx.checked["retrieves"],
            "problems": problems,
            "notes": notes,
            "ok": not problems,
        },
        "gateway_log_problems": log_problems(gateway_log),
        "elapsed_seconds": round(time.monotonic() - began, 1),
        "out": str(args.out),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, parse_args, run, render)


if __name__ == "__main__":
    raise SystemExit(main())
