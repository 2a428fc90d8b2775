"""Real clients (dicomweb-client) and a reference answer (Orthanc's own DICOMweb plugin)."""

from __future__ import annotations

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import OrthancServer

from .conftest import QUERY_NODES

STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"


def _values(item: dict, tag: str) -> list:
    return item.get(tag, {}).get("Value", [])


@pytest.mark.parametrize("node", QUERY_NODES)
def test_dicomweb_client_finds_a_series_by_patient_date_and_description(
    gateway: GatewayProcess, studies: list[Dataset], node: str
) -> None:
    """The classic scenario: a Patient ID, an exam date and a series description."""
    target = next(d for d in studies if d.SeriesDescription == "AX T1 +C")
    client = DICOMwebClient(url=gateway.url(node, ""))
    found = client.search_for_studies(search_filters={"PatientID": target.PatientID, "StudyDate": target.StudyDate})
    assert [_values(s, STUDY)[0] for s in found] == [target.StudyInstanceUID]
    series = client.search_for_series(
        study_instance_uid=target.StudyInstanceUID, search_filters={"SeriesDescription": "AX T1 +C"}
    )
    uids = {_values(s, SERIES)[0] for s in series}
    assert target.SeriesInstanceUID in uids
    if node != "dcmqrscp":  # dcmqrscp cannot match SeriesDescription; the gateway warns instead
        assert uids == {target.SeriesInstanceUID}
    instances = client.search_for_instances(
        study_instance_uid=target.StudyInstanceUID, series_instance_uid=target.SeriesInstanceUID
    )
    expected = {d.SOPInstanceUID for d in studies if d.SeriesInstanceUID == target.SeriesInstanceUID}
    assert {_values(i, SOP)[0] for i in instances} == expected


@pytest.mark.parametrize("node", QUERY_NODES)
def test_dicomweb_client_non_ascii_wildcard_limit_offset_and_uid_lists(
    gateway: GatewayProcess, studies: list[Dataset], node: str
) -> None:
    client = DICOMwebClient(url=gateway.url(node, ""))
    found = client.search_for_studies(search_filters={"PatientName": "Müller*"})
    assert {_values(s, "00100020")[0] for s in found} == {"DEMO-0002"}
    assert len(found) == 2
    page = client.search_for_studies(limit=3, offset=1)
    assert len(page) == 3
    a, b = sorted({d.SeriesInstanceUID for d in studies if d.PatientID == "DEMO-0001"})[:2]
    study = next(d.StudyInstanceUID for d in studies if d.SeriesInstanceUID == a)
    same_study = b in {d.SeriesInstanceUID for d in studies if d.StudyInstanceUID == study}
    if same_study:
        series = client.search_for_series(study_instance_uid=study, search_filters={"SeriesInstanceUID": [a, b]})
        assert {_values(s, SERIES)[0] for s in series} == {a, b}
    fields = client.search_for_studies(search_filters={"PatientID": "DEMO-0005"}, fields=["StudyDescription", "PatientAge"])
    assert all("00081030" in s for s in fields)


COMPARED = {
    "/studies?PatientID=DEMO-0001": ["00100010", "00100020", "00080020", "00080030", "00080050", "00080061",
                                      "00201206", "00201208", "00100030", "00100040"],
    "/studies?StudyDate=20170101-20221231": ["00100020", "00080020", "00080061", "00201206"],
    "/studies?PatientName=Yamada*": ["00100010", "00100020"],
}


@pytest.mark.parametrize("query", list(COMPARED))
def test_gateway_agrees_with_orthancs_own_dicomweb(gateway: GatewayProcess, orthanc: OrthancServer, query: str) -> None:
    ours = httpx.get(gateway.url("orthanc", query), timeout=30)
    theirs = httpx.get(orthanc.dicomweb_url.rstrip("/") + query, headers={"Accept": "application/dicom+json"}, timeout=30)
    assert ours.status_code == theirs.status_code == 200
    ours_by_uid = {_values(i, STUDY)[0]: i for i in ours.json()}
    theirs_by_uid = {_values(i, STUDY)[0]: i for i in theirs.json()}
    assert set(ours_by_uid) == set(theirs_by_uid) and ours_by_uid
    for uid, item in ours_by_uid.items():
        for tag in COMPARED[query]:
            assert _values(item, tag) == _values(theirs_by_uid[uid], tag), (uid, tag)


def test_series_and_instances_agree_with_orthancs_own_dicomweb(
    gateway: GatewayProcess, orthanc: OrthancServer, studies: list[Dataset]
) -> None:
    study = next(d.StudyInstanceUID for d in studies if d.PatientID == "DEMO-0002" and d.Modality == "CT")
    base = orthanc.dicomweb_url.rstrip("/")
    for path, key, tags in (
        (f"/studies/{study}/series", SERIES, ["00080060", "0008103E", "00200011", "00201209"]),
        (f"/studies/{study}/instances", SOP, ["00080016", "00200013", "00280010", "00280011"]),
    ):
        ours = httpx.get(gateway.url("orthanc", path), timeout=30).json()
        theirs = httpx.get(base + path, headers={"Accept": "application/dicom+json"}, timeout=30).json()
        ours_by = {_values(i, key)[0]: i for i in ours}
        theirs_by = {_values(i, key)[0]: i for i in theirs}
        assert set(ours_by) == set(theirs_by) and ours_by
        for uid, item in ours_by.items():
            for tag in tags:
                assert _values(item, tag) == _values(theirs_by[uid], tag), (path, uid, tag)
