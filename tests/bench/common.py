"""What the benchmarks (run.py for QIDO, wado.py, stow.py, viewer.py) share: their command-line entry
point, the gateway log lines worth reporting, and py-spy: finding it, recording with it, and the
summary of a recording."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.realpacs import _die_with_parent

LEVELS = ("WARNING", "ERROR", "CRITICAL", "Traceback")

# a thread's role: (role, markers in its stacks), first match wins
RoleMarkers = Sequence[tuple[str, Sequence[str]]]


def log_problems(log_text: str, levels: Sequence[str] = LEVELS, last: int = 50) -> list[str]:
    """The last ``last`` lines of a gateway log at one of ``levels`` (the access log is INFO)."""
    return [line for line in log_text.splitlines() if any(level in line for level in levels)][-last:]


def bench_main(argv: Sequence[str] | None, parse_args: Callable[[Sequence[str] | None], Any],
               run: Callable[[Any], dict[str, Any]], render: Callable[[dict[str, Any]], str]) -> int:
    """Run a benchmark, write its JSON report to ``--out``, print its table. The exit status is 1
    only when its checks found a problem (never because of timing)."""
    args = parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds the with-blocks: Orthanc, the gateways, temporary files

    signal.signal(signal.SIGTERM, on_term)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(render(report))
    return 0 if report["checks"]["ok"] else 1


def py_spy_exe() -> str | None:
    """py-spy on PATH or beside this Python, or None when it is not installed."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return exe if os.access(exe, os.X_OK) else None


def stop_py_spy(proc: subprocess.Popen[bytes]) -> str:
    """Stop a ``py-spy record`` (it writes its output on Ctrl-C); returns the last line it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    return err.splitlines()[-1] if err else ""


@contextmanager
def py_spy_recording(exe: str, pid: int, raw: Path, gil: bool, roles: RoleMarkers) -> Iterator[dict[str, Any]]:
    """py-spy ``record -f raw -r 250 --threads`` (with ``--gil``: the thread holding the GIL only) on
    ``pid`` while the with-block runs. Yields the entry for the report, ``{"raw": ...}``, which the
    block adds its results to; ``py_spy`` (py-spy's last line) and ``summary`` follow them."""
    argv = [exe, "record", "-f", "raw", "-r", "250", "--threads", "-p", str(pid), "-o", str(raw),
            "-d", "600"] + (["--gil"] if gil else [])
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    time.sleep(1.5)  # attach
    entry: dict[str, Any] = {"raw": str(raw)}
    try:
        yield entry
    finally:
        entry["py_spy"] = stop_py_spy(spy)
    if raw.exists():
        entry["summary"] = summarise_pyspy(raw, roles)


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    parts = path.split("/")
    short = "/".join(parts[-2:]) if "gateway" in parts else parts[-1]
    return f"{m.group(1)} ({short})"


def _role(joined_stack: str, roles: RoleMarkers) -> str:
    for role, markers in roles:
        if any(m in joined_stack for m in markers):
            return role
    return "idle or other"


def summarise_pyspy(raw: Path, roles: RoleMarkers, top: int = 12) -> dict[str, Any]:
    """Samples per thread (role guessed from its stacks with ``roles``), and per thread the functions
    that were on the CPU (leaf frames, 'self') and the gateway and server functions below which the
    time was spent ('total')."""
    per_thread: dict[str, Counter[str]] = defaultdict(Counter)
    leafs: dict[str, Counter[str]] = defaultdict(Counter)
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    samples: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread (")), "thread (?)")
        frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        samples[thread] += n
        per_thread[thread][_role(";".join(frames), roles)] += n
        if frames:
            leafs[thread][frame_name(frames[-1])] += n
        seen = set()
        for f in frames:
            name = frame_name(f)
            ours = any(m in f for m in ("gateway/", "starlette", "anyio", "h11", "httptools", "uvicorn"))
            if ours and name not in seen:
                seen.add(name)
                totals[thread][name] += n
    total = sum(samples.values())
    threads = []
    for thread, n in samples.most_common():
        busy = [(r, c) for r, c in per_thread[thread].most_common() if r != "idle or other"]
        role = "+".join(r for r, c in busy if c >= 0.1 * n) or "idle or other"
        tid = re.match(r"thread \((\d+)\)", thread)
        threads.append({
            "thread": thread, "tid": int(tid.group(1)) if tid else None, "role": role,
            "roles": dict(per_thread[thread].most_common()), "samples": n,
            "share": round(n / total, 3) if total else None,
            "self": [[name, c, round(c / n, 3)] for name, c in leafs[thread].most_common(top)],
            "total": [[name, c, round(c / n, 3)] for name, c in totals[thread].most_common(top)],
        })
    return {"samples": total, "threads": threads}
