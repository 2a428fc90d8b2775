"""Start real PACS software (Orthanc, DCMTK dcmqrscp) as plain processes.

Both servers are context managers with ``start()``/``stop()``; each one lives
in its own temporary directory, listens on free ports and is torn down (process
group killed, directory removed) by ``stop()``, by ``__exit__`` and, as a last
resort, by an ``atexit`` hook.  Nothing is written outside the temporary
directory.  Both are started with ``TCP_NODELAY=1`` in their environment:
DCMTK only sets TCP_NODELAY on its sockets when that variable is set, and
Orthanc links DCMTK for its DICOM side.

Typical use from a pytest fixture::

    @pytest.fixture(scope="module")
    def orthanc():
        require_binary(ORTHANC_BINARY, "Orthanc")
        with OrthancServer(modalities={"gw": ("GATEWAY", "127.0.0.1", 11112)}) as srv:
            yield srv

Orthanc (Debian 1.10.1 + DICOMweb plugin 1.7)
---------------------------------------------
* Listens on all interfaces (1.10 has no bind-address option).  HTTP rejects
  non-loopback clients (``RemoteAccessAllowed: false``).  On DICOM, C-ECHO and
  C-STORE are open to any calling AE (``DicomAlwaysAllowEcho/Store``);
  C-FIND/C-GET/C-MOVE only to AEs listed in ``DicomModalities`` *and* coming
  from the listed host (``DicomCheckModalityHost: true``).  Orthanc compares
  the host as a literal string with the peer IP, so list local peers as
  ``"127.0.0.1"``, not ``"localhost"``.
* ``MaximumPduLength`` is supported (range 4096..131072, default 16384); we
  default to 131072, which Orthanc then announces in its A-ASSOCIATE-AC.
* ``ExtraMainDicomTags`` only exists from Orthanc 1.11 on.  1.10.1 ignores it,
  so we only emit it when the binary reports >= 1.11 (see
  ``ORTHANC_EXTRA_MAIN_DICOM_TAGS``).  With 1.10 the attributes that are not
  "main DICOM tags" of the index (e.g. Rows, Columns, BitsAllocated at
  instance level) are read from the stored files, which is what
  ``StorageAccessOnFind: "Always"`` (set explicitly) allows; with "Never"
  they would come back empty.  SOPClassUID at IMAGE level comes from the
  instance metadata, ModalitiesInStudy / NumberOf*Related* are computed from
  the index.
* ``StorageCompression: false`` (plain files, cheaper), ``SyncStorageArea:
  false`` (no fsync per instance: throw-away storage), ``SaveJobs: false``,
  ``OverwriteInstances: true`` (re-loading a data set with changed attributes
  replaces it instead of silently keeping the old copy), ``DeidentifyLogs:
  false`` (the logs are for debugging synthetic test data).
* Every option can be overridden with ``extra_config``.
* DICOM TLS (``dicom_tls=OrthancDicomTls(...)``): ``DicomTlsEnabled`` with
  ``DicomTlsCertificate``, ``DicomTlsPrivateKey``, ``DicomTlsTrustedCertificates``
  and ``DicomTlsRemoteCertificateRequired`` (all in 1.10.1; a trusted
  certificates file is required even when remote certificates are not).
  The DICOM port then speaks only TLS (1.2 or 1.3; a plain association
  request is answered with a TCP reset); every modality gets
  ``UseDicomTls`` (C-MOVE to it over TLS, presenting Orthanc's own
  certificate, which must then be valid for TLS clients too). HTTP stays
  plain, so ``load`` works as usual. Without a client certificate, the
  TLS 1.3 handshake completes on the client's side and Orthanc then closes
  the connection.

dcmqrscp (DCMTK 3.6.7)
----------------------
Observed behaviour (``tests/integration/test_realpacs_fixtures.py`` pins the
important points):

* Access control: the AETable "Peers" column restricts *calling AE title +
  calling host name*; the port is not checked.  The host is compared
  case-insensitively with the reverse-resolved peer name, so local peers must
  be listed as ``localhost`` (127.0.0.1 <-> localhost here; with ``-dhl`` it
  would be the IP string, which the HostTable cannot hold).  An unknown
  calling AE, another host, or a called AE title other than ``aet`` all get
  A-ASSOCIATE-RJ (permanent, service user, "called AE title not recognised").
  dcmqrscp cannot bind to an address: it listens on all interfaces; TCP
  wrapper control (``--access-control``) would need /etc/hosts.allow, which
  these helpers do not touch.
* Quota: at most 500 studies per storage area (we use ``(200, 1024mb)``);
  beyond the quota it deletes the oldest study.
* Duplicate SOP Instance UID: C-STORE answers Success, the old file is deleted
  ("due to quota or duplicate SOP instance UID") and the new copy replaces the
  database record (count unchanged, attributes from the new copy).
* C-GET works without ``--assoc-config-file`` as long as ``--disable-get`` is
  not given: it accepts storage contexts in whatever role the requestor
  proposes (SCP role via role selection).
* Max PDU: ``MaxPDUSize``/``-pdu`` range 4096..131072; with 131072 the
  A-ASSOCIATE-AC announces 131072.
* Extended negotiation: none.  A relational-query request (ext-neg byte 1) is
  silently not acknowledged; a query missing a higher-level unique key (e.g.
  SERIES without StudyInstanceUID, IMAGE without SeriesInstanceUID, IMAGE with
  only SOPInstanceUID) fails with status 0xC000 and no ErrorComment.
  Level PATIENT in the Study Root model also gives 0xC000.
* Keys it supports (matching and return), per level:
  PATIENT/STUDY: PatientName, PatientID, IssuerOfPatientID, PatientBirthDate,
  PatientBirthTime, PatientSex, OtherPatientIDs, OtherPatientNames,
  EthnicGroup, PatientComments; STUDY: StudyDate, StudyTime, AccessionNumber,
  ReferringPhysicianName, StudyDescription, NameOfPhysiciansReadingStudy,
  AdmittingDiagnosesDescription, PatientAge, PatientSize, PatientWeight,
  Occupation, AdditionalPatientHistory, StudyInstanceUID, StudyID,
  OtherStudyNumbers; SERIES: Modality, SeriesInstanceUID, SeriesNumber;
  IMAGE: SOPInstanceUID, InstanceNumber.  Keys of higher levels are returned
  at lower levels too (PatientName at SERIES, Modality at IMAGE).
* Any other key -- SeriesDescription, ModalitiesInStudy, SOPClassesInStudy,
  SOPClassUID, Rows, NumberOfStudyRelatedSeries/Instances,
  NumberOfSeriesRelatedInstances, InstitutionName, private tags -- is
  accepted without error, *omitted* from the responses (not returned empty),
  and a value given for it is ignored for matching (SeriesDescription=nomatch
  still returns every series).  ``--check-find`` does not change this.
  Every response carries RetrieveAETitle (0008,0054) = ``aet``.
* Matching: PN matching is case-sensitive (``mü*`` does not match
  ``Müller``); wildcards, date ranges, UID lists work.
* Character sets: responses are converted to the SpecificCharacterSet of the
  *request* when DCMTK can (ISO_IR 100 request -> ISO_IR 100 response).
  Without SpecificCharacterSet in the request it tries ASCII; if the record
  holds non-ASCII text that conversion fails (warning in the log) and the
  response is sent in the stored set with SpecificCharacterSet "ISO_IR 192".
  Records converted to ASCII carry no SpecificCharacterSet.  Code-extension
  sets (e.g. "ISO 2022 IR 6") are not supported as targets -> stored set.
  Matching is charset-aware: a Latin-1 request "Mü*" matches a UTF-8 record.
  (``+U8`` / ``SpecificCharacterSet = "ISO_IR 192", override`` in the config
  would force UTF-8 answers; not used by default.)

Orthanc 1.10.1 C-FIND behaviour (same probes)
---------------------------------------------
* Every requested key is returned; attributes absent from the instance come
  back *empty* (InstitutionName, TimezoneOffsetFromUTC, SeriesDate ...).
  ModalitiesInStudy, SOPClassesInStudy, NumberOfStudyRelatedSeries/Instances,
  NumberOfSeriesRelatedInstances are computed; SOPClassUID at IMAGE level is
  returned; non-index attributes (Rows, Columns, BitsAllocated,
  PhotometricInterpretation, even SeriesDescription at STUDY level or Rows at
  SERIES level) are read from a stored file thanks to
  ``StorageAccessOnFind: "Always"``, and are also used for matching
  (Rows=5 or BodyPartExamined=nomatch -> no results; a value on an unknown
  private tag -> no results).
* No extended negotiation acknowledged, but it behaves relationally anyway:
  SERIES without StudyInstanceUID and IMAGE with only SOPInstanceUID work;
  PATIENT level in the Study Root model works too.
* Character set: answers are always in ``DefaultEncoding`` (here UTF-8,
  SpecificCharacterSet "ISO_IR 192"), whatever the request asks for.  PN
  matching is case-insensitive (``CaseSensitivePN: false``: ``mü*`` matches
  ``Müller``) but not accent-insensitive (``Mu*`` does not); a Latin-1
  request ``Mü*`` matches the UTF-8 record.
* Unknown calling AE (or AE known with another host): the association is
  accepted (C-ECHO/C-STORE work), a C-FIND is answered with A-ABORT.
* ``MaximumPduLength`` 131072 is what the A-ASSOCIATE-AC announces.
* QIDO-RS (DICOMweb plugin 1.7 on Orthanc 1.10.1): query parameters are *not*
  percent-decoded.  ``PatientName=M*`` matches but ``PatientName=M%2A``,
  ``PatientID=PID%31`` or any percent-encoded UTF-8 value do not (0 results,
  HTTP 200).  httpx encodes ``*`` as ``%2A`` when given ``params=``, so build
  such URLs by hand with ASCII values.  Instance-level QIDO includes Rows,
  Columns, BitsAllocated.

Timing here: start-to-ready ~0.25 s for either server; ``load`` of a few
instances ~15 ms (Orthanc REST) / ~50 ms (dcmqrscp C-STORE + C-FIND check);
``stop`` of dcmqrscp a few ms (workers are killed first and the parent is
nudged to reap them, so no zombies are left to init); a graceful Orthanc stop
takes 2.5-3.5 s (its embedded HTTP server polls before exiting), so fixtures
with throw-away data can pass ``stop_timeout=0`` to SIGKILL at once.
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DCMQRSCP_BINARY = "/usr/bin/dcmqrscp"

#: Calling AE title used by the helpers themselves (readiness echo, ``load``).
HELPER_AET = "REALPACS_HELPER"

#: Additional index columns requested from Orthanc >= 1.11 (ignored by 1.10).
#: Chosen from the QIDO-RS default return keys (PS3.18 6.7.1.2.2) that are not
#: already main DICOM tags or computed by Orthanc.
ORTHANC_EXTRA_MAIN_DICOM_TAGS: dict[str, list[str]] = {
    "Instance": ["Rows", "Columns", "BitsAllocated", "TimezoneOffsetFromUTC"],
    "Series": [
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "TimezoneOffsetFromUTC",
    ],
    "Study": ["TimezoneOffsetFromUTC"],
    "Patient": [],
}

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(path: str, what: str) -> None:
    """Skip (locally) or fail (when ``CI=true``) if ``path`` is missing.

    Programs must be executable; shared libraries (plugins, ``*.so``) only
    need to exist.
    """
    is_library = ".so" in os.path.basename(path)
    if os.path.isfile(path) and (is_library or os.access(path, os.X_OK)):
        return
    missing_part(f"{what} not available: {path} is missing or not usable")


def missing_part(message: str) -> None:
    """A real part (a PACS, a browser, a proxy, their packages) is missing: the test fails under
    ``CI=true``, where every part must be there, and is skipped elsewhere."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


_PR_SET_PDEATHSIG = 1
try:  # loaded in the parent so that the pre-exec hook only makes one call
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if os.uname().sysname == "Linux" else None
except OSError:  # pragma: no cover
    _LIBC = None


def _die_with_parent() -> None:
    """Pre-exec hook: SIGKILL the server if the test process dies abruptly
    (e.g. pytest killed by a CI timeout, where neither fixtures nor atexit
    run).  Linux ties this to the *thread* that started the server, so start
    servers from a long-lived thread (pytest's main thread is fine) or pass
    ``die_with_parent=False``."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    data = path.read_bytes()[-16384:].decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


def _with_file_meta(ds):
    """``ds`` itself if its file meta is complete, else a copy with file meta
    (Explicit VR Little Endian unless a transfer syntax is already set).
    The caller's dataset is never modified."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = getattr(ds, "file_meta", None)
    if (meta is not None and "TransferSyntaxUID" in meta
            and meta.get("MediaStorageSOPClassUID") == ds.SOPClassUID
            and meta.get("MediaStorageSOPInstanceUID") == ds.SOPInstanceUID):
        return ds
    new = Dataset()
    new.update(ds)
    new_meta = copy.deepcopy(meta) if meta is not None else FileMetaDataset()
    if "TransferSyntaxUID" not in new_meta:
        new_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    new_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    new_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "ImplementationClassUID" not in new_meta:
        new_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    new.file_meta = new_meta
    return new


def _part10_bytes(ds) -> bytes:
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, _with_file_meta(ds), enforce_file_format=True)
    return buf.getvalue()


def _set_nodelay(event) -> None:
    """pynetdicom EVT_CONN_OPEN handler: disable Nagle on the new socket."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def dimse_echo(host: str, port: int, called_aet: str, calling_aet: str = HELPER_AET,
               timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> bool:
    """One C-ECHO (over DICOM TLS with ``tls``); True if it was accepted and answered with Success."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
                         tls_args=(tls, host) if tls is not None else None)
    try:
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


# --------------------------------------------------------------------------
# process management shared by both servers
# --------------------------------------------------------------------------

_LIVE: set["_ManagedServer"] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:  # pragma: no cover - safety net
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        try:
            server.stop()
        except Exception:
            pass


class ServerStartError(RuntimeError):
    pass


class _ManagedServer:
    """Process in its own session/process group, plus a private temp dir."""

    _name = "server"

    def __init__(self, start_timeout: float = _START_TIMEOUT,
                 stop_timeout: float = _STOP_TIMEOUT,
                 die_with_parent: bool = True) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        self.tmpdir: Path | None = None
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- context manager ---------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # -- hooks ---------------------------------------------------------------
    def _prepare(self) -> list[str]:
        """Write configuration into ``self.tmpdir``; return argv."""
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _wake(self) -> None:
        """Make the server's main loop run once (used before stopping)."""

    # -- lifecycle -------------------------------------------------------------
    def start(self):
        if self.process is not None:
            raise RuntimeError(f"{self._name} already started")
        last_error: Exception | None = None
        # A free port can be taken between free_port() and the server's bind():
        # retry a couple of times with fresh ports.
        for _attempt in range(3):
            try:
                self._start_once()
                return self
            except ServerStartError as exc:
                last_error = exc
                addr_in_use = "in use" in str(exc).lower() or "bind" in str(exc).lower()
                self.stop()
                if not addr_in_use:
                    raise
        assert last_error is not None
        raise last_error

    def _start_once(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"realpacs-{self._name}-"))
        self.log_path = self.tmpdir / f"{self._name}.log"
        argv = self._prepare()
        self._log_file = open(self.log_path, "ab", buffering=0)
        self.process = subprocess.Popen(
            argv,
            cwd=self.tmpdir,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills children too
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self.process.poll()
            if rc is not None:
                raise ServerStartError(
                    f"{self._name} exited with code {rc} during start-up; log tail:\n"
                    f"{self.log_tail()}"
                )
            try:
                if self._ready():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self._name} not ready after {self.start_timeout:.0f}s; log tail:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``stop_timeout`` seconds (0: at once), then
        make sure nothing of the process group survives; remove the temp dir.
        Idempotent."""
        proc = self.process
        if proc is not None:
            pgid = proc.pid  # session leader: pgid == pid
            if proc.poll() is None:
                _kill_children_first(pgid, self._wake)
                if self.stop_timeout > 0:
                    _signal_group(pgid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        pass
                if proc.poll() is None:
                    _signal_group(pgid, signal.SIGKILL)
                    proc.wait(timeout=_STOP_TIMEOUT)
            # Leftover children of the group (e.g. dcmqrscp association workers).
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, _STOP_TIMEOUT)
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[tuple[int, int, str]]:
    """``(pid, ppid, state)`` of every process in group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces/parens.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append((int(entry.name), int(fields[1]), fields[0]))
    return members


def _group_alive(pgid: int) -> bool:
    """True if a non-zombie process of group ``pgid`` still exists."""
    if not Path("/proc").is_dir():  # pragma: no cover - non-Linux fallback
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return any(state != "Z" for _pid, _ppid, state in _group_members(pgid))


def _kill_children_first(leader: int, wake=None, timeout: float = 3.0) -> None:
    """SIGKILL the leader's children and give it time to reap them.

    dcmqrscp forks one worker per association and reaps them in its accept
    loop (about once a second).  Killing the parent first would orphan
    workers that are just exiting and leave zombies to init.
    """
    if not Path("/proc").is_dir():  # pragma: no cover
        return
    children = [pid for pid, ppid, _s in _group_members(leader) if ppid == leader]
    if not children:
        return
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(ppid == leader for _pid, ppid, _s in _group_members(leader)):
            return
        if wake is not None:
            wake()
        time.sleep(0.05)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of group {pgid} survived SIGKILL")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OrthancDicomTls:
    """Orthanc's DICOM TLS files (PEM paths). ``certificate`` serves the DICOM port and is also
    presented to modalities (C-MOVE), so give it both server and client use."""

    certificate: str
    private_key: str
    trusted_certificates: str
    remote_certificate_required: bool = True

    def helper_context(self) -> ssl.SSLContext:
        """What the helpers (readiness C-ECHO) connect with: Orthanc's own certificate as client
        certificate, the chain checked against the trusted certificates, no host name check."""
        context = ssl.create_default_context(cafile=self.trusted_certificates)
        context.check_hostname = False
        context.load_cert_chain(self.certificate, self.private_key)
        return context


@functools.lru_cache(maxsize=None)
def orthanc_version(binary: str = ORTHANC_BINARY) -> tuple[int, ...]:
    """``(major, minor, patch)`` as reported by ``Orthanc --version``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=10, env=_child_env()).stdout
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out.splitlines()[0] if out else "")
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


class OrthancServer(_ManagedServer):
    """Orthanc with the DICOMweb plugin, private storage, loopback HTTP.

    ``modalities`` maps a symbolic name to ``(AE title, host, port)``; each one
    may C-ECHO/FIND/GET/MOVE/STORE.  Because ``DicomCheckModalityHost`` is on,
    the host must be the literal address the peer connects from
    (``"127.0.0.1"`` for local peers).  ``HELPER_AET`` is always registered
    (from 127.0.0.1) so tests can query with it.

    Attributes: ``dicom_port``, ``http_port``, ``aet``, ``base_url`` (no
    trailing slash), ``dicomweb_url`` (DICOMweb root, *with* trailing slash:
    ``f"{srv.dicomweb_url}studies"``), ``log_path``, ``tmpdir``, ``config``.

    ``stop()`` sends SIGTERM and waits ``stop_timeout`` s (graceful shutdown
    takes ~3 s) before SIGKILL; ``stop_timeout=0`` kills at once.
    """

    _name = "orthanc"

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        dicom_scp_timeout: int = 30,
        max_pdu_length: int = 131072,
        stable_age: int = 1,
        verbose: bool = False,
        extra_config: Mapping[str, object] | None = None,
        binary: str = ORTHANC_BINARY,
        dicomweb_plugin: str = ORTHANC_DICOMWEB_PLUGIN,
        start_timeout: float = _START_TIMEOUT,
        stop_timeout: float = _STOP_TIMEOUT,
        die_with_parent: bool = True,
        dicom_tls: OrthancDicomTls | None = None,
    ) -> None:
        super().__init__(start_timeout, stop_timeout, die_with_parent)
        self.dicom_tls = dicom_tls
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_scp_timeout = dicom_scp_timeout
        self.max_pdu_length = max_pdu_length
        self.stable_age = stable_age
        self.verbose = verbose
        self.extra_config = dict(extra_config or {})
        self.binary = binary
        self.dicomweb_plugin = dicomweb_plugin
        self.dicom_port = 0
        self.http_port = 0
        self.config: dict = {}
        self._http = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web/"

    def build_config(self) -> dict:
        assert self.tmpdir is not None
        modalities = {
            name: {
                "AET": aet,
                "Host": host,
                "Port": int(port),
                "AllowEcho": True,
                "AllowFind": True,
                "AllowFindWorklist": True,
                "AllowGet": True,
                "AllowMove": True,
                "AllowStore": True,
                "AllowStorageCommitment": True,
                "AllowTranscoding": True,
            }
            for name, (aet, host, port) in self.modalities.items()
        }
        modalities.setdefault("realpacs-helper", {
            "AET": HELPER_AET, "Host": "127.0.0.1", "Port": 1,
            "AllowEcho": True, "AllowFind": True, "AllowGet": True,
            "AllowMove": True, "AllowStore": True,
        })
        config: dict = {
            "Name": f"realpacs-{self.aet}",
            "StorageDirectory": str(self.tmpdir / "storage"),
            "IndexDirectory": str(self.tmpdir / "index"),
            "TemporaryDirectory": str(self.tmpdir / "tmp"),
            "StorageCompression": False,
            "SyncStorageArea": False,
            "MaximumStorageCacheSize": 16,
            "Plugins": [self.dicomweb_plugin],
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "LuaScripts": [],
            # HTTP
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "HttpDescribeErrors": True,
            # DICOM
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DefaultEncoding": "Utf8",
            "DicomScpTimeout": self.dicom_scp_timeout,
            "DicomScuTimeout": 10,
            "MaximumPduLength": self.max_pdu_length,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": modalities,
            "DicomModalitiesInDatabase": False,
            "OrthancPeersInDatabase": False,
            "UnknownSopClassAccepted": False,
            "SynchronousCMove": True,
            # Index / find behaviour
            "StableAge": self.stable_age,
            "OverwriteInstances": True,
            "StorageAccessOnFind": "Always",
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "CaseSensitivePN": False,
            "DeidentifyLogs": False,
            "MetricsEnabled": False,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        if orthanc_version(self.binary) >= (1, 11, 0):
            config["ExtraMainDicomTags"] = ORTHANC_EXTRA_MAIN_DICOM_TAGS
        if self.dicom_tls is not None:
            tls = self.dicom_tls
            config.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": tls.certificate,
                "DicomTlsPrivateKey": tls.private_key,
                "DicomTlsTrustedCertificates": tls.trusted_certificates,
                "DicomTlsRemoteCertificateRequired": tls.remote_certificate_required,
            })
            for modality in modalities.values():
                modality["UseDicomTls"] = True
        _deep_update(config, self.extra_config)
        return config

    def _prepare(self) -> list[str]:
        assert self.tmpdir is not None
        for sub in ("storage", "index", "tmp"):
            (self.tmpdir / sub).mkdir()
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.config = self.build_config()
        config_path = self.tmpdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        argv = [self.binary]
        if self.verbose:
            argv.append("--verbose")
        argv.append(str(config_path))
        return argv

    def _client(self):
        import httpx

        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, timeout=30.0,
                                      trust_env=False)
        return self._http

    def _ready(self) -> bool:
        import httpx

        try:
            resp = self._client().get("/system", timeout=2.0)
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        tls = self.dicom_tls.helper_context() if self.dicom_tls is not None else None
        return dimse_echo("127.0.0.1", self.dicom_port, self.aet, timeout=2.0, tls=tls)

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        super().stop()

    # -- data ------------------------------------------------------------------
    def load(self, datasets: Iterable) -> list[dict]:
        """Store pydicom Datasets through ``POST /instances``; returns Orthanc's
        JSON answers.  Raises if one is refused."""
        client = self._client()
        answers = []
        for ds in datasets:
            resp = client.post("/instances", content=_part10_bytes(ds),
                               headers={"Content-Type": "application/dicom"})
            if resp.status_code != 200:
                raise RuntimeError(
                    f"Orthanc refused {ds.SOPInstanceUID}: {resp.status_code} {resp.text}"
                )
            answer = resp.json()
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc refused {ds.SOPInstanceUID}: {answer}")
            answers.append(answer)
        return answers

    def rest(self, method: str, path: str, **kwargs):
        """Call Orthanc's REST API (``path`` relative to ``base_url``)."""
        resp = self._client().request(method, path, **kwargs)
        resp.raise_for_status()
        return resp


def _deep_update(target: dict, updates: Mapping) -> None:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


# --------------------------------------------------------------------------
# dcmqrscp
# --------------------------------------------------------------------------


class DcmqrscpServer(_ManagedServer):
    """DCMTK ``dcmqrscp`` with one storage area (``aet``) in a temp dir.

    ``peers`` maps a symbolic name to ``(AE title, host name, port)``; only
    those (plus ``HELPER_AET`` from localhost) may associate.  Host names, not
    IP addresses: use ``"localhost"``.  The port is where dcmqrscp connects
    for C-MOVE to that AE title.

    ``extra_args`` are appended to the command line (e.g. ``["+U8"]`` or
    ``["-dhl"]``).  Attributes: ``port``, ``aet``, ``log_path``, ``tmpdir``,
    ``config_text``.
    """

    _name = "dcmqrscp"

    MAX_PDU_LIMIT = 131072
    MAX_STUDIES_LIMIT = 500

    def __init__(
        self,
        aet: str = "DCMQRSCP",
        peers: Mapping[str, tuple[str, str, int]] | None = None,
        max_pdu: int = 131072,
        max_associations: int = 16,
        quota: tuple[int, str] = (200, "1024mb"),
        single_process: bool = False,
        verbose: bool = True,
        extra_args: Sequence[str] = (),
        binary: str = DCMQRSCP_BINARY,
        start_timeout: float = _START_TIMEOUT,
        stop_timeout: float = _STOP_TIMEOUT,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(start_timeout, stop_timeout, die_with_parent)
        if not 4096 <= max_pdu <= self.MAX_PDU_LIMIT:
            raise ValueError(f"dcmqrscp max PDU must be 4096..{self.MAX_PDU_LIMIT}")
        if quota[0] > self.MAX_STUDIES_LIMIT:
            raise ValueError(f"dcmqrscp allows at most {self.MAX_STUDIES_LIMIT} studies")
        for name, (_aet, host, _port) in (peers or {}).items():
            if re.fullmatch(r"[\d.]+|.*:.*", host):
                raise ValueError(
                    f"peer {name!r}: dcmqrscp's HostTable needs a host name, not {host!r}")
        self.aet = aet
        self.peers = dict(peers or {})
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.quota = quota
        self.single_process = single_process
        self.verbose = verbose
        self.extra_args = list(extra_args)
        self.binary = binary
        self.port = 0
        self.config_text = ""

    @property
    def storage_dir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "db" / self.aet

    def build_config(self) -> str:
        peers = dict(self.peers)
        peers.setdefault("realpacs_helper", (HELPER_AET, "localhost", 1))
        lines = [
            f"NetworkTCPPort  = {self.port}",
            f"MaxPDUSize      = {self.max_pdu}",
            f"MaxAssociations = {self.max_associations}",
            "",
            "HostTable BEGIN",
        ]
        names = []
        for name, (aet, host, port) in peers.items():
            symbol = re.sub(r"\W", "_", name)
            names.append(symbol)
            lines.append(f"{symbol} = ({aet}, {host}, {int(port)})")
        lines.append(f"realpacs_all_peers = {', '.join(names)}")
        lines += [
            "HostTable END",
            "",
            "VendorTable BEGIN",
            "VendorTable END",
            "",
            "AETable BEGIN",
            f"{self.aet} {self.storage_dir} RW ({self.quota[0]}, {self.quota[1]}) "
            "realpacs_all_peers",
            "AETable END",
            "",
        ]
        return "\n".join(lines)

    def _prepare(self) -> list[str]:
        self.storage_dir.mkdir(parents=True)
        self.port = free_port()
        self.config_text = self.build_config()
        config_path = self.tmpdir / "dcmqrscp.cfg"
        config_path.write_text(self.config_text)
        argv = [self.binary, "--config", str(config_path)]
        if self.verbose:
            argv.append("--verbose")
        if self.single_process:
            argv.append("--single-process")
        argv += self.extra_args
        argv.append(str(self.port))
        return argv

    def _ready(self) -> bool:
        # Cheap TCP probe first, so that pynetdicom does not log a connection
        # error for every poll before the listen socket exists.
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
        except OSError:
            return False
        return dimse_echo("127.0.0.1", self.port, self.aet, timeout=2.0)

    def _wake(self) -> None:
        # dcmqrscp reaps finished workers after each pass of its accept loop,
        # which otherwise waits up to 1 s; an empty connection ends the wait.
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            pass

    # -- data ------------------------------------------------------------------
    def load(self, datasets: Iterable, calling_aet: str = HELPER_AET) -> None:
        """C-STORE the datasets, then check with C-FIND that all are present."""
        datasets = [_with_file_meta(ds) for ds in datasets]
        if not datasets:
            return
        pending = list(datasets)
        for _ in range(3):
            pending = self._store(pending, calling_aet)
            if not pending:
                break
        else:
            raise RuntimeError(
                f"C-STORE of {pending[0].SOPInstanceUID} failed three times; log tail:\n{self.log_tail()}"
            )
        self._verify_present(datasets, calling_aet)

    def _store(self, datasets: list, calling_aet: str) -> list:
        """Store on one association; return what is left when the association breaks (seen rarely
        under load: dcmqrscp's per-association child gone), so the caller can go on with a new one."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=calling_aet)
        ae.maximum_pdu_size = self.max_pdu
        ae.dimse_timeout = 5  # a stalled store is resumed on a new association, not waited out
        contexts: dict[str, set[str]] = {}
        for ds in datasets:
            contexts.setdefault(ds.SOPClassUID, set()).add(ds.file_meta.TransferSyntaxUID)
        if len(contexts) > 128:
            raise ValueError("too many SOP classes for one association")
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.aet,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)])
        if not assoc.is_established:
            ae.shutdown()
            raise RuntimeError(f"dcmqrscp refused the association; log tail:\n{self.log_tail()}")
        try:
            for index, ds in enumerate(datasets):
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as exc:  # no accepted presentation context
                    raise RuntimeError(
                        f"dcmqrscp did not accept {ds.SOPClassUID} in "
                        f"{ds.file_meta.TransferSyntaxUID} (compressed syntaxes need "
                        f"e.g. extra_args=['+xs']): {exc}") from exc
                code = getattr(status, "Status", None)
                if code is None:
                    return datasets[index:]
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise RuntimeError(
                        f"C-STORE of {ds.SOPInstanceUID} failed: status 0x{code:04X}; "
                        f"log tail:\n{self.log_tail()}"
                    )
            return []
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def _verify_present(self, datasets: Sequence, calling_aet: str) -> None:
        from pydicom.dataset import Dataset

        expected: dict[tuple[str, str], set[str]] = {}
        for ds in datasets:
            expected.setdefault((ds.StudyInstanceUID, ds.SeriesInstanceUID), set()).add(
                ds.SOPInstanceUID)
        missing = []
        for (study, series), sops in expected.items():
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study
            query.SeriesInstanceUID = series
            query.SOPInstanceUID = ""
            found = {str(r.SOPInstanceUID) for r in
                     c_find(self.port, self.aet, query, calling_aet=calling_aet)}
            missing += sorted(sops - found)
        if missing:
            raise RuntimeError(
                f"dcmqrscp does not hold {len(missing)} instance(s) after load "
                f"(duplicates or quota?): {missing[:5]}"
            )


def c_find(port: int, called_aet: str, query, calling_aet: str = HELPER_AET,
           host: str = "127.0.0.1", model: str = "study",
           timeout: float = 30.0) -> list:
    """Study/Patient Root C-FIND; returns the identifiers of the pending
    responses.  Raises on refused association or a failure status."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    sop = (StudyRootQueryRetrieveInformationModelFind if model == "study"
           else PatientRootQueryRetrieveInformationModelFind)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(sop)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)])
    if not assoc.is_established:
        ae.shutdown()
        raise RuntimeError(f"C-FIND association to {called_aet}@{host}:{port} refused")
    results = []
    try:
        for status, identifier in assoc.send_c_find(query, sop):
            if not status:
                raise RuntimeError("C-FIND: no response (timeout or abort)")
            code = status.Status
            if code in (0xFF00, 0xFF01):
                results.append(identifier)
            elif code != 0x0000:
                raise RuntimeError(f"C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return results
