"""The three ways the benchmark asks the same question, and the queries it asks.

- ``gateway``: QIDO-RS through the gateway, one keep-alive httpx Client per client thread.
- ``direct``: C-FIND from this process on an association opened beforehand and kept open (Study
  Root, TCP_NODELAY, the same maximum PDU, pynetdicom configured as the gateway configures it, the
  same identifier the gateway builds for that QIDO request).
- ``orthanc``: Orthanc's own DICOMweb plugin (QIDO-RS), same HTTP client setup as ``gateway``.

A client's ``request(query)`` returns ``(seconds, results)`` and raises ``BenchError`` on any failure,
a wrong number of results included. Timing covers what the user waits for: the whole HTTP response
body, or every C-FIND response up to the final status. For ``limit`` the direct client stops the clock
at the match the gateway stops at (``limit + 1``), sends C-CANCEL, and drains the remaining responses
after the clock has stopped, as the gateway does in the background after answering.

pynetdicom 3.0.4 race, worked around here (``park_reactor``): a requestor's association thread (the
"reactor") takes any complete message off the DIMSE queue unless it is paused, and drops a response
it did not expect. ``send_c_find`` pauses it by clearing an event and waiting until ``_is_paused`` is
true, but right after the previous C-FIND ended (which resumed the reactor) that flag can still be
true from the last pause, before the reactor thread has run again. The request then goes out with the
reactor running, and with a fast peer (TCP_NODELAY, loopback) the reactor can swallow the first
response: a C-FIND that silently misses a match, or, if it was the final response, waits for the DIMSE
timeout. Measured without the workaround: 1 to 14 in 320 back-to-back C-FINDs at 8 clients, each
logged by pynetdicom as "Received unexpected C-FIND service message". The gateway's own upper layer
(``gateway/dimse/ul.py``) reads its responses in the requesting thread and has no such race.
"""

from __future__ import annotations

import copy
import socket
import time
from dataclasses import dataclass

import httpx
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from gateway.dicomweb.attributes import Level
from gateway.dicomweb.plan import Resource, build_plan
from gateway.dicomweb.query import parse_query
from gateway.dimse.net import configure_pynetdicom

from .data import BenchData

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PENDING = (0xFF00, 0xFF01)
PATHS = ("gateway", "direct", "orthanc")
PATH_LABELS = {"gateway": "gateway QIDO", "direct": "direct C-FIND", "orthanc": "Orthanc QIDO"}


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Query:
    name: str
    label: str
    resource: Resource
    path: str  # QIDO path below the service root, e.g. "/studies"
    params: str  # query string, plain ASCII (Orthanc does not percent-decode)
    limit: int | None
    total: int  # matches in the data set, before any limit
    identifier: Dataset  # what the gateway sends for this request (relational node)

    @property
    def http_expected(self) -> int:
        return self.total if self.limit is None else min(self.limit, self.total)

    @property
    def direct_read(self) -> int | None:
        """How many matches the direct client reads before C-CANCEL (None: all of them)."""
        return None if self.limit is None else self.limit + 1

    @property
    def direct_expected(self) -> int:
        return self.total if self.direct_read is None else min(self.direct_read, self.total)

    def url(self, service_root: str) -> str:
        """``service_root`` without a trailing slash."""
        return service_root + self.path + (f"?{self.params}" if self.params else "")


def gateway_identifier(resource: Resource, params: str) -> Dataset:
    """The C-FIND identifier the gateway sends for this QIDO request to a node with ``relational =
    "assume"`` (one query, no fan-out)."""
    plan = build_plan(resource, parse_query(params), relational=True, fuzzy_accepted=False, charset="ISO_IR 192")
    if len(plan.steps) != 1:
        raise AssertionError(f"expected a single C-FIND for {resource} ?{params}, got {len(plan.steps)}")
    return plan.steps[0].identifier


def build_queries(data: BenchData, limit: int = 10) -> list[Query]:
    study, series = data.study_uid, data.series_uid
    low, high = data.date_range
    specs = [
        ("patient", "studies by PatientID", Resource(Level.STUDY), "/studies",
         f"PatientID={data.patient_id}", None, data.studies_of_patient),
        ("date", "studies by StudyDate range", Resource(Level.STUDY), "/studies",
         f"StudyDate={low}-{high}", None, data.studies_in_range),
        ("limit", f"all studies, limit={limit}", Resource(Level.STUDY), "/studies",
         f"limit={limit}", limit, data.studies_total),
        ("series", "series of a study", Resource(Level.SERIES, study), f"/studies/{study}/series",
         "", None, data.series_in_study),
        ("instances", "instances of a series", Resource(Level.IMAGE, study, series),
         f"/studies/{study}/series/{series}/instances", "", None, data.instances_in_series),
    ]
    return [
        Query(name, label, resource, path, params, lim, total, gateway_identifier(resource, params))
        for name, label, resource, path, params, lim, total in specs
    ]


# ------------------------------------------------------------------------------------------------
# HTTP (gateway and Orthanc)


class HttpClient:
    def __init__(self, service_root: str, timeout: float = 30.0) -> None:
        self.service_root = service_root.rstrip("/")
        self.client = httpx.Client(
            timeout=timeout, trust_env=False, headers={"Accept": "application/dicom+json"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        self._urls: dict[str, str] = {}

    def request(self, query: Query) -> tuple[float, int]:
        url = self._urls.get(query.name)
        if url is None:
            url = self._urls[query.name] = query.url(self.service_root)
        started = time.perf_counter()
        response = self.client.get(url)  # reads the whole body
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            results = len(response.json())
        except ValueError as exc:
            raise BenchError(f"not JSON: {exc}") from None
        if results != query.http_expected:
            raise BenchError(f"{results} results, expected {query.http_expected}")
        return elapsed, results

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------------
# Direct C-FIND


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def park_reactor(assoc: Association) -> None:
    """Make the next ``send_*`` wait until the reactor is really paused (see the module docstring).

    Clearing the stale flag makes ``send_c_find``'s own wait loop wait for the reactor's next pass,
    which parks it before the request is sent. That wait existed already whenever the reactor was in
    its 1 ms sleep, so this closes the race without adding a wait on average."""
    assoc._is_paused = False


class DirectFindClient:
    """One association, opened now and kept open; C-FIND requests one at a time."""

    def __init__(self, port: int, called_aet: str, calling_aet: str, max_pdu: int, timeout: float = 30.0) -> None:
        configure_pynetdicom()  # the gateway's settings: no per-PDU log formatting, no identifier logging
        self.port = port
        self.called_aet = called_aet
        self.max_pdu = max_pdu
        self.ae = AE(ae_title=calling_aet)
        self.ae.add_requested_context(STUDY_ROOT)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        self.msg_id = 0
        self.assoc: Association | None = None
        self._identifiers: dict[str, Dataset] = {}  # a private copy per client: no Dataset shared by threads
        self._open()

    def _open(self) -> None:
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.called_aet, max_pdu=self.max_pdu,
                                  evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if not assoc.is_established:
            raise BenchError(f"association to {self.called_aet}@127.0.0.1:{self.port} not established")
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is None or not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            assoc.abort()
            raise BenchError("TCP_NODELAY is not set on the direct association")
        self.assoc = assoc

    def request(self, query: Query) -> tuple[float, int]:
        if self.assoc is None or not self.assoc.is_established:
            self._open()  # after a failure; the failure itself was counted
        assoc = self.assoc
        assert assoc is not None
        self.msg_id = self.msg_id % 65535 + 1
        msg_id = self.msg_id
        identifier = self._identifiers.get(query.name)
        if identifier is None:
            identifier = self._identifiers[query.name] = copy.deepcopy(query.identifier)
        read_limit = query.direct_read
        matches = 0
        stopped: float | None = None
        final: int | None = None
        started = time.perf_counter()
        park_reactor(assoc)
        try:
            for status, _identifier in assoc.send_c_find(identifier, STUDY_ROOT, msg_id=msg_id):
                if not status or "Status" not in status:
                    raise BenchError("no C-FIND response (timeout or association lost)")
                code = int(status.Status)
                if code in PENDING:
                    if stopped is None:
                        matches += 1
                        if read_limit is not None and matches >= read_limit:
                            stopped = time.perf_counter()
                            assoc.send_c_cancel(msg_id, query_model=STUDY_ROOT)
                    continue
                final = code
                break
        except BenchError:
            assoc.abort()
            raise
        if stopped is None:
            stopped = time.perf_counter()
        if final is None:
            assoc.abort()
            raise BenchError("C-FIND ended without a final status")
        if final not in (0x0000, 0xFE00):
            raise BenchError(f"C-FIND final status 0x{final:04X}")
        if matches != query.direct_expected:
            raise BenchError(f"{matches} matches, expected {query.direct_expected}")
        return stopped - started, matches

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            try:
                self.assoc.release()
            except Exception:
                self.assoc.abort()
        self.assoc = None
