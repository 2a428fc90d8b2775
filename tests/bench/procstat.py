"""Watching the gateway and the PACS from outside, through /proc (Linux only).

- Associations: a DICOM association is one TCP connection, so the number of associations the PACS
  holds from the gateway is the number of ESTABLISHED connections whose local end is the PACS's DICOM
  port and whose remote end is a socket the gateway process owns. Orthanc 1.10 does not report its
  open associations (``/statistics`` and ``/system`` have no such field), so this is read from the
  kernel's connection table (``/proc/net/tcp`` and ``tcp6``) and the gateway's ``/proc/<pid>/fd``.
- Memory and threads: ``VmRSS`` and ``Threads`` from ``/proc/<pid>/status``; ``VmHWM`` is the kernel's
  own peak RSS, which catches peaks between two samples.
- CPU: ``utime + stime`` from ``/proc/<pid>/stat``, to split a cell's cost between the processes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_ESTABLISHED = "01"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available() -> bool:
    return os.path.exists("/proc/net/tcp") and os.path.isdir(f"/proc/{os.getpid()}/fd")


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
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


def associations_from(client_pid: int, server_port: int) -> int:
    """ESTABLISHED connections the server (listening on ``server_port``) holds from ``client_pid``."""
    inodes = socket_inodes(client_pid)
    rows = tcp_table()
    client_ports = {lp for lp, rp, st, ino in rows if ino in inodes and rp == server_port and st == _ESTABLISHED}
    return sum(1 for lp, rp, st, _ino in rows if lp == server_port and st == _ESTABLISHED and rp in client_ports)


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


class Sampler:
    """Samples the gateway every ``interval`` seconds in a background thread.

    ``window()`` starts a new measurement window and returns the peaks of the one that ended;
    ``overall`` holds the peaks since ``start()``. Bounded: the thread stops at ``stop()`` or after
    ``max_seconds``, whichever comes first.
    """

    def __init__(self, gateway_pid: int, pacs_port: int, interval: float = 0.005, max_seconds: float = 1800.0) -> None:
        self.gateway_pid = gateway_pid
        self.pacs_port = pacs_port
        self.interval = interval
        self.max_seconds = max_seconds
        self.overall = Peaks()
        self._window = Peaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.last_error: str | None = None

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> Peaks:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.overall

    def window(self) -> Peaks:
        with self._lock:
            ended, self._window = self._window, Peaks()
        return ended

    def sample_once(self) -> None:
        assoc = associations_from(self.gateway_pid, self.pacs_port)
        status = status_fields(self.gateway_pid)
        with self._lock:
            for peaks in (self.overall, self._window):
                peaks.associations = max(peaks.associations, assoc)
                peaks.rss_kb = max(peaks.rss_kb, status.get("rss_kb", 0))
                peaks.threads = max(peaks.threads, status.get("threads", 0))
                peaks.samples += 1

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.sample_once()
            except Exception as exc:  # never let a parsing surprise end the sampling silently
                self.last_error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.interval)
