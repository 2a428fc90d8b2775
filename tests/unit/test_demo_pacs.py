"""The demo PACS over real TCP, driven by a plain pynetdicom SCU.

Expected answers are computed directly from ``generate_studies()``.
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.demo.data import generate_studies, instance_bytes
from gateway.demo.pacs import DemoPACS

STUDY_FIND = StudyRootQueryRetrieveInformationModelFind
PATIENT_FIND = PatientRootQueryRetrieveInformationModelFind
SCU_TITLE = "TEST-SCU"

STUDIES = generate_studies()


@pytest.fixture(scope="module")
def running_pacs() -> Iterator[DemoPACS]:
    with DemoPACS(datasets=STUDIES) as pacs:
        yield pacs


def _wait_until_idle(pacs: DemoPACS) -> None:
    """The acceptor counts a release only after it has answered it."""
    deadline = time.monotonic() + 2
    while pacs.associations_current and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def pacs(running_pacs: DemoPACS) -> Iterator[DemoPACS]:
    _wait_until_idle(running_pacs)
    running_pacs.reset_counters()
    yield running_pacs
    running_pacs.relational = True
    running_pacs.unsupported_keys = set()
    running_pacs.silently_ignored_keys = set()
    running_pacs.omit_move_originator = False
    running_pacs.response_delay = 0.0
    running_pacs.reject = None
    running_pacs.move_destinations = {}


def _nodelay(event: Event) -> None:
    connection = event.assoc.dul.socket
    assert connection is not None and connection.socket is not None
    connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(pacs: DemoPACS, relational: bool = False, get_storage: bool = False) -> Association:
    ae = AE(ae_title=SCU_TITLE)
    for sop_class in (
        Verification,
        STUDY_FIND,
        PATIENT_FIND,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        CTImageStorage,
    ):
        ae.add_requested_context(sop_class)
    ext_neg: list[Any] = []
    if relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_FIND
        item.service_class_application_information = b"\x01"
        ext_neg.append(item)
    if get_storage:
        ext_neg.append(build_role(CTImageStorage, scp_role=True))
    return ae.associate(
        pacs.host,
        pacs.port,
        ae_title=pacs.ae_title,
        ext_neg=ext_neg,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
    )


def _find(
    pacs: DemoPACS, query: Dataset, model: str = STUDY_FIND, relational: bool = False
) -> tuple[list[int], list[Dataset]]:
    assoc = _associate(pacs, relational=relational)
    assert assoc.is_established
    statuses, identifiers = [], []
    for status, identifier in assoc.send_c_find(query, model):
        statuses.append(status.Status)
        if identifier is not None:
            identifiers.append(identifier)
    assoc.release()
    return statuses, identifiers


def _query(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _studies_where(predicate: Callable[[Dataset], bool]) -> list[str]:
    """Study Instance UIDs in date/time order of the generated studies selected by `predicate`."""
    firsts: dict[str, Dataset] = {}
    for ds in STUDIES:
        firsts.setdefault(ds.StudyInstanceUID, ds)
    chosen = [ds for ds in firsts.values() if predicate(ds)]
    return [
        ds.StudyInstanceUID
        for ds in sorted(chosen, key=lambda ds: (ds.StudyDate, ds.StudyTime, ds.StudyInstanceUID))
    ]


def _values(ds: Dataset, keyword: str) -> list[str]:
    element = ds[keyword]
    return [str(value) for value in element.value] if element.VM > 1 else [str(element.value)]


def _series_uid(description: str) -> str:
    return next(ds.SeriesInstanceUID for ds in STUDIES if ds.SeriesDescription == description)


def test_generated_data_is_deterministic_and_complete() -> None:
    assert [instance_bytes(ds) for ds in generate_studies()] == [instance_bytes(ds) for ds in STUDIES]
    assert len({ds.PatientID for ds in STUDIES}) >= 6
    assert len({ds.StudyInstanceUID for ds in STUDIES}) >= 10
    assert len({ds.SeriesInstanceUID for ds in STUDIES}) >= 25
    assert any(int(ds.get("NumberOfFrames", 1)) >= 5 for ds in STUDIES)
    assert any(ds.get((0x0009, 0x0010)) is not None for ds in STUDIES)
    assert len([ds for ds in generate_studies(scale=2) if ds.Modality == "CT"]) > len(
        [ds for ds in STUDIES if ds.Modality == "CT"]
    )


def test_echo(pacs: DemoPACS) -> None:
    assoc = _associate(pacs)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert pacs.associations_total == 1
    assert pacs.associations_peak == 1


def test_study_query_by_patient_id(pacs: DemoPACS) -> None:
    query = _query(
        "STUDY",
        PatientID="DEMO-0002",
        StudyInstanceUID="",
        StudyDate="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="",
        StudyDescription="",
        InstanceAvailability="",
    )
    statuses, found = _find(pacs, query)
    assert statuses == [0xFF00] * len(found) + [0x0000]
    assert [ds.StudyInstanceUID for ds in found] == _studies_where(lambda ds: ds.PatientID == "DEMO-0002")
    for ds in found:
        members = [s for s in STUDIES if s.StudyInstanceUID == ds.StudyInstanceUID]
        assert _values(ds, "ModalitiesInStudy") == sorted({s.Modality for s in members})
        assert int(ds.NumberOfStudyRelatedInstances) == len(members)
        assert ds.RetrieveAETitle == pacs.ae_title
        assert ds.InstanceAvailability == "ONLINE"
    assert any(len(_values(ds, "ModalitiesInStudy")) >= 3 for ds in found)
    assert pacs.find_requests == 1
    assert pacs.last_find_identifiers[-1].PatientID == "DEMO-0002"


def test_wildcard_patient_name(pacs: DemoPACS) -> None:
    _, found = _find(pacs, _query("PATIENT", PatientName="doe*", PatientID=""), PATIENT_FIND)
    assert [ds.PatientID for ds in found] == ["DEMO-0001"]
    _, found = _find(pacs, _query("PATIENT", PatientName="Y?mada*", PatientID=""), PATIENT_FIND)
    assert [ds.PatientID for ds in found] == ["DEMO-0003"]
    _, found = _find(pacs, _query("PATIENT", PatientName="*", PatientID=""), PATIENT_FIND)
    assert [ds.PatientID for ds in found] == sorted({ds.PatientID for ds in STUDIES})


def test_study_date_range(pacs: DemoPACS) -> None:
    for value, predicate in (
        ("20160101-20201231", lambda ds: "20160101" <= ds.StudyDate <= "20201231"),
        ("-20151231", lambda ds: ds.StudyDate <= "20151231"),
        ("20240101-", lambda ds: ds.StudyDate >= "20240101"),
    ):
        _, found = _find(pacs, _query("STUDY", StudyDate=value, StudyInstanceUID=""))
        assert [ds.StudyInstanceUID for ds in found] == _studies_where(predicate), value


def test_sequence_matching(pacs: DemoPACS) -> None:
    code = Dataset()
    code.CodeValue = "CTCHEST"
    code.CodeMeaning = ""
    _, found = _find(pacs, _query("STUDY", ProcedureCodeSequence=[code], StudyInstanceUID=""))
    expected = _studies_where(
        lambda ds: "ProcedureCodeSequence" in ds and ds.ProcedureCodeSequence[0].CodeValue == "CTCHEST"
    )
    assert [ds.StudyInstanceUID for ds in found] == expected
    assert found[0].ProcedureCodeSequence[0].CodeMeaning == "CT Chest"


def test_relational_series_query(pacs: DemoPACS) -> None:
    query = _query("SERIES", Modality="MR", SeriesInstanceUID="", PatientName="")
    expected = {ds.SeriesInstanceUID for ds in STUDIES if ds.Modality == "MR"}

    statuses, found = _find(pacs, query, relational=True)
    assert statuses[-1] == 0x0000
    assert {ds.SeriesInstanceUID for ds in found} == expected

    statuses, found = _find(pacs, query)  # not negotiated
    assert statuses == [0xA900] and not found

    pacs.relational = False
    assoc = _associate(pacs, relational=True)
    assert assoc.acceptor.sop_class_extended[STUDY_FIND][:1] == b"\x00"
    assoc.release()
    statuses, found = _find(pacs, query, relational=True)
    assert statuses == [0xA900] and not found


def test_hierarchical_series_query_with_study_uid(pacs: DemoPACS) -> None:
    study_uid = STUDIES[0].StudyInstanceUID
    _, found = _find(
        pacs, _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", SeriesNumber="")
    )
    assert [ds.SeriesInstanceUID for ds in found] == sorted(
        {ds.SeriesInstanceUID for ds in STUDIES if ds.StudyInstanceUID == study_uid},
        key=lambda uid: int(uid.rsplit(".", 1)[1]),
    )
    statuses, _ = _find(
        pacs, _query("SERIES", StudyInstanceUID=study_uid, PatientName="", SeriesInstanceUID="")
    )
    assert statuses == [0xA900]


def test_unsupported_and_silently_ignored_keys(pacs: DemoPACS) -> None:
    query = _query("STUDY", PatientID="DEMO-0001", StudyDescription="NO SUCH STUDY", StudyInstanceUID="")
    expected = _studies_where(lambda ds: ds.PatientID == "DEMO-0001")

    pacs.unsupported_keys = {"StudyDescription"}
    statuses, found = _find(pacs, query)
    assert statuses == [0xFF01] * len(expected) + [0x0000]
    assert [ds.StudyInstanceUID for ds in found] == expected
    assert all("StudyDescription" not in ds for ds in found)

    pacs.unsupported_keys = set()
    pacs.silently_ignored_keys = {"StudyDescription"}
    statuses, found = _find(pacs, query)
    assert statuses == [0xFF00] * len(expected) + [0x0000]
    assert all("StudyDescription" not in ds for ds in found)


def test_response_delay_still_answers(pacs: DemoPACS) -> None:
    pacs.response_delay = 0.02
    _, found = _find(pacs, _query("STUDY", PatientID="DEMO-0005", StudyInstanceUID=""))
    assert len(found) == len(_studies_where(lambda ds: ds.PatientID == "DEMO-0005"))


def test_cancel_is_counted(pacs: DemoPACS) -> None:
    pacs.response_delay = 0.2
    assoc = _associate(pacs)
    statuses = []
    for status, _ in assoc.send_c_find(_query("STUDY", StudyInstanceUID=""), STUDY_FIND, msg_id=7):
        statuses.append(status.Status)
        if len(statuses) == 1:
            assoc.send_c_cancel(7, query_model=STUDY_FIND)
    assoc.release()
    assert statuses[0] == 0xFF00
    assert statuses[-1] == 0xFE00
    assert len(statuses) < len(_studies_where(lambda ds: True)) + 1
    assert pacs.cancels_received == 1


@pytest.mark.parametrize(
    ("mode", "result", "source", "diagnostic"), [("transient", 2, 3, 2), ("permanent", 1, 1, 3)]
)
def test_reject(pacs: DemoPACS, mode: str, result: int, source: int, diagnostic: int) -> None:
    pacs.reject = mode
    assoc = _associate(pacs)
    assert assoc.is_rejected
    assert (
        assoc.acceptor.primitive.result,
        assoc.acceptor.primitive.result_source,
        assoc.acceptor.primitive.diagnostic,
    ) == (result, source, diagnostic)
    pacs.reject = None
    assoc = _associate(pacs)
    assert assoc.is_established
    assoc.release()


def test_get_series(pacs: DemoPACS) -> None:
    series_uid = _series_uid("Thorax 1.0 B31f")
    expected = {ds.SOPInstanceUID: ds.PixelData for ds in STUDIES if ds.SeriesInstanceUID == series_uid}
    received: dict[str, bytes] = {}

    def on_store(event: Event) -> int:
        received[event.dataset.SOPInstanceUID] = event.dataset.PixelData
        return 0x0000

    assoc = _associate(pacs, get_storage=True)
    assoc.bind(evt.EVT_C_STORE, on_store)
    query = _query("SERIES", StudyInstanceUID=STUDIES[0].StudyInstanceUID, SeriesInstanceUID=series_uid)
    statuses = [
        status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
    ]
    assoc.release()
    assert statuses[-1] == 0x0000
    assert received == expected


@pytest.mark.parametrize("omit", [False, True])
def test_move_series(pacs: DemoPACS, omit: bool) -> None:
    received: dict[str, tuple[Any, Any]] = {}

    def on_store(event: Event) -> int:
        request = event.request
        received[event.dataset.SOPInstanceUID] = (
            request.MoveOriginatorApplicationEntityTitle,
            request.MoveOriginatorMessageID,
        )
        return 0x0000

    store_ae = AE(ae_title="STORE-SCP")
    store_ae.add_supported_context(CTImageStorage)
    server = store_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        pacs.move_destinations = {"STORE-SCP": ("127.0.0.1", server.server_address[1])}
        pacs.omit_move_originator = omit
        series_uid = _series_uid("Head 5.0 H30s")
        study_uid = next(ds.StudyInstanceUID for ds in STUDIES if ds.SeriesInstanceUID == series_uid)
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        assoc = _associate(pacs)
        statuses = [
            s.Status
            for s, _ in assoc.send_c_move(
                query, "STORE-SCP", StudyRootQueryRetrieveInformationModelMove, msg_id=42
            )
        ]
        unknown = [
            s.Status
            for s, _ in assoc.send_c_move(query, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)
        ]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses[-1] == 0x0000
    assert unknown == [0xA801]
    assert set(received) == {ds.SOPInstanceUID for ds in STUDIES if ds.SeriesInstanceUID == series_uid}
    expected = (None, None) if omit else (SCU_TITLE, 42)
    assert set(received.values()) == {expected}


def test_store_then_find(pacs: DemoPACS) -> None:
    new = copy.deepcopy(STUDIES[0])
    new.PatientID = "TEST-STORE"
    new.PatientName = "STORE^TEST"
    new.StudyInstanceUID = "1.2.826.0.1.3680043.10.1137.99.1"
    new.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1137.99.2"
    new.SOPInstanceUID = new.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1137.99.3"
    assoc = _associate(pacs)
    assert assoc.send_c_store(new).Status == 0x0000
    assoc.release()
    assert new.SOPInstanceUID in pacs.stored
    _, found = _find(
        pacs, _query("STUDY", PatientID="TEST-STORE", StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    )
    assert [(ds.StudyInstanceUID, int(ds.NumberOfStudyRelatedInstances)) for ds in found] == [
        (new.StudyInstanceUID, 1)
    ]


def test_non_ascii_names_round_trip(pacs: DemoPACS) -> None:
    for pattern, patient_id, name, charset in (
        ("Müller*", "DEMO-0002", "Müller^Jürgen", "ISO_IR 192"),
        ("山田*", "DEMO-0003", "Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192"),
        ("gómez^maría", "DEMO-0004", "Gómez^María", "ISO_IR 100"),
    ):
        query = _query("PATIENT", SpecificCharacterSet="ISO_IR 192", PatientName=pattern, PatientID="")
        _, found = _find(pacs, query, PATIENT_FIND)
        assert [(ds.PatientID, str(ds.PatientName), ds.SpecificCharacterSet) for ds in found] == [
            (patient_id, name, charset)
        ]


def test_association_counters(pacs: DemoPACS) -> None:
    first, second = _associate(pacs), _associate(pacs)
    assert first.send_c_echo().Status == second.send_c_echo().Status == 0x0000
    assert pacs.associations_peak == 2
    first.release()
    second.release()
    _wait_until_idle(pacs)
    assert pacs.associations_current == 0
    assert pacs.associations_total == 2
