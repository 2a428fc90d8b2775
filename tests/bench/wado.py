"""Retrieve benchmark: the gateway's WADO-RS against getscu, pynetdicom and Orthanc's own WADO-RS.

    python -m tests.bench.wado [--smoke] [--out bench-results/wado.json] [--py-spy DIR]

What runs:

1. Orthanc (with its DICOMweb plugin) on free ports, loaded once with a CT series (500 slices of
   512x512x16 bits, about 262 MB, from ``generate_large_ct_series``) and one multi-frame instance
   (200 frames of 512x512x16 bits, Multi-frame Grayscale Word Secondary Capture, pixels from numpy
   with a fixed seed), in the same study. ``DicomThreadsCount`` raised as in the QIDO benchmark;
   ``TCP_NODELAY=1`` in its environment (``tests/support/realpacs.py``).
2. The gateway as its own process with two nodes for that Orthanc: ``orthanc`` retrieves with C-GET,
   ``orthanc-move`` with C-MOVE to the gateway's receiver (``gateway.move_port``, registered at
   Orthanc); both ``max_pdu = 131072`` (Orthanc's maximum).
3. Each object through each path (``PATHS``): the gateway with C-GET and with C-MOVE, getscu
   (``-B``, ``+B`` and ``--ignore``, files on tmpfs), stock pynetdicom C-GET, Orthanc's WADO-RS, and
   as a diagnostic the gateway's DIMSE half alone in this process (its upper layer and part framing,
   no hand-off, no HTTP). Warm-up retrieves for every path first, then timed rounds that take every
   path in turn (so that load from elsewhere on the machine spreads over all paths). HTTP bodies are
   read with ``httpx`` ``iter_raw(1 << 20)``; parts are counted on the fly from their Content-Length
   (no copy, no scan of the payload) and their data set bytes and SOP Instance UIDs checked.
4. Time to first part: the gateway lists the instances with an IMAGE-level C-FIND before the
   C-GET, so the time to the response headers (which the gateway sends with the first part)
   includes that listing. The same listing is replayed against Orthanc on a warm association: the
   gateway's own ``list_instances`` in this process, its upper layer alone, pynetdicom, findscu. The
   DIMSE half gives the time from connecting to the first C-STORE fully received. TTFB minus
   listing minus that is the gateway's own time from the first C-STORE in to the first part out.
5. Peak RSS while streaming to a slow client: a fresh gateway process (clean ``VmHWM``), the series
   read at about 50 MB/s, ``VmHWM`` read from ``/proc/<pid>/status`` against the bound "200 MB + 2 x
   the largest instance".
6. ``--py-spy DIR``: after the timed runs, the CPU of each gateway thread during C-GET series
   retrieves (``/proc/<pid>/task``, nothing attached), then py-spy (``record -f raw -r 250
   --threads``, once with ``--gil`` and once without) during more of them; the summary splits the
   samples per thread (the DIMSE worker that reads the socket, the event loop that writes HTTP).

Output: a table on stdout and JSON (``--out``). MB is 10^6 bytes of data set (the DICOM data set
without file meta or multipart framing: the same number for every path). The exit status is
non-zero only when something went wrong (a failed retrieve, a wrong count of instances or bytes, a
gateway over its memory bound), never because of timing: there are no timed assertions. Every loop
is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import re
import resource
import shutil
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.demo.data import UID_ROOT, generate_large_ct_series, instance_bytes
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    OrthancServer,
    _die_with_parent,
    free_port,
    orthanc_version,
)

from . import procstat
from .common import bench_main, log_problems, py_spy_exe, py_spy_recording
from .run import BenchGateway, _provenance

GATEWAY_AE = "DICOMWEB-GW"
ORTHANC_AE = "ORTHANC"
GETSCU_AE = "BENCH-GETSCU"
PYND_AE = "BENCH-PYND"
FIND_AE = "BENCH-FIND"
GET_NODE, MOVE_NODE = "orthanc", "orthanc-move"
MAX_PDU = 131072
MB = 1_000_000
GETSCU = "/usr/bin/getscu"
DEFAULT_OUT = "bench-results/wado.json"
ACCEPT = 'multipart/related; type="application/dicom"'
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MF_GRAY_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MF_SEED = 20240301

PATHS = ("gw-get", "gw-move", "getscu", "getscu-bp", "getscu-ignore", "pynetdicom", "orthanc", "dimse-half")
PATH_LABELS = {
    "gw-get": "gateway WADO-RS, C-GET",
    "gw-move": "gateway WADO-RS, C-MOVE",
    "getscu": "getscu -B (to tmpfs)",
    "getscu-bp": "getscu +B (to tmpfs)",
    "getscu-ignore": "getscu --ignore",
    "pynetdicom": "pynetdicom C-GET",
    "orthanc": "Orthanc WADO-RS",
    "dimse-half": "gateway DIMSE half only",
}
PATH_NOTES = {
    "gw-get": "GET /nodes/orthanc/dicom-web/...; IMAGE-level C-FIND, new association, C-GET, multipart out",
    "gw-move": "as gw-get, node retrieve=move: C-MOVE to the gateway's receiver",
    "getscu": "DCMTK getscu, -pdu 131072, TCP_NODELAY=1, default storage mode (receive in memory, then "
              "write), files to tmpfs; includes process start",
    "getscu-bp": "as getscu with +B (--bit-preserving: received directly to disk)",
    "getscu-ignore": "as getscu with --ignore (receive, store nothing) and -v (for the final counts): the "
                     "DIMSE limit; only the instance count is checked (nothing written)",
    "pynetdicom": "stock pynetdicom 3 C-GET: associate (max_pdu 131072, TCP_NODELAY on EVT_CONN_OPEN, "
                  "LOG_HANDLER_LEVEL none), handler takes event.encoded_dataset(include_meta=False), release",
    "orthanc": "Orthanc's DICOMweb plugin, same httpx client as the gateway",
    "dimse-half": "diagnostic, in this process: gateway/dimse/ul.py opens the association with the "
                  "gateway's proposal and runs the C-GET; each instance framed by the gateway's WADO "
                  "_Preparer and dropped. No C-FIND, no thread hand-off, no HTTP",
}
GATEWAY_PATHS = ("gw-get", "gw-move")
GETSCU_MODES = {"getscu": "-B", "getscu-bp": "+B", "getscu-ignore": "--ignore"}


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    slices: int
    rows: int
    cols: int
    frames: int
    frame_rows: int
    frame_cols: int
    warmup: int
    runs: int
    listing_runs: int
    retrieve_cap: float  # one retrieve, seconds
    target_cap: float  # the timed rounds of one object, seconds
    run_cap: float  # no new round or phase after this, seconds since start
    slow_rate: float  # bytes per second read by the slow client
    profile_runs: int


FULL = Profile("full", 500, 512, 512, 200, 512, 512, warmup=1, runs=3, listing_runs=5, retrieve_cap=120.0,
               target_cap=150.0, run_cap=420.0, slow_rate=50 * MB, profile_runs=3)
SMOKE = Profile("smoke", 20, 256, 256, 10, 256, 256, warmup=1, runs=1, listing_runs=1, retrieve_cap=30.0,
                target_cap=30.0, run_cap=60.0, slow_rate=50 * MB, profile_runs=1)


# ------------------------------------------------------------------------------------------------
# Data


@dataclass
class Target:
    """One object to retrieve: what every path must deliver."""

    name: str
    label: str
    level: str  # SERIES or IMAGE
    study_uid: str
    series_uid: str
    sop_uid: str | None
    sop_class: str
    dataset_bytes: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> data set bytes
    file_bytes: int = 0  # PS3.10 files as loaded

    @property
    def instances(self) -> int:
        return len(self.dataset_bytes)

    @property
    def total_dataset_bytes(self) -> int:
        return sum(self.dataset_bytes.values())

    @property
    def largest(self) -> int:
        return max(self.dataset_bytes.values()) if self.dataset_bytes else 0

    @property
    def wado_path(self) -> str:
        path = f"/studies/{self.study_uid}/series/{self.series_uid}"
        return path + (f"/instances/{self.sop_uid}" if self.sop_uid else "")

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "level": self.level, "instances": self.instances,
                "dataset_bytes": self.total_dataset_bytes, "dataset_mb": round(self.total_dataset_bytes / MB, 1),
                "file_bytes": self.file_bytes, "largest_instance_bytes": self.largest,
                "sop_class": self.sop_class, "study_uid": self.study_uid, "series_uid": self.series_uid,
                "sop_uid": self.sop_uid}


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def meta_info(head: bytes | bytearray) -> tuple[int, str]:
    """(offset of the data set, MediaStorageSOPInstanceUID) in the first bytes of a PS3.10 stream."""
    pos = 132 if head[128:132] == b"DICM" else 0
    sop = ""
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return pos, sop
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", head, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            header = 8
        if element == 0x0003:
            sop = bytes(head[pos + header : pos + header + length]).decode("ascii", "replace").rstrip("\x00 ")
        pos += header + length
    raise BenchError("file meta longer than the bytes read")


def multiframe_dataset(frames: int, rows: int, cols: int, study_uid: str) -> Dataset:
    """One Multi-frame Grayscale Word Secondary Capture instance, pixels from a fixed seed."""
    import numpy as np

    template = next(generate_large_ct_series(1, 16, 16))  # the CT series' patient and study
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
                    "StudyDescription", "InstitutionName", "Manufacturer"):
        if keyword in template:
            setattr(ds, keyword, template[keyword].value)
    ds.StudyInstanceUID = study_uid
    ds.SOPClassUID = MF_GRAY_WORD_SC
    ds.SOPInstanceUID = f"{UID_ROOT}9.3.2.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}9.2.2"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.Modality = "OT"
    ds.SeriesDescription = "Benchmark multi-frame"
    ds.ConversionType = "WSD"
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.NumberOfFrames = frames
    ds.FrameTime = "40"
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    rng = np.random.default_rng(MF_SEED)
    ds.PixelData = rng.integers(0, 4096, size=(frames, rows, cols), dtype="<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def load_data(server: OrthancServer, profile: Profile, threads: int = 4) -> tuple[list[Target], float]:
    """Generate and POST both objects to Orthanc; returns the targets (the series, the multi-frame
    instance, and the series' first slice alone) and the seconds it took."""
    started = time.monotonic()
    first = next(generate_large_ct_series(1, profile.rows, profile.cols))
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    series = Target("series", f"CT series, {profile.slices} slices {profile.rows}x{profile.cols}", "SERIES",
                    study_uid, series_uid, None, CT_IMAGE)
    source = iter(generate_large_ct_series(profile.slices, profile.rows, profile.cols))
    lock = threading.Lock()
    failures: list[str] = []

    def post_all() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as client:
            while not failures:
                with lock:
                    ds = next(source, None)
                if ds is None:
                    return
                data = instance_bytes(ds)
                offset, _ = meta_info(data[:4096])
                with lock:
                    series.dataset_bytes[str(ds.SOPInstanceUID)] = len(data) - offset
                    series.file_bytes += len(data)
                r = client.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
                if r.status_code != 200:
                    failures.append(f"{ds.SOPInstanceUID}: HTTP {r.status_code}")

    workers = [threading.Thread(target=post_all, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    if failures or any(w.is_alive() for w in workers):
        raise RuntimeError(f"loading Orthanc failed: {failures[:3] or 'timeout'}")

    mf = multiframe_dataset(profile.frames, profile.frame_rows, profile.frame_cols, study_uid)
    multiframe = Target("multiframe", f"multi-frame instance, {profile.frames} frames "
                        f"{profile.frame_rows}x{profile.frame_cols}", "IMAGE", study_uid,
                        str(mf.SeriesInstanceUID), str(mf.SOPInstanceUID), MF_GRAY_WORD_SC)
    data = instance_bytes(mf)
    del mf
    offset, _ = meta_info(data[:4096])
    multiframe.dataset_bytes[str(multiframe.sop_uid)] = len(data) - offset
    multiframe.file_bytes = len(data)
    server.rest("POST", "/instances", content=data, headers={"Content-Type": "application/dicom"})
    del data
    stats = server.rest("GET", "/statistics").json()
    if int(stats["CountInstances"]) != profile.slices + 1:
        raise RuntimeError(f"Orthanc holds {stats}, expected {profile.slices + 1} instances")
    first_sop = str(first.SOPInstanceUID)
    one = Target("slice", f"one CT slice {profile.rows}x{profile.cols} (instance level)", "IMAGE", study_uid,
                 series_uid, first_sop, CT_IMAGE, {first_sop: series.dataset_bytes[first_sop]})
    return [series, multiframe, one], time.monotonic() - started


# ------------------------------------------------------------------------------------------------
# One retrieve per path


@dataclass
class Retrieved:
    seconds: float
    instances: int
    dataset_bytes: int | None  # None: not observable on this path
    uids: set[str] | None
    ttfb: float | None = None  # HTTP: response headers; gateway sends them with the first part
    first_mib: float | None = None  # HTTP: first 1 MiB chunk of the body
    first_store: float | None = None  # DIMSE: first C-STORE handled
    wire_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class MultipartCounter:
    """Counts the parts of a multipart/related body as it streams by, without copying payloads.

    Each part's header gives its Content-Length; the payload is skipped by arithmetic, keeping its
    first bytes (the file meta) to learn the data set length and SOP Instance UID. A part without
    Content-Length is found by scanning for the delimiter (slower; counted in ``scanned_parts``)."""

    HEAD = 4096

    def __init__(self, boundary: str) -> None:
        self.dash = b"--" + boundary.encode("ascii")
        self.delimiter = b"\r\n" + self.dash
        self.state = "delimiter"
        self.buf = bytearray()
        self.remaining = 0
        self.head = bytearray()
        self.length = 0
        self.parts: list[tuple[int, bytes]] = []
        self.closed = False
        self.scanned_parts = 0
        self.wire_bytes = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self.wire_bytes += len(chunk)
        self._consume(memoryview(chunk))

    def _consume(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            if self.state == "payload":
                take = min(self.remaining, n - pos)
                if len(self.head) < self.HEAD:
                    self.head += view[pos : pos + min(take, self.HEAD - len(self.head))]
                self.remaining -= take
                pos += take
                if self.remaining == 0:
                    self.parts.append((self.length, bytes(self.head)))
                    self.state = "delimiter"
            elif self.state == "scan":
                data = self._tail + bytes(view[pos:])
                found = data.find(self.delimiter)
                if found < 0:
                    keep = len(self.delimiter) - 1
                    body = len(data) - keep
                    if body > 0:
                        if len(self.head) < self.HEAD:
                            self.head += data[: min(body, self.HEAD - len(self.head))]
                        self.length += body
                        self._tail = data[body:]
                    else:
                        self._tail = data
                    return
                if len(self.head) < self.HEAD:
                    self.head += data[: min(found, self.HEAD - len(self.head))]
                self.length += found
                self.parts.append((self.length, bytes(self.head)))
                self.scanned_parts += 1
                self.state, self._tail = "delimiter", b""
                self._consume(memoryview(data)[found:])
                return
            elif self.state == "epilogue":
                return
            else:  # "delimiter": [CRLF] --boundary, then "--" or headers up to an empty line
                take = min(n - pos, 8192)
                before = len(self.buf)
                self.buf += view[pos : pos + take]
                used = self._headers()
                if used is None:
                    if len(self.buf) > 65536:
                        raise BenchError("multipart: no part header in 64 KiB")
                    pos += take
                    continue
                pos += used - before
                self.buf.clear()

    def _headers(self) -> int | None:
        buf = self.buf
        start = 2 if buf[:2] == b"\r\n" else 0
        if len(buf) < start + len(self.dash) + 2:
            return None
        if buf[start : start + len(self.dash)] != self.dash:
            raise BenchError(f"multipart: expected the boundary, got {bytes(buf[start:start + 40])!r}")
        after = start + len(self.dash)
        if buf[after : after + 2] == b"--":
            self.closed = True
            self.state = "epilogue"
            return len(buf)
        end = buf.find(b"\r\n\r\n", after)
        if end < 0:
            return None
        length = None
        for line in bytes(buf[after:end]).decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value.strip())
        self.head = bytearray()
        if length is None:
            self.state, self.length, self._tail = "scan", 0, b""
        else:
            self.state, self.length, self.remaining = "payload", length, length
            if length == 0:
                self.parts.append((0, b""))
                self.state = "delimiter"
        return end + 4

    def finish(self) -> tuple[int, int, set[str]]:
        """(parts, data set bytes, SOP Instance UIDs); raises if the body did not end properly."""
        if not self.closed:
            raise BenchError(f"multipart body ended without the closing boundary (state {self.state})")
        total, uids = 0, set()
        for length, head in self.parts:
            offset, sop = meta_info(head)
            total += length - offset
            uids.add(sop)
        return len(self.parts), total, uids


class HttpPath:
    """WADO-RS over httpx (gateway or Orthanc): one keep-alive client, bodies streamed and dropped."""

    def __init__(self, service_root: str, cap: float) -> None:
        self.root = service_root.rstrip("/")
        self.cap = cap
        self.client = httpx.Client(timeout=httpx.Timeout(60.0), trust_env=False,
                                   limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    def retrieve(self, target: Target) -> Retrieved:
        url = self.root + target.wado_path
        started = time.perf_counter()
        with self.client.stream("GET", url, headers={"Accept": ACCEPT}) as r:
            headers_at = time.perf_counter()
            if r.status_code != 200:
                r.read()
                raise BenchError(f"HTTP {r.status_code}: {r.text[:200]}")
            match = re.search(r'boundary="?([^";,\s]+)"?', r.headers.get("content-type", ""))
            if not match:
                raise BenchError(f"not multipart: {r.headers.get('content-type')}")
            counter = MultipartCounter(match.group(1))
            first_chunk = None
            for chunk in r.iter_raw(1 << 20):
                if first_chunk is None:
                    first_chunk = time.perf_counter()
                counter.feed(chunk)
                if time.perf_counter() - started > self.cap:
                    raise BenchError(f"retrieve cut at the {self.cap:g} s cap")
        ended = time.perf_counter()
        parts, dataset_bytes, uids = counter.finish()
        return Retrieved(ended - started, parts, dataset_bytes, uids, ttfb=headers_at - started,
                         first_mib=(first_chunk - started) if first_chunk else None,
                         wire_bytes=counter.wire_bytes, extra={"scanned_parts": counter.scanned_parts})

    def close(self) -> None:
        self.client.close()


class GetscuPath:
    def __init__(self, port: int, mode: str, cap: float) -> None:
        self.port = port
        self.mode = mode
        self.cap = cap
        shm = Path("/dev/shm")
        self.base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())

    def retrieve(self, target: Target) -> Retrieved:
        out = Path(tempfile.mkdtemp(prefix="wado-bench-getscu-", dir=self.base))
        try:
            argv = [GETSCU, "-aet", GETSCU_AE, "-aec", ORTHANC_AE, "-pdu", str(MAX_PDU), "-S",
                    "-k", f"QueryRetrieveLevel={target.level}", "-k", f"StudyInstanceUID={target.study_uid}",
                    "-k", f"SeriesInstanceUID={target.series_uid}"]
            if target.sop_uid:
                argv += ["-k", f"SOPInstanceUID={target.sop_uid}"]
            if self.mode == "--ignore":
                argv += ["--ignore", "-v"]  # -v: the final counts, the only check when nothing is written
            elif self.mode != "-B":
                argv.append(self.mode)
            if self.mode != "--ignore":  # getscu refuses an output directory with --ignore
                argv += ["-od", str(out)]
            argv += ["127.0.0.1", str(self.port)]
            env = {**os.environ, "TCP_NODELAY": "1"}
            started = time.perf_counter()
            proc = subprocess.run(argv, check=False, capture_output=True, env=env, timeout=self.cap,
                                  preexec_fn=_die_with_parent)
            seconds = time.perf_counter() - started
            if proc.returncode != 0:
                raise BenchError(f"getscu exited with {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
            problems = [line for line in proc.stderr.decode(errors="replace").splitlines()
                        if line.startswith(("E:", "F:"))]
            if problems:
                raise BenchError(f"getscu: {problems[:3]}")
            if self.mode == "--ignore":
                log = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
                completed = re.search(r"Number of Completed Suboperations\s*:\s*(\d+)", log)
                failed = re.search(r"Number of Failed Suboperations\s*:\s*(\d+)", log)
                if not completed or not failed or int(failed.group(1)):
                    raise BenchError(f"getscu --ignore: no final counts, or failures: {log[-300:]}")
                return Retrieved(seconds, int(completed.group(1)), None, None)
            total, uids, files = 0, set(), 0
            for path in out.iterdir():
                with open(path, "rb") as f:
                    head = f.read(MultipartCounter.HEAD)
                offset, sop = meta_info(head)
                total += path.stat().st_size - offset
                uids.add(sop)
                files += 1
            return Retrieved(seconds, files, total, uids, extra={"output_dir": str(self.base)})
        finally:
            shutil.rmtree(out, ignore_errors=True)


def _nodelay(event: Any) -> None:
    import socket

    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PynetdicomPath:
    """Stock pynetdicom C-GET, a new association per retrieve (as the gateway opens one)."""

    def __init__(self, port: int, sop_classes: Sequence[str], cap: float) -> None:
        from pynetdicom import AE, build_role

        from gateway.dimse.net import configure_pynetdicom

        configure_pynetdicom()  # LOG_HANDLER_LEVEL "none", no identifier logging
        self.port = port
        self.ae = AE(ae_title=PYND_AE)
        self.ae.add_requested_context(STUDY_ROOT_GET)
        for uid in sop_classes:
            self.ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = self.ae.network_timeout = cap
        self.roles: list[Any] = [build_role(uid, scp_role=True) for uid in sop_classes]

    def retrieve(self, target: Target) -> Retrieved:
        from pynetdicom import evt

        state: dict[str, Any] = {"n": 0, "bytes": 0, "uids": set(), "first": None}

        def on_store(event: Any) -> int:
            data = event.encoded_dataset(include_meta=False)
            if state["first"] is None:
                state["first"] = time.perf_counter()
            state["n"] += 1
            state["bytes"] += len(data)
            state["uids"].add(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        query = Dataset()
        query.QueryRetrieveLevel = target.level
        query.StudyInstanceUID = target.study_uid
        query.SeriesInstanceUID = target.series_uid
        if target.sop_uid:
            query.SOPInstanceUID = target.sop_uid
        started = time.perf_counter()
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=ORTHANC_AE, ext_neg=self.roles,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, _nodelay)],
                                  max_pdu=MAX_PDU)
        if not assoc.is_established:
            raise BenchError("pynetdicom: association not established")
        final = None
        try:
            for status, _identifier in assoc.send_c_get(query, STUDY_ROOT_GET):
                if not status or "Status" not in status:
                    raise BenchError("pynetdicom: no C-GET response (timeout or association lost)")
                final = int(status.Status)
        finally:
            if assoc.is_established:
                assoc.release()
        seconds = time.perf_counter() - started
        if final != 0x0000:
            raise BenchError(f"pynetdicom: C-GET final status 0x{(final or 0):04X}")
        return Retrieved(seconds, state["n"], state["bytes"], state["uids"],
                         first_store=(state["first"] - started) if state["first"] else None)


class DimseHalfPath:
    """The gateway's DIMSE half in this process: its upper layer and its WADO part framing, no HTTP."""

    def __init__(self, port: int, cap: float) -> None:
        self.port = port
        self.cap = cap

    def retrieve(self, target: Target) -> Retrieved:
        from gateway.dicomweb.negotiation import choose_instance_media
        from gateway.dicomweb.streaming import new_boundary
        from gateway.dicomweb.wado import _Preparer
        from gateway.dimse.net import (
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
        )
        from gateway.dimse.retrieve import RetrieveRequest, storage_proposals
        from gateway.dimse.ul import StoreRequest, open_association

        choice = choose_instance_media(ACCEPT, [], single_instance=target.level == "IMAGE")
        series_of = {sop: target.series_uid for sop in target.dataset_bytes}
        preparer = _Preparer(choice, new_boundary(), "http://127.0.0.1", target.study_uid, series_of)
        request = RetrieveRequest(target.level, target.study_uid, target.series_uid, target.sop_uid,
                                  instances=[(target.series_uid, sop, target.sop_class) for sop in target.dataset_bytes],
                                  transfer_syntaxes=list(choice.transfer_syntaxes))
        [proposal] = storage_proposals(request)
        state: dict[str, Any] = {"n": 0, "bytes": 0, "uids": set(), "first": None}

        def on_store(store: StoreRequest) -> int:
            if state["first"] is None:
                state["first"] = time.perf_counter()
            part = preparer(store)
            if part.payload is None:
                return 0xC000
            state["n"] += 1
            state["bytes"] += sum(len(c) for c in store.chunks)
            state["uids"].add(store.sop_instance_uid)
            return 0x0000

        started = time.perf_counter()
        assoc = open_association(
            node="bench", host="127.0.0.1", port=self.port, calling_ae=GATEWAY_AE, called_ae=ORTHANC_AE,
            proposal=proposal, max_pdu=MAX_PDU, connect_timeout=5, acse_timeout=10, dimse_timeout=self.cap,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        final: dict[int, Any] | None = None
        try:
            for response in assoc.get(request.identifier(), STUDY_ROOT_GET, 1, on_store):
                final = response
        finally:
            assoc.release()
        seconds = time.perf_counter() - started
        status = int(final.get(0x00000900, 0xFFFF)) if final else None
        if status != 0x0000:
            raise BenchError(f"gateway UL: C-GET final status {status}")
        return Retrieved(seconds, state["n"], state["bytes"], state["uids"],
                         first_store=(state["first"] - started) if state["first"] else None)


# ------------------------------------------------------------------------------------------------
# The listing C-FIND, replayed


def listing_identifier(target: Target) -> Dataset:
    """The IMAGE-level C-FIND identifier the gateway sends to list ``target`` (relational node)."""
    from gateway.dicomweb.attributes import Level
    from gateway.dicomweb.plan import Resource, build_plan
    from gateway.dicomweb.query import parse_query

    query = parse_query("includefield=SOPClassUID" + (f"&SOPInstanceUID={target.sop_uid}" if target.sop_uid else ""))
    plan = build_plan(Resource(Level.IMAGE, target.study_uid, target.series_uid), query, relational=True,
                      fuzzy_accepted=False, charset="ISO_IR 192", defaults=False)
    if len(plan.steps) != 1:
        raise BenchError(f"expected one C-FIND for the listing, got {len(plan.steps)}")
    return plan.steps[0].identifier


def measure_listing(port: int, target: Target, runs: int) -> dict[str, Any]:
    """The gateway's listing C-FIND on an association opened beforehand: with pynetdicom (as in the
    QIDO benchmark's direct path) and with the gateway's own upper layer."""
    from gateway.dicomweb.attributes import Level
    from gateway.dicomweb.plan import Resource
    from gateway.dimse.net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
    from gateway.dimse.ul import Proposal, open_association

    from .paths import DirectFindClient, Query

    identifier = listing_identifier(target)
    keys = sorted(elem.keyword or str(elem.tag) for elem in identifier)
    out: dict[str, Any] = {"identifier_keys": keys, "matches": target.instances, "runs": runs}
    errors: list[str] = []

    def record(key: str, times: Sequence[float]) -> None:
        out[f"{key}_ms"] = [round(t * 1000, 2) for t in times]
        out[f"{key}_median_ms"] = round(statistics.median(times) * 1000, 2) if times else None

    query = Query("listing", "listing", Resource(Level.IMAGE, target.study_uid, target.series_uid), "", "",
                  None, target.instances, identifier)
    times: list[float] = []
    try:
        client = DirectFindClient(port, ORTHANC_AE, FIND_AE, MAX_PDU)
        try:
            client.request(query)  # warm-up
            for _ in range(runs):
                times.append(client.request(query)[0])
        finally:
            client.close()
    except Exception as exc:
        errors.append(f"pynetdicom C-FIND: {type(exc).__name__}: {exc}")
    record("pynetdicom", times)

    times = []
    try:
        assoc = open_association(
            node="bench", host="127.0.0.1", port=port, calling_ae=GATEWAY_AE, called_ae=ORTHANC_AE,
            proposal=Proposal(contexts=[(STUDY_ROOT_FIND, (ExplicitVRLittleEndian, ImplicitVRLittleEndian))]),
            max_pdu=MAX_PDU, connect_timeout=5, acse_timeout=10, dimse_timeout=60,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        try:
            for i in range(runs + 1):
                started = time.perf_counter()
                matches = final = 0
                for status, found in assoc.find(identifier, STUDY_ROOT_FIND, i + 1):
                    if status in (0xFF00, 0xFF01):
                        matches += found is not None
                    else:
                        final = status
                elapsed = time.perf_counter() - started
                if final != 0 or matches != target.instances:
                    raise BenchError(f"status 0x{final:04X}, {matches} matches, expected {target.instances}")
                if i:
                    times.append(elapsed)
        finally:
            assoc.release()
    except Exception as exc:
        errors.append(f"gateway UL C-FIND: {type(exc).__name__}: {exc}")
    record("ul", times)

    for key, what, listing in (("gateway_code", "gateway list_instances", _gateway_listing),
                               ("findscu", "findscu", _findscu_listing)):
        times = []
        try:
            times = listing(port, target, runs)
        except Exception as exc:
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
        record(key, times)
    out["errors"] = errors
    return out


def _gateway_listing(port: int, target: Target, runs: int) -> list[float]:
    """The gateway's own ``list_instances`` in this process (its pool, its C-FIND worker thread and
    per-match hand-off to the event loop, its post-filter), on a warm pooled association."""
    import anyio

    from gateway.config import NodeSettings
    from gateway.dicomweb.attributes import Level
    from gateway.dicomweb.plan import Resource
    from gateway.dicomweb.wado import WadoContext, list_instances
    from gateway.dimse.node import NodeClient

    resource = Resource(Level.IMAGE, target.study_uid, target.series_uid)

    async def main() -> list[float]:
        times: list[float] = []
        async with anyio.create_task_group() as tg:
            settings = NodeSettings(name="bench", ae_title=ORTHANC_AE, host="127.0.0.1", port=port,
                                    max_pdu=MAX_PDU, relational="assume")
            node = NodeClient(settings, GATEWAY_AE, tg, None)
            ctx = WadoContext(node=node, base_url="http://127.0.0.1", stall_timeout=20.0, strict_accept=False,
                              fanout_concurrency=4, fanout_max_parents=1000)
            try:
                for i in range(runs + 1):  # the first one opens the association: a warm-up
                    started = time.perf_counter()
                    found = await list_instances(ctx, resource, target.sop_uid)
                    elapsed = time.perf_counter() - started
                    if len(found) != target.instances:
                        raise BenchError(f"{len(found)} instances listed, expected {target.instances}")
                    if i:
                        times.append(elapsed)
            finally:
                await node.pool.aclose()
                tg.cancel_scope.cancel()
        return times

    try:
        import uvloop  # noqa: F401  (the gateway serves on uvloop when it is installed)

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(main, backend="asyncio", backend_options=options)


FINDSCU = "/usr/bin/findscu"


def _findscu_listing(port: int, target: Target, runs: int) -> list[float]:
    """DCMTK findscu with the same keys (-q: nothing printed; includes process start). One untimed
    verbose run first counts the matches."""
    if not os.access(FINDSCU, os.X_OK):
        return []
    argv = [FINDSCU, "-aet", FIND_AE, "-aec", ORTHANC_AE, "-pdu", str(MAX_PDU), "-S",
            "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={target.study_uid}",
            "-k", f"SeriesInstanceUID={target.series_uid}",
            "-k", f"SOPInstanceUID={target.sop_uid}" if target.sop_uid else "SOPInstanceUID",
            "-k", "SOPClassUID", "127.0.0.1", str(port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    check = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=60)
    matches = len(re.findall(r"Find Response: \d+ \(Pending\)", check.stdout + check.stderr))
    if check.returncode != 0 or matches != target.instances:
        raise BenchError(f"findscu: exit {check.returncode}, {matches} matches, expected {target.instances}")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run([*argv[:1], "-q", *argv[1:]], check=False, capture_output=True, env=env, timeout=60)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise BenchError(f"findscu -q: exit {proc.returncode}")
    return times


# ------------------------------------------------------------------------------------------------
# Measuring


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Context:
    profile: Profile
    gateway_pid: int
    orthanc_pid: int | None
    sampler: procstat.Sampler | None
    began: float


@dataclass
class Cell:
    target: Target
    path: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    warmup: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    truncated: bool = False
    peaks: procstat.Peaks | None = None


def one_retrieve(ctx: Context, client: Any, cell: Cell) -> dict[str, Any] | None:
    """One retrieve with its CPU accounting and checks; None (and an error recorded) on failure."""
    target = cell.target
    gw0, pacs0 = procstat.cpu_seconds(ctx.gateway_pid), procstat.cpu_seconds(ctx.orthanc_pid)
    own0, kids0 = time.process_time(), _children_cpu()
    load = loadavg()
    try:
        got: Retrieved = client.retrieve(target)
    except Exception as exc:
        cell.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    gw_cpu = procstat.cpu_seconds(ctx.gateway_pid) - gw0
    pacs_cpu = procstat.cpu_seconds(ctx.orthanc_pid) - pacs0
    client_cpu = (time.process_time() - own0) + (_children_cpu() - kids0)
    problems = []
    if got.instances >= 0 and got.instances != target.instances:
        problems.append(f"{got.instances} instances, expected {target.instances}")
    if got.dataset_bytes is not None and got.dataset_bytes != target.total_dataset_bytes:
        problems.append(f"{got.dataset_bytes} data set bytes, expected {target.total_dataset_bytes}")
    if got.uids is not None and got.uids != set(target.dataset_bytes):
        problems.append(f"SOP Instance UIDs differ ({len(got.uids ^ set(target.dataset_bytes))} not matching)")
    if problems:
        cell.errors.append("; ".join(problems))
        return None
    ms = (lambda v: round(v * 1000, 2) if v is not None else None)
    return {
        "seconds": round(got.seconds, 4),
        "mb_per_s": round(target.total_dataset_bytes / MB / got.seconds, 1) if got.seconds > 0 else None,
        "ttfb_ms": ms(got.ttfb),
        "first_mib_ms": ms(got.first_mib),
        "first_store_ms": ms(got.first_store),
        "instances": got.instances if got.instances >= 0 else None,
        "dataset_bytes": got.dataset_bytes,
        "wire_bytes": got.wire_bytes,
        "cpu_s": {
            "gateway": round(gw_cpu, 3) if cell.path in GATEWAY_PATHS else None,
            "orthanc": round(pacs_cpu, 3),
            "client": round(client_cpu, 3),
        },
        "loadavg_1m": load[0] if load else None,
        **({"extra": got.extra} if got.extra else {}),
    }


def run_target(ctx: Context, target: Target, paths: Sequence[str], clients: dict[str, Any],
               print_fn: Callable[[str], None]) -> list[Cell]:
    """Warm-up of every path, then timed rounds over all paths; bounded by count and by time."""
    profile = ctx.profile
    cells = {p: Cell(target, p) for p in paths}
    for p in paths:
        for _ in range(profile.warmup):
            result = one_retrieve(ctx, clients[p], cells[p])
            if result is not None:
                cells[p].warmup.append(result)
    if ctx.sampler is not None:
        ctx.sampler.window()
    deadline = time.monotonic() + profile.target_cap
    for round_no in range(profile.runs):
        if round_no and (time.monotonic() > deadline or time.monotonic() - ctx.began > profile.run_cap):
            for c in cells.values():
                c.truncated = True
            break
        for p in paths:
            result = one_retrieve(ctx, clients[p], cells[p])
            if result is not None:
                result["round"] = round_no
                cells[p].runs.append(result)
    if ctx.sampler is not None:
        peaks = ctx.sampler.window()
        for p in GATEWAY_PATHS:
            if p in cells:
                cells[p].peaks = peaks
    for p in paths:
        c = cells[p]
        s = summarise_cell(c)
        print_fn(f"  {target.name:<10} {PATH_LABELS[p]:<26} median {_fmt(s['median_s'], 3)} s  "
                 f"{_fmt(s['mb_per_s'])} MB/s  n={len(c.runs)}  errors={len(c.errors)}"
                 + (f"  e.g. {c.errors[0][:120]}" if c.errors else ""))
    return list(cells.values())


def summarise_cell(cell: Cell) -> dict[str, Any]:
    secs = [r["seconds"] for r in cell.runs]
    median = statistics.median(secs) if secs else None

    def med(key: str) -> float | None:
        values = [r[key] for r in cell.runs if r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    def med_cpu(key: str) -> float | None:
        values = [r["cpu_s"][key] for r in cell.runs if r["cpu_s"].get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    out: dict[str, Any] = {
        "target": cell.target.name,
        "path": cell.path,
        "label": PATH_LABELS[cell.path],
        "runs": len(cell.runs),
        "median_s": round(median, 4) if median is not None else None,
        "min_s": round(min(secs), 4) if secs else None,
        "max_s": round(max(secs), 4) if secs else None,
        "mb_per_s": round(cell.target.total_dataset_bytes / MB / median, 1) if median else None,
        "ttfb_ms": med("ttfb_ms"),
        "first_mib_ms": med("first_mib_ms"),
        "first_store_ms": med("first_store_ms"),
        "cpu_s": {"gateway": med_cpu("gateway"), "orthanc": med_cpu("orthanc"), "client": med_cpu("client")},
        "instances": cell.runs[0]["instances"] if cell.runs else None,
        "dataset_bytes": cell.runs[0]["dataset_bytes"] if cell.runs else None,
        "errors": len(cell.errors),
        "error_samples": sorted(set(cell.errors))[:5],
        "truncated_by_time_cap": cell.truncated,
        "detail": cell.runs,
        "warmup": cell.warmup,
    }
    if cell.peaks is not None:
        out["gateway_peak_rss_mb"] = round(cell.peaks.rss_kb / 1024, 1)
        out["gateway_peak_threads"] = cell.peaks.threads
        out["gateway_peak_associations"] = cell.peaks.associations
    return out


def ratios(summaries: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """Throughput ratios: the other path's time over the gateway's (above 1: the gateway is faster)."""
    by_path = {s["path"]: s for s in summaries if s["target"] == target}
    getscu = [by_path[p] for p in ("getscu", "getscu-bp") if p in by_path and by_path[p]["median_s"]]
    best_getscu = min(getscu, key=lambda s: s["median_s"]) if getscu else None
    out: dict[str, Any] = {"getscu_reference": best_getscu["path"] if best_getscu else None}
    refs = {"getscu": best_getscu, "getscu_ignore": by_path.get("getscu-ignore"),
            "pynetdicom": by_path.get("pynetdicom"), "orthanc_wado": by_path.get("orthanc"),
            "dimse_half": by_path.get("dimse-half")}
    for gw in GATEWAY_PATHS:
        g = by_path.get(gw)
        for name, ref in refs.items():
            key = f"{gw.replace('-', '_')}_vs_{name}"
            if g and ref and g["median_s"] and ref["median_s"]:
                out[key] = round(ref["median_s"] / g["median_s"], 3)
            else:
                out[key] = None
    return out


# ------------------------------------------------------------------------------------------------
# Slow client


def slow_client(profile: Profile, dicom_port: int, move_port: int, target: Target) -> dict[str, Any]:
    """A fresh gateway, the series read at ``profile.slow_rate``; VmHWM from /proc against the bound."""
    bound = 200 * (1 << 20) + 2 * target.largest
    expected = target.total_dataset_bytes / profile.slow_rate
    cap = max(30.0, 3 * expected + 20)
    out: dict[str, Any] = {"rate_mb_per_s": profile.slow_rate / MB, "bound_mb": round(bound / (1 << 20), 1),
                           "bound_rule": "200 MiB + 2 x the largest instance", "cap_s": round(cap, 1)}
    gateway = BenchGateway(gateway_settings(dicom_port, move_port, "warning"))
    with gateway:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        start = procstat.status_fields(pid)
        out["start_rss_mb"] = round(start.get("rss_kb", 0) / 1024, 1)
        out["start_hwm_mb"] = round(start.get("hwm_kb", 0) / 1024, 1)
        sampler = procstat.Sampler(pid, dicom_port, interval=0.01).start() if procstat.available() else None
        received, started = 0, time.monotonic()
        counter: MultipartCounter | None = None
        error = None
        truncated = False
        try:
            with httpx.Client(timeout=60, trust_env=False) as client, \
                    client.stream("GET", gateway.url(None, target.wado_path), headers={"Accept": ACCEPT}) as r:
                if r.status_code != 200:
                    raise BenchError(f"HTTP {r.status_code}")
                match = re.search(r'boundary="?([^";,\s]+)"?', r.headers.get("content-type", ""))
                counter = MultipartCounter(match.group(1) if match else "")
                for chunk in r.iter_raw(1 << 20):
                    counter.feed(chunk)
                    received += len(chunk)
                    time.sleep(len(chunk) / profile.slow_rate)
                    if time.monotonic() - started > cap:
                        truncated = True
                        break
            if not truncated and counter is not None:
                parts, dataset_bytes, _uids = counter.finish()
                if parts != target.instances or dataset_bytes != target.total_dataset_bytes:
                    error = f"{parts} parts / {dataset_bytes} bytes, expected {target.instances} / " \
                            f"{target.total_dataset_bytes}"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - started
        end = procstat.status_fields(pid)
        peaks = sampler.stop() if sampler is not None else None
    out.update({
        "received_bytes": received,
        "seconds": round(seconds, 2),
        "achieved_mb_per_s": round(received / MB / seconds, 1) if seconds > 0 else None,
        "vmhwm_mb": round(end.get("hwm_kb", 0) / 1024, 1),
        "sampled_peak_rss_mb": round(peaks.rss_kb / 1024, 1) if peaks else None,
        "peak_threads": peaks.threads if peaks else None,
        "samples": peaks.samples if peaks else 0,
        "truncated_by_time_cap": truncated,
        "error": error,
    })
    out["within_bound"] = bool(end.get("hwm_kb")) and end["hwm_kb"] * 1024 < bound
    return out


# ------------------------------------------------------------------------------------------------
# py-spy


def profile_gateway(ctx: Context, out_dir: Path, target: Target, client: HttpPath) -> dict[str, Any]:
    """py-spy ``record -f raw -r 250 --threads`` on the gateway during C-GET retrieves of ``target``,
    with ``--gil`` (the thread holding the GIL) and without (every thread on a CPU)."""
    results: dict[str, Any] = {"threads_cpu": threads_cpu_pass(ctx, target, client)}
    exe = py_spy_exe()
    if exe is None:
        results["error"] = "py-spy is not installed"
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    for mode in ("gil", "nogil"):
        raw = out_dir / f"gateway-get-{target.name}-{mode}.txt"
        with py_spy_recording(exe, ctx.gateway_pid, raw, mode == "gil", _ROLE_MARKERS) as entry:
            runs, errors = [], []
            deadline = time.monotonic() + 60
            for _ in range(ctx.profile.profile_runs):
                if time.monotonic() > deadline:
                    break
                try:
                    got = client.retrieve(target)
                    runs.append(round(got.seconds, 3))
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
            entry.update(retrieve_seconds=runs, errors=errors)
        results[mode] = entry
    return results


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{thread id: (comm, user + system CPU seconds)} of every thread of ``pid``, from /proc."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / procstat._CLK_TCK)
    return out


def threads_cpu_pass(ctx: Context, target: Target, client: HttpPath) -> dict[str, Any]:
    """CPU of each gateway thread (from /proc/<pid>/task, nothing attached) during C-GET retrieves."""
    before = thread_cpu(ctx.gateway_pid)
    started = time.perf_counter()
    runs, errors = [], []
    for _ in range(ctx.profile.profile_runs):
        try:
            runs.append(round(client.retrieve(target).seconds, 3))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    wall = time.perf_counter() - started
    after = thread_cpu(ctx.gateway_pid)
    used = {tid: cpu - before.get(tid, (comm, 0.0))[1] for tid, (comm, cpu) in after.items()}
    threads: list[dict[str, Any]] = [
        {"tid": tid, "comm": after[tid][0], "cpu_s": round(cpu, 3),
         "share_of_wall": round(cpu / wall, 3) if wall > 0 else None}
        for tid, cpu in sorted(used.items(), key=lambda item: -item[1]) if cpu > 0
    ]
    return {"retrieve_seconds": runs, "wall_s": round(wall, 3), "errors": errors,
            "process_cpu_s": round(sum(used.values()), 3), "threads": threads}


_ROLE_MARKERS = (
    ("C-GET worker", ("_get_on (", "_answer_store (", "Association.get (")),
    ("C-MOVE receiver", ("serve_stores (", "MoveReceiver._serve (")),
    ("C-FIND worker", ("_FindJob.run (",)),
    ("event loop", ("run_until_complete", "run_forever", "uvicorn", "serve (gateway/cli")),
)



# ------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    lines = []
    setup = report["setup"]
    lines.append(f"WADO-RS retrieve benchmark ({report['profile']}): Orthanc {setup['orthanc_version']}, "
                 f"{setup['cpus']} CPUs, load average {report['load_average']['start']} at start, "
                 f"{report['load_average']['end']} at end")
    for name, t in report["targets"].items():
        lines.append(f"  {name}: {t['label']}, {t['instances']} instance(s), {t['dataset_mb']} MB of data set")
    for name in report["targets"]:
        rows = [s for s in report["results"] if s["target"] == name]
        if not rows:
            continue
        t = report["targets"][name]
        lines += ["", (f"== {t['label']} ({t['dataset_mb']} MB): median of {report['runs']} timed run(s) after "
                       f"{report['warmup']} warm-up ==")]
        lines.append(f"{'path':<27}{'MB/s':>8}{'median s':>10}{'min s':>8}{'TTFB ms':>9}{'1st store':>10}"
                     f"{'CPU s gw':>9}{'Orthanc':>8}{'client':>8}{'errors':>7}")
        for s in rows:
            lines.append(
                f"{s['label']:<27}{_fmt(s['mb_per_s']):>8}{_fmt(s['median_s'], 3):>10}{_fmt(s['min_s'], 3):>8}"
                f"{_fmt(s['ttfb_ms']):>9}{_fmt(s['first_store_ms']):>10}{_fmt(s['cpu_s']['gateway'], 2):>9}"
                f"{_fmt(s['cpu_s']['orthanc'], 2):>8}{_fmt(s['cpu_s']['client'], 2):>8}{s['errors']:>7}")
        r = report["ratios"].get(name, {})
        lines.append(f"throughput ratios (other path's time / gateway's time; 1.0 = as fast; "
                     f"getscu = {r.get('getscu_reference') or '-'}):")
        for gw in GATEWAY_PATHS:
            key = gw.replace("-", "_")
            lines.append(f"  {PATH_LABELS[gw]:<25} vs getscu {_fmt(r.get(f'{key}_vs_getscu'), 2)}"
                         f"  vs getscu --ignore {_fmt(r.get(f'{key}_vs_getscu_ignore'), 2)}"
                         f"  vs pynetdicom {_fmt(r.get(f'{key}_vs_pynetdicom'), 2)}"
                         f"  vs Orthanc WADO-RS {_fmt(r.get(f'{key}_vs_orthanc_wado'), 2)}"
                         f"  vs own DIMSE half {_fmt(r.get(f'{key}_vs_dimse_half'), 2)}")
        fp = report["first_part"].get(name)
        if fp:
            spread = fp.get("listing_gateway_code_range_ms") or [None, None]
            lines += [
                (f"time to first part, gateway C-GET: TTFB {_fmt(fp['ttfb_ms'])} ms (C-MOVE "
                 f"{_fmt(fp['move_ttfb_ms'])} ms, Orthanc WADO-RS {_fmt(fp['orthanc_ttfb_ms'])} ms)"),
                (f"  listing C-FIND replayed: gateway's list_instances {_fmt(fp['listing_gateway_code_ms'])} ms "
                 f"({_fmt(spread[0])}-{_fmt(spread[1])}), its UL alone {_fmt(fp['listing_ul_ms'])} ms, pynetdicom "
                 f"{_fmt(fp['listing_pynetdicom_ms'])} ms, findscu {_fmt(fp['listing_findscu_ms'])} ms"),
                (f"  connect + C-GET to the first C-STORE received (DIMSE half): {_fmt(fp['dimse_first_store_ms'])} ms; "
                 f"first C-STORE in -> first part out = TTFB - list_instances - that = "
                 + (f"{_fmt(fp['first_store_to_first_part_ms'])} ms"
                    if fp.get("first_store_to_first_part_resolved") else
                    f"{_fmt(fp['first_store_to_first_part_ms'])} ms (not resolved: within the replays' spread)")
                 + f"; at most {_fmt(fp.get('first_store_to_first_part_upper_bound_ms'))} ms (with the bare C-FIND)"),
            ]
    slow = report.get("slow_client")
    if slow:
        lines += ["", f"slow client ({_fmt(slow['rate_mb_per_s'], 0)} MB/s target, {_fmt(slow['achieved_mb_per_s'])} "
                      f"MB/s achieved, {slow['received_bytes'] / MB:.0f} MB in {slow['seconds']} s), fresh gateway: "
                      f"VmHWM {slow['vmhwm_mb']} MiB (after start-up {slow['start_hwm_mb']} MiB; sampled peak RSS "
                      f"{slow['sampled_peak_rss_mb']} MiB), bound {slow['bound_mb']} MiB "
                      f"({slow['bound_rule']}): {'within' if slow['within_bound'] else 'OVER'}"
                      + (f"; error: {slow['error']}" if slow.get("error") else "")]
    gw = report["gateway_process"]
    lines.append(f"main gateway process: peak RSS {gw['peak_rss_mb']} MiB sampled, VmHWM {gw['hwm_rss_mb']} MiB, "
                 f"peak threads {gw['peak_threads']}, peak associations to Orthanc {gw['peak_associations']}")
    prof = report.get("py_spy")
    if prof:
        names: dict[int, str] = {}
        for mode in ("gil", "nogil"):
            for t in ((prof.get(mode) or {}).get("summary") or {}).get("threads", []):
                if t.get("tid") is not None:
                    names[t["tid"]] = t["thread"].partition(": ")[2] or t["thread"]
        cpu = prof.get("threads_cpu")
        if cpu:
            lines.append(f"gateway threads' CPU during {len(cpu['retrieve_seconds'])} C-GET series retrieve(s) "
                         f"({cpu['retrieve_seconds']} s; {cpu['wall_s']} s wall, {cpu['process_cpu_s']} s CPU), "
                         f"from /proc, nothing attached (worker threads are pooled: a retrieve's C-GET and its "
                         f"listing C-FIND run on whichever is free):")
            for t in cpu["threads"][:5]:
                lines.append(f"  tid {t['tid']:<8} {names.get(t['tid'], t['comm']):<52} {t['cpu_s']:>7.3f} s CPU "
                             f"= {t['share_of_wall'] * 100:5.1f}% of the wall time")
        for mode in ("gil", "nogil"):
            entry = prof.get(mode)
            summary = entry.get("summary") if isinstance(entry, dict) else None
            if not summary:
                continue
            what = "--gil: the thread holding the GIL" if mode == "gil" else "no --gil: every thread py-spy saw active"
            lines.append(f"py-spy ({what}), {summary['samples']} samples, retrieves of {entry['retrieve_seconds']} s:")
            for t in summary["threads"][:4]:
                lines.append(f"  {t['role']:<26} {t['thread']:<34} {t['share'] * 100:5.1f}%  self: "
                             + ", ".join(f"{n} {c * 100:.0f}%" for n, _, c in t["self"][:5]))
    checks = report["checks"]
    lines += ["", f"errors: {checks['errors_total']}" + (f"  e.g. {checks['error_samples']}" if checks["error_samples"] else ""),
              (f"data load {report['setup']['load_seconds']} s; benchmark {report['elapsed_seconds']} s; "
               f"results in {report['out']}")]
    if checks["problems"]:
        lines.append("PROBLEMS: " + "; ".join(checks["problems"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def gateway_settings(dicom_port: int, move_port: int, log_level: str) -> dict[str, Any]:
    node = {"ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": dicom_port, "max_associations": 4,
            "max_pdu": MAX_PDU, "relational": "assume"}
    return {
        "server": {"log_level": log_level},
        "gateway": {"ae_title": GATEWAY_AE, "move_port": move_port},
        "nodes": [{"name": GET_NODE, "default": True, "retrieve": "get", **node},
                  {"name": MOVE_NODE, "retrieve": "move", **node}],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.wado", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, one run per path")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    parser.add_argument("--runs", type=int, help="timed runs per path (default 3; smoke 1)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--targets", default="series,multiframe,slice",
                        help="comma-separated subset of series,multiframe,slice")
    parser.add_argument("--no-slow-client", action="store_true", help="skip the slow-client memory run")
    parser.add_argument("--orthanc-dicom-threads", type=int, default=64, help="Orthanc's DicomThreadsCount")
    parser.add_argument("--gateway-log-level", default="info", help="the gateway's server.log_level")
    parser.add_argument("--py-spy", metavar="DIR", help="profile C-GET series retrieves with py-spy into DIR")
    return parser.parse_args(argv)


def _open_client(path: str, gateway: BenchGateway, server: OrthancServer, profile: Profile,
                 sop_classes: Sequence[str]) -> Any:
    cap = profile.retrieve_cap
    if path == "gw-get":
        return HttpPath(gateway.url(GET_NODE, ""), cap)
    if path == "gw-move":
        return HttpPath(gateway.url(MOVE_NODE, ""), cap)
    if path == "orthanc":
        return HttpPath(server.dicomweb_url, cap)
    if path in GETSCU_MODES:
        return GetscuPath(server.dicom_port, GETSCU_MODES[path], cap)
    if path == "pynetdicom":
        return PynetdicomPath(server.dicom_port, sop_classes, cap)
    if path == "dimse-half":
        return DimseHalfPath(server.dicom_port, cap)
    raise SystemExit(f"unknown path {path!r}")


def first_part_estimates(summaries: list[dict[str, Any]], listing: dict[str, Any],
                         targets: Sequence[str]) -> dict[str, Any]:
    """Time to the first part, split (see ``first_part_method`` in the report).
    ``first_store_to_first_part_ms`` = TTFB - the gateway's list_instances replay - DIMSE first store;
    ``..._upper_bound_ms`` uses the upper layer's bare C-FIND instead (the gateway's listing can only
    take longer than that), so it holds even when the replays' spread swamps the estimate."""
    out: dict[str, Any] = {}
    for name in targets:
        by_path = {s["path"]: s for s in summaries if s["target"] == name}
        gw, half = by_path.get("gw-get"), by_path.get("dimse-half")
        lst = listing.get(name, {})
        ttfb = gw["ttfb_ms"] if gw else None
        code, ul = lst.get("gateway_code_median_ms"), lst.get("ul_median_ms")
        first_store = half["first_store_ms"] if half else None
        estimate = round(ttfb - code - first_store, 2) if None not in (ttfb, code, first_store) else None
        bound = round(ttfb - ul - first_store, 2) if None not in (ttfb, ul, first_store) else None
        spread = [min(lst["gateway_code_ms"]), max(lst["gateway_code_ms"])] if lst.get("gateway_code_ms") else None
        resolved = estimate is not None and estimate >= 0 and (spread is None or spread[1] - spread[0] <= estimate)
        out[name] = {
            "ttfb_ms": ttfb,
            "listing_gateway_code_ms": code,
            "listing_gateway_code_range_ms": spread,
            "listing_ul_ms": ul,
            "listing_pynetdicom_ms": lst.get("pynetdicom_median_ms"),
            "listing_findscu_ms": lst.get("findscu_median_ms"),
            "ttfb_minus_listing_ms": round(ttfb - code, 2) if None not in (ttfb, code) else None,
            "dimse_first_store_ms": first_store,
            "first_store_to_first_part_ms": estimate,
            "first_store_to_first_part_resolved": resolved,
            "first_store_to_first_part_upper_bound_ms": bound,
            "move_ttfb_ms": by_path["gw-move"]["ttfb_ms"] if "gw-move" in by_path else None,
            "orthanc_ttfb_ms": by_path["orthanc"]["ttfb_ms"] if "orthanc" in by_path else None,
            "pynetdicom_first_store_ms": by_path["pynetdicom"]["first_store_ms"] if "pynetdicom" in by_path else None,
        }
    return out


def run(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    profile = SMOKE if args.smoke else FULL
    if args.runs:
        profile = dataclasses.replace(profile, runs=args.runs)
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            raise SystemExit(f"unknown path {p!r}")
    wanted_targets = [t for t in args.targets.split(",") if t]
    began = time.monotonic()
    load_start = loadavg()
    move_port = free_port()
    server = OrthancServer(
        aet=ORTHANC_AE,
        modalities={
            "gateway": (GATEWAY_AE, "127.0.0.1", move_port),
            "getscu": (GETSCU_AE, "127.0.0.1", free_port()),
            "pynetdicom": (PYND_AE, "127.0.0.1", free_port()),
            "find": (FIND_AE, "127.0.0.1", free_port()),
        },
        stop_timeout=0,
        extra_config={"DicomThreadsCount": args.orthanc_dicom_threads},
    )
    summaries: list[dict[str, Any]] = []
    listing: dict[str, Any] = {}
    skipped: list[str] = []
    problems: list[str] = []
    slow: dict[str, Any] | None = None
    spy: dict[str, Any] | None = None
    with server:
        loaded, load_seconds = load_data(server, profile)
        series, multiframe = loaded[0], loaded[1]
        targets = {t.name: t for t in loaded if t.name in wanted_targets}
        print_fn(f"Orthanc {'.'.join(map(str, orthanc_version()))} on DICOM port {server.dicom_port}: loaded "
                 f"{series.instances} CT slices ({series.total_dataset_bytes / MB:.0f} MB) and a "
                 f"{profile.frames}-frame instance ({multiframe.total_dataset_bytes / MB:.0f} MB) in "
                 f"{load_seconds:.1f} s; load average {loadavg()}")
        gateway = BenchGateway(gateway_settings(server.dicom_port, move_port, args.gateway_log_level))
        with gateway:
            assert gateway.proc is not None
            gw_pid = gateway.proc.pid
            sampler = procstat.Sampler(gw_pid, server.dicom_port).start() if procstat.available() else None
            ctx = Context(profile, gw_pid, server.pid, sampler, began)
            clients: dict[str, Any] = {}
            try:
                for name, target in targets.items():
                    listing[name] = measure_listing(server.dicom_port, target, profile.listing_runs)
                    print_fn(f"  {name:<10} listing C-FIND ({target.instances} matches): gateway list_instances "
                             f"{_fmt(listing[name]['gateway_code_median_ms'])} ms, gateway UL "
                             f"{_fmt(listing[name]['ul_median_ms'])} ms, pynetdicom "
                             f"{_fmt(listing[name]['pynetdicom_median_ms'])} ms, findscu "
                             f"{_fmt(listing[name]['findscu_median_ms'])} ms")
                for p in paths:
                    clients[p] = _open_client(p, gateway, server, profile, [CT_IMAGE, MF_GRAY_WORD_SC])
                for name, target in targets.items():
                    if time.monotonic() - began > profile.run_cap:
                        skipped.append(name)
                        continue
                    for cell in run_target(ctx, target, paths, clients, print_fn):
                        summaries.append(summarise_cell(cell))
                if args.py_spy and "series" in targets and time.monotonic() - began < profile.run_cap + 120:
                    profile_client = HttpPath(gateway.url(GET_NODE, ""), profile.retrieve_cap)
                    try:
                        spy = profile_gateway(ctx, Path(args.py_spy), targets["series"], profile_client)
                    finally:
                        profile_client.close()
                    print_fn(f"  py-spy: raw stacks in {args.py_spy}")
            finally:
                for c in clients.values():
                    if hasattr(c, "close"):
                        c.close()
                overall = sampler.stop() if sampler is not None else procstat.Peaks()
                end_status = procstat.status_fields(gw_pid)
                sampler_error = sampler.last_error if sampler is not None else None
                gateway_log = gateway.log_text()
        if not args.no_slow_client and "series" in targets:
            slow = slow_client(profile, server.dicom_port, move_port, targets["series"])
            print_fn(f"  slow client: VmHWM {slow['vmhwm_mb']} MiB, bound {slow['bound_mb']} MiB, "
                     f"{slow['achieved_mb_per_s']} MB/s" + (f", error: {slow['error']}" if slow["error"] else ""))

    first_part = first_part_estimates(summaries, listing, list(targets))

    errors_total = sum(s["errors"] for s in summaries) + sum(len(v.get("errors", [])) for v in listing.values())
    samples = sorted({e for s in summaries for e in s["error_samples"]}
                     | {e for v in listing.values() for e in v.get("errors", [])})[:5]
    byte_counts: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        counts = {s["path"]: {"instances": s["instances"], "dataset_bytes": s["dataset_bytes"]}
                  for s in summaries if s["target"] == name}
        byte_counts[name] = {"expected": {"instances": target.instances, "dataset_bytes": target.total_dataset_bytes},
                             **counts}
    if errors_total:
        problems.append(f"{errors_total} failed or wrong retrieves")
    missing = [f"{s['target']}/{s['path']}" for s in summaries if not s["median_s"]]
    if missing:
        problems.append(f"paths without numbers: {', '.join(missing)}")
    if slow is not None:
        if slow["error"]:
            problems.append(f"slow client: {slow['error']}")
        if not slow["within_bound"]:
            problems.append(f"slow client: gateway VmHWM {slow['vmhwm_mb']} MiB over the bound {slow['bound_mb']} MiB")
    if sampler_error:
        problems.append(f"sampler: {sampler_error}")
    if skipped:
        problems.append(f"skipped by the run cap: {', '.join(skipped)}")

    report: dict[str, Any] = {
        "benchmark": "wado",
        "profile": profile.name,
        "runs": profile.runs,
        "warmup": profile.warmup,
        "paths": {p: {"label": PATH_LABELS[p], "how": PATH_NOTES[p]} for p in paths},
        "targets": {name: t.summary() for name, t in targets.items()},
        "setup": {
            "orthanc_version": ".".join(map(str, orthanc_version())),
            "orthanc_binary": ORTHANC_BINARY,
            "dicomweb_plugin": ORTHANC_DICOMWEB_PLUGIN,
            "orthanc_dicom_threads": args.orthanc_dicom_threads,
            "getscu": subprocess.run([GETSCU, "--version"], check=False, capture_output=True,
                                     text=True).stdout.splitlines()[0]
            if os.access(GETSCU, os.X_OK) else None,
            "gateway": {"max_pdu": MAX_PDU, "max_associations": 4, "log_level": args.gateway_log_level,
                        "nodes": {GET_NODE: "retrieve = get", MOVE_NODE: "retrieve = move"}, **_provenance()},
            "http_client": f"httpx {httpx.__version__}, one keep-alive connection per path, Accept: {ACCEPT}, "
                           "iter_raw(1 << 20), parts counted by Content-Length",
            "timing": "wall clock from the request (or process start, or associate) to the last byte / final "
                      "status / release; TTFB = response headers, which the gateway sends with the first part",
            "mb": "10^6 bytes of DICOM data set (no file meta, no multipart framing)",
            "load_seconds": round(load_seconds, 1),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_average": {"start": load_start, "end": loadavg()},
        "listing": listing,
        "results": summaries,
        "ratios": {name: ratios(summaries, name) for name in targets},
        "first_part": first_part,
        "first_part_method": (
            "TTFB: response headers of the gateway's C-GET path (the gateway sends them when the first part "
            "is ready). Listing: the gateway's IMAGE-level C-FIND replayed against the same Orthanc on a "
            "warm association: the gateway's own list_instances run in this process (used for the "
            "estimate), its upper layer alone, pynetdicom, and findscu (process start included). DIMSE "
            "first store: the gateway's upper layer in this process, from connect to the first C-STORE "
            "fully received (association with the gateway's proposal, C-GET, Orthanc's time to the first "
            "sub-operation and its transfer). TTFB - listing - DIMSE first store = the gateway's time from "
            "the first C-STORE in to the first part out (preparing the part, hand-off to the event loop, "
            "response start), plus request parsing; an estimate from medians of separate runs. No "
            "packet capture."),
        "slow_client": slow,
        "gateway_process": {
            "peak_rss_mb": round(overall.rss_kb / 1024, 1),
            "hwm_rss_mb": round(end_status.get("hwm_kb", 0) / 1024, 1),
            "peak_threads": overall.threads,
            "peak_associations": overall.associations,
            "samples": overall.samples,
        },
        "py_spy": spy,
        "checks": {
            "errors_total": errors_total,
            "error_samples": samples,
            "byte_counts": byte_counts,
            "problems": problems,
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
