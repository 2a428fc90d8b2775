"""Bad input gets the right status and a JSON body that names what was wrong, before any association."""

from __future__ import annotations

import httpx
import pytest

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

BAD_QUERIES = [
    ("/studies?StudyDate=2020-13-01", "StudyDate"),
    ("/studies?StudyDate=20201301", "StudyDate"),
    ("/studies?StudyDate=2020", "StudyDate"),
    ("/studies?StudyTime=2500", "StudyTime"),
    ("/studies?StudyTime=2200-0200", "StudyTime"),
    ("/studies?limit=-1", "limit"),
    ("/studies?limit=abc", "limit"),
    ("/studies?limit=0", "limit"),
    ("/studies?offset=x", "offset"),
    ("/studies?limit=1&limit=2", "limit"),
    ("/studies?PatientID=a&PatientID=b", "PatientID"),
    ("/studies?StudyInstanceUID=1.2.*", "StudyInstanceUID"),
    ("/studies?StudyInstanceUID=1.2.abc", "StudyInstanceUID"),
    ("/studies?StudyInstanceUID=1.2,,1.3", "StudyInstanceUID"),
    ("/studies?includefield=all,PatientAge", "includefield"),
    ("/studies?includefield=NoSuchKeyword", "includefield"),
    ("/studies?fuzzymatching=maybe", "fuzzymatching"),
    ("/studies?PatientName=M%FCller", "PatientName"),  # Latin-1 byte, not UTF-8
    ("/studies?00091010=x", "00091010"),  # private tag without its creator
    ("/studies?PatientID.PatientName=x", "PatientID.PatientName"),
    ("/studies/1.2.3/series?Modality=ct", "Modality"),
    ("/studies/1.2.3/series?SeriesNumber=three", "SeriesNumber"),
    ("/studies?PatientID=" + "x" * 65, "PatientID"),
    ("/studies?AccessionNumber=a%5Cb", "AccessionNumber"),  # backslash
    ("/studies?PatientName=a%00b", "PatientName"),
    ("/studies?charset=iso-8859-1", "charset"),
    ("/studies/not-a-uid/series", "study"),
    ("/studies/1.2.3/series/1..2/instances", "series"),
    ("/studies?PixelData=abc", "PixelData"),
]


@pytest.mark.parametrize("path,parameter", BAD_QUERIES, ids=[c[0] for c in BAD_QUERIES])
def test_bad_query_is_400_naming_the_parameter(
    gateway: GatewayProcess, chaos: DemoPACS, client: httpx.Client, path: str, parameter: str
) -> None:
    associations_before = chaos.associations_total
    r = client.get(gateway.url("chaos", path))
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] == "bad-request"
    assert body["parameter"] == parameter
    assert body["message"]
    assert body["requestId"] == r.headers["x-request-id"]
    assert chaos.associations_total == associations_before, "a bad request reached the PACS"


def test_out_of_level_attribute_is_ignored_with_a_warning(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.url("demo", "/studies"), params={"Modality": "CT", "PatientID": "DEMO-0001"})
    assert r.status_code == 200
    assert len(r.json()) == 3  # all of the patient's studies: Modality does not filter studies
    assert any("Modality" in w and "ignored" in w for w in r.headers.get_list("warning"))


def test_unknown_parameter_is_ignored_with_a_warning(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.url("demo", "/studies"), params={"PatientID": "DEMO-0001", "_": "1700000000"})
    assert r.status_code == 200
    assert len(r.json()) == 3
    assert any("not supported" in w and "_" in w for w in r.headers.get_list("warning"))


@pytest.mark.parametrize(
    "accept",
    ["application/dicom+xml", 'multipart/related; type="application/dicom+xml"', "text/html", "image/png"],
)
def test_unproducible_media_type_is_406(gateway: GatewayProcess, client: httpx.Client, accept: str) -> None:
    r = client.get(gateway.url("demo", "/studies"), headers={"Accept": accept})
    assert r.status_code == 406
    assert r.json()["error"] == "not-acceptable"


@pytest.mark.parametrize(
    "accept", ["application/dicom+json", "application/json", "*/*", "application/*",
               "application/dicom+xml;q=0.9, application/dicom+json;q=0.5", 'application/dicom+json; charset="utf-8"']
)
def test_acceptable_media_types(gateway: GatewayProcess, client: httpx.Client, accept: str) -> None:
    r = client.get(gateway.url("demo", "/studies"), params={"PatientID": "DEMO-0001"}, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 3


def test_accept_query_parameter_wins_over_the_header(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.url("demo", "/studies?accept=application/dicom%2Bxml"), headers={"Accept": "application/json"})
    assert r.status_code == 406


def test_unknown_node_is_404(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.base + "/nodes/nope/dicom-web/studies")
    assert r.status_code == 404
    assert "nope" in r.json()["message"]


def test_unknown_route_and_method_are_json(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.base + "/dicom-web/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not-found"
    r = client.delete(gateway.base + "/dicom-web/studies")
    assert r.status_code == 405 and r.json()["error"] == "method-not-allowed"


def test_non_latin1_value_for_a_latin1_node_is_400() -> None:
    """A node whose charset cannot carry the value: the error names the parameter, no C-FIND is sent."""
    from gateway.dicomweb.plan import Level, Resource, build_plan
    from gateway.dicomweb.query import QueryError, parse_query

    with pytest.raises(QueryError) as err:
        build_plan(Resource(Level.STUDY), parse_query("PatientName=%E5%B1%B1%E7%94%B0*"), relational=False,
                   fuzzy_accepted=False, charset="ISO_IR 100")
    assert err.value.parameter == "PatientName"
