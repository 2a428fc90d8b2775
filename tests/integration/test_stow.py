"""STOW-RS round trips: store through the gateway into Orthanc, dcmqrscp and the demo PACS, then
retrieve through the gateway and compare byte for byte."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.integration.stow_support import *  # noqa: F403 - the STOW fixtures
from tests.integration.stow_support import (
    MULTIPART,
    StowTargets,
    fresh_copy,
    multipart_body,
    p10_bytes,
    pydicom_file,
)

JSON = {"Accept": "application/dicom+json"}
NATIVE_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
COMPRESSED_FILES = ("JPEG2000.dcm", "SC_rgb_rle.dcm")


def dataset_bytes(p10: bytes) -> bytes:
    """The data set of a PS3.10 file, without preamble and File Meta."""
    group_length = int.from_bytes(p10[140:144], "little")
    return p10[144 + group_length :]


def canonical(p10: bytes) -> bytes:
    """The data set re-framed by pydicom: element values stay the raw bytes read (pydicom writes
    unconverted elements as they were), sequences and items get undefined lengths."""
    ds = pydicom.dcmread(io.BytesIO(p10))

    def reframe(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                elem.is_undefined_length = True
                for item in elem.value:
                    item.is_undefined_length_sequence_item = True
                    reframe(item)

    reframe(ds)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def retrieve(client: httpx.Client, url: str) -> bytes:
    """The instance at ``url`` as a PS3.10 file in the form the PACS holds it."""
    r = client.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200, r.text
    match = re.search(r'boundary="?([^";]+)"?', r.headers["content-type"])
    assert match
    chunks = r.content.split(b"--" + match.group(1).encode())[1:-1]
    assert len(chunks) == 1
    payload = chunks[0].partition(b"\r\n\r\n")[2]
    return payload[:-2]


def referenced(body: dict[str, Any]) -> dict[str, str]:
    """SOP Instance UID -> RetrieveURL from a Store Instances Response."""
    items = body.get("00081199", {}).get("Value", [])
    return {item["00081155"]["Value"][0]: item["00081190"]["Value"][0] for item in items}


def sample(names: tuple[str, ...], study: str) -> list[Dataset]:
    """Fresh copies of pydicom's test files in one study. CT_small ends with Data Set Trailing
    Padding, which Orthanc drops when it stores (PS3.10 allows it to): removed here, so that a
    byte comparison shows only what the gateway did."""
    out = []
    for name in names:
        ds = fresh_copy(pydicom_file(name), study=study)
        if "DataSetTrailingPadding" in ds:
            del ds.DataSetTrailingPadding
        out.append(ds)
    return out


@pytest.mark.parametrize("node", ["demo", "orthanc", "dcmqrscp"])
def test_stow_then_wado_is_byte_exact(stow_targets: StowTargets, node: str) -> None:
    study = generate_uid()
    names = NATIVE_FILES + (COMPRESSED_FILES if node != "dcmqrscp" else ())
    datasets = sample(names, study)
    files = [p10_bytes(ds) for ds in datasets]
    gw = stow_targets.gateway
    with httpx.Client(timeout=60) as client:
        r = client.post(gw.url(node, f"/studies/{study}"), content=multipart_body(files),
                        headers={"Content-Type": MULTIPART, **JSON})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/dicom+json")
        body = r.json()
        assert "00081198" not in body
        assert body["00081190"]["Value"] == [gw.url(node, f"/studies/{study}")]
        urls = referenced(body)
        assert set(urls) == {ds.SOPInstanceUID for ds in datasets}
        for ds, sent in zip(datasets, files):
            url = urls[ds.SOPInstanceUID]
            assert url == gw.url(node, f"/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
            got = retrieve(client, url)
            received = pydicom.dcmread(io.BytesIO(got))
            if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2":
                # Implicit VR never goes out on the web: the same elements, re-encoded explicitly
                assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert received == ds
                continue
            assert received.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            if node == "orthanc":
                # Orthanc rewrites sequences with defined lengths: every value byte-exact, the
                # sequence framing its own
                assert canonical(got) == canonical(sent), f"{ds.SOPClassUID.name} changed on the way"
            else:
                assert dataset_bytes(got) == dataset_bytes(sent), f"{ds.SOPClassUID.name} changed on the way"


@pytest.mark.parametrize("node", ["demo", "orthanc", "dcmqrscp"])
def test_dicomweb_client_store_instances(stow_targets: StowTargets, node: str) -> None:
    study = generate_uid()
    datasets = sample(("CT_small.dcm", "MR_small.dcm"), study)
    client = DICOMwebClient(url=stow_targets.gateway.url(node, ""))
    response = client.store_instances(datasets=datasets)
    stored = {item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence}
    assert stored == {ds.SOPInstanceUID for ds in datasets}
    assert "FailedSOPSequence" not in response
    for ds in datasets:
        back = client.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert back.PixelData == ds.PixelData
        assert back.PatientName == ds.PatientName
        assert back.SOPClassUID == ds.SOPClassUID


def test_compressed_part_is_converted_when_the_pacs_refuses_its_syntax(stow_targets: StowTargets,
                                                                          picky: Any) -> None:
    """The PACS takes only native syntaxes: the JPEG 2000 part is decoded (no loss of its own) and
    stored as Explicit VR Little Endian; the native part goes out as it is."""
    picky.restrict_storage_syntaxes((ExplicitVRLittleEndian,))
    study = generate_uid()
    j2k, ct = sample(("JPEG2000.dcm", "CT_small.dcm"), study)
    r = httpx.post(stow_targets.gateway.url("picky", "/studies"), content=multipart_body([p10_bytes(j2k), p10_bytes(ct)]),
                   headers={"Content-Type": MULTIPART, **JSON}, timeout=60)
    assert r.status_code == 200, r.text
    assert set(picky.stored) == {j2k.SOPInstanceUID, ct.SOPInstanceUID}
    held = pydicom.dcmread(io.BytesIO(picky._instances[j2k.SOPInstanceUID][0]))
    assert held.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(held.pixel_array, j2k.pixel_array)
    held_ct = pydicom.dcmread(io.BytesIO(picky._instances[ct.SOPInstanceUID][0]))
    assert held_ct.PixelData == ct.PixelData


def test_lossless_source_to_a_pacs_that_takes_only_implicit_vr(stow_targets: StowTargets, picky: Any) -> None:
    picky.restrict_storage_syntaxes(("1.2.840.10008.1.2",))
    study = generate_uid()
    (ct,) = sample(("CT_small.dcm",), study)
    r = httpx.post(stow_targets.gateway.url("picky", "/studies"), content=multipart_body([p10_bytes(ct)]),
                   headers={"Content-Type": MULTIPART, **JSON}, timeout=60)
    assert r.status_code == 200, r.text
    held = pydicom.dcmread(io.BytesIO(picky._instances[ct.SOPInstanceUID][0]))
    assert held.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert held.PixelData == ct.PixelData
    assert held.PatientName == ct.PatientName


def test_single_part_application_dicom(stow_targets: StowTargets) -> None:
    study = generate_uid()
    (ct,) = sample(("CT_small.dcm",), study)
    r = httpx.post(stow_targets.gateway.url("demo", "/studies"), content=p10_bytes(ct),
                   headers={"Content-Type": "application/dicom", **JSON}, timeout=60)
    assert r.status_code == 200, r.text
    assert set(referenced(r.json())) == {ct.SOPInstanceUID}
    assert ct.SOPInstanceUID in stow_targets.demo.stored


def test_dicom_json_with_bulk_data(stow_targets: StowTargets) -> None:
    """The metadata part, then the pixel data as an octet-stream part named by its BulkDataURI."""
    study = generate_uid()
    (ct,) = sample(("CT_small.dcm",), study)
    bulk: dict[str, bytes] = {}

    def handler(element: Any) -> str:
        uri = f"http://client.example/bulk/{len(bulk)}"
        bulk[uri] = element.value
        return uri

    metadata = ct.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=handler)
    boundary = "json-bulk-boundary"
    body = bytearray(f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode())
    import json

    body += json.dumps([metadata]).encode() + b"\r\n"
    for uri, value in bulk.items():
        body += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Location: {uri}\r\n\r\n"
                 .encode() + value + b"\r\n")
    body += f"--{boundary}--\r\n".encode()
    r = httpx.post(stow_targets.gateway.url("orthanc", "/studies"), content=bytes(body), timeout=60,
                   headers={"Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}',
                            **JSON})
    assert r.status_code == 200, r.text
    url = referenced(r.json())[ct.SOPInstanceUID]
    with httpx.Client(timeout=60) as client:
        back = pydicom.dcmread(io.BytesIO(retrieve(client, url)))
    assert back.PixelData == ct.PixelData
    for elem in ct:
        if elem.VR not in ("SQ", "OB", "OW", "UN") and elem.tag.group != 0x0002:
            assert back[elem.tag].value == elem.value, elem.keyword


def test_pacs_down_is_502_and_nothing_is_half_done(stow_targets: StowTargets) -> None:
    (ct,) = sample(("CT_small.dcm",), generate_uid())
    r = httpx.post(stow_targets.gateway.url("down", "/studies"), content=multipart_body([p10_bytes(ct)]),
                   headers={"Content-Type": MULTIPART, **JSON}, timeout=30)
    assert r.status_code == 502, r.text
    assert r.json()["error"] == "pacs-unreachable"
