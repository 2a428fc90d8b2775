"""The demo PACS: a real pynetdicom SCP on TCP that keeps its data in memory.

Services: Verification, Patient Root and Study Root Query/Retrieve (C-FIND,
C-GET, C-MOVE) and Storage (C-STORE of every standard storage SOP class in
uncompressed and common compressed transfer syntaxes).

Instances are kept as their encoded PS3.10 bytes plus a header-only Dataset
(read with ``stop_before_pixels``) used for matching.  C-GET and C-MOVE
sub-operations hand pynetdicom a Dataset parsed from the stored bytes (pixel
data stays an undecoded byte string), because its Query/Retrieve service
class only accepts Dataset objects; pynetdicom re-encodes it for the
negotiated transfer syntax.

C-FIND behaviour (PS3.4 C.4.1):

* hierarchical queries always; relational queries only when the requestor
  proposed SOP Class Extended Negotiation with byte 1 set *and* the
  ``relational`` switch is on (the negotiation answer also follows the
  switch).  Fuzzy semantic matching, combined date-time matching and time
  zone adjustment are not supported (answered 0);
* in a hierarchical query, a key of a level above the query level other
  than that level's unique key, a missing unique key of a level above, or a
  unique key of a level above with other than one plain value, is answered
  with status 0xA900 (Identifier does not match SOP Class).  At the Study
  Root STUDY level the patient attributes belong to the STUDY level;
* keys of levels below the query level are not matched and are returned
  empty;
* matching itself is done by :mod:`gateway.demo.matching`.

C-GET/C-MOVE select instances by the unique keys of the retrieve level and
the levels above it (UID lists allowed); other keys are ignored.  A missing
unique key of the retrieve level is answered with 0xA900 by C-GET and with
0xC514 by C-MOVE (pynetdicom's C-MOVE service cannot send a failure status
before it has associated with the destination).  C-MOVE
sub-operations carry the C-MOVE requestor's AE title and Message ID as Move
Originator attributes (unless ``omit_move_originator`` is set).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Collection, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from types import TracebackType
from typing import Any, Self, cast

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from gateway.demo.data import generate_studies, instance_bytes
from gateway.demo.matching import (
    CONTROL_KEYWORDS,
    LEVEL_INDEPENDENT_KEYWORDS,
    LEVELS,
    UNIQUE_KEYS,
    build_response,
    key_level,
    matches,
)

PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
STORE_CANNOT_UNDERSTAND = 0xC000

STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# SOP Class UID -> root level of its information model.
_FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
}
_RETRIEVE_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
}
_COMPUTED_KEYWORDS = frozenset(
    {
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "InstanceAvailability",
        "NumberOfSeriesRelatedInstances",
    }
)


class _IdentifierError(Exception):
    """The request identifier does not fit the information model."""


@dataclass(frozen=True)
class _FindPlan:
    level: str
    match_keys: tuple[DataElement, ...]
    return_keys: Dataset
    status: int


class _Index:
    """Level records built from the stored headers, in result order.

    A PATIENT, STUDY or SERIES record holds the attributes of that level,
    taken from the first instance of the entity, and those of the levels
    above it; an IMAGE record is the instance's own header.  All records
    also carry the computed attributes of their level and the levels above.
    """

    def __init__(self, headers: Iterable[Dataset]) -> None:
        ordered = sorted(headers, key=_instance_order)
        by_patient: dict[str, list[Dataset]] = {}
        by_study: dict[str, list[Dataset]] = {}
        by_series: dict[str, list[Dataset]] = {}
        for header in ordered:
            by_patient.setdefault(str(header.get("PatientID", "")), []).append(header)
            by_study.setdefault(str(header.get("StudyInstanceUID", "")), []).append(header)
            by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(header)

        patients: dict[str, Dataset] = {}
        for patient_id in sorted(by_patient):
            members = by_patient[patient_id]
            record = _level_part(members[0], "PATIENT")
            record.NumberOfPatientRelatedStudies = _count(members, "StudyInstanceUID")
            record.NumberOfPatientRelatedSeries = _count(members, "SeriesInstanceUID")
            record.NumberOfPatientRelatedInstances = len(members)
            patients[patient_id] = record

        studies: dict[str, Dataset] = {}
        for study_uid, members in by_study.items():
            record = _merge(patients[str(members[0].get("PatientID", ""))], _level_part(members[0], "STUDY"))
            record.ModalitiesInStudy = _distinct(members, "Modality")
            record.SOPClassesInStudy = _distinct(members, "SOPClassUID")
            record.NumberOfStudyRelatedSeries = _count(members, "SeriesInstanceUID")
            record.NumberOfStudyRelatedInstances = len(members)
            record.InstanceAvailability = "ONLINE"
            studies[study_uid] = record

        series: dict[str, Dataset] = {}
        for series_uid, members in by_series.items():
            study = studies[str(members[0].get("StudyInstanceUID", ""))]
            record = _merge(study, _level_part(members[0], "SERIES"))
            record.NumberOfSeriesRelatedInstances = len(members)
            series[series_uid] = record

        self.records: dict[str, list[Dataset]] = {
            "PATIENT": list(patients.values()),
            "STUDY": list(studies.values()),
            "SERIES": list(series.values()),
            "IMAGE": [
                _merge(header, _computed(series[str(header.get("SeriesInstanceUID", ""))]))
                for header in ordered
            ],
        }


class _DemoAE(AE):
    """An AE whose association acceptance follows the PACS switches.

    pynetdicom rejects an association request itself when the calling AE
    title is not in ``require_calling_aet`` (result 1 "rejected-permanent",
    source 1, reason 3 "calling-AE-title-not-recognized") or when more than
    ``maximum_associations`` acceptor associations are active (result 2
    "rejected-transient", source 3, reason 2 "local-limit-exceeded").  Both
    are read on every request, so the ``reject`` switch is implemented by
    overriding them.
    """

    def __init__(self, pacs: DemoPACS) -> None:
        super().__init__(ae_title=pacs.ae_title)
        self._pacs = pacs

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        return 0 if self._pacs.reject == "transient" else self._pacs.max_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._pacs.max_associations = value

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        # No calling AE title can be empty, so [""] rejects every requestor.
        return [""] if self._pacs.reject == "permanent" else []

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise AttributeError("the demo PACS controls rejection with its 'reject' switch")

    def associate(self, *args: Any, move_originator: str | None = None, **kwargs: Any) -> Association:
        """Request an association; pynetdicom calls this for C-MOVE sub-operations.

        pynetdicom's C-MOVE service sends its *own* AE title as Move
        Originator Application Entity Title; `move_originator` (passed by
        the C-MOVE handler with the destination) replaces it with the C-MOVE
        requestor's title, or removes both Move Originator attributes when
        it is an empty string.
        """
        assoc = super().associate(*args, **kwargs)
        send = _parked(assoc, assoc.send_c_store)
        if move_originator is not None:
            send = _with_move_originator(send, move_originator)
        assoc.send_c_store = send  # type: ignore[method-assign]
        return assoc


class DemoPACS:
    """An in-memory Query/Retrieve and Storage SCP for tests, demos and benchmarks.

    Switches (plain attributes, may be changed while the server runs):

    * ``relational``: accept relational queries when negotiated;
    * ``unsupported_keys``: keywords ignored for matching and not returned;
      pending responses then carry status 0xFF01 instead of 0xFF00;
    * ``silently_ignored_keys``: keywords ignored for matching and not
      returned, status unchanged (like DCMTK's dcmqrscp);
    * ``omit_move_originator``: C-MOVE sub-operations without Move Originator
      AE Title / Message ID;
    * ``response_delay``: seconds slept before each C-FIND pending response
      and each C-GET/C-MOVE sub-operation;
    * ``reject``: ``None``, ``"transient"`` or ``"permanent"`` rejection of
      new associations;
    * ``max_associations``: maximum number of simultaneous associations;
    * ``move_destinations``: C-MOVE destinations, AE title -> (host, port).

    DICOM TLS (set before ``start()``): ``ssl_context``, a server context, makes
    the DICOM port speak TLS (client certificates as that context requires);
    ``move_tls``, a client context, makes C-MOVE sub-associations TLS
    (the destination's host name is the name checked).

    Counters (``reset_counters()`` zeroes them): ``cancels_received`` (C-CANCELs
    seen while a C-FIND/C-GET/C-MOVE was still running, once per request),
    ``associations_total``, ``associations_current``, ``associations_peak``
    (accepted associations), ``find_requests``, ``retrieve_requests`` (C-GET and
    C-MOVE requests; ``last_retrieve_levels`` their Query/Retrieve Levels), ``last_find_identifiers`` and
    ``stored`` (SOP Instance UID -> calling AE title, for each C-STORE).

    ``start()`` also turns off pynetdicom's (process-wide) logging of C-FIND
    identifiers.
    """

    def __init__(
        self,
        ae_title: str = "DEMO-PACS",
        host: str = "127.0.0.1",
        port: int = 0,
        datasets: Iterable[Dataset] | None = None,
        move_destinations: dict[str, tuple[str, int]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        move_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.ssl_context = ssl_context
        self.move_tls = move_tls
        self.host = host
        self.port = port
        self.move_destinations: dict[str, tuple[str, int]] = dict(move_destinations or {})
        self.relational = True
        self.unsupported_keys: set[str] = set()
        self.silently_ignored_keys: set[str] = set()
        self.omit_move_originator = False
        self.response_delay = 0.0
        self.reject: str | None = None
        self.max_associations = 10
        self.refused_storage_classes: set[str] = set()
        self.storage_syntaxes: tuple[str, ...] = STORAGE_TRANSFER_SYNTAXES

        self._lock = threading.RLock()
        self._instances: dict[str, tuple[bytes, Dataset]] = {}
        self._index: _Index | None = None
        self._active: set[Association] = set()
        self._last_find: deque[Dataset] = deque(maxlen=50)
        self.reset_counters()

        for ds in generate_studies() if datasets is None else datasets:
            blob = instance_bytes(ds)
            self._add(blob, _read_header(blob))

        self._ae = _DemoAE(self)
        self._ae.maximum_pdu_size = 1024 * 1024
        self._server: Any = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start listening; afterwards ``port`` holds the bound port."""
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        self._current_index()
        server = self._ae.start_server(
            (self.host, self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, _set_tcp_nodelay),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_RELEASED, self._on_closed),
                (evt.EVT_ABORTED, self._on_closed),
                (evt.EVT_CONN_CLOSE, self._on_closed),
                (evt.EVT_SOP_EXTENDED, self._on_sop_extended),
                (evt.EVT_C_FIND, self._on_find),
                (evt.EVT_C_GET, self._on_get),
                (evt.EVT_C_MOVE, self._on_move),
                (evt.EVT_C_STORE, self._on_store),
            ],
            contexts=_supported_contexts(self.refused_storage_classes, self.storage_syntaxes),
        )
        self._server = server
        self.port = cast(ThreadedAssociationServer, server).server_address[1]

    def refuse_storage_classes(self, sop_classes: set[str]) -> None:
        """Reject the storage contexts of these SOP classes on new associations (like a PACS that
        cannot send them by C-GET); an empty set accepts them all again."""
        self.refused_storage_classes = set(sop_classes)
        if self._server is not None:
            self._server.contexts = _supported_contexts(self.refused_storage_classes, self.storage_syntaxes)

    def restrict_storage_syntaxes(self, syntaxes: tuple[str, ...] | None) -> None:
        """Accept only these transfer syntaxes for storage contexts on new associations (like a PACS
        without codecs); None accepts every syntax the demo PACS knows again."""
        self.storage_syntaxes = tuple(syntaxes) if syntaxes else STORAGE_TRANSFER_SYNTAXES
        if self._server is not None:
            self._server.contexts = _supported_contexts(self.refused_storage_classes, self.storage_syntaxes)

    def stop(self) -> None:
        """Stop listening, then abort the open associations, like a PACS that goes down.

        pynetdicom's own shutdown aborts first and stops listening afterwards, which lets a client that
        reconnects at once slip into a new association while the server winds down.
        """
        for server in list(self._ae._servers):
            server.shutdown()
        self._ae._servers = []
        for assoc in self._ae.active_associations:
            assoc.abort()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- data and counters -------------------------------------------------

    def datasets(self) -> list[Dataset]:
        """Return every stored instance, decoded from its stored bytes."""
        with self._lock:
            blobs = [blob for blob, _ in self._instances.values()]
        return [pydicom.dcmread(BytesIO(blob)) for blob in blobs]

    def headers(self) -> list[Dataset]:
        """Return the header (everything before the pixel data) of every stored instance."""
        with self._lock:
            return [header for _, header in self._instances.values()]

    def reset_counters(self) -> None:
        """Zero the counters and forget the received identifiers and C-STOREs."""
        with self._lock:
            self.cancels_received = 0
            self.associations_total = 0
            self.associations_current = len(self._active)
            self.associations_peak = len(self._active)
            self.find_requests = 0
            self.find_matches_sent = 0
            self.retrieve_requests = 0  # C-GET and C-MOVE requests
            self.last_retrieve_levels: list[str] = []
            self._last_find.clear()
            self.stored: dict[str, str] = {}

    @property
    def last_find_identifiers(self) -> list[Dataset]:
        """The identifiers of the last 50 C-FIND requests, oldest first."""
        with self._lock:
            return list(self._last_find)

    def _add(self, blob: bytes, header: Dataset) -> None:
        with self._lock:
            self._instances[str(header.SOPInstanceUID)] = (blob, header)
            self._index = None

    def _current_index(self) -> _Index:
        with self._lock:
            if self._index is None:
                self._index = _Index(header for _, header in self._instances.values())
            return self._index

    def _count_cancel(self, event: Event) -> bool:
        """True (and counted) if a C-CANCEL arrived for this request."""
        if not event.is_cancelled:
            return False
        with self._lock:
            self.cancels_received += 1
        return True

    def _pause(self) -> None:
        if self.response_delay > 0:
            time.sleep(self.response_delay)

    # -- association events ------------------------------------------------

    def _on_accepted(self, event: Event) -> None:
        with self._lock:
            self._active.add(event.assoc)
            self.associations_total += 1
            self.associations_current = len(self._active)
            self.associations_peak = max(self.associations_peak, self.associations_current)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            self._active.discard(event.assoc)
            self.associations_current = len(self._active)

    def _on_sop_extended(self, event: Event) -> dict[str, bytes]:
        """Answer SOP Class Extended Negotiation: only byte 1 (relational) is supported."""
        answers = {}
        app_info: dict[str, bytes] = event.app_info  # type: ignore[attr-defined]
        for sop_class, info in app_info.items():
            if (sop_class in _FIND_MODELS or sop_class in _RETRIEVE_MODELS) and info:
                relational = self.relational and info[0] == 1
                answers[sop_class] = bytes([int(relational)]) + bytes(len(info) - 1)
        return answers

    # -- services ----------------------------------------------------------

    def _on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        sop_class = _sop_class(event)
        with self._lock:
            self.find_requests += 1
            self._last_find.append(identifier)
        negotiated = event.assoc.acceptor.sop_class_extended.get(sop_class, b"")
        relational = self.relational and negotiated[:1] == b"\x01"
        try:
            plan = self._plan_find(identifier, _FIND_MODELS[sop_class], relational)
        except _IdentifierError:
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        for record in self._current_index().records[plan.level]:
            if not all(matches(record, key) for key in plan.match_keys):
                continue
            response = build_response(record, plan.return_keys, plan.level, self.ae_title)
            self._pause()
            if self._count_cancel(event):
                yield CANCELLED, None
                return
            with self._lock:
                self.find_matches_sent += 1
            yield plan.status, response
        if self._count_cancel(event):
            yield CANCELLED, None

    def _plan_find(self, identifier: Dataset, root: str, relational: bool) -> _FindPlan:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        model_levels = _model_levels(root)
        if level not in model_levels:
            raise _IdentifierError(f"query level {level!r} not in the information model")
        depth = LEVELS.index(level)
        unsupported = frozenset(self.unsupported_keys)
        ignored = frozenset(self.silently_ignored_keys)
        warn = False
        return_keys = Dataset()
        match_keys = []
        upper_unique_keys = set()
        for key in identifier:
            keyword = key.keyword
            if key.tag.element == 0 or keyword in CONTROL_KEYWORDS:
                continue
            if keyword in unsupported or keyword in ignored:
                warn = warn or keyword in unsupported
                continue
            return_keys.add(key)
            key_depth = LEVELS.index(_model_level(key, root, level))
            if key_depth > depth:
                continue
            if key_depth < depth and not relational:
                if keyword != UNIQUE_KEYS[LEVELS[key_depth]] or not _single_value(key):
                    raise _IdentifierError(f"{keyword} not allowed in a hierarchical {level} query")
                upper_unique_keys.add(LEVELS[key_depth])
            match_keys.append(key)
        if not relational and not set(model_levels[: model_levels.index(level)]) <= upper_unique_keys:
            raise _IdentifierError("a unique key of a level above the query level is missing")
        return _FindPlan(level, tuple(match_keys), return_keys, PENDING_WARNING if warn else PENDING)

    def _select(self, identifier: Dataset, root: str) -> list[str]:
        """SOP Instance UIDs selected by a C-GET/C-MOVE identifier."""
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        model_levels = _model_levels(root)
        if level not in model_levels:
            raise _IdentifierError(f"retrieve level {level!r} not in the information model")
        keys = []
        for upper in model_levels[: model_levels.index(level) + 1]:
            keyword = UNIQUE_KEYS[upper]
            element = identifier.data_element(keyword)
            if element is not None and not element.is_empty:
                keys.append(element)
            elif upper == level:
                raise _IdentifierError(f"{keyword} is required to retrieve at the {level} level")
        return [
            str(record.SOPInstanceUID)
            for record in self._current_index().records["IMAGE"]
            if all(matches(record, key) for key in keys)
        ]

    def _retrieve(self, event: Event, uids: list[str]) -> Iterator[tuple[int, Dataset | None]]:
        for uid in uids:
            self._pause()
            if self._count_cancel(event):
                yield CANCELLED, None
                return
            with self._lock:
                blob = self._instances[uid][0]
            yield PENDING, pydicom.dcmread(BytesIO(blob))

    def _count_retrieve(self, event: Event) -> None:
        with self._lock:
            self.retrieve_requests += 1
            self.last_retrieve_levels.append(str(getattr(event.identifier, "QueryRetrieveLevel", "")))

    def _on_get(self, event: Event) -> Iterator[Any]:
        self._count_retrieve(event)
        try:
            uids = self._select(event.identifier, _RETRIEVE_MODELS[_sop_class(event)])
        except _IdentifierError:
            yield 1
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        yield len(uids)
        yield from self._retrieve(event, uids)

    def _on_move(self, event: Event) -> Iterator[Any]:
        self._count_retrieve(event)
        destination = self.move_destinations.get(event.move_destination or "")
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801
            return
        # pynetdicom associates with the destination before it reads any
        # status, so an invalid identifier is reported by raising here:
        # pynetdicom then answers 0xC514 without associating.
        uids = self._select(event.identifier, _RETRIEVE_MODELS[_sop_class(event)])
        host, port = destination
        options: dict[str, Any] = {
            "contexts": self._move_contexts(uids),
            "evt_handlers": [(evt.EVT_CONN_OPEN, _set_tcp_nodelay)],
            "move_originator": "" if self.omit_move_originator else event.assoc.requestor.ae_title,
        }
        if self.move_tls is not None:
            options["tls_args"] = (self.move_tls, host)
        yield host, port, options
        yield len(uids)
        yield from self._retrieve(event, uids)

    def _move_contexts(self, uids: list[str]) -> list[PresentationContext]:
        """Presentation contexts for the C-MOVE sub-association (at most 128)."""
        syntaxes: dict[str, list[str]] = {}
        with self._lock:
            for uid in uids:
                header = self._instances[uid][1]
                proposed = syntaxes.setdefault(str(header.SOPClassUID), list(_UNCOMPRESSED))
                transfer_syntax = str(header.file_meta.TransferSyntaxUID)
                if transfer_syntax not in proposed:
                    proposed.insert(0, transfer_syntax)
        return [build_context(sop_class, ts) for sop_class, ts in list(syntaxes.items())[:128]]

    def _on_store(self, event: Event) -> int:
        blob = event.encoded_dataset(include_meta=True)
        try:
            header = _read_header(blob)
            uid = str(header.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - any undecodable data set is refused
            return STORE_CANNOT_UNDERSTAND
        self._add(blob, header)
        with self._lock:
            self.stored[uid] = event.assoc.requestor.ae_title
        return 0x0000


def _supported_contexts(refused: Collection[str] = (),
                        syntaxes: Sequence[str] = STORAGE_TRANSFER_SYNTAXES) -> list[PresentationContext]:
    contexts = [build_context(Verification, list(_UNCOMPRESSED))]
    for sop_class in (*_FIND_MODELS, *_RETRIEVE_MODELS):
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    for storage in AllStoragePresentationContexts:
        if storage.abstract_syntax in refused:
            continue
        context = build_context(cast(UID, storage.abstract_syntax), list(syntaxes))
        # Accept either role, so C-GET requestors can act as Storage SCP.
        context.scu_role = True
        context.scp_role = True
        contexts.append(context)
    return contexts


def _set_tcp_nodelay(event: Event) -> None:
    connection = event.assoc.dul.socket
    if connection is not None and connection.socket is not None:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _sop_class(event: Event) -> UID:
    return cast(UID, event.request.AffectedSOPClassUID)


def _parked(assoc: Association, send_c_store: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Work around a pynetdicom 3.0.4 race on requestor associations: right after one operation
    ends, the association thread may still count as paused while it is not, and then swallow the
    next response if the peer answers fast (TCP_NODELAY, loopback) - here a C-STORE response from
    the gateway's receiver, after which pynetdicom waits out its DIMSE timeout. Clearing the stale
    flag makes send_c_store wait until the thread is really paused."""

    def send(*args: Any, **kwargs: Any) -> Dataset:
        assoc._is_paused = False
        return send_c_store(*args, **kwargs)

    return send


def _with_move_originator(send_c_store: Callable[..., Dataset], originator: str) -> Callable[..., Dataset]:
    def send(
        dataset: Dataset,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        return send_c_store(
            dataset,
            msg_id=msg_id,
            priority=priority,
            originator_aet=originator or None,
            originator_id=originator_id if originator else None,
        )

    return send


def _read_header(blob: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(blob), stop_before_pixels=True)


def _model_levels(root: str) -> tuple[str, ...]:
    return LEVELS[LEVELS.index(root) :]


def _model_level(key: DataElement, root: str, query_level: str) -> str:
    """Level of `key`; in the Study Root model patient attributes are STUDY attributes."""
    if key.keyword in LEVEL_INDEPENDENT_KEYWORDS:
        return query_level
    level = key_level(key.tag)
    return "STUDY" if root == "STUDY" and level == "PATIENT" else level


def _single_value(key: DataElement) -> bool:
    value = key.value
    return (
        isinstance(value, str)
        and value.strip() != ""
        and "\\" not in value
        and not any(c in value for c in "*?")
    )


def _level_part(header: Dataset, level: str) -> Dataset:
    part = Dataset()
    if "SpecificCharacterSet" in header:
        part.add(header["SpecificCharacterSet"])
    for element in header:
        if element.keyword not in CONTROL_KEYWORDS and key_level(element.tag) == level:
            part.add(element)
    return part


def _merge(upper: Dataset, part: Dataset) -> Dataset:
    merged = Dataset()
    for element in upper:
        merged.add(element)
    for element in part:
        merged.add(element)
    return merged


def _computed(record: Dataset) -> Dataset:
    computed = Dataset()
    for element in record:
        if element.keyword in _COMPUTED_KEYWORDS:
            computed.add(element)
    return computed


def _count(members: list[Dataset], keyword: str) -> int:
    return len({str(member.get(keyword, "")) for member in members})


def _distinct(members: list[Dataset], keyword: str) -> list[str]:
    return sorted({str(member.get(keyword)) for member in members if member.get(keyword)})


def _instance_order(header: Dataset) -> tuple[str, str, str, int, str, int, str]:
    return (
        str(header.get("StudyDate", "")),
        str(header.get("StudyTime", "")),
        str(header.get("StudyInstanceUID", "")),
        _int(header.get("SeriesNumber")),
        str(header.get("SeriesInstanceUID", "")),
        _int(header.get("InstanceNumber")),
        str(header.get("SOPInstanceUID", "")),
    )


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0
