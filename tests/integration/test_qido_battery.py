"""One QIDO-RS query battery against every PACS, with expected answers from the data generator.

Where a PACS cannot match a key (dcmqrscp ignores SeriesDescription and ModalitiesInStudy and does not
return them), the gateway cannot check it either: the expected answer is then the unfiltered set,
with a Warning that names the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import httpx
import pytest
from pydicom.dataset import Dataset

from tests.support.gatewayproc import GatewayProcess

from .conftest import QUERY_NODES

STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
UID_OF = {"study": STUDY, "series": SERIES, "instance": SOP}
KEY_OF = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}

# What dcmqrscp cannot match or return (DCMTK 3.6.7's index holds a fixed set of keys).
DCMQRSCP_BLIND = {"SeriesDescription", "ModalitiesInStudy"}


@dataclass
class Case:
    name: str
    path: Callable[[list[Dataset]], str]
    params: dict[str, str] | Callable[[list[Dataset]], dict[str, str]]
    level: str
    where: Callable[[Dataset], bool]
    filters_on: set[str] = field(default_factory=set)  # keywords some PACS cannot match
    loose: Callable[[Dataset], bool] | None = None  # ``where`` without the conditions on those keywords


def first_study(studies: list[Dataset], patient: str, modality: str | None = None) -> str:
    return next(d.StudyInstanceUID for d in studies if d.PatientID == patient and (modality is None or d.Modality == modality))


def first_series(studies: list[Dataset], description: str) -> tuple[str, str]:
    d = next(d for d in studies if d.SeriesDescription == description)
    return d.StudyInstanceUID, d.SeriesInstanceUID


CASES = [
    Case("studies by PatientID", lambda s: "/studies", {"PatientID": "DEMO-0001"}, "study",
         lambda d: d.PatientID == "DEMO-0001"),
    Case("studies by wildcard name", lambda s: "/studies", {"PatientName": "DOE*"}, "study",
         lambda d: str(d.PatientName).startswith("DOE")),
    Case("studies by non-ASCII name", lambda s: "/studies", {"PatientName": "Müller*"}, "study",
         lambda d: str(d.PatientName).startswith("Müller")),
    Case("studies by Latin-1 stored name", lambda s: "/studies", {"PatientName": "Gómez^María"}, "study",
         lambda d: str(d.PatientName) == "Gómez^María"),
    Case("studies by ideographic name, alphabetic group", lambda s: "/studies", {"PatientName": "Yamada*"}, "study",
         lambda d: str(d.PatientName).startswith("Yamada")),
    Case("studies by date range", lambda s: "/studies", {"StudyDate": "20180101-20211231"}, "study",
         lambda d: "20180101" <= d.StudyDate <= "20211231"),
    Case("studies up to a date", lambda s: "/studies", {"StudyDate": "-20161231"}, "study",
         lambda d: d.StudyDate <= "20161231"),
    Case("studies from a date", lambda s: "/studies", {"StudyDate": "20230101-"}, "study",
         lambda d: d.StudyDate >= "20230101"),
    Case("studies by modality in study", lambda s: "/studies", {"ModalitiesInStudy": "MR"}, "study",
         lambda d: d.Modality == "MR", {"ModalitiesInStudy"}, lambda d: True),
    Case("studies by UID list", lambda s: "/studies",
         lambda s: {"StudyInstanceUID": f"{first_study(s, 'DEMO-0002')},{first_study(s, 'DEMO-0005')}"}, "study",
         lambda d: d.StudyDate in ("20170215", "20160905")),
    Case("series of a study", lambda s: f"/studies/{first_study(s, 'DEMO-0002', 'CT')}/series", {}, "series",
         lambda d: d.PatientID == "DEMO-0002" and d.StudyDate == "20210609"),
    Case("CT series of a study", lambda s: f"/studies/{first_study(s, 'DEMO-0002', 'CT')}/series", {"Modality": "CT"},
         "series", lambda d: d.PatientID == "DEMO-0002" and d.StudyDate == "20210609" and d.Modality == "CT"),
    Case("series of a study by description", lambda s: f"/studies/{first_study(s, 'DEMO-0001', 'MR')}/series",
         {"SeriesDescription": "AX T1*"}, "series",
         lambda d: d.PatientID == "DEMO-0001" and d.Modality == "MR" and d.SeriesDescription.startswith("AX T1"),
         {"SeriesDescription"}, lambda d: d.PatientID == "DEMO-0001" and d.Modality == "MR"),
    Case("all MR series of a patient", lambda s: "/series", {"PatientID": "DEMO-0005", "Modality": "MR"}, "series",
         lambda d: d.PatientID == "DEMO-0005" and d.Modality == "MR"),
    Case("series by UID, no study", lambda s: "/series", lambda s: {"SeriesInstanceUID": first_series(s, "COR T2")[1]}, "series",
         lambda d: d.SeriesDescription == "COR T2"),
    Case("instances of a series", lambda s: "/studies/{}/series/{}/instances".format(*first_series(s, "Thorax 3.0 B70f")),
         {}, "instance", lambda d: d.SeriesDescription == "Thorax 3.0 B70f"),
    Case("instance by number", lambda s: "/studies/{}/series/{}/instances".format(*first_series(s, "AX T2")),
         {"InstanceNumber": "3"}, "instance", lambda d: d.SeriesDescription == "AX T2" and d.InstanceNumber == 3),
    Case("instances of a study", lambda s: f"/studies/{first_study(s, 'DEMO-0004')}/instances", {}, "instance",
         lambda d: d.PatientID == "DEMO-0004"),
    Case("instances of a patient", lambda s: "/instances", {"PatientID": "DEMO-0006"}, "instance",
         lambda d: d.PatientID == "DEMO-0006"),
]


def expected(studies: list[Dataset], case: Case) -> set[str]:
    return {str(getattr(d, KEY_OF[case.level])) for d in studies if case.where(d)}


def uids(body: list[dict], level: str) -> set[str]:
    return {item[UID_OF[level]]["Value"][0] for item in body}


@pytest.mark.parametrize("node", QUERY_NODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_query_battery(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client, node: str, case: Case) -> None:
    params = case.params(studies) if callable(case.params) else case.params
    r = client.get(gateway.url(node, case.path(studies)), params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    body = r.json()
    blind = case.filters_on & DCMQRSCP_BLIND if node == "dcmqrscp" else set()
    if blind:
        assert case.loose is not None
        want = {str(getattr(d, KEY_OF[case.level])) for d in studies if case.loose(d)}
        warning = " ".join(r.headers.get_list("warning"))
        for keyword in blind:
            assert keyword in warning, f"no Warning names {keyword}: {warning!r}"
    else:
        want = expected(studies, case)
    assert want, "a test case must expect something"
    assert uids(body, case.level) == want
    assert len(body) == len(want), "duplicate results"
    for item in body:
        url = item["00081190"]["Value"][0]
        assert url.startswith(gateway.url(node, "/studies/")), url
        assert url.endswith(item[UID_OF[case.level]]["Value"][0])


@pytest.mark.parametrize("node", QUERY_NODES)
def test_names_come_back_as_utf8_whatever_the_pacs_charset(gateway: GatewayProcess, client: httpx.Client, node: str) -> None:
    for patient_id, name in (("DEMO-0002", "Müller^Jürgen"), ("DEMO-0004", "Gómez^María")):
        r = client.get(gateway.url(node, "/studies"), params={"PatientID": patient_id})
        assert r.status_code == 200
        names = {item["00100010"]["Value"][0]["Alphabetic"] for item in r.json()}
        assert names == {name}
    r = client.get(gateway.url(node, "/studies"), params={"PatientID": "DEMO-0003"})
    pn = r.json()[0]["00100010"]["Value"][0]
    assert pn["Alphabetic"] == "Yamada^Tarou"
    if node != "dcmqrscp" or "Ideographic" in pn:  # every PACS here keeps all three groups
        assert pn["Ideographic"] == "山田^太郎"
        assert pn["Phonetic"] == "やまだ^たろう"


@pytest.mark.parametrize("node", QUERY_NODES)
def test_study_results_carry_the_default_attributes(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client, node: str) -> None:
    r = client.get(gateway.url(node, "/studies"), params={"PatientID": "DEMO-0005", "includefield": "StudyDescription"})
    assert r.status_code == 200
    by_uid = {item[STUDY]["Value"][0]: item for item in r.json()}
    for d in studies:
        if d.PatientID != "DEMO-0005":
            continue
        item = by_uid[d.StudyInstanceUID]
        assert item["00080020"]["Value"] == [d.StudyDate]
        assert item["00100020"]["Value"] == ["DEMO-0005"]
        assert item["00081030"]["Value"] == [d.StudyDescription]
        # every default attribute is present, empty when the PACS does not know it
        for tag in ("00080020", "00080030", "00080050", "00080061", "00080090", "00100010", "00100020",
                    "00100030", "00100040", "0020000D", "00200010", "00201206", "00201208"):
            assert tag in item, tag
        assert "00080052" not in item and "00080054" not in item  # no QueryRetrieveLevel, RetrieveAETitle
        if node != "dcmqrscp":
            n_series = len({x.SeriesInstanceUID for x in studies if x.StudyInstanceUID == d.StudyInstanceUID})
            assert item["00201206"]["Value"] == [n_series]


@pytest.mark.parametrize("node", QUERY_NODES)
def test_limit_and_offset_page_through_all_studies(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client, node: str) -> None:
    everything = {d.StudyInstanceUID for d in studies}
    seen: list[str] = []
    offset = 0
    while True:
        r = client.get(gateway.url(node, "/studies"), params={"limit": "4", "offset": str(offset)})
        assert r.status_code == 200
        page = [item[STUDY]["Value"][0] for item in r.json()]
        more = any("additional results" in w for w in r.headers.get_list("warning"))
        assert len(page) == 4 if more else len(page) <= 4
        seen += page
        offset += 4
        if not more:
            break
    assert sorted(seen) == sorted(everything)
