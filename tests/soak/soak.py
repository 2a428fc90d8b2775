"""The soak: many mixed requests through one gateway process in front of Orthanc, then proof that
nothing was left behind.

    python -m tests.soak.soak --requests 20000 --clients 32 [--duration-limit S] [--out FILE]

It starts its own Orthanc (loaded with the synthetic studies) and one gateway process in front of it,
then sends ``--requests`` requests from ``--clients`` threads (tests/soak/workload.py): about 50 %
QIDO-RS searches of seven shapes, 35 % WADO-RS retrieves of instances and series (some of instances
this run stored), 15 % STOW-RS stores of fresh instances (into 16 studies, so that Orthanc's
database grows in instances only and a search costs it the same at the end as at the start). Every
answer is checked (status, content type, the exact UIDs, each instance's pixel data, the multipart
closing boundary, the Store Instances Response). No new request starts after ``--duration-limit``
seconds.

The gateway is watched from outside, through /proc: VmRSS, VmHWM (the kernel's peak), threads, open
file descriptors and its associations (ESTABLISHED connections to Orthanc's DICOM port from sockets
the gateway owns), sampled during the load and measured at rest before and after it. "At rest" is
reached the same way both times (``settle``): the node's idle timeout is short (2 s), so pooled
associations close; anyio ends idle worker threads only when a later call needs a worker, after 10 s
of idleness, so the settle waits past that, sends one search, and waits for its association to
close again. Then threads and descriptors must be what they were, and no association may be open.

RSS is allowed to end a little higher than it started (``--rss-tolerance-mb``, default 16 MB):
CPython's allocator keeps freed arenas and the interpreter fills caches (interned strings, pydicom's
dictionaries, codecs) on first use, while a leak grows with the number of requests. Measured on the
2-core test machine with 32 clients, from the settled baseline to the settled end: +1.5 MB after 300
requests, +3.0 MB after 3,000 and +3.4 MB after 20,000 (baseline about 106 MB), so the growth levels
off instead of following the request count. 16 MB is about five times the largest growth seen; a leak
of 840 bytes per request would pass it in a full run of 20,000.

The exit status is 1 when a check failed (an error, a request not run, a resource not back to its
baseline, an error in the gateway's log), never because of timing; a JSON report goes to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.demo.data import generate_studies
from tests.bench.common import bench_main, log_problems
from tests.bench.procstat import connections_from, status_fields
from tests.soak.workload import DEFAULT_MIX, Catalog, LoadRun, Outcome, Workload, percentile
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import ORTHANC_BINARY, OrthancServer

GATEWAY_AE = "DICOMWEB-GW"
ORTHANC_AE = "SOAK-ORTHANC"
MAX_ASSOCIATIONS = 4  # Orthanc serves 4 associations at once by default (DicomThreadsCount)
IDLE_TIMEOUT = 2.0  # the node's idle_timeout: pooled associations close this long after their last use
WORKER_IDLE = 10.0  # anyio ends a worker thread idle this long, at the next call that needs a worker
SETTLE_LIMIT = 30.0  # the longest wait for the associations to close at rest
SAMPLE_INTERVAL = 0.2
DEFAULT_RSS_TOLERANCE_MB = 16.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ProcessState:
    """The gateway process as seen from outside."""

    rss_kb: int = 0
    hwm_kb: int = 0
    threads: int = 0
    fds: int = 0
    associations: int = 0


def process_state(pid: int, pacs_port: int) -> ProcessState:
    status = status_fields(pid)
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return ProcessState(status.get("rss_kb", 0), status.get("hwm_kb", 0), status.get("threads", 0), fds,
                        connections_from(pid, pacs_port)[0])


class Sampler:
    """Peaks of the gateway's RSS, threads, descriptors and associations while the load runs, sampled
    every ``SAMPLE_INTERVAL`` by a thread that ends at ``stop()`` or after ``max_seconds``."""

    def __init__(self, pid: int, pacs_port: int, max_seconds: float) -> None:
        self.pid, self.pacs_port, self.max_seconds = pid, pacs_port, max_seconds
        self.peak = ProcessState()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> ProcessState:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = process_state(self.pid, self.pacs_port)
            self.peak = ProcessState(*(max(a, b) for a, b in zip(asdict(self.peak).values(), asdict(now).values())))
            self.samples += 1
            self._stop.wait(SAMPLE_INTERVAL)


def settle(gateway: GatewayProcess, pacs_port: int) -> ProcessState:
    """The gateway at rest: past anyio's worker idle time, one search (its worker-thread call ends the
    idle workers), then every pooled association closed by the idle timeout."""
    assert gateway.proc is not None
    pid = gateway.proc.pid
    time.sleep(WORKER_IDLE + 1.0)
    with httpx.Client(base_url=gateway.base, timeout=30, trust_env=False) as client:
        probe = client.get("/dicom-web/studies", params={"limit": "1"}, headers={"Accept": "application/dicom+json"})
        if probe.status_code != 200:
            raise RuntimeError(f"the settle probe got {probe.status_code}: {probe.text[:300]}")
    deadline = time.monotonic() + SETTLE_LIMIT
    time.sleep(IDLE_TIMEOUT)
    while process_state(pid, pacs_port).associations and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the closing association's worker call returns
    return process_state(pid, pacs_port)


def _kind_table(outcomes: Sequence[Outcome], wall: float) -> dict[str, Any]:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    table = {}
    for kind, items in sorted(by_kind.items()):
        latencies = [(o.end - o.start) * 1000 for o in items]
        table[kind] = {
            "requests": len(items),
            "errors": sum(not o.ok for o in items),
            "p50_ms": round(percentile(latencies, 50), 1),
            "p95_ms": round(percentile(latencies, 95), 1),
            "shapes": dict(sorted(Counter(o.shape for o in items).items())),
            "mb_received": round(sum(o.size for o in items) / 1e6, 1),
        }
    table["all"] = {
        "requests": len(outcomes),
        "errors": sum(not o.ok for o in outcomes),
        "throughput_rps": round(len(outcomes) / wall, 1) if wall > 0 else 0.0,
    }
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    studies = generate_studies()
    workload = Workload(Catalog.from_datasets(studies), DEFAULT_MIX, seed=args.seed)
    started = time.monotonic()
    with OrthancServer(aet=ORTHANC_AE, modalities={"gateway": (GATEWAY_AE, "127.0.0.1", 1)}, stop_timeout=0) as orthanc:
        orthanc.load(studies)
        settings = {
            "gateway": {"ae_title": GATEWAY_AE, "move_port": 0},
            "nodes": [{
                "name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc.dicom_port,
                "default": True, "max_pdu": 131072, "relational": "assume", "max_associations": MAX_ASSOCIATIONS,
                "idle_timeout": IDLE_TIMEOUT,
                # a soak looks for leaks, not for the overload answer: requests queue for an association
                "acquire_timeout": 60.0,
            }],
        }
        gateway = GatewayProcess(settings)
        try:
            gateway.start()
            assert gateway.proc is not None
            pid, pacs_port = gateway.proc.pid, orthanc.dicom_port
            print(f"[soak] Orthanc and the gateway are up ({time.monotonic() - started:.1f} s); warming up", flush=True)
            # every request shape, at full concurrency, so that what is built on first use is built
            warmup = LoadRun(gateway.base, workload, requests=max(4 * args.clients, 100), clients=args.clients,
                             time_limit=args.duration_limit, id_prefix="warmup").start().wait()
            after_warmup = process_state(pid, pacs_port)
            baseline = settle(gateway, pacs_port)
            print(f"[soak] baseline {baseline}; {args.requests} requests from {args.clients} clients", flush=True)
            sampler = Sampler(pid, pacs_port, args.duration_limit + 120).start()
            load = LoadRun(gateway.base, workload, requests=args.requests, clients=args.clients,
                           time_limit=args.duration_limit, id_prefix="soak").start()
            try:
                last = time.monotonic()
                while load.running:
                    time.sleep(0.5)
                    if time.monotonic() - last >= 15:
                        last = time.monotonic()
                        print(f"[soak] {load.completed}/{args.requests} done", flush=True)
                outcomes = load.wait()
            finally:
                load.stop()  # when interrupted: no new requests while the gateway and Orthanc stop
                peak = sampler.stop()
            end_of_load = process_state(pid, pacs_port)
            wall = load.ended_at - load.started_at
            print(f"[soak] load done in {wall:.1f} s; settling", flush=True)
            after = settle(gateway, pacs_port)
            problems = log_problems(gateway.log_text(), ("ERROR", "CRITICAL", "Traceback"))
        finally:
            gateway.stop()
            shutil.rmtree(gateway.dir, ignore_errors=True)

    failed = [o for o in [*warmup, *outcomes] if not o.ok]
    rss_growth_mb = (after.rss_kb - baseline.rss_kb) / 1024
    checks = {
        "all_requests_run": len(outcomes) == args.requests and not load.stopped_by_time_limit,
        "errors": len(failed),
        "threads_back": after.threads == baseline.threads,
        "fds_back": after.fds == baseline.fds,
        "associations_back": after.associations == baseline.associations == 0,
        "associations_within_cap": peak.associations <= MAX_ASSOCIATIONS,
        "rss_growth_mb": round(rss_growth_mb, 1),
        "rss_tolerance_mb": args.rss_tolerance_mb,
        "rss_back": rss_growth_mb <= args.rss_tolerance_mb,
        "gateway_log_errors": problems,
    }
    checks["ok"] = (checks["all_requests_run"] and not failed and checks["threads_back"] and checks["fds_back"]
                    and checks["associations_back"] and checks["associations_within_cap"] and checks["rss_back"]
                    and not problems)
    return {
        "requests": args.requests,
        "clients": args.clients,
        "duration_limit_s": args.duration_limit,
        "stopped_by_duration_limit": load.stopped_by_time_limit,
        "seed": args.seed,
        "load_wall_s": round(wall, 2),
        "total_wall_s": round(time.monotonic() - started, 1),
        "kinds": _kind_table(outcomes, wall),
        "warmup_requests": len(warmup),
        "gateway": {
            "after_warmup": asdict(after_warmup),
            "baseline": asdict(baseline),
            "peak": asdict(peak),
            "end_of_load": asdict(end_of_load),
            "after": asdict(after),
            "samples": sampler.samples,
        },
        "error_samples": [asdict(o) for o in failed[:20]],
        "checks": checks,
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"Soak: {report['kinds']['all']['requests']} of {report['requests']} requests from "
             f"{report['clients']} clients in {report['load_wall_s']} s "
             f"({report['kinds']['all']['throughput_rps']} requests/s), {report['kinds']['all']['errors']} errors "
             f"(whole run {report['total_wall_s']} s)", ""]
    lines.append(f"{'kind':<6} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'MB':>8}")
    for kind, row in report["kinds"].items():
        if kind != "all":
            lines.append(f"{kind:<6} {row['requests']:>9} {row['errors']:>7} {row['p50_ms']:>8} {row['p95_ms']:>8} "
                         f"{row['mb_received']:>8}")
    g = report["gateway"]
    lines += ["", f"{'gateway':<16} {'baseline':>10} {'peak':>10} {'after':>10}"]
    lines.append(f"{'RSS MB':<16} {g['baseline']['rss_kb'] / 1024:>10.1f} {g['peak']['hwm_kb'] / 1024:>10.1f} "
                 f"{g['after']['rss_kb'] / 1024:>10.1f}")
    for name in ("threads", "fds", "associations"):
        lines.append(f"{name:<16} {g['baseline'][name]:>10} {g['peak'][name]:>10} {g['after'][name]:>10}")
    checks = report["checks"]
    lines += ["", f"RSS growth {checks['rss_growth_mb']} MB (tolerance {checks['rss_tolerance_mb']} MB); "
                  f"peak is VmHWM, the kernel's high-water mark",
              "checks: " + ("all passed" if checks["ok"] else "FAILED " + str(
                  {k: v for k, v in checks.items() if v not in (True, 0, [], None) and k not in
                   ("rss_growth_mb", "rss_tolerance_mb", "ok")}))]
    for sample in report["error_samples"][:5]:
        lines.append(f"  {sample['kind']} {sample['shape']} {sample['request_id']}: {sample['error'][:200]}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests in the measured load (default 20000)")
    parser.add_argument("--clients", type=int, default=32, help="client threads (default 32)")
    parser.add_argument("--duration-limit", type=float, default=1800.0,
                        help="seconds after which no new request starts (default 1800); the run then fails")
    parser.add_argument("--rss-tolerance-mb", type=float, default=DEFAULT_RSS_TOLERANCE_MB,
                        help=f"allowed RSS growth from baseline to the end (default {DEFAULT_RSS_TOLERANCE_MB:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "soak.json"), help="JSON report")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.clients < 1 or args.duration_limit <= 0:
        parser.error("--requests, --clients and --duration-limit must be positive")
    if not os.path.isfile(ORTHANC_BINARY):
        parser.error(f"Orthanc is needed ({ORTHANC_BINARY}; Debian package orthanc)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, parse_args, run, render)


if __name__ == "__main__":
    sys.exit(main())
