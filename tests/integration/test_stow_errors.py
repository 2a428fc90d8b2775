"""STOW-RS with bad uploads: every broken request gets the right status and body, and the PACS gets
exactly the instances that arrived complete and valid, nothing more.

Each case sends fresh SOP Instance UIDs and compares what the PACS received during the request
(``DemoPACS.stored``, before and after) with the set it should have received.
"""

from __future__ import annotations

import io
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from gateway.demo.pacs import DemoPACS
from tests.integration.stow_support import *  # noqa: F403 - the STOW fixtures
from tests.integration.stow_support import (
    BOUNDARY,
    MULTIPART,
    StowTargets,
    fresh_copy,
    multipart_body,
    p10_bytes,
)
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import free_port

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

JSON = {"Accept": "application/dicom+json"}
STOW_HEADERS = {"Content-Type": MULTIPART, **JSON}

# FailureReason codes (PS3.18 Table I.2-2, and the gateway's module docstring)
CLASS_NOT_SUPPORTED = 0x0122
SYNTAX_NOT_SUPPORTED = 0xC122
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110


# ------------------------------------------------------------------------------------------------
# Instances and bodies


def sample_file(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    return pydicom.dcmread(path)


def ct(study: str | None = None) -> Dataset:
    return fresh_copy(sample_file("CT_small.dcm"), study=study)


def mr(study: str | None = None) -> Dataset:
    return fresh_copy(sample_file("MR_small.dcm"), study=study)


def big_ct(side: int = 800) -> Dataset:
    """A CT whose pixel data alone (side * side * 2 bytes) is over 1 MB for side 800."""
    ds = ct()
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    return ds


def garbage(size: int = 4096, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def truncated(ds: Dataset, cut: int = 10_000) -> bytes:
    """The PS3.10 file of ``ds`` without its last ``cut`` bytes (inside the pixel data for a CT)."""
    data = p10_bytes(ds)
    assert len(data) > cut + 2000
    return data[:-cut]


def without_meta_element(p10: bytes, element: int) -> bytes:
    """The PS3.10 file with File Meta element (0002,element) removed and the group length fixed."""
    pos = 132
    kept: list[bytes] = []
    while p10[pos:pos + 2] == b"\x02\x00":
        elem = int.from_bytes(p10[pos + 2:pos + 4], "little")
        vr = p10[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            end = pos + 12 + int.from_bytes(p10[pos + 8:pos + 12], "little")
        else:
            end = pos + 8 + int.from_bytes(p10[pos + 6:pos + 8], "little")
        if elem not in (0x0000, element):
            kept.append(p10[pos:end])
        pos = end
    meta = b"".join(kept)
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(meta).to_bytes(4, "little")
    return p10[:132] + group_length + meta + p10[pos:]


def part(payload: bytes, *headers: str, boundary: str = BOUNDARY) -> bytes:
    """One body part with its delimiter line; ``Content-Type: application/dicom`` unless headers are given."""
    head = "".join(f"{h}\r\n" for h in (headers or ("Content-Type: application/dicom",)))
    return f"--{boundary}\r\n{head}\r\n".encode() + payload + b"\r\n"


def close_delimiter(boundary: str = BOUNDARY) -> bytes:
    return f"--{boundary}--\r\n".encode()


def chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


# ------------------------------------------------------------------------------------------------
# Checks


def snapshot(pacs: DemoPACS) -> set[str]:
    return set(pacs.stored)


def arrived(pacs: DemoPACS, before: set[str]) -> set[str]:
    return set(pacs.stored) - before


def assert_problem(r: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    """A JSON problem with this status (and error code)."""
    assert r.status_code != 500, r.text
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0].strip() == "application/json", r.headers["content-type"]
    body = r.json()
    assert {"error", "message", "requestId"} <= set(body), body
    assert isinstance(body["message"], str) and body["message"]
    assert body["requestId"] == r.headers["x-request-id"]
    if error is not None:
        assert body["error"] == error, body
    return body


def assert_store_response(r: httpx.Response, status: int) -> dict[str, Any]:
    """A Store Instances Response (DICOM JSON) with this status."""
    assert r.status_code != 500, r.text
    assert r.status_code == status, (r.status_code, r.text, r.headers.get_list("warning"))
    assert r.headers["content-type"].split(";")[0].strip() == "application/dicom+json", r.headers["content-type"]
    body = r.json()
    assert isinstance(body, dict), body
    for item in body.get("00081199", {}).get("Value", []):
        assert item["00081150"]["vr"] == "UI" and item["00081155"]["vr"] == "UI"
        assert item["00081190"]["vr"] == "UR"
    for item in body.get("00081198", {}).get("Value", []):
        assert item["00081197"]["vr"] == "US"
    return body


def referenced(body: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]


def failed(body: dict[str, Any]) -> dict[str, int]:
    """SOP Instance UID -> FailureReason."""
    return {item["00081155"]["Value"][0]: item["00081197"]["Value"][0]
            for item in body.get("00081198", {}).get("Value", [])}


def failed_classes(body: dict[str, Any]) -> dict[str, str]:
    return {item["00081155"]["Value"][0]: item["00081150"]["Value"][0]
            for item in body.get("00081198", {}).get("Value", [])}


def warnings(r: httpx.Response) -> list[str]:
    return r.headers.get_list("warning")


def assert_unreadable_counted(r: httpx.Response, count: int) -> None:
    text = " | ".join(warnings(r))
    assert any(w.startswith("299 ") for w in warnings(r)), warnings(r)
    assert f"{count} part(s) could not be read" in text, text


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture
def gw(stow_targets: StowTargets) -> GatewayProcess:
    return stow_targets.gateway


@pytest.fixture
def demo(stow_targets: StowTargets) -> DemoPACS:
    return stow_targets.demo


# ------------------------------------------------------------------------------------------------
# 1-4, 29, 27: refused before the body is read


@pytest.mark.parametrize("content_type", [
    pytest.param("text/plain", id="text-plain"),
    pytest.param(f"multipart/form-data; boundary={BOUNDARY}", id="form-data"),
    pytest.param(f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}', id="related-xml"),
    pytest.param(f'multipart/related; type="application/octet-stream"; boundary={BOUNDARY}', id="related-octets"),
    pytest.param(f'multipart/mixed; type="application/dicom"; boundary={BOUNDARY}', id="mixed"),
    pytest.param("multipart/related; type=", id="unreadable-params"),
    pytest.param(None, id="none"),
])
def test_unsupported_content_type_is_415(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client,
                                         content_type: str | None) -> None:
    before = snapshot(demo)
    headers = dict(JSON)
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = client.post(gw.url(None, "/studies"), content=multipart_body([p10_bytes(ct())]), headers=headers)
    assert_problem(r, 415, "unsupported-media-type")
    assert arrived(demo, before) == set()


def test_accept_xml_only_is_406_and_nothing_stored(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies"), content=multipart_body([p10_bytes(ct())]),
                    headers={"Content-Type": MULTIPART, "Accept": "application/dicom+xml"})
    assert_problem(r, 406, "not-acceptable")
    assert arrived(demo, before) == set()


@pytest.mark.parametrize("query", ["?foo=bar", "?StudyInstanceUID=1.2.3", "?accept=application/dicom%2Bjson"])
def test_query_parameters_are_400(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client, query: str) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies" + query), content=multipart_body([p10_bytes(ct())]),
                    headers=STOW_HEADERS)
    assert_problem(r, 400, "bad-request")
    assert arrived(demo, before) == set()


@pytest.mark.parametrize("study", ["1.2.abc", "not-a-uid", "1..2", "1." * 40 + "1"])
def test_bad_study_uid_in_url_is_400(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client, study: str) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, f"/studies/{study}"), content=multipart_body([p10_bytes(ct())]),
                    headers=STOW_HEADERS)
    body = assert_problem(r, 400, "bad-request")
    assert body.get("parameter") == "study"
    assert arrived(demo, before) == set()


# ------------------------------------------------------------------------------------------------
# 5-10, 20, 21: bodies that are not multipart/related as declared


@pytest.mark.parametrize("content_type", [
    pytest.param('multipart/related; type="application/dicom"', id="no-boundary"),
    pytest.param('multipart/related; type="application/dicom"; boundary=abc{}', id="braces"),
    pytest.param('multipart/related; type="application/dicom"; boundary="abc "', id="trailing-space"),
    pytest.param('multipart/related; type="application/dicom"; boundary=""', id="empty"),
    pytest.param('multipart/related; type="application/dicom"; boundary=' + "b" * 71, id="71-chars"),
    pytest.param('multipart/related; type="application/dicom"; boundary="a\\"b"', id="quote"),
])
def test_missing_or_invalid_boundary_is_400(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client,
                                            content_type: str) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies"), content=multipart_body([p10_bytes(ct())]),
                    headers={"Content-Type": content_type, **JSON})
    assert_problem(r, 400, "bad-request")
    assert arrived(demo, before) == set()


def _huge_header_body() -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nX-Big: {'x' * 100_000}\r\n\r\n".encode()
            + p10_bytes(ct()) + b"\r\n" + close_delimiter())


def _many_headers_body() -> bytes:
    headers = ["Content-Type: application/dicom"] + [f"X-Header-{i}: {i}" for i in range(100)]
    return part(p10_bytes(ct()), *headers) + close_delimiter()


def _other_boundary_body() -> bytes:
    # the first delimiter is the declared one, the next ones another: one part that never ends
    return part(p10_bytes(ct())) + part(p10_bytes(mr()), boundary="other-boundary") + close_delimiter("other-boundary")


def _wrong_boundary_only_body() -> bytes:
    return multipart_body([p10_bytes(ct()), p10_bytes(mr())], boundary="not-the-declared-boundary")


@pytest.mark.parametrize("make_body", [
    pytest.param(lambda: b"", id="empty-body"),
    pytest.param(close_delimiter, id="close-delimiter-only"),
    pytest.param(lambda: b"preamble\r\n" + close_delimiter() + b"epilogue", id="preamble-and-close-only"),
    pytest.param(lambda: garbage(20_000), id="garbage-no-boundary"),
    pytest.param(_wrong_boundary_only_body, id="boundary-never-appears"),
    pytest.param(_other_boundary_body, id="broken-boundary"),
    pytest.param(_huge_header_body, id="100kb-header-line"),
    pytest.param(_many_headers_body, id="too-many-headers"),
    pytest.param(lambda: f"--{BOUNDARY}\r\nno colon here\r\n\r\n".encode() + p10_bytes(ct()) + b"\r\n"
                 + close_delimiter(), id="malformed-header-line"),
    pytest.param(lambda: f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode(), id="ends-in-headers"),
])
def test_unparseable_multipart_is_400_and_nothing_stored(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client,
                                                         make_body: Callable[[], bytes]) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies"), content=make_body(), headers=STOW_HEADERS)
    assert_problem(r, 400, "bad-request")
    assert arrived(demo, before) == set()


# ------------------------------------------------------------------------------------------------
# 11, 12: no close delimiter


@pytest.mark.parametrize("tail", [b"\r\n", b""], ids=["crlf", "no-crlf"])
def test_one_part_without_close_delimiter_is_400(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client,
                                                 tail: bytes) -> None:
    """The last part before the end of the body is never complete without the close delimiter
    (its last bytes could be the start of one), so nothing is sent."""
    before = snapshot(demo)
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p10_bytes(ct()) + tail
    r = client.post(gw.url(None, "/studies"), content=body, headers=STOW_HEADERS)
    assert_problem(r, 400, "bad-request")
    assert arrived(demo, before) == set()


def test_complete_parts_before_a_missing_close_delimiter_are_stored(gw: GatewayProcess, demo: DemoPACS,
                                                                    client: httpx.Client) -> None:
    before = snapshot(demo)
    first, second, third = ct(), mr(), ct()
    body = part(p10_bytes(first)) + part(p10_bytes(second)) + part(p10_bytes(third))  # no close delimiter
    r = client.post(gw.url(None, "/studies"), content=body, headers=STOW_HEADERS)
    body_json = assert_store_response(r, 202)
    assert sorted(referenced(body_json)) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert failed(body_json) == {third.SOPInstanceUID: PROCESSING_FAILURE}
    assert warnings(r), "the malformed end of the body must be reported"
    assert arrived(demo, before) == {first.SOPInstanceUID, second.SOPInstanceUID}


def test_malformed_headers_after_a_stored_part(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    good, other = ct(), mr()
    body = (part(p10_bytes(good)) + f"--{BOUNDARY}\r\nX-Big: {'x' * 100_000}\r\n\r\n".encode()
            + p10_bytes(other) + b"\r\n" + close_delimiter())
    r = client.post(gw.url(None, "/studies"), content=body, headers=STOW_HEADERS)
    body_json = assert_store_response(r, 202)
    assert referenced(body_json) == [good.SOPInstanceUID]
    assert any("malformed" in w for w in warnings(r)), warnings(r)
    assert arrived(demo, before) == {good.SOPInstanceUID}


# ------------------------------------------------------------------------------------------------
# 13-16, 28, 30: parts that are not valid DICOM


def test_garbage_part_alone_is_409_with_warning(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies"), content=multipart_body([garbage()]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert referenced(body) == [] and failed(body) == {}
    assert_unreadable_counted(r, 1)
    assert arrived(demo, before) == set()


@pytest.mark.parametrize("cut", [10_000, 1, 30_000], ids=["mid-pixels", "last-byte", "early-pixels"])
def test_truncated_part_alone_is_409_cannot_understand(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client,
                                                       cut: int) -> None:
    before = snapshot(demo)
    ds = ct()
    r = client.post(gw.url(None, "/studies"), content=multipart_body([truncated(ds, cut)]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert referenced(body) == []
    assert failed(body) == {ds.SOPInstanceUID: CANNOT_UNDERSTAND}
    assert failed_classes(body) == {ds.SOPInstanceUID: CT_IMAGE}
    assert arrived(demo, before) == set()


def test_part_without_sop_instance_uid_is_409_with_warning(gw: GatewayProcess, demo: DemoPACS,
                                                           client: httpx.Client) -> None:
    before = snapshot(demo)
    ds = ct()
    media_uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    r = client.post(gw.url(None, "/studies"), content=multipart_body([p10_bytes(ds)]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert referenced(body) == [] and failed(body) == {}
    assert_unreadable_counted(r, 1)
    assert media_uid not in demo.stored
    assert arrived(demo, before) == set()


def test_good_and_bad_parts_mixed(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    first, cut, last = ct(), ct(), mr()
    body = multipart_body([p10_bytes(first), garbage(), truncated(cut), p10_bytes(last)])
    r = client.post(gw.url(None, "/studies"), content=body, headers=STOW_HEADERS)
    body_json = assert_store_response(r, 202)
    assert sorted(referenced(body_json)) == sorted([first.SOPInstanceUID, last.SOPInstanceUID])
    assert failed(body_json) == {cut.SOPInstanceUID: CANNOT_UNDERSTAND}
    assert_unreadable_counted(r, 1)
    assert arrived(demo, before) == {first.SOPInstanceUID, last.SOPInstanceUID}


@pytest.mark.parametrize("part_type", ["text/plain", "application/octet-stream", "application/dicom+json"])
def test_part_with_another_content_type_is_not_stored(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client,
                                                      part_type: str) -> None:
    before = snapshot(demo)
    good, odd = ct(), mr()
    body = part(p10_bytes(good)) + part(p10_bytes(odd), f"Content-Type: {part_type}") + close_delimiter()
    r = client.post(gw.url(None, "/studies"), content=body, headers=STOW_HEADERS)
    body_json = assert_store_response(r, 202)
    assert referenced(body_json) == [good.SOPInstanceUID]
    assert failed(body_json) == {odd.SOPInstanceUID: CANNOT_UNDERSTAND}
    assert arrived(demo, before) == {good.SOPInstanceUID}


def test_part_without_file_meta_transfer_syntax_is_not_stored(gw: GatewayProcess, demo: DemoPACS,
                                                              client: httpx.Client) -> None:
    before = snapshot(demo)
    ds = ct()
    data = without_meta_element(p10_bytes(ds), 0x0010)
    meta = pydicom.dcmread(io.BytesIO(data), force=True).file_meta
    assert "TransferSyntaxUID" not in meta and meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    r = client.post(gw.url(None, "/studies"), content=multipart_body([data]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert referenced(body) == []
    # reported either as a FailedSOPSequence item or, unnamed, in the Warning header
    assert failed(body) == {ds.SOPInstanceUID: CANNOT_UNDERSTAND} or (
        failed(body) == {} and any("1 part(s) could not be read" in w for w in warnings(r))), (body, warnings(r))
    assert arrived(demo, before) == set()


def test_part_with_invalid_transfer_syntax_uid_is_not_stored(gw: GatewayProcess, demo: DemoPACS,
                                                             client: httpx.Client) -> None:
    before = snapshot(demo)
    ds = ct()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # written as Explicit VR LE...
    data = bytearray(p10_bytes(ds))
    at = data.index(b"1.2.840.10008.1.2.1\x00")
    data[at:at + 20] = b"not.a.uid.at.all.xx\x00"  # ...but the File Meta names no valid UID
    r = client.post(gw.url(None, "/studies"), content=multipart_body([bytes(data)]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert failed(body) == {ds.SOPInstanceUID: CANNOT_UNDERSTAND}
    assert arrived(demo, before) == set()


def test_single_application_dicom_garbage_is_409(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies"), content=garbage(),
                    headers={"Content-Type": "application/dicom", **JSON})
    assert_store_response(r, 409)
    assert_unreadable_counted(r, 1)
    assert arrived(demo, before) == set()


def test_single_application_dicom_empty_is_400(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    r = client.post(gw.url(None, "/studies"), content=b"", headers={"Content-Type": "application/dicom", **JSON})
    assert_problem(r, 400, "bad-request")
    assert arrived(demo, before) == set()


def test_dicom_json_with_unreadable_metadata_is_400(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    boundary = "json-boundary"
    body = part(b"this is not JSON", "Content-Type: application/dicom+json", boundary=boundary) + \
        close_delimiter(boundary)
    r = client.post(gw.url(None, "/studies"), content=body,
                    headers={"Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}',
                             **JSON})
    assert_problem(r, 400)
    assert arrived(demo, before) == set()


# ------------------------------------------------------------------------------------------------
# 17, 18: Study Instance UID in the URL


def test_study_url_with_a_mismatching_instance(gw: GatewayProcess, demo: DemoPACS, client: httpx.Client) -> None:
    before = snapshot(demo)
    study = generate_uid()
    match, other = ct(study), mr(generate_uid())
    r = client.post(gw.url(None, f"/studies/{study}"), content=multipart_body([p10_bytes(match), p10_bytes(other)]),
                    headers=STOW_HEADERS)
    body = assert_store_response(r, 202)
    assert referenced(body) == [match.SOPInstanceUID]
    assert failed(body) == {other.SOPInstanceUID: STUDY_MISMATCH}
    assert failed_classes(body) == {other.SOPInstanceUID: MR_IMAGE}
    assert body["00081190"]["Value"] == [gw.url(None, f"/studies/{study}")]
    assert arrived(demo, before) == {match.SOPInstanceUID}


def test_study_url_with_only_mismatching_instances_is_409(gw: GatewayProcess, demo: DemoPACS,
                                                          client: httpx.Client) -> None:
    before = snapshot(demo)
    study = generate_uid()
    a, b = ct(generate_uid()), mr(generate_uid())
    r = client.post(gw.url(None, f"/studies/{study}"), content=multipart_body([p10_bytes(a), p10_bytes(b)]),
                    headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert referenced(body) == []
    assert failed(body) == {a.SOPInstanceUID: STUDY_MISMATCH, b.SOPInstanceUID: STUDY_MISMATCH}
    assert arrived(demo, before) == set()


# ------------------------------------------------------------------------------------------------
# 22, 23: what the PACS accepts


def _paced(*pieces: bytes, pause: float = 0.4) -> Iterator[bytes]:
    """The pieces as separate chunks, with a pause before each after the first, so the gateway
    handles each before the next arrives."""
    for i, piece in enumerate(pieces):
        if i:
            time.sleep(pause)
        yield piece


@pytest.mark.parametrize("paced", [False, True], ids=["one-chunk", "ct-arrives-first"])
def test_refused_sop_class_fails_and_others_are_stored(gw: GatewayProcess, picky: DemoPACS, client: httpx.Client,
                                                       paced: bool) -> None:
    picky.refuse_storage_classes({CT_IMAGE})
    before = snapshot(picky)
    refused, accepted = ct(), mr()
    sent = part(p10_bytes(refused)) + part(p10_bytes(accepted)) + close_delimiter()
    # a part is complete once the next delimiter line has arrived: the first chunk ends there
    split = len(part(p10_bytes(refused))) + len(f"--{BOUNDARY}\r\n")
    content: bytes | Iterable[bytes] = _paced(sent[:split], sent[split:]) if paced else sent
    r = client.post(gw.url("picky", "/studies"), content=content, headers=STOW_HEADERS)
    body = assert_store_response(r, 202)
    assert referenced(body) == [accepted.SOPInstanceUID]
    assert failed(body) == {refused.SOPInstanceUID: CLASS_NOT_SUPPORTED}
    assert arrived(picky, before) == {accepted.SOPInstanceUID}


def test_refused_sop_class_alone_is_409(gw: GatewayProcess, picky: DemoPACS, client: httpx.Client) -> None:
    """The PACS is up and answers; it only refuses the class: a Store Instances Response, not a 502."""
    picky.refuse_storage_classes({CT_IMAGE})
    before = snapshot(picky)
    refused = ct()
    r = client.post(gw.url("picky", "/studies"), content=multipart_body([p10_bytes(refused)]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert failed(body) == {refused.SOPInstanceUID: CLASS_NOT_SUPPORTED}
    assert arrived(picky, before) == set()


def test_refused_syntax_is_converted_without_loss(gw: GatewayProcess, picky: DemoPACS, client: httpx.Client) -> None:
    picky.restrict_storage_syntaxes((ExplicitVRLittleEndian,))
    before = snapshot(picky)
    j2k = fresh_copy(sample_file("JPEG2000.dcm"))
    assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    r = client.post(gw.url("picky", "/studies"), content=multipart_body([p10_bytes(j2k)]), headers=STOW_HEADERS)
    body = assert_store_response(r, 200)
    assert referenced(body) == [j2k.SOPInstanceUID] and failed(body) == {}
    assert not warnings(r)
    assert arrived(picky, before) == {j2k.SOPInstanceUID}
    held = pydicom.dcmread(io.BytesIO(picky._instances[j2k.SOPInstanceUID][0]))
    assert held.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(held.pixel_array, j2k.pixel_array)


def test_syntax_that_cannot_be_produced_without_loss_fails_c122(gw: GatewayProcess, picky: DemoPACS,
                                                                client: httpx.Client) -> None:
    """The PACS takes Secondary Capture in JPEG Baseline only: the JPEG instance goes out as it is;
    the uncompressed one would need lossy compression, so it fails with 0xC122."""
    picky.restrict_storage_syntaxes((JPEGBaseline8Bit,))
    before = snapshot(picky)
    jpeg = fresh_copy(sample_file("SC_rgb_small_odd_jpeg.dcm"))
    native = fresh_copy(sample_file("SC_rgb_small_odd.dcm"))
    assert jpeg.SOPClassUID == native.SOPClassUID == SECONDARY_CAPTURE
    r = client.post(gw.url("picky", "/studies"), content=multipart_body([p10_bytes(jpeg), p10_bytes(native)]),
                    headers=STOW_HEADERS)
    body = assert_store_response(r, 202)
    assert referenced(body) == [jpeg.SOPInstanceUID]
    assert failed(body) == {native.SOPInstanceUID: SYNTAX_NOT_SUPPORTED}
    assert arrived(picky, before) == {jpeg.SOPInstanceUID}


def test_syntax_refused_alone_is_409_c122(gw: GatewayProcess, picky: DemoPACS, client: httpx.Client) -> None:
    """The PACS takes the class, in JPEG Baseline only; an uncompressed instance cannot be produced
    in it without loss: 409 with 0xC122 (the PACS was reached, so no 502)."""
    picky.restrict_storage_syntaxes((JPEGBaseline8Bit,))
    before = snapshot(picky)
    native = fresh_copy(sample_file("SC_rgb_small_odd.dcm"))
    r = client.post(gw.url("picky", "/studies"), content=multipart_body([p10_bytes(native)]), headers=STOW_HEADERS)
    body = assert_store_response(r, 409)
    assert failed(body) == {native.SOPInstanceUID: SYNTAX_NOT_SUPPORTED}
    assert arrived(picky, before) == set()


# ------------------------------------------------------------------------------------------------
# 24: the PACS is down


def test_pacs_down_is_502_and_nothing_stored(stow_targets: StowTargets, gw: GatewayProcess,
                                             client: httpx.Client) -> None:
    pacses = (stow_targets.demo, stow_targets.picky)
    before = [snapshot(p) for p in pacses]
    r = client.post(gw.url("down", "/studies"), content=multipart_body([p10_bytes(ct()), p10_bytes(mr())]),
                    headers=STOW_HEADERS)
    assert_problem(r, 502, "pacs-unreachable")
    assert [arrived(p, b) for p, b in zip(pacses, before)] == [set(), set()]


# ------------------------------------------------------------------------------------------------
# 25, 26: the body limit


@pytest.fixture(scope="module")
def small_gateway(stow_targets: StowTargets) -> Iterator[GatewayProcess]:
    """A gateway in front of the same demo PACS that takes bodies of at most 1 MB and waits at most
    1 s for the next piece of a body."""
    settings = {
        "gateway": {"ae_title": "STOW-GW-1MB", "move_port": free_port()},
        "stow": {"max_body_mb": 1, "read_timeout": 1.0},
        "nodes": [{"name": "demo", "ae_title": "STOW-DEMO", "host": "127.0.0.1", "port": stow_targets.demo.port,
                   "default": True}],
    }
    with GatewayProcess(settings) as gateway:
        yield gateway


def raw_exchange(gateway: GatewayProcess, path: str, headers: dict[str, str], body: bytes,
                 timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send the request line, headers and ``body`` (which may be less than the Content-Length
    says), then read one response without sending anything more."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
            if b"\r\n\r\n" in received:
                top, _, rest = received.partition(b"\r\n\r\n")
                lengths = [line.split(b":", 1)[1] for line in top.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")]
                if lengths and len(rest) >= int(lengths[0]):
                    break
    top, _, rest = received.partition(b"\r\n\r\n")
    assert top, "no response"
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, response_headers, rest


def test_declared_length_over_the_limit_is_413_before_reading(small_gateway: GatewayProcess,
                                                              demo: DemoPACS) -> None:
    """Content-Length says 5 MB; only the first, complete part is sent, then the client waits:
    the answer comes without the rest of the body, and the complete part is not stored."""
    before = snapshot(demo)
    first = ct()
    status, headers, body = raw_exchange(
        small_gateway, "/dicom-web/studies",
        {"Content-Type": MULTIPART, "Accept": "application/dicom+json", "Content-Length": "5000000"},
        part(p10_bytes(first)) + part(p10_bytes(mr())))
    assert status == 413
    assert headers["content-type"].split(";")[0] == "application/json"
    problem = httpx.Response(status, content=body).json()
    assert problem["error"] == "payload-too-large" and problem["requestId"] == headers["x-request-id"]
    assert arrived(demo, before) == set()


def test_declared_length_over_the_limit_with_httpx(small_gateway: GatewayProcess, demo: DemoPACS,
                                                   client: httpx.Client) -> None:
    before = snapshot(demo)
    parts = [p10_bytes(ct())] + [p10_bytes(big_ct(600))] * 2  # about 1.5 MB
    r = client.post(small_gateway.url(None, "/studies"), content=multipart_body(parts), headers=STOW_HEADERS)
    assert_problem(r, 413, "payload-too-large")
    assert arrived(demo, before) == set()


def test_chunked_body_over_the_limit_keeps_the_complete_parts(small_gateway: GatewayProcess, demo: DemoPACS,
                                                              client: httpx.Client) -> None:
    before = snapshot(demo)
    first, second, big = ct(), mr(), big_ct()
    body = multipart_body([p10_bytes(first), p10_bytes(second), p10_bytes(big)])
    assert len(body) > 1_200_000
    r = client.post(small_gateway.url(None, "/studies"), content=chunks(body), headers=STOW_HEADERS)
    assert "content-length" not in r.request.headers
    body_json = assert_store_response(r, 202)
    assert sorted(referenced(body_json)) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert failed(body_json) == {big.SOPInstanceUID: OUT_OF_RESOURCES}
    assert any("limit" in w for w in warnings(r)), warnings(r)
    assert arrived(demo, before) == {first.SOPInstanceUID, second.SOPInstanceUID}


def test_chunked_body_over_the_limit_without_a_complete_part_is_413(small_gateway: GatewayProcess, demo: DemoPACS,
                                                                    client: httpx.Client) -> None:
    before = snapshot(demo)
    big = big_ct()
    r = client.post(small_gateway.url(None, "/studies"), content=chunks(multipart_body([p10_bytes(big)])),
                    headers=STOW_HEADERS)
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "payload-too-large")
    assert arrived(demo, before) == set()


def test_stalled_upload_keeps_the_complete_parts(small_gateway: GatewayProcess, demo: DemoPACS) -> None:
    """The client sends one complete part and half of the next, then nothing (the connection stays
    open): after stow.read_timeout the complete part is stored and the answer says what happened."""
    before = snapshot(demo)
    first, second = ct(), mr()
    sent = part(p10_bytes(first)) + part(p10_bytes(second))[:5000]
    status, headers, body = raw_exchange(
        small_gateway, "/dicom-web/studies",
        {"Content-Type": MULTIPART, "Accept": "application/dicom+json", "Content-Length": "500000"}, sent)
    assert status == 202, body
    assert headers["content-type"].split(";")[0] == "application/dicom+json"
    answer = httpx.Response(status, content=body).json()
    assert referenced(answer) == [first.SOPInstanceUID]
    assert failed(answer) == {second.SOPInstanceUID: PROCESSING_FAILURE}
    assert "sent nothing" in headers.get("warning", ""), headers
    assert arrived(demo, before) == {first.SOPInstanceUID}


def test_stalled_upload_without_a_complete_part_is_408(small_gateway: GatewayProcess, demo: DemoPACS) -> None:
    before = snapshot(demo)
    sent = part(p10_bytes(ct()))[:20_000]
    status, headers, body = raw_exchange(
        small_gateway, "/dicom-web/studies",
        {"Content-Type": MULTIPART, "Accept": "application/dicom+json", "Content-Length": "500000"}, sent)
    assert status == 408, (status, body)
    assert headers["content-type"].split(";")[0] == "application/json"
    assert httpx.Response(status, content=body).json()["error"] == "request-timeout"
    assert arrived(demo, before) == set()


# ------------------------------------------------------------------------------------------------
# The client goes away mid-upload


def test_client_disconnect_mid_upload_stores_the_complete_parts_only(gw: GatewayProcess, demo: DemoPACS) -> None:
    before = snapshot(demo)
    log_start = len(gw.log_text())
    first, second, third = ct(), mr(), ct()
    body = multipart_body([p10_bytes(first), p10_bytes(second), p10_bytes(third)])
    third_starts = len(part(p10_bytes(first)) + part(p10_bytes(second)))
    cut = third_starts + len(part(p10_bytes(third))) // 2
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nContent-Type: {MULTIPART}\r\n"
            f"Accept: application/dicom+json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head.encode() + body[:cut])
        # let the gateway take in what was sent: the server reports a disconnect ahead of body
        # bytes it has buffered but not yet handed to the application
        time.sleep(0.3)
    expected = {first.SOPInstanceUID, second.SOPInstanceUID}
    assert wait_for(lambda: arrived(demo, before) >= expected, 10.0), arrived(demo, before)
    assert not wait_for(lambda: third.SOPInstanceUID in demo.stored, 2.0), "the incomplete part was stored"
    assert arrived(demo, before) == expected

    def disconnect_logged() -> bool:
        return any("STOW-RS" in line and "disconnected" in line for line in gw.log_text()[log_start:].splitlines())

    assert wait_for(disconnect_logged, 5.0), gw.log_text()[log_start:][-3000:]
