"""QIDO benchmark: the gateway against a direct C-FIND and Orthanc's own QIDO, on one Orthanc, in one run.

    python -m tests.bench.run [--smoke] [--out bench-results/qido.json]
    bash deploy/bootstrap.sh bench [--smoke]

What runs:

1. Orthanc (with its DICOMweb plugin) on free ports, loaded with the demo studies plus relabelled
   copies (``tests/bench/data.py``).
2. The gateway as its own process, one node for that Orthanc: ``max_associations = 8``,
   ``max_pdu = 131072`` (Orthanc's maximum), ``relational = "assume"``.
3. Five queries -- studies by PatientID, by StudyDate range, all studies with ``limit=10``, the series
   of a study, the instances of a series -- each on three paths (``tests/bench/paths.py``): gateway
   QIDO, direct C-FIND on an open association, Orthanc's QIDO; at 1, 8 and 32 concurrent clients.
4. Per cell: warm-up requests (discarded), then a fixed number of requests per client, cut short by
   a wall-clock cap. p50 and p95 latency, throughput, CPU per request of the gateway and of Orthanc.
5. Throughout, a sampler process reads /proc every 5 ms (every 10-15 ms in practice on a busy
   2-CPU machine): the associations Orthanc holds from the gateway (TCP connections, see
   ``tests/bench/procstat.py``), the gateway's RSS and thread count; the kernel's own RSS high-water
   mark covers the gaps between samples.

Output: a table on stdout and a JSON file. The exit status is non-zero only when something went wrong
(failed or wrong answers, more associations than the cap, a measured cell without numbers), never
because of timing: there are no timed assertions. Every loop is bounded in count and in time: a cell
by its request count and a wall-clock cap, the run by a cap after which no further cell starts (the
cells it skips are listed in the JSON).

Profiling: ``--py-spy OUT`` records the gateway with py-spy (``pip install py-spy``) for the whole run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    OrthancServer,
    _die_with_parent,
    free_port,
    orthanc_version,
)

from . import procstat
from .common import bench_main, log_problems, py_spy_exe, stop_py_spy
from .data import BenchData, bench_data
from .paths import (
    PATH_LABELS,
    PATHS,
    DirectFindClient,
    HttpClient,
    Query,
    build_queries,
)

GATEWAY_AE = "DICOMWEB-GW"
DIRECT_AE = "BENCH-DIRECT"
ORTHANC_AE = "ORTHANC"
NODE = "orthanc"
MAX_ASSOCIATIONS = 8
MAX_PDU = 131072
DEFAULT_OUT = "bench-results/qido.json"


@dataclass(frozen=True)
class Profile:
    name: str
    concurrencies: tuple[int, ...]
    requests_per_client: dict[int, int]
    warmup_per_client: dict[int, int]
    cell_cap: float  # wall-clock cap of the timed part of one cell, seconds
    warmup_cap: float
    run_cap: float  # no cell starts after this many seconds of the run (a guard against a hang)
    scale: int
    copies: int


FULL = Profile("full", (1, 8, 32), {1: 200, 8: 40, 32: 15}, {1: 10, 8: 3, 32: 2},
               cell_cap=20.0, warmup_cap=10.0, run_cap=900.0, scale=2, copies=3)
SMOKE = Profile("smoke", (1, 8), {1: 5, 8: 3}, {1: 1, 8: 1}, cell_cap=5.0, warmup_cap=5.0, run_cap=90.0,
                scale=1, copies=0)


# ------------------------------------------------------------------------------------------------
# Processes


class BenchGateway(GatewayProcess):
    """The gateway process, killed with the benchmark if the benchmark is killed (a CI timeout), its
    temporary directory removed when it stops."""

    def start(self, timeout: float = 30.0) -> BenchGateway:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not become healthy:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PySpy:
    """``py-spy record`` attached to the gateway for the whole run (``--py-spy OUT``): collapsed stacks
    of the thread holding the GIL, i.e. where the gateway spends its CPU. Needs py-spy on PATH or
    beside this Python, and the right to ptrace the gateway."""

    def __init__(self, pid: int, out: str, rate: int = 250) -> None:
        exe = py_spy_exe()
        if exe is None:
            raise SystemExit("--py-spy: py-spy is not installed (pip install py-spy)")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--gil", "--threads", "--nonblocking",
             "--format", "raw", "-o", out, "--duration", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
        )

    def stop(self) -> str:
        return stop_py_spy(self.proc)


def _provenance() -> dict[str, Any]:
    """Which gateway code ran: the package's location and, when it is in a git work tree, its commit."""
    import gateway

    source = Path(gateway.__file__).resolve().parent
    info: dict[str, Any] = {"version": getattr(gateway, "__version__", "?"), "source": str(source)}
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=5)
            info["uncommitted_changes"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def gateway_settings(dicom_port: int, log_level: str) -> dict[str, Any]:
    return {
        "server": {"log_level": log_level},
        "gateway": {"ae_title": GATEWAY_AE},
        "qido": {"max_results": 5000},
        "nodes": [{
            "name": NODE, "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": dicom_port, "default": True,
            "max_associations": MAX_ASSOCIATIONS, "max_pdu": MAX_PDU, "relational": "assume",
        }],
    }


def load_parallel(server: OrthancServer, data: BenchData, threads: int = 4) -> float:
    """POST every instance to Orthanc from ``threads`` connections; returns the seconds it took."""
    from gateway.demo.data import instance_bytes

    started = time.monotonic()
    chunks = [data.datasets[i::threads] for i in range(threads)]
    failures: list[str] = []

    def post(chunk: list) -> None:
        with httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as client:
            for ds in chunk:
                r = client.post("/instances", content=instance_bytes(ds), headers={"Content-Type": "application/dicom"})
                if r.status_code != 200:
                    failures.append(f"{ds.SOPInstanceUID}: HTTP {r.status_code}")
                    return

    workers = [threading.Thread(target=post, args=(c,), daemon=True) for c in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    if failures or any(w.is_alive() for w in workers):
        raise RuntimeError(f"loading Orthanc failed: {failures[:3] or 'timeout'}")
    stats = server.rest("GET", "/statistics").json()
    if int(stats["CountInstances"]) != data.instances_total or int(stats["CountStudies"]) != data.studies_total:
        raise RuntimeError(f"Orthanc holds {stats}, expected {data.instances_total} instances")
    return time.monotonic() - started


# ------------------------------------------------------------------------------------------------
# Measuring one cell


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Context:
    profile: Profile
    orthanc_pid: int | None
    gateway_pid: int
    sampler: procstat.Sampler | None


def run_cell(ctx: Context, path: str, query: Query, clients: list[Any], concurrency: int) -> dict[str, Any]:
    profile = ctx.profile
    n_requests = profile.requests_per_client[concurrency]
    n_warmup = profile.warmup_per_client[concurrency]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    warmup_errors: list[str] = []
    truncated = threading.Event()
    barrier = threading.Barrier(concurrency + 1)
    lock = threading.Lock()

    def worker(i: int) -> None:
        client = clients[i]
        warm_deadline = time.monotonic() + profile.warmup_cap
        for _ in range(n_warmup):
            if time.monotonic() > warm_deadline:
                break
            try:
                client.request(query)
            except Exception as exc:
                with lock:
                    warmup_errors.append(f"{type(exc).__name__}: {exc}")
        try:
            barrier.wait(timeout=profile.warmup_cap + 60)
        except threading.BrokenBarrierError:
            return
        deadline = time.monotonic() + profile.cell_cap
        for _ in range(n_requests):
            if time.monotonic() > deadline:
                truncated.set()
                break
            try:
                elapsed, _results = client.request(query)
                latencies[i].append(elapsed)
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,), name=f"bench-{path}-{i}", daemon=True)
               for i in range(concurrency)]
    if ctx.sampler is not None:
        ctx.sampler.window()  # the cell's window includes its warm-up
    cell_began = time.monotonic()
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=profile.warmup_cap + 60)
    except threading.BrokenBarrierError:
        errors.append("warm-up did not finish")
    timed_began = time.monotonic()
    gw_cpu0, pacs_cpu0, own_cpu0 = procstat.cpu_seconds(ctx.gateway_pid), procstat.cpu_seconds(ctx.orthanc_pid), time.process_time()
    started = time.perf_counter()
    join_deadline = time.monotonic() + profile.cell_cap + 90  # the cap, plus one request's worst timeout
    for t in threads:
        t.join(timeout=max(0.1, join_deadline - time.monotonic()))
    wall = time.perf_counter() - started
    gw_cpu = procstat.cpu_seconds(ctx.gateway_pid) - gw_cpu0
    pacs_cpu = procstat.cpu_seconds(ctx.orthanc_pid) - pacs_cpu0
    own_cpu = time.process_time() - own_cpu0
    peaks = ctx.sampler.window() if ctx.sampler is not None else None
    if any(t.is_alive() for t in threads):
        errors.append("a client thread did not finish in time")

    flat = [x for per_client in latencies for x in per_client]
    ok = len(flat)
    per_req = (lambda cpu: round(cpu * 1000 / ok, 3)) if ok else (lambda cpu: None)
    cell: dict[str, Any] = {
        "query": query.name,
        "path": path,
        "concurrency": concurrency,
        "requests": ok,
        "errors": len(errors) + len(warmup_errors),
        "error_samples": sorted(set(errors + warmup_errors))[:5],
        "truncated_by_time_cap": truncated.is_set(),
        "p50_ms": round(percentile(flat, 0.50) * 1000, 3) if flat else None,
        "p95_ms": round(percentile(flat, 0.95) * 1000, 3) if flat else None,
        "mean_ms": round(statistics.fmean(flat) * 1000, 3) if flat else None,
        "min_ms": round(min(flat) * 1000, 3) if flat else None,
        "max_ms": round(max(flat) * 1000, 3) if flat else None,
        "wall_s": round(wall, 3),
        "monotonic": {"cell": round(cell_began, 3), "timed": round(timed_began, 3), "end": round(time.monotonic(), 3)},
        "throughput_rps": round(ok / wall, 1) if wall > 0 and ok else None,
        "cpu_ms_per_request": {
            "gateway": per_req(gw_cpu) if path == "gateway" else None,
            "orthanc": per_req(pacs_cpu),
            "bench_clients": per_req(own_cpu),
        },
    }
    if peaks is not None and path == "gateway":
        cell["gateway_peak_associations"] = peaks.associations
        cell["gateway_peak_threads"] = peaks.threads
        cell["gateway_peak_rss_mb"] = round(peaks.rss_kb / 1024, 1)
        cell["sampler_samples"] = peaks.samples
    return cell


# ------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(c["query"], c["path"], c["concurrency"]): c for c in cells}
    out = []
    for (query, path, conc), cell in by_key.items():
        if path != "gateway":
            continue
        entry: dict[str, Any] = {"query": query, "concurrency": conc}
        for other, key in (("direct", "gateway_over_direct_p50"), ("orthanc", "gateway_over_orthanc_p50")):
            o = by_key.get((query, other, conc))
            if o and o["p50_ms"] and cell["p50_ms"] is not None:
                entry[key] = round(cell["p50_ms"] / o["p50_ms"], 2)
            else:
                entry[key] = None
        out.append(entry)
    return out


def render(report: dict[str, Any]) -> str:
    cells = report["cells"]
    queries = report["queries"]
    by_key = {(c["query"], c["path"], c["concurrency"]): c for c in cells}
    ratio = {(r["query"], r["concurrency"]): r for r in report["ratios"]}
    meta = report["setup"]
    lines = [
        f"QIDO benchmark ({report['profile']}): Orthanc {meta['orthanc_version']}, "
        f"{meta['data']['studies']} studies / {meta['data']['series']} series / {meta['data']['instances']} instances; "
        f"gateway max_associations={MAX_ASSOCIATIONS}, max_pdu={MAX_PDU}, relational=assume; "
        f"Orthanc DicomThreadsCount={meta['orthanc_dicom_threads']}; {meta['cpus']} CPUs",
        "Latency in ms (p50 / p95). Ratios: gateway p50 divided by the other path's p50.",
        "CPU ms per request: the gateway process in the gateway cells, this process (the pynetdicom clients) "
        "in the direct cells, Orthanc in each path's cells.",
        "direct C-FIND: an association opened beforehand; with limit=10 the clock stops at the 11th match "
        "(then C-CANCEL), as the gateway answers then.",
    ]
    name_w = max(len(q["label"]) for q in queries) + 2
    for conc in report["concurrencies"]:
        n = report["requests_per_client"][str(conc)]
        lines += ["", f"== {conc} concurrent client{'s' if conc > 1 else ''} "
                      f"({n} requests each after {report['warmup_per_client'][str(conc)]} warm-up) =="]
        head = f"{'query':<{name_w}}" + "".join(f"{PATH_LABELS[p]:>17}" for p in PATHS)
        head += f"{'gw/direct':>11}{'gw/Orthanc':>12}{'errors':>8}"
        lines += [head]
        for q in queries:
            row = f"{q['label']:<{name_w}}"
            errs = 0
            for p in PATHS:
                c = by_key.get((q["name"], p, conc))
                if c is None:
                    row += f"{'-':>17}"
                    continue
                errs += c["errors"]
                row += f"{_fmt(c['p50_ms']) + ' / ' + _fmt(c['p95_ms']):>17}"
            r = ratio.get((q["name"], conc), {})
            row += f"{_fmt(r.get('gateway_over_direct_p50'), 2):>11}{_fmt(r.get('gateway_over_orthanc_p50'), 2):>12}{errs:>8}"
            lines.append(row)
        lines.append("")
        lines.append(f"{'throughput, CPU per request':<{name_w}}{'req/s: gateway':>15}{'direct':>8}{'Orthanc':>9}"
                     f"{'CPU ms: gateway':>18}{'direct client':>15}{'Orthanc (gw/direct/QIDO)':>27}")
        for q in queries:
            gw_c, dir_c, orth_c = (by_key.get((q["name"], p, conc)) for p in PATHS)
            row = f"{q['label']:<{name_w}}"
            for c, width in ((gw_c, 15), (dir_c, 8), (orth_c, 9)):
                row += f"{_fmt(c['throughput_rps'], 0) if c else '-':>{width}}"
            row += f"{_fmt(gw_c['cpu_ms_per_request']['gateway']) if gw_c else '-':>18}"
            row += f"{_fmt(dir_c['cpu_ms_per_request']['bench_clients']) if dir_c else '-':>15}"
            pacs = " / ".join(_fmt(c["cpu_ms_per_request"]["orthanc"]) if c else "-" for c in (gw_c, dir_c, orth_c))
            row += f"{pacs:>27}"
            lines.append(row)
        assoc = [by_key[(q["name"], "gateway", conc)].get("gateway_peak_associations")
                 for q in queries if (q["name"], "gateway", conc) in by_key]
        assoc = [a for a in assoc if a is not None]
        if assoc:
            lines.append(f"gateway: peak associations held by Orthanc from the gateway: {max(assoc)} (cap {MAX_ASSOCIATIONS})")
    gw = report["gateway_process"]
    checks = report["checks"]
    lines += [
        "",
        f"gateway process: peak RSS {_fmt(gw['peak_rss_mb'])} MB (kernel high-water mark {_fmt(gw['hwm_rss_mb'])} MB, "
        f"{_fmt(gw['start_rss_mb'])} MB after start-up), peak threads {gw['peak_threads']} "
        f"({gw['start_threads']} after start-up); {gw['samples']} samples, one every {_fmt(gw['mean_sampling_interval_ms'])} ms",
        f"associations Orthanc held from the gateway: peak {checks['peak_associations']} overall, "
        f"{checks['peak_associations_at_max_concurrency']} at {checks['max_concurrency']} clients (cap {MAX_ASSOCIATIONS})",
        f"errors: {checks['errors_total']}" + (f"  e.g. {checks['error_samples']}" if checks["error_samples"] else ""),
        f"data load {_fmt(meta['load_seconds'], 1)} s; benchmark {_fmt(report['elapsed_seconds'], 0)} s; "
        f"results in {report['out']}",
    ]
    if checks["problems"]:
        lines += ["PROBLEMS: " + "; ".join(checks["problems"])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def _open_clients(path: str, n: int, gateway: GatewayProcess, server: OrthancServer) -> list[Any]:
    if path == "gateway":
        return [HttpClient(gateway.url(None, "")) for _ in range(n)]
    if path == "orthanc":
        return [HttpClient(server.dicomweb_url) for _ in range(n)]
    return [DirectFindClient(server.dicom_port, ORTHANC_AE, DIRECT_AE, MAX_PDU) for _ in range(n)]


def _close_all(clients: list[Any]) -> None:
    for c in clients:
        try:
            c.close()
        except Exception:
            pass


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few requests per cell at 1 and 8 clients, small data")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    parser.add_argument("--concurrency", help="comma-separated client counts (default 1,8,32; smoke 1,8)")
    parser.add_argument("--requests", type=int, help="requests per client in every cell (overrides the profile)")
    parser.add_argument("--cell-cap", type=float, help="wall-clock cap of one cell's timed part, seconds")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--queries", help="comma-separated subset of patient,date,limit,series,instances")
    parser.add_argument("--orthanc-dicom-threads", type=int, default=64,
                        help="Orthanc's DicomThreadsCount (default 64: more than the associations open at once)")
    parser.add_argument("--gateway-log-level", default="info", help="the gateway's server.log_level (default info)")
    parser.add_argument("--py-spy", metavar="OUT",
                        help="record the gateway with py-spy (GIL samples, collapsed stacks) into OUT")
    return parser.parse_args(argv)


def _profile(args: argparse.Namespace) -> Profile:
    p = SMOKE if args.smoke else FULL
    concs = tuple(int(x) for x in args.concurrency.split(",")) if args.concurrency else p.concurrencies
    req = {c: args.requests or p.requests_per_client.get(c, 15) for c in concs}
    warm = {c: p.warmup_per_client.get(c, 2) for c in concs}
    return Profile(p.name, concs, req, warm, args.cell_cap or p.cell_cap, p.warmup_cap, p.run_cap, p.scale, p.copies)


def run(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    profile = _profile(args)
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            raise SystemExit(f"unknown path {p!r}")
    began = time.monotonic()
    data = bench_data(scale=profile.scale, copies=profile.copies)
    queries = build_queries(data)
    if args.queries:
        wanted = args.queries.split(",")
        queries = [q for q in queries if q.name in wanted]
    cells: list[dict[str, Any]] = []
    skipped: list[str] = []
    server = OrthancServer(
        aet=ORTHANC_AE,
        modalities={"gateway": (GATEWAY_AE, "127.0.0.1", free_port()), "direct": (DIRECT_AE, "127.0.0.1", free_port())},
        dicom_scp_timeout=600,  # direct clients keep their associations open between cells
        stop_timeout=0,
        # Orthanc serves every open association from a pool of DicomThreadsCount threads (default 4), and
        # a thread waits on an idle association for up to a second before it moves on: with more open
        # associations than threads, requests wait for seconds. Give every association its own thread,
        # so that the benchmark measures the paths and not that scheduler (--orthanc-dicom-threads 4
        # shows the default).
        extra_config={"DicomThreadsCount": args.orthanc_dicom_threads},
    )
    with server:
        load_seconds = load_parallel(server, data)
        print_fn(f"Orthanc {'.'.join(map(str, orthanc_version()))} on DICOM port {server.dicom_port}: "
                 f"loaded {data.instances_total} instances ({data.studies_total} studies) in {load_seconds:.1f} s")
        gateway = BenchGateway(gateway_settings(server.dicom_port, args.gateway_log_level))
        with gateway:
            assert gateway.proc is not None
            gw_pid = gateway.proc.pid
            spy = PySpy(gw_pid, args.py_spy) if args.py_spy else None
            start_status = procstat.status_fields(gw_pid)
            sampler = procstat.Sampler(gw_pid, server.dicom_port, cap=MAX_ASSOCIATIONS).start() if procstat.available() else None
            sampling_began = time.monotonic()
            ctx = Context(profile, server.pid, gw_pid, sampler)
            try:
                for conc in profile.concurrencies:
                    clients = {}
                    try:
                        for p in paths:
                            clients[p] = _open_clients(p, conc, gateway, server)
                        for q in queries:
                            for p in paths:
                                if time.monotonic() - began > profile.run_cap:
                                    skipped.append(f"{q.name}/{p}/{conc}")
                                    continue
                                cell = run_cell(ctx, p, q, clients[p], conc)
                                cells.append(cell)
                                print_fn(f"  {conc:>2} clients  {q.label:<28} {PATH_LABELS[p]:<14} "
                                         f"p50 {_fmt(cell['p50_ms'])} ms  p95 {_fmt(cell['p95_ms'])} ms  "
                                         f"n={cell['requests']}  errors={cell['errors']}"
                                         + ("  (time cap)" if cell["truncated_by_time_cap"] else ""))
                    finally:
                        for cs in clients.values():
                            _close_all(cs)
            finally:
                if spy is not None:
                    print_fn(f"py-spy: {spy.stop() or 'done'}; collapsed stacks in {spy.out}")
                overall = sampler.stop() if sampler is not None else procstat.Peaks()
                end_status = procstat.status_fields(gw_pid)
                sampler_error = sampler.last_error if sampler is not None else None
                sampled_seconds = time.monotonic() - sampling_began
                gateway_log = gateway.log_text()

    errors_total = sum(c["errors"] for c in cells)
    samples = sorted({s for c in cells for s in c["error_samples"]})[:5]
    max_conc = max(profile.concurrencies)
    at_max = [c.get("gateway_peak_associations", 0) for c in cells if c["path"] == "gateway" and c["concurrency"] == max_conc]
    problems = []
    if errors_total:
        problems.append(f"{errors_total} failed requests")
    if overall.associations > MAX_ASSOCIATIONS:
        problems.append(f"Orthanc held {overall.associations} associations from the gateway (cap {MAX_ASSOCIATIONS})")
    missing = [f"{c['query']}/{c['path']}/{c['concurrency']}" for c in cells
               if c["p50_ms"] is None or c["p95_ms"] is None or math.isnan(c["p50_ms"]) or math.isnan(c["p95_ms"])]
    if missing:
        problems.append(f"cells without numbers: {', '.join(missing)}")
    if sampler_error:
        problems.append(f"sampler: {sampler_error}")
    if procstat.available() and overall.samples == 0:
        problems.append("the sampler took no samples")

    report: dict[str, Any] = {
        "benchmark": "qido",
        "profile": profile.name,
        "concurrencies": list(profile.concurrencies),
        "requests_per_client": {str(k): v for k, v in profile.requests_per_client.items()},
        "warmup_per_client": {str(k): v for k, v in profile.warmup_per_client.items()},
        "cell_cap_seconds": profile.cell_cap,
        "paths": {p: PATH_LABELS[p] for p in paths},
        "queries": [{"name": q.name, "label": q.label, "qido": q.url(""), "expected_results": q.http_expected,
                     "direct_reads": q.direct_expected} for q in queries],
        "setup": {
            "orthanc_version": ".".join(map(str, orthanc_version())),
            "orthanc_binary": ORTHANC_BINARY,
            "dicomweb_plugin": ORTHANC_DICOMWEB_PLUGIN,
            "orthanc_dicom_threads": args.orthanc_dicom_threads,
            "gateway": {"max_associations": MAX_ASSOCIATIONS, "max_pdu": MAX_PDU, "relational": "assume",
                        "log_level": args.gateway_log_level, **_provenance()},
            "direct_client": "pynetdicom requestor, one association per client thread opened before the cell, "
                             "TCP_NODELAY, max_pdu 131072, LOG_HANDLER_LEVEL none; reactor parked before each "
                             "C-FIND (works around a pynetdicom 3.0.4 race, see tests/bench/paths.py)",
            "timing": "HTTP: whole response body read; direct: up to the final status, or to match limit+1 "
                      "(then C-CANCEL, drained after the clock stops)",
            "data": data.summary(),
            "load_seconds": round(load_seconds, 2),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "cells": cells,
        "ratios": ratios(cells),
        "gateway_process": {
            "peak_rss_mb": round(overall.rss_kb / 1024, 1),
            "hwm_rss_mb": round(end_status.get("hwm_kb", 0) / 1024, 1),
            "start_rss_mb": round(start_status.get("rss_kb", 0) / 1024, 1),
            "peak_threads": overall.threads,
            "start_threads": start_status.get("threads", 0),
            "samples": overall.samples,
            "mean_sampling_interval_ms": round(sampled_seconds * 1000 / overall.samples, 1) if overall.samples else None,
            "sampled": procstat.available(),
        },
        # (time.monotonic(), associations Orthanc held from the gateway) at every change
        "association_timeline": [[round(t, 4), n] for t, n in overall.timeline],
        # connections between the gateway and Orthanc whenever Orthanc held more than the cap
        "over_cap_snapshots": [{"monotonic": round(t, 4), "connections": conns} for t, conns in overall.over_cap],
        "checks": {
            "errors_total": errors_total,
            "error_samples": samples,
            "association_cap": MAX_ASSOCIATIONS,
            "peak_associations": overall.associations,
            "max_concurrency": max_conc,
            "peak_associations_at_max_concurrency": max(at_max) if at_max else None,
            "problems": problems,
            "skipped_by_run_cap": skipped,
            "ok": not problems,
        },
        # what the gateway logged above INFO (it logs each request at INFO in its access log)
        "gateway_log_problems": log_problems(gateway_log),
        "elapsed_seconds": round(time.monotonic() - began, 1),
        "out": str(args.out),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, parse_args, run, render)


if __name__ == "__main__":
    raise SystemExit(main())
