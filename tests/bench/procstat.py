"""Watching the gateway and the PACS from outside, through /proc (Linux only).

- Associations: a DICOM association is one TCP connection, so the number of associations the PACS
  holds from the gateway is the number of connections whose PACS-side socket (local end: the DICOM
  port) is ESTABLISHED and whose remote end is a socket the gateway process owns. Orthanc 1.10 does not report its
  open associations (``/statistics`` and ``/system`` have no such field), so this is read from the
  kernel's connection table (``/proc/net/tcp`` and ``tcp6``) and the gateway's ``/proc/<pid>/fd``.
- Memory and threads: ``VmRSS`` and ``Threads`` from ``/proc/<pid>/status``; ``VmHWM`` is the kernel's
  own peak RSS, which catches peaks between two samples.
- CPU: ``utime + stime`` from ``/proc/<pid>/stat``, to split a cell's cost between the processes.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_ESTABLISHED = "01"
_MAX_TIMELINE = 100_000
_MAX_OVER_CAP = 10
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available() -> bool:
    return os.path.exists("/proc/net/tcp") and os.path.isdir(f"/proc/{os.getpid()}/fd")


def socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed in between
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_table() -> list[tuple[int, int, str, str]]:
    """``(local port, remote port, state, inode)`` of every TCP socket in this network namespace."""
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            rows.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode))
    return rows


def connections_from(client_pid: int, server_port: int) -> tuple[int, list[tuple[int, str, str]]]:
    """ESTABLISHED connections the server (listening on ``server_port``) holds from ``client_pid``,
    and ``(client port, client-side state, server-side state)`` of every connection between the two."""
    inodes = socket_inodes(client_pid)
    rows = tcp_table()
    client_side = {lp: st for lp, rp, st, ino in rows if ino in inodes and rp == server_port}
    server_side = {rp: st for lp, rp, st, _ino in rows if lp == server_port and rp in client_side}
    # what the PACS holds: its side is ESTABLISHED (whatever state the gateway's side is in by then)
    count = sum(1 for st in server_side.values() if st == _ESTABLISHED)
    return count, sorted((port, st, server_side.get(port, "-")) for port, st in client_side.items())


def associations_from(client_pid: int, server_port: int) -> int:
    """ESTABLISHED connections the server (listening on ``server_port``) holds from ``client_pid``."""
    return connections_from(client_pid, server_port)[0]


def established_to(server_port: int) -> int:
    """Every ESTABLISHED connection accepted on ``server_port`` (whoever the peer is)."""
    return sum(1 for lp, _rp, st, _ino in tcp_table() if lp == server_port and st == _ESTABLISHED)


def status_fields(pid: int) -> dict[str, int]:
    """``rss_kb``, ``hwm_kb`` and ``threads`` of ``pid`` (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    out["rss_kb"] = int(value.split()[0])
                elif key == "VmHWM":
                    out["hwm_kb"] = int(value.split()[0])
                elif key == "Threads":
                    out["threads"] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of ``pid`` so far (0.0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Peaks:
    associations: int = 0
    rss_kb: int = 0
    threads: int = 0
    samples: int = 0
    # (time.monotonic(), associations) at every change of the count; the clock is system-wide on Linux
    timeline: list[tuple[float, int]] = field(default_factory=list)
    # snapshots when the count passed the cap: (time, [(gateway port, gateway-side state, PACS-side state)])
    over_cap: list[tuple[float, list]] = field(default_factory=list)


class Sampler:
    """Samples the gateway every ``interval`` seconds from a separate process.

    A process of its own, so that the sampling rate does not depend on how busy the benchmark's client
    threads keep this interpreter. ``window()`` starts a new measurement window and returns the peaks
    of the one that ended; ``stop()`` returns the peaks since ``start()``. Bounded: the sampler exits
    at ``stop()``, after ``max_seconds``, or when this process is gone.
    """

    def __init__(self, gateway_pid: int, pacs_port: int, interval: float = 0.005, max_seconds: float = 1800.0,
                 cap: int | None = None) -> None:
        self.gateway_pid = gateway_pid
        self.cap = cap
        self.pacs_port = pacs_port
        self.interval = interval
        self.max_seconds = max_seconds
        self.last_error: str | None = None
        self._conn: Any = None
        self._proc: Any = None
        self._overall = Peaks()

    def start(self) -> Sampler:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_sampler_main, name="bench-sampler", daemon=True,
            args=(child, self.gateway_pid, self.pacs_port, self.interval, self.max_seconds, os.getpid(), self.cap),
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(30) or self._conn.recv() != "ready":
            raise RuntimeError("the sampler process did not start")
        return self

    def _ask(self, message: str) -> Peaks:
        try:
            self._conn.send(message)
            if not self._conn.poll(10):
                raise TimeoutError("no answer")
            answer = self._conn.recv()
        except (OSError, EOFError, TimeoutError) as exc:
            self.last_error = f"sampler process: {type(exc).__name__}: {exc}"
            return Peaks()
        if answer.get("error"):
            self.last_error = answer["error"]
        peaks = answer["peaks"]
        peaks["timeline"] = [tuple(x) for x in peaks.get("timeline", [])]
        peaks["over_cap"] = [tuple(x) for x in peaks.get("over_cap", [])]
        return Peaks(**peaks)

    def window(self) -> Peaks:
        return self._ask("window")

    def stop(self) -> Peaks:
        if self._proc is None:
            return self._overall
        self._overall = self._ask("stop")
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()
        self._proc = None
        return self._overall


def _sampler_main(conn: Any, gateway_pid: int, pacs_port: int, interval: float, max_seconds: float,
                  parent_pid: int, cap: int | None) -> None:
    overall, window = Peaks(), Peaks()
    error: str | None = None
    last_count = -1
    conn.send("ready")
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and os.getppid() == parent_pid:
        try:
            assoc, connections = connections_from(gateway_pid, pacs_port)
            status = status_fields(gateway_pid)
            if cap is not None and assoc > cap and len(overall.over_cap) < _MAX_OVER_CAP:
                overall.over_cap.append((time.monotonic(), connections))
            if assoc != last_count and len(overall.timeline) < _MAX_TIMELINE:
                overall.timeline.append((time.monotonic(), assoc))
                last_count = assoc
            for peaks in (overall, window):
                peaks.associations = max(peaks.associations, assoc)
                peaks.rss_kb = max(peaks.rss_kb, status.get("rss_kb", 0))
                peaks.threads = max(peaks.threads, status.get("threads", 0))
                peaks.samples += 1
        except Exception as exc:  # report a parsing surprise instead of ending the sampling silently
            error = f"{type(exc).__name__}: {exc}"
        if conn.poll(interval):
            message = conn.recv()
            if message == "window":
                conn.send({"peaks": asdict(window), "error": error})
                window = Peaks()
            elif message == "stop":
                conn.send({"peaks": asdict(overall), "error": error})
                return
