"""Store benchmark: the gateway's STOW-RS against storescu, pynetdicom and Orthanc's own STOW-RS.

    python -m tests.bench.stow [--smoke] [--out bench-results/stow.json] [--py-spy DIR]

What runs:

1. Orthanc (with its DICOMweb plugin) on free ports, its storage in its own temporary directory on
   disk (removed at the end). ``DicomThreadsCount`` raised so that concurrent stores are not
   queued; ``TCP_NODELAY=1`` in its environment (``tests/support/realpacs.py``).
2. The data, made once before anything is timed: a CT series (500 slices of 512x512x16 bits, about
   262 MB of data set, from ``generate_large_ct_series``) as PS3.10 bytes in memory, each one also
   as a ready-made multipart part (delimiter, Content-Type, file) and as a file on tmpfs
   (``/dev/shm``) for storescu, and as a pydicom data set for pynetdicom.
3. The gateway as its own process, one node for that Orthanc: ``max_pdu = 131072`` (Orthanc's
   maximum), ``stow.lanes`` 2 (the default).
4. Every path stores the whole series into the same Orthanc (``paths_for``): the gateway's STOW-RS with
   1, 10 and 100 instances per request (one httpx connection, requests back to back, each body
   streamed from the prepared parts with a Content-Length, TCP_NODELAY on the client socket), the
   same with two concurrent clients, Orthanc's own STOW-RS (same client), DCMTK storescu (one
   association, files on tmpfs), stock pynetdicom (one association, ``send_c_store`` of each
   pre-read data set), and as diagnostics the gateway's own upper layer in this process (its
   ``Association.store`` of the prepared data set bytes; no HTTP, no multipart, no worker threads),
   on one association and on a new association per instance (what a STOW-RS request of one
   instance costs in DIMSE terms).
   Orthanc is emptied (its studies deleted over REST) before every store, so that every store
   goes into an empty Orthanc and its disk use stays bounded; that and the checks are not timed.
   A warm-up store per path first, then timed rounds that take every path in turn (so that load
   from elsewhere on the machine spreads over all paths).
5. Checks after every store: the gateway's (and Orthanc's) Store Instances Responses list every
   SOP Instance UID in ReferencedSOPSequence and none in FailedSOPSequence, with HTTP 200;
   storescu exits 0 without errors; pynetdicom and the upper layer get Success for each instance;
   Orthanc then holds exactly the series' instances, and the data set bytes of the first and the
   last instance as Orthanc stored them are the ones sent.
6. Peak RSS of a fresh gateway process (clean ``VmHWM``) during one STOW-RS request of more than
   1 GB (2000 CT instances of 512x512x16 bits), streamed as a chunked body and made on the fly from
   one encoded instance with a new SOP Instance UID patched into each copy (the client never holds
   more than that one instance). ``VmHWM`` from ``/proc/<pid>/status`` against a target of 200 MiB,
   reported, not enforced: over the target is not a failure. Orthanc must have disk room for the
   gigabyte (checked with ``shutil.disk_usage``; without it the memory run is skipped, which is a
   problem in the full run and only a message with ``--smoke``).
7. ``--py-spy DIR``: after the timed runs, the CPU of each gateway thread during more stores of the
   profiled path (``--py-spy-path``; ``/proc/<pid>/task``, nothing attached), then py-spy
   (``record -f raw -r 250 --threads``, once with ``--gil`` and once without) during more of them.

``--smoke`` (run by ``test_stow_bench_smoke.py``): 30 instances of 256x256, 1 and 10 instances per
request, one round, and the memory run with 115 instances (about 60 MB); a few seconds.

Output: a table on stdout and JSON (``--out``). MB is 10^6 bytes of data set (the DICOM data set
without file meta or multipart framing: the same number for every path). Ratios are the other
path's median time over this path's (above 1: this path is faster). The exit status is non-zero
only when something went wrong (a failed store, a wrong count of instances, different bytes in
Orthanc), never because of timing or memory: there are no timed assertions. Every loop is bounded
in count and in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.demo.data import UID_ROOT, generate_large_ct_series, instance_bytes
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    OrthancServer,
    _die_with_parent,
    orthanc_version,
)

from . import procstat
from .paths import park_reactor
from .run import BenchGateway, _provenance
from .common import bench_main, log_problems, py_spy_exe, py_spy_recording
from .wado import _children_cpu, _fmt, _nodelay, loadavg, meta_info, thread_cpu

GATEWAY_AE = "DICOMWEB-GW"
ORTHANC_AE = "ORTHANC"
STORESCU_AE = "BENCH-STORESCU"
PYND_AE = "BENCH-PYND"
UL_AE = "BENCH-UL"
NODE = "orthanc"
MAX_PDU = 131072
LANES = 2
MB = 1_000_000
MIB = 1 << 20
STORESCU = "/usr/bin/storescu"
DEFAULT_OUT = "bench-results/stow.json"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BOUNDARY = "stow-bench-6c1e0a9f"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
ACCEPT = "application/dicom+json"
MEMORY_TARGET_MIB = 200
# the memory run's instances: a fixed-width UID, so that it can be patched into the encoded bytes
MEMORY_UID_BASE = 10_000_000
MEMORY_SERIES_UID = f"{UID_ROOT}9.2.5"


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    instances: int
    rows: int
    cols: int
    batches: tuple[int, ...]  # instances per STOW-RS request, one gateway path each
    two_clients: bool  # the gateway path with two concurrent clients (largest batch)
    warmup: int
    runs: int
    store_cap: float  # one store of the whole series, seconds
    run_cap: float  # no new round or phase after this, seconds since start
    memory_instances: int
    memory_rows: int
    memory_cols: int
    memory_cap: float
    profile_runs: int


FULL = Profile("full", 500, 512, 512, (1, 10, 100), True, warmup=1, runs=3, store_cap=240.0, run_cap=1200.0,
               memory_instances=2000, memory_rows=512, memory_cols=512, memory_cap=600.0, profile_runs=3)
SMOKE = Profile("smoke", 30, 256, 256, (1, 10), False, warmup=1, runs=1, store_cap=30.0, run_cap=60.0,
                memory_instances=115, memory_rows=512, memory_cols=512, memory_cap=60.0, profile_runs=1)


def paths_for(profile: Profile) -> list[str]:
    paths = [f"gw-{b}" for b in profile.batches]
    if profile.two_clients:
        paths.append(f"gw-{max(profile.batches)}x2")
    return paths + ["orthanc-stow", "storescu", "pynetdicom", "ul-store", "ul-store-each"]


def _gateway_batch(path: str) -> tuple[int, int] | None:
    """(instances per request, concurrent clients) of a gateway path, None for the others."""
    m = re.fullmatch(r"gw-(\d+)(?:x(\d+))?", path)
    return (int(m.group(1)), int(m.group(2) or 1)) if m else None


def path_label(path: str, profile: Profile) -> str:
    gw = _gateway_batch(path)
    if gw:
        batch, clients = gw
        return f"gateway STOW-RS, {batch}/request" + (f", {clients} clients" if clients > 1 else "")
    if path == "orthanc-stow":
        return f"Orthanc STOW-RS, {max(profile.batches)}/request"
    return {"storescu": "storescu (from tmpfs)", "pynetdicom": "pynetdicom C-STORE",
            "ul-store": "gateway UL C-STORE only",
            "ul-store-each": "gateway UL, assoc. per instance"}[path]


def path_note(path: str, profile: Profile) -> str:
    gw = _gateway_batch(path)
    if gw:
        batch, clients = gw
        return (f"POST /nodes/{NODE}/dicom-web/studies, {batch} instance(s) per request, "
                + (f"{clients} httpx clients in threads taking the requests in turn"
                   if clients > 1 else "one httpx connection, requests back to back")
                + f"; the gateway stores each request over stow.lanes = {LANES} new associations")
    return {
        "orthanc-stow": f"POST {{orthanc}}/dicom-web/studies, {max(profile.batches)} instances per request, the "
                        "same client as the gateway's paths",
        "storescu": f"DCMTK storescu -R -pdu {MAX_PDU} +sd <dir on tmpfs>, TCP_NODELAY=1, one association; "
                    "includes process start and reading the files",
        "pynetdicom": f"stock pynetdicom 3: associate (max_pdu {MAX_PDU}, TCP_NODELAY on EVT_CONN_OPEN, "
                      "LOG_HANDLER_LEVEL none), send_c_store of each pre-read pydicom data set (reactor parked before "
                      "each: works around a pynetdicom 3.0.4 race, see tests/bench/paths.py), release",
        "ul-store": "diagnostic, in this process: gateway/dimse/ul.py opens one association and sends each "
                    "prepared data set with Association.store; no HTTP, no multipart parsing, no lanes",
        "ul-store-each": "diagnostic, as ul-store but a new association (open, C-STORE, release) for each "
                         "instance, as the gateway opens one per STOW-RS request of one instance",
    }[path]


# ------------------------------------------------------------------------------------------------
# Data


@dataclass
class Instance:
    sop_uid: str
    part: bytes  # the multipart part: delimiter line, part headers, blank line, the PS3.10 file, CRLF
    file_start: int  # where the PS3.10 file starts in ``part``
    dataset_offset: int  # where the data set starts in the file
    path: Path | None = None  # the file on tmpfs, for storescu

    @property
    def file(self) -> memoryview:
        return memoryview(self.part)[self.file_start : len(self.part) - 2]

    @property
    def dataset(self) -> memoryview:
        return memoryview(self.part)[self.file_start + self.dataset_offset : len(self.part) - 2]

    @property
    def dataset_bytes(self) -> int:
        return len(self.part) - 2 - self.file_start - self.dataset_offset


def part_head() -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


CLOSE = f"--{BOUNDARY}--\r\n".encode("ascii")


@dataclass
class Series:
    label: str
    study_uid: str
    series_uid: str
    instances: list[Instance]
    directory: Path | None = None  # the files on tmpfs
    datasets: list[Any] = field(default_factory=list)  # pre-read pydicom data sets

    @property
    def count(self) -> int:
        return len(self.instances)

    @property
    def total_dataset_bytes(self) -> int:
        return sum(i.dataset_bytes for i in self.instances)

    @property
    def total_file_bytes(self) -> int:
        return sum(len(i.part) - 2 - i.file_start for i in self.instances)

    @property
    def uids(self) -> set[str]:
        return {i.sop_uid for i in self.instances}

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "instances": self.count, "dataset_bytes": self.total_dataset_bytes,
                "dataset_mb": round(self.total_dataset_bytes / MB, 1), "file_bytes": self.total_file_bytes,
                "study_uid": self.study_uid, "series_uid": self.series_uid,
                "files_on": str(self.directory.parent) if self.directory else None}


def _tmpfs() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def make_series(profile: Profile, with_files: bool, with_datasets: bool) -> Series:
    """The CT series as prepared parts (and files on tmpfs, and pre-read data sets)."""
    head = part_head()
    instances: list[Instance] = []
    datasets: list[Any] = []
    directory = Path(tempfile.mkdtemp(prefix="stow-bench-files-", dir=_tmpfs())) if with_files else None
    study_uid = series_uid = ""
    try:
        for number, ds in enumerate(generate_large_ct_series(profile.instances, profile.rows, profile.cols), 1):
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            data = instance_bytes(ds)
            offset, sop = meta_info(data[:4096])
            inst = Instance(sop, head + data + b"\r\n", len(head), offset)
            if directory is not None:
                inst.path = directory / f"ct{number:05d}.dcm"
                inst.path.write_bytes(data)
            if with_datasets:
                datasets.append(dcmread(io.BytesIO(data)))
            instances.append(inst)
    except BaseException:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    label = f"CT series, {profile.instances} slices {profile.rows}x{profile.cols}x16 bits"
    return Series(label, study_uid, series_uid, instances, directory, datasets)


def memory_template(rows: int, cols: int) -> tuple[bytes, memoryview, str]:
    """One CT instance for the memory run: (its bytes up to the Pixel Data element, the rest, the
    placeholder SOP Instance UID found twice in the first part: file meta and data set)."""
    ds = next(generate_large_ct_series(1, rows, cols))
    placeholder = memory_uid(0)
    ds.SOPInstanceUID = placeholder
    ds.file_meta.MediaStorageSOPInstanceUID = placeholder
    ds.SeriesInstanceUID = MEMORY_SERIES_UID
    ds.SeriesNumber = 5
    data = instance_bytes(ds)
    pixel = data.find(b"\xe0\x7f\x10\x00OW")
    if pixel < 0:
        raise BenchError("no Pixel Data element in the memory run's template")
    head = data[:pixel]
    if head.count(placeholder.encode("ascii")) != 2:
        raise BenchError("the template's SOP Instance UID is not where it was expected")
    return head, memoryview(data)[pixel:], placeholder


def memory_uid(index: int) -> str:
    return f"{UID_ROOT}9.3.5.{MEMORY_UID_BASE + index}"  # same length for every index below 90 million


def memory_body(count: int, head: bytes, tail: memoryview, placeholder: str) -> Iterator[bytes | memoryview]:
    """A multipart body of ``count`` instances made on the fly: only the template is held."""
    old = placeholder.encode("ascii")
    for i in range(count):
        delimiter = (b"\r\n" if i else b"") + part_head()
        yield delimiter + head.replace(old, memory_uid(i).encode("ascii"))
        yield tail
    yield b"\r\n" + CLOSE


# ------------------------------------------------------------------------------------------------
# Orthanc: checks and emptying


def orthanc_count(server: OrthancServer) -> int:
    return int(server.rest("GET", "/statistics").json()["CountInstances"])


def orthanc_disk_mb(server: OrthancServer) -> float:
    return float(server.rest("GET", "/statistics").json().get("TotalDiskSizeMB", 0))


def clear_orthanc(server: OrthancServer) -> None:
    """Delete every study (each DELETE removes its series, instances and files)."""
    for _attempt in range(3):
        for study in server.rest("GET", "/studies").json():
            server.rest("DELETE", f"/studies/{study}")
        if orthanc_count(server) == 0:
            return
    raise BenchError(f"Orthanc still holds {orthanc_count(server)} instances after deleting every study")


def stored_dataset(server: OrthancServer, sop_uid: str) -> bytes:
    found = [x for x in server.rest("POST", "/tools/lookup", content=sop_uid).json() if x.get("Type") == "Instance"]
    if len(found) != 1:
        raise BenchError(f"Orthanc lookup of {sop_uid}: {found}")
    data = server.rest("GET", f"/instances/{found[0]['ID']}/file").content
    offset, _ = meta_info(data[:4096])
    return data[offset:]


def check_orthanc(server: OrthancServer, series: Series) -> list[str]:
    """Orthanc holds exactly the series, and the first and last instances' data sets are the ones sent."""
    problems = []
    count = orthanc_count(server)
    if count != series.count:
        problems.append(f"Orthanc holds {count} instances, expected {series.count}")
        return problems
    for inst in (series.instances[0], series.instances[-1]):
        if stored_dataset(server, inst.sop_uid) != inst.dataset:
            problems.append(f"Orthanc's copy of {inst.sop_uid} differs from the data set sent")
    return problems


# ------------------------------------------------------------------------------------------------
# One store of the whole series per path


@dataclass
class Stored:
    seconds: float
    stored: int
    uids: set[str] | None  # None: not reported on this path
    requests: int = 0
    request_seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _nodelay_transport() -> httpx.HTTPTransport:
    return httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                               limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


def parse_store_response(r: httpx.Response) -> tuple[set[str], int, str]:
    """(referenced SOP Instance UIDs, failed instances, a problem or "") of a Store Instances Response."""
    try:
        body = r.json()
    except ValueError:
        return set(), 0, f"HTTP {r.status_code}, not JSON: {r.text[:200]}"
    if not isinstance(body, dict):
        return set(), 0, f"HTTP {r.status_code}: unexpected JSON {str(body)[:200]}"
    uids = {str(item["00081155"]["Value"][0]) for item in body.get("00081199", {}).get("Value", [])}
    failed = len(body.get("00081198", {}).get("Value", []))
    problem = ""
    if r.status_code != 200 or failed:
        reasons = [item.get("00081197", {}).get("Value") for item in body.get("00081198", {}).get("Value", [])[:3]]
        problem = f"HTTP {r.status_code}, {failed} failed (FailureReason {reasons}), warning {r.headers.get('warning')}"
    return uids, failed, problem


class HttpStore:
    """STOW-RS over httpx: one keep-alive connection per client, each body streamed from the
    prepared parts with its Content-Length."""

    def __init__(self, url: str, batch: int, clients: int, cap: float) -> None:
        self.url = url
        self.batch = batch
        self.cap = cap
        self.clients = [httpx.Client(transport=_nodelay_transport(), timeout=httpx.Timeout(120.0), trust_env=False)
                        for _ in range(clients)]

    def _post(self, client: httpx.Client, chunk: Sequence[Instance]) -> tuple[float, set[str], str]:
        def body() -> Iterator[bytes]:
            for inst in chunk:
                yield inst.part
            yield CLOSE

        length = sum(len(i.part) for i in chunk) + len(CLOSE)
        started = time.perf_counter()
        r = client.post(self.url, content=body(), headers={
            "Content-Type": CONTENT_TYPE, "Content-Length": str(length), "Accept": ACCEPT})
        elapsed = time.perf_counter() - started
        uids, _failed, problem = parse_store_response(r)
        return elapsed, uids, problem

    def store(self, series: Series) -> Stored:
        batches = [series.instances[i : i + self.batch] for i in range(0, series.count, self.batch)]
        uids: set[str] = set()
        times: list[float] = []
        problems: list[str] = []
        lock = threading.Lock()
        started = time.perf_counter()
        deadline = time.monotonic() + self.cap

        def worker(k: int) -> None:
            client = self.clients[k]
            for chunk in batches[k :: len(self.clients)]:
                if problems or time.monotonic() > deadline:
                    return
                try:
                    elapsed, got, problem = self._post(client, chunk)
                except httpx.HTTPError as exc:
                    elapsed, got, problem = 0.0, set(), f"{type(exc).__name__}: {exc}"
                with lock:
                    times.append(elapsed)
                    uids.update(got)
                    if problem:
                        problems.append(problem)

        if len(self.clients) == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(len(self.clients))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=self.cap + 130)
            if any(t.is_alive() for t in threads):
                problems.append("a client thread did not finish")
        seconds = time.perf_counter() - started
        if problems:
            raise BenchError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if len(times) != len(batches):
            raise BenchError(f"cut at the {self.cap:g} s cap after {len(times)} of {len(batches)} requests")
        return Stored(seconds, len(uids), uids, requests=len(times), request_seconds=times)

    def close(self) -> None:
        for c in self.clients:
            c.close()


class StorescuStore:
    def __init__(self, port: int, cap: float) -> None:
        self.port = port
        self.cap = cap

    def store(self, series: Series) -> Stored:
        assert series.directory is not None
        argv = [STORESCU, "-aet", STORESCU_AE, "-aec", ORTHANC_AE, "-pdu", str(MAX_PDU), "-R",
                "+sd", "127.0.0.1", str(self.port), str(series.directory)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        started = time.perf_counter()
        proc = subprocess.run(argv, check=False, capture_output=True, env=env, timeout=self.cap,
                              preexec_fn=_die_with_parent)
        seconds = time.perf_counter() - started
        log = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            raise BenchError(f"storescu exited with {proc.returncode}: {log[-300:]}")
        problems = [line for line in log.splitlines() if line.startswith(("E:", "F:"))]
        if problems:
            raise BenchError(f"storescu: {problems[:3]}")
        return Stored(seconds, -1, None)  # counted in Orthanc


class PynetdicomStore:
    """Stock pynetdicom: one association, send_c_store of each pre-read data set."""

    def __init__(self, port: int, cap: float) -> None:
        from pynetdicom import AE

        from gateway.dimse.net import configure_pynetdicom

        configure_pynetdicom()  # LOG_HANDLER_LEVEL "none", no identifier logging
        self.port = port
        self.cap = cap
        self.ae = AE(ae_title=PYND_AE)
        self.ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = self.ae.network_timeout = 60

    def store(self, series: Series) -> Stored:
        from pynetdicom import evt

        if len(series.datasets) != series.count:
            raise BenchError("the pre-read data sets are missing")
        deadline = time.monotonic() + self.cap
        stored = 0
        uids: set[str] = set()
        started = time.perf_counter()
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=ORTHANC_AE,
                                  evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)], max_pdu=MAX_PDU)
        if not assoc.is_established:
            raise BenchError("pynetdicom: association not established")
        try:
            for ds in series.datasets:
                if time.monotonic() > deadline:
                    raise BenchError(f"cut at the {self.cap:g} s cap after {stored} instances")
                park_reactor(assoc)  # a pynetdicom 3.0.4 race, see tests/bench/paths.py
                status = assoc.send_c_store(ds)
                if not status or "Status" not in status:
                    raise BenchError("pynetdicom: no C-STORE response (timeout or association lost)")
                if int(status.Status) != 0x0000:
                    raise BenchError(f"pynetdicom: C-STORE status 0x{int(status.Status):04X}")
                stored += 1
                uids.add(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.release()
        return Stored(time.perf_counter() - started, stored, uids)


class UpperLayerStore:
    """The gateway's upper layer in this process: Association.store of each data set, on one
    association (``each=False``) or on a new association per instance (``each=True``)."""

    def __init__(self, port: int, cap: float, each: bool = False) -> None:
        self.port = port
        self.cap = cap
        self.each = each

    def _open(self) -> Any:
        from gateway.dimse.net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
        from gateway.dimse.ul import Proposal, open_association

        # the contexts the gateway's StoreSession proposes for one class in a native syntax
        return open_association(
            node="bench", host="127.0.0.1", port=self.port, calling_ae=UL_AE, called_ae=ORTHANC_AE,
            proposal=Proposal(contexts=[(CT_IMAGE, (ExplicitVRLittleEndian, ImplicitVRLittleEndian))]),
            max_pdu=MAX_PDU, connect_timeout=5, acse_timeout=10, dimse_timeout=60,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME)

    def store(self, series: Series) -> Stored:
        deadline = time.monotonic() + self.cap
        stored = 0
        uids: set[str] = set()
        assoc = None
        started = time.perf_counter()
        try:
            for n, inst in enumerate(series.instances):
                if time.monotonic() > deadline:
                    raise BenchError(f"cut at the {self.cap:g} s cap after {stored} instances")
                if assoc is None:
                    assoc = self._open()
                cx = assoc.context_for(CT_IMAGE, ExplicitVRLittleEndian)
                if cx is None:
                    raise BenchError("gateway UL: Explicit VR Little Endian not accepted for CT Image Storage")
                status, comment = assoc.store(cx.context_id, CT_IMAGE, inst.sop_uid, n % 65535 + 1, inst.dataset)
                if status != 0x0000:
                    raise BenchError(f"gateway UL: C-STORE status 0x{status:04X} {comment}")
                stored += 1
                uids.add(inst.sop_uid)
                if self.each:
                    assoc, old = None, assoc
                    old.release()
        finally:
            if assoc is not None:
                assoc.release()
        return Stored(time.perf_counter() - started, stored, uids)


# ------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Context:
    profile: Profile
    server: OrthancServer
    series: Series
    gateway_pid: int
    sampler: procstat.Sampler | None
    began: float


@dataclass
class Cell:
    path: str
    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    warmup: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    truncated: bool = False


def one_store(ctx: Context, client: Any, cell: Cell) -> dict[str, Any] | None:
    """One store of the whole series into an emptied Orthanc, with its CPU accounting and checks;
    None (and an error recorded) on failure."""
    series = ctx.series
    try:
        clear_orthanc(ctx.server)
    except Exception as exc:
        cell.errors.append(f"emptying Orthanc: {type(exc).__name__}: {exc}")
        return None
    gw0, pacs0 = procstat.cpu_seconds(ctx.gateway_pid), procstat.cpu_seconds(ctx.server.pid)
    own0, kids0 = time.process_time(), _children_cpu()
    load = loadavg()
    try:
        got: Stored = client.store(series)
    except Exception as exc:
        cell.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    gw_cpu = procstat.cpu_seconds(ctx.gateway_pid) - gw0
    pacs_cpu = procstat.cpu_seconds(ctx.server.pid) - pacs0
    client_cpu = (time.process_time() - own0) + (_children_cpu() - kids0)
    problems = []
    if got.stored >= 0 and got.stored != series.count:
        problems.append(f"{got.stored} instances stored, expected {series.count}")
    if got.uids is not None and got.uids != series.uids:
        problems.append(f"SOP Instance UIDs differ ({len(got.uids ^ series.uids)} not matching)")
    try:
        disk_mb = orthanc_disk_mb(ctx.server)
        problems += check_orthanc(ctx.server, series)
    except Exception as exc:
        disk_mb = None
        problems.append(f"checking Orthanc: {type(exc).__name__}: {exc}")
    if problems:
        cell.errors.append("; ".join(problems))
        return None
    result: dict[str, Any] = {
        "seconds": round(got.seconds, 4),
        "instances_per_s": round(series.count / got.seconds, 1),
        "mb_per_s": round(series.total_dataset_bytes / MB / got.seconds, 1),
        "stored": series.count,
        "orthanc_disk_mb": disk_mb,
        "cpu_s": {
            "gateway": round(gw_cpu, 3) if _gateway_batch(cell.path) else None,
            "orthanc": round(pacs_cpu, 3),
            "client": round(client_cpu, 3),
        },
        "loadavg_1m": load[0] if load else None,
    }
    if got.requests:
        ms = sorted(t * 1000 for t in got.request_seconds)
        result.update({"requests": got.requests, "request_ms_median": round(statistics.median(ms), 2),
                       "request_ms_max": round(ms[-1], 2)})
    return result


def run_paths(ctx: Context, paths: Sequence[str], clients: dict[str, Any],
              print_fn: Callable[[str], None]) -> list[Cell]:
    """Warm-up of every path, then timed rounds over all paths; bounded by count and by time."""
    profile = ctx.profile
    cells = {p: Cell(p, path_label(p, profile)) for p in paths}
    for p in paths:
        for _ in range(profile.warmup):
            result = one_store(ctx, clients[p], cells[p])
            if result is not None:
                cells[p].warmup.append(result)
    if ctx.sampler is not None:
        ctx.sampler.window()
    for round_no in range(profile.runs):
        if round_no and time.monotonic() - ctx.began > profile.run_cap:
            for c in cells.values():
                c.truncated = True
            break
        for p in paths:
            result = one_store(ctx, clients[p], cells[p])
            if result is not None:
                result["round"] = round_no
                cells[p].runs.append(result)
        print_fn(f"  round {round_no + 1}: " + ", ".join(
            f"{p} {cells[p].runs[-1]['seconds']:.2f} s" if cells[p].runs and cells[p].runs[-1].get("round") == round_no
            else f"{p} failed" for p in paths))
    try:
        clear_orthanc(ctx.server)
    except Exception as exc:
        next(iter(cells.values())).errors.append(f"emptying Orthanc: {type(exc).__name__}: {exc}")
    return list(cells.values())


def summarise_cell(cell: Cell, series: Series) -> dict[str, Any]:
    secs = [r["seconds"] for r in cell.runs]
    median = statistics.median(secs) if secs else None

    def med(key: str) -> float | None:
        values = [r[key] for r in cell.runs if r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    def med_cpu(key: str) -> float | None:
        values = [r["cpu_s"][key] for r in cell.runs if r["cpu_s"].get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "path": cell.path,
        "label": cell.label,
        "runs": len(cell.runs),
        "median_s": round(median, 4) if median else None,
        "min_s": round(min(secs), 4) if secs else None,
        "max_s": round(max(secs), 4) if secs else None,
        "instances_per_s": round(series.count / median, 1) if median else None,
        "mb_per_s": round(series.total_dataset_bytes / MB / median, 1) if median else None,
        "stored": cell.runs[0]["stored"] if cell.runs else None,
        "requests": cell.runs[0].get("requests") if cell.runs else None,
        "request_ms_median": med("request_ms_median"),
        "cpu_s": {"gateway": med_cpu("gateway"), "orthanc": med_cpu("orthanc"), "client": med_cpu("client")},
        "errors": len(cell.errors),
        "error_samples": sorted(set(cell.errors))[:5],
        "truncated_by_time_cap": cell.truncated,
        "detail": cell.runs,
        "warmup": cell.warmup,
    }


REFERENCES = {"storescu": "storescu", "pynetdicom": "pynetdicom", "ul_store": "ul-store",
              "ul_store_each": "ul-store-each", "orthanc_stow": "orthanc-stow"}


def ratios(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per path, the reference path's median time over this path's (above 1: this path is faster)."""
    by_path = {s["path"]: s for s in summaries}
    out: dict[str, dict[str, float | None]] = {}
    for s in summaries:
        if not (_gateway_batch(s["path"]) or s["path"] == "orthanc-stow"):
            continue
        row: dict[str, float | None] = {}
        for name, ref_path in REFERENCES.items():
            ref = by_path.get(ref_path)
            if ref_path == s["path"]:
                continue
            row[f"vs_{name}"] = round(ref["median_s"] / s["median_s"], 3) \
                if ref and ref["median_s"] and s["median_s"] else None
        out[s["path"]] = row
    return out


# ------------------------------------------------------------------------------------------------
# Memory: one request of more than a gigabyte


def memory_run(profile: Profile, server: OrthancServer, print_fn: Callable[[str], None]) -> dict[str, Any]:
    """A fresh gateway, one chunked STOW-RS request of ``profile.memory_instances`` instances; its VmHWM."""
    head, tail, placeholder = memory_template(profile.memory_rows, profile.memory_cols)
    count = profile.memory_instances
    file_bytes = len(head) + len(tail)
    dataset_bytes = file_bytes - meta_info(head[:4096])[0]
    # every part but the first starts with the CRLF of its delimiter; the close delimiter has one too
    body_bytes = count * (len(part_head()) + file_bytes + 2) + len(CLOSE)
    out: dict[str, Any] = {
        "instances": count, "instance_file_bytes": file_bytes, "dataset_bytes": dataset_bytes * count,
        "body_bytes": body_bytes, "target_mib": MEMORY_TARGET_MIB,
        "lanes": LANES, "transfer": "chunked (no Content-Length), parts made on the fly from one template",
        "skipped": None, "error": None,
    }
    storage = server.tmpdir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(storage).free
    need = out["body_bytes"] + 2 * (1 << 30)  # Orthanc's files plus a margin
    out["disk_free_gb"] = round(free / 1e9, 1)
    if free < need:
        out["skipped"] = (f"not enough disk for Orthanc's storage at {storage}: {free / 1e9:.1f} GB free, "
                          f"{need / 1e9:.1f} GB needed")
        return out
    clear_orthanc(server)
    gateway = BenchGateway(gateway_settings(server.dicom_port, "warning"))
    with gateway:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        start = procstat.status_fields(pid)
        out["start_rss_mib"] = round(start.get("rss_kb", 0) / 1024, 1)
        out["start_hwm_mib"] = round(start.get("hwm_kb", 0) / 1024, 1)
        sampler = procstat.Sampler(pid, server.dicom_port, interval=0.01).start() if procstat.available() else None
        started = time.perf_counter()
        try:
            with httpx.Client(transport=_nodelay_transport(), trust_env=False,
                              timeout=httpx.Timeout(120.0)) as client:
                deadline = time.monotonic() + profile.memory_cap

                def body() -> Iterator[bytes | memoryview]:
                    for chunk in memory_body(count, head, tail, placeholder):
                        if time.monotonic() > deadline:
                            raise BenchError(f"the memory run passed its {profile.memory_cap:g} s cap")
                        yield chunk

                r = client.post(gateway.url(NODE, "/studies"), content=body(),
                                headers={"Content-Type": CONTENT_TYPE, "Accept": ACCEPT})
            uids, _failed, problem = parse_store_response(r)
            if problem:
                out["error"] = problem
            elif uids != {memory_uid(i) for i in range(count)}:
                out["error"] = f"{len(uids)} instances in the response, expected {count}"
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        end = procstat.status_fields(pid)
        peaks = sampler.stop() if sampler is not None else None
        memory_log_problems = log_problems(gateway.log_text(), ("ERROR", "CRITICAL", "Traceback"), last=10)
    try:
        held = orthanc_count(server)
        out["orthanc_disk_mb"] = orthanc_disk_mb(server)
        if out["error"] is None and held != count:
            out["error"] = f"Orthanc holds {held} instances, expected {count}"
        clear_orthanc(server)
    except Exception as exc:
        out["error"] = out["error"] or f"checking Orthanc: {type(exc).__name__}: {exc}"
    hwm = end.get("hwm_kb", 0)
    out.update({
        "seconds": round(seconds, 2),
        "mb_per_s": round(out["dataset_bytes"] / MB / seconds, 1) if seconds > 0 else None,
        "vmhwm_mib": round(hwm / 1024, 1),
        "vmhwm_mb": round(hwm * 1024 / MB, 1),
        "sampled_peak_rss_mib": round(peaks.rss_kb / 1024, 1) if peaks else None,
        "peak_threads": peaks.threads if peaks else None,
        "peak_associations": peaks.associations if peaks else None,
        "samples": peaks.samples if peaks else 0,
        "within_target": bool(hwm) and hwm / 1024 <= MEMORY_TARGET_MIB,
        "gateway_log_problems": memory_log_problems,
    })
    print_fn(f"  memory: {count} instances, {out['body_bytes'] / 1e9:.2f} GB in one request, {out['seconds']} s "
             f"({out['mb_per_s']} MB/s): gateway VmHWM {out['vmhwm_mib']} MiB "
             f"({'PASS' if out['within_target'] else 'over target'} against {MEMORY_TARGET_MIB} MiB)"
             + (f"; error: {out['error']}" if out["error"] else ""))
    return out


# ------------------------------------------------------------------------------------------------
# py-spy


_ROLE_MARKERS = (
    ("store worker", ("_send (", "Association.store (", "StoreSession._send")),
    ("event loop", ("run_until_complete", "run_forever", "uvicorn", "serve (gateway/cli")),
)



def profile_gateway(ctx: Context, out_dir: Path, path: str, client: HttpStore) -> dict[str, Any]:
    """The CPU of each gateway thread during stores of ``path`` (from /proc), then py-spy
    ``record -f raw -r 250 --threads`` with ``--gil`` and without during more of them."""

    def stores(runs: int, deadline: float) -> tuple[list[float], list[str]]:
        seconds, errors = [], []
        for _ in range(runs):
            if time.monotonic() > deadline:
                break
            try:
                clear_orthanc(ctx.server)
                seconds.append(round(client.store(ctx.series).seconds, 3))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        return seconds, errors

    results: dict[str, Any] = {"path": path}
    before = thread_cpu(ctx.gateway_pid)
    t0 = time.perf_counter()
    runs, errors = stores(ctx.profile.profile_runs, time.monotonic() + 120)
    wall = time.perf_counter() - t0
    after = thread_cpu(ctx.gateway_pid)
    used = {tid: cpu - before.get(tid, (comm, 0.0))[1] for tid, (comm, cpu) in after.items()}
    results["threads_cpu"] = {
        "store_seconds": runs, "wall_s": round(wall, 3), "errors": errors,
        "process_cpu_s": round(sum(used.values()), 3),
        "note": "wall includes emptying Orthanc before each store",
        "threads": [{"tid": tid, "comm": after[tid][0], "cpu_s": round(cpu, 3)}
                    for tid, cpu in sorted(used.items(), key=lambda item: -item[1]) if cpu > 0.005],
    }
    exe = py_spy_exe()
    if exe is None:
        results["error"] = "py-spy is not installed"
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    for mode in ("gil", "nogil"):
        raw = out_dir / f"gateway-stow-{path}-{mode}.txt"
        with py_spy_recording(exe, ctx.gateway_pid, raw, mode == "gil", _ROLE_MARKERS) as entry:
            runs, errors = stores(ctx.profile.profile_runs, time.monotonic() + 120)
            entry.update(store_seconds=runs, errors=errors)
        results[mode] = entry
    clear_orthanc(ctx.server)
    return results


# ------------------------------------------------------------------------------------------------
# Output


def render(report: dict[str, Any]) -> str:
    setup = report["setup"]
    data = report["data"]
    lines = [f"STOW-RS store benchmark ({report['profile']}): Orthanc {setup['orthanc_version']}, "
             f"{setup['cpus']} CPUs, "
             f"load average {report['load_average']['start']} at start, {report['load_average']['end']} at end",
             f"  data: {data['label']}, {data['instances']} instances, {data['dataset_mb']} MB of data set; "
             "every store into an emptied Orthanc",
             "", f"== store all {data['instances']} instances: median of {report['runs']} timed run(s) after "
                 f"{report['warmup']} warm-up ==",
             f"{'path':<38}{'median s':>9}{'min s':>8}{'inst/s':>8}{'MB/s':>7}{'req ms':>8}{'CPU s gw':>9}"
             f"{'Orthanc':>8}{'client':>8}{'vs storescu':>12}{'vs pynetd.':>11}{'errors':>7}"]
    for s in report["results"]:
        r = report["ratios"].get(s["path"], {})
        lines.append(f"{s['label']:<38}{_fmt(s['median_s'], 3):>9}{_fmt(s['min_s'], 3):>8}"
                     f"{_fmt(s['instances_per_s']):>8}{_fmt(s['mb_per_s']):>7}{_fmt(s['request_ms_median']):>8}"
                     f"{_fmt(s['cpu_s']['gateway'], 2):>9}{_fmt(s['cpu_s']['orthanc'], 2):>8}"
                     f"{_fmt(s['cpu_s']['client'], 2):>8}{_fmt(r.get('vs_storescu'), 2):>12}"
                     f"{_fmt(r.get('vs_pynetdicom'), 2):>11}{s['errors']:>7}")
    lines += ["", "ratios: the reference's median time / this path's (above 1: this path is faster)",
              f"{'path':<38}{'storescu':>10}{'pynetdicom':>12}{'UL 1 assoc':>12}{'UL assoc/inst':>15}"
              f"{'Orthanc STOW':>14}"]
    labels = {s["path"]: s["label"] for s in report["results"]}
    for p, r in report["ratios"].items():
        lines.append(f"{labels[p]:<38}{_fmt(r.get('vs_storescu'), 2):>10}{_fmt(r.get('vs_pynetdicom'), 2):>12}"
                     f"{_fmt(r.get('vs_ul_store'), 2):>12}{_fmt(r.get('vs_ul_store_each'), 2):>15}"
                     f"{_fmt(r.get('vs_orthanc_stow'), 2):>14}")
    mem = report.get("memory")
    if mem:
        if mem.get("skipped"):
            lines += ["", f"memory run skipped: {mem['skipped']}"]
        elif "vmhwm_mib" in mem:
            lines += ["", f"memory: fresh gateway, one chunked STOW-RS request of {mem['instances']} instances "
                          f"({mem['body_bytes'] / 1e9:.2f} GB) in {mem['seconds']} s ({mem['mb_per_s']} MB/s): "
                          f"VmHWM {mem['vmhwm_mib']} MiB (after start-up {mem['start_hwm_mib']} MiB; sampled peak "
                          f"RSS {mem['sampled_peak_rss_mib']} MiB, peak associations {mem['peak_associations']}), "
                          f"target {mem['target_mib']} MiB: {'PASS' if mem['within_target'] else 'over target'}"
                          + (f"; error: {mem['error']}" if mem.get("error") else "")]
    gw = report["gateway_process"]
    lines.append(f"main gateway process: peak RSS {gw['peak_rss_mib']} MiB sampled, VmHWM {gw['hwm_rss_mib']} MiB, "
                 f"peak threads {gw['peak_threads']}, peak associations to Orthanc {gw['peak_associations']}")
    prof = report.get("py_spy")
    if prof:
        cpu = prof.get("threads_cpu") or {}
        lines.append(f"gateway threads' CPU during {len(cpu.get('store_seconds', []))} store(s) of {prof['path']} "
                     f"({cpu.get('store_seconds')} s; process {cpu.get('process_cpu_s')} s CPU):")
        for t in cpu.get("threads", [])[:6]:
            lines.append(f"  tid {t['tid']:<8} {t['comm']:<20} {t['cpu_s']:>7.3f} s CPU")
        for mode in ("gil", "nogil"):
            entry = prof.get(mode)
            summary = entry.get("summary") if isinstance(entry, dict) else None
            if not summary:
                continue
            what = "--gil: the thread holding the GIL" if mode == "gil" else "no --gil: every thread py-spy saw active"
            lines.append(f"py-spy ({what}), {summary['samples']} samples, stores of {entry['store_seconds']} s:")
            for t in summary["threads"][:4]:
                lines.append(f"  {t['role']:<26} {t['thread']:<34} {t['share'] * 100:5.1f}%  self: "
                             + ", ".join(f"{n} {c * 100:.0f}%" for n, _, c in t["self"][:6]))
    checks = report["checks"]
    lines += ["", f"errors: {checks['errors_total']}" + (f"  e.g. {checks['error_samples']}" if checks["error_samples"] else ""),
              f"data prepared in {report['setup']['prepare_seconds']} s; benchmark {report['elapsed_seconds']} s; "
              f"results in {report['out']}"]
    if checks["problems"]:
        lines.append("PROBLEMS: " + "; ".join(checks["problems"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def gateway_settings(dicom_port: int, log_level: str) -> dict[str, Any]:
    return {
        "server": {"log_level": log_level},
        "gateway": {"ae_title": GATEWAY_AE},
        "stow": {"lanes": LANES},
        "nodes": [{"name": NODE, "default": True, "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": dicom_port,
                   "max_associations": 8, "max_pdu": MAX_PDU, "relational": "assume"}],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.stow", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, one run per path")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    parser.add_argument("--runs", type=int, help="timed runs per path (default 3; smoke 1)")
    parser.add_argument("--paths", help="comma-separated subset of the paths (default: all of the profile's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    parser.add_argument("--orthanc-dicom-threads", type=int, default=16, help="Orthanc's DicomThreadsCount")
    parser.add_argument("--gateway-log-level", default="info", help="the gateway's server.log_level")
    parser.add_argument("--py-spy", metavar="DIR", help="profile gateway stores with py-spy into DIR")
    parser.add_argument("--py-spy-path", help="the gateway path to profile (default: the largest batch)")
    return parser.parse_args(argv)


def _open_client(path: str, gateway: BenchGateway, server: OrthancServer, profile: Profile) -> Any:
    cap = profile.store_cap
    gw = _gateway_batch(path)
    if gw:
        return HttpStore(gateway.url(NODE, "/studies"), gw[0], gw[1], cap)
    if path == "orthanc-stow":
        return HttpStore(server.dicomweb_url + "studies", max(profile.batches), 1, cap)
    if path == "storescu":
        return StorescuStore(server.dicom_port, cap)
    if path == "pynetdicom":
        return PynetdicomStore(server.dicom_port, cap)
    if path in ("ul-store", "ul-store-each"):
        return UpperLayerStore(server.dicom_port, cap, each=path == "ul-store-each")
    raise SystemExit(f"unknown path {path!r}")


def run(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    profile = SMOKE if args.smoke else FULL
    if args.runs:
        profile = dataclasses.replace(profile, runs=args.runs)
    all_paths = paths_for(profile)
    paths = [p for p in (args.paths or ",".join(all_paths)).split(",") if p]
    for p in paths:
        if p not in all_paths:
            raise SystemExit(f"unknown path {p!r}; this profile has {', '.join(all_paths)}")
    spy_path = args.py_spy_path or f"gw-{max(profile.batches)}"
    if args.py_spy and not _gateway_batch(spy_path):
        raise SystemExit(f"--py-spy-path must be a gateway path, not {spy_path!r}")
    began = time.monotonic()
    load_start = loadavg()
    problems: list[str] = []
    summaries: list[dict[str, Any]] = []
    memory: dict[str, Any] | None = None
    spy: dict[str, Any] | None = None
    series = make_series(profile, with_files="storescu" in paths, with_datasets="pynetdicom" in paths)
    prepare_seconds = time.monotonic() - began
    try:
        server = OrthancServer(aet=ORTHANC_AE, stop_timeout=0,
                               extra_config={"DicomThreadsCount": args.orthanc_dicom_threads})
        with server:
            print_fn(f"Orthanc {'.'.join(map(str, orthanc_version()))} on DICOM port {server.dicom_port}, storage in "
                     f"{server.tmpdir}; {series.count} CT instances ({series.total_dataset_bytes / MB:.0f} MB) "
                     f"prepared in {prepare_seconds:.1f} s; load average {loadavg()}")
            gateway = BenchGateway(gateway_settings(server.dicom_port, args.gateway_log_level))
            with gateway:
                assert gateway.proc is not None
                gw_pid = gateway.proc.pid
                sampler = procstat.Sampler(gw_pid, server.dicom_port).start() if procstat.available() else None
                ctx = Context(profile, server, series, gw_pid, sampler, began)
                clients: dict[str, Any] = {}
                try:
                    for p in paths:
                        clients[p] = _open_client(p, gateway, server, profile)
                    cells = run_paths(ctx, paths, clients, print_fn)
                    summaries = [summarise_cell(c, series) for c in cells]
                    for s in summaries:
                        print_fn(f"  {s['label']:<38} median {_fmt(s['median_s'], 3)} s  {_fmt(s['mb_per_s'])} MB/s  "
                                 f"n={s['runs']}  errors={s['errors']}"
                                 + (f"  e.g. {s['error_samples'][0][:160]}" if s["error_samples"] else ""))
                    if args.py_spy and time.monotonic() - began < profile.run_cap + 300:
                        gw = _gateway_batch(spy_path)
                        assert gw is not None
                        spy_client = HttpStore(gateway.url(NODE, "/studies"), gw[0], gw[1], profile.store_cap)
                        try:
                            spy = profile_gateway(ctx, Path(args.py_spy), spy_path, spy_client)
                        finally:
                            spy_client.close()
                        print_fn(f"  py-spy: raw stacks in {args.py_spy}")
                finally:
                    for c in clients.values():
                        if hasattr(c, "close"):
                            c.close()
                    overall = sampler.stop() if sampler is not None else procstat.Peaks()
                    end_status = procstat.status_fields(gw_pid)
                    sampler_error = sampler.last_error if sampler is not None else None
                    gateway_log = gateway.log_text()
            if not args.no_memory:
                if time.monotonic() - began > profile.run_cap + 600:
                    problems.append("memory run skipped: the run cap had passed")
                else:
                    memory = memory_run(profile, server, print_fn)
    finally:
        if series.directory is not None:
            shutil.rmtree(series.directory, ignore_errors=True)

    errors_total = sum(s["errors"] for s in summaries)
    samples = sorted({e for s in summaries for e in s["error_samples"]})[:5]
    if errors_total:
        problems.append(f"{errors_total} failed or wrong stores")
    missing = [s["path"] for s in summaries if not s["median_s"]]
    if missing:
        problems.append(f"paths without numbers: {', '.join(missing)}")
    if memory is not None:
        if memory.get("skipped"):
            if args.smoke:
                print_fn(f"  memory run skipped: {memory['skipped']}")
            else:
                problems.append(f"memory run: {memory['skipped']}")
        elif memory.get("error"):
            problems.append(f"memory run: {memory['error']}")
    if sampler_error:
        problems.append(f"sampler: {sampler_error}")
    if any(s["truncated_by_time_cap"] for s in summaries):
        problems.append("timed rounds cut short by the run cap")

    return {
        "benchmark": "stow",
        "profile": profile.name,
        "runs": profile.runs,
        "warmup": profile.warmup,
        "paths": {p: {"label": path_label(p, profile), "how": path_note(p, profile)} for p in paths},
        "data": series.summary(),
        "setup": {
            "orthanc_version": ".".join(map(str, orthanc_version())),
            "orthanc_binary": ORTHANC_BINARY,
            "dicomweb_plugin": ORTHANC_DICOMWEB_PLUGIN,
            "orthanc_dicom_threads": args.orthanc_dicom_threads,
            "orthanc_storage": "plain files in a temporary directory on disk, SyncStorageArea false, emptied "
                               "before every store",
            "storescu": subprocess.run([STORESCU, "--version"], check=False, capture_output=True,
                                       text=True).stdout.splitlines()[0] if os.access(STORESCU, os.X_OK) else None,
            "gateway": {"max_pdu": MAX_PDU, "stow_lanes": LANES, "max_associations": 8,
                        "log_level": args.gateway_log_level, **_provenance()},
            "http_client": f"httpx {httpx.__version__}, TCP_NODELAY, one keep-alive connection per client, "
                           f"Content-Type: {CONTENT_TYPE.split('; boundary')[0]}, body streamed from prepared "
                           "parts with a Content-Length, Accept: application/dicom+json",
            "timing": "wall clock from the first request (or process start, or associate) to the last response "
                      "(or exit, or release) of a store of the whole series",
            "mb": "10^6 bytes of DICOM data set (no file meta, no multipart framing)",
            "prepare_seconds": round(prepare_seconds, 1),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_average": {"start": load_start, "end": loadavg()},
        "results": summaries,
        "ratios": ratios(summaries),
        "memory": memory,
        "gateway_process": {
            "peak_rss_mib": round(overall.rss_kb / 1024, 1),
            "hwm_rss_mib": round(end_status.get("hwm_kb", 0) / 1024, 1),
            "peak_threads": overall.threads,
            "peak_associations": overall.associations,
            "samples": overall.samples,
        },
        "py_spy": spy,
        "checks": {
            "errors_total": errors_total,
            "error_samples": samples,
            "problems": problems,
            "ok": not problems,
        },
        "gateway_log_problems": log_problems(gateway_log),
        "elapsed_seconds": round(time.monotonic() - began, 1),
        "out": str(args.out),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(argv, parse_args, run, render)


if __name__ == "__main__":
    raise SystemExit(main())
