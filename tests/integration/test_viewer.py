"""What a viewer needs, against real PACSes: metadata, frames, bulk data, rendered images.

The session gateway (conftest.py) fronts the demo PACS, Orthanc and dcmqrscp, each by C-GET and by
C-MOVE; every answer is compared with the synthetic studies the PACSes were loaded with, through
``dicomweb-client`` where it has the call, and httpx otherwise.
"""

from __future__ import annotations

import io
import json
import tomllib
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset

from tests.support.gatewayproc import GatewayProcess

VIEWER_NODES = ("demo", "demo-move", "orthanc", "orthanc-move", "dcmqrscp", "dcmqrscp-move")
OCTET = 'multipart/related; type="application/octet-stream"'


def web_client(url: str) -> DICOMwebClient:
    """A dicomweb-client whose Host header keeps the port. Version 0.61 writes ``Host: 127.0.0.1``
    for a server on another port (RFC 9110 7.2 wants the port), and the gateway builds the
    BulkDataURIs of metadata from the Host header, as a server behind no proxy must; deployments
    with such clients set ``server.public_url`` (README, known client quirks)."""
    client = DICOMwebClient(url=url)
    if client.port not in (80, 443):
        client.host = f"{client.host}:{client.port}"
    return client


def multiframe(studies: list[Dataset]) -> Dataset:
    return next(d for d in studies if int(d.get("NumberOfFrames", 1) or 1) > 1)


def ct_series(studies: list[Dataset]) -> list[Dataset]:
    return [d for d in studies if d.get("SeriesDescription") == "Thorax 1.0 B31f"]


def frame_bytes(ds: Dataset, number: int) -> bytes:
    size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
    return bytes(ds.PixelData[(number - 1) * size:number * size])


def from_json(item: dict[str, Any]) -> Dataset:
    return Dataset.from_json(item, bulk_data_uri_handler=lambda tag, vr, uri: b"")


def assert_metadata_matches(item: dict[str, Any], original: Dataset, base: str) -> None:
    """Every attribute of the original is there with its value; bulk data by a URI that names it."""
    decoded = from_json(item)
    for elem in original:
        if elem.tag.group in (0x0002,) or elem.tag == 0x7FE00010 or elem.tag.is_private or elem.VR == "SQ":
            continue
        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") and len(elem.value or b"") > 1024:
            assert "BulkDataURI" in item[f"{elem.tag:08X}"]
            continue
        assert elem.tag in decoded, f"{elem.keyword or elem.tag} missing"
        got, want = decoded[elem.tag].value, elem.value
        if elem.VR in ("DS", "IS", "FL", "FD") and want not in ("", None):
            assert np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float)), elem.keyword
        elif elem.VR == "PN":
            assert str(got) == str(want), elem.keyword
        else:
            assert got == want, elem.keyword
    for key in item:
        assert not key.startswith("0002"), "no file meta in metadata"
    if "PixelData" in original:
        uri = item["7FE00010"]["BulkDataURI"]
        assert uri == (f"{base}/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}/instances/"
                       f"{original.SOPInstanceUID}/bulkdata/7FE00010")


# ------------------------------------------------------------------------------------------------
# Metadata


@pytest.mark.parametrize("node", VIEWER_NODES)
def test_series_metadata_holds_every_instance_with_its_attributes(gateway: GatewayProcess, studies: list[Dataset],
                                                                   node: str) -> None:
    source = ct_series(studies)
    client = web_client(gateway.url(node, ""))
    items = client.retrieve_series_metadata(source[0].StudyInstanceUID, source[0].SeriesInstanceUID)
    by_uid = {d.SOPInstanceUID: d for d in source}
    assert sorted(i["00080018"]["Value"][0] for i in items) == sorted(by_uid)
    for item in items:
        assert_metadata_matches(item, by_uid[item["00080018"]["Value"][0]], gateway.url(node, ""))


@pytest.mark.parametrize("node", ("demo", "orthanc", "dcmqrscp"))
def test_study_and_instance_metadata(gateway: GatewayProcess, studies: list[Dataset], node: str) -> None:
    target = multiframe(studies)
    client = web_client(gateway.url(node, ""))
    study_items = client.retrieve_study_metadata(target.StudyInstanceUID)
    in_study = {d.SOPInstanceUID for d in studies if d.StudyInstanceUID == target.StudyInstanceUID}
    assert {i["00080018"]["Value"][0] for i in study_items} == in_study
    item = client.retrieve_instance_metadata(target.StudyInstanceUID, target.SeriesInstanceUID, target.SOPInstanceUID)
    assert_metadata_matches(item, target, gateway.url(node, ""))


def test_metadata_of_an_unknown_instance_is_404(gateway: GatewayProcess, studies: list[Dataset],
                                                 client: httpx.Client) -> None:
    target = ct_series(studies)[0]
    r = client.get(gateway.url("demo", f"/studies/{target.StudyInstanceUID}/series/{target.SeriesInstanceUID}"
                                       "/instances/1.2.3.4.5/metadata"))
    assert r.status_code == 404 and r.json()["error"] == "not-found"
    r = client.get(gateway.url("orthanc", "/studies/1.2.3.4.5/metadata"))
    assert r.status_code == 404


# ------------------------------------------------------------------------------------------------
# Frames and bulk data


@pytest.mark.parametrize("node", VIEWER_NODES)
def test_every_frame_of_a_multiframe_instance_is_byte_exact(gateway: GatewayProcess, studies: list[Dataset],
                                                           node: str) -> None:
    target = multiframe(studies)
    count = int(target.NumberOfFrames)
    client = web_client(gateway.url(node, ""))
    frames = client.retrieve_instance_frames(target.StudyInstanceUID, target.SeriesInstanceUID,
                                             target.SOPInstanceUID, frame_numbers=list(range(1, count + 1)))
    assert [bytes(f) for f in frames] == [frame_bytes(target, n) for n in range(1, count + 1)]
    # one by one too, in reverse: a frame is cut from its own offset, not from the first
    for number in range(count, 0, -1):
        [one] = client.retrieve_instance_frames(target.StudyInstanceUID, target.SeriesInstanceUID,
                                                target.SOPInstanceUID, frame_numbers=[number])
        assert bytes(one) == frame_bytes(target, number)


@pytest.mark.parametrize("node", ("demo", "orthanc", "dcmqrscp"))
def test_pixel_data_bulk_data_uri_resolves_to_the_pixel_data(gateway: GatewayProcess, studies: list[Dataset],
                                                            node: str) -> None:
    client = web_client(gateway.url(node, ""))
    for target in (multiframe(studies), ct_series(studies)[0]):
        item = client.retrieve_instance_metadata(target.StudyInstanceUID, target.SeriesInstanceUID,
                                                 target.SOPInstanceUID)
        [value] = client.retrieve_bulkdata(item["7FE00010"]["BulkDataURI"])
        assert bytes(value) == bytes(target.PixelData)


def test_frames_in_single_and_multipart_forms(gateway: GatewayProcess, studies: list[Dataset],
                                              client: httpx.Client) -> None:
    target = multiframe(studies)
    url = gateway.url("demo", f"/studies/{target.StudyInstanceUID}/series/{target.SeriesInstanceUID}/instances/"
                              f"{target.SOPInstanceUID}/frames/3")
    for accept in ("application/octet-stream", "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"):
        r = client.get(url, headers={"Accept": accept})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/octet-stream")
        assert r.content == frame_bytes(target, 3)
    for accept in (OCTET, f'{OCTET}; transfer-syntax=*', 'multipart/related; type=application/octet-stream',
                   f'{OCTET}; transfer-syntax="1.2.840.10008.1.2.1"'):
        r = client.get(url, headers={"Accept": accept})
        assert r.status_code == 200, (accept, r.text)
        assert r.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
        assert frame_bytes(target, 3) in r.content
    r = client.get(url.replace("/frames/3", "/frames/1,3,5"), headers={"Accept": "application/octet-stream"})
    assert r.status_code == 406, "several frames cannot go single part"


@pytest.mark.parametrize(("frames", "status"), [("0", 400), ("1,", 400), ("a", 400), ("1;2", 400), ("-1", 400),
                                                ("9", 404), ("1,2,99", 404)])
def test_bad_frame_lists(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client, frames: str,
                         status: int) -> None:
    target = multiframe(studies)
    r = client.get(gateway.url("demo", f"/studies/{target.StudyInstanceUID}/series/{target.SeriesInstanceUID}/"
                                       f"instances/{target.SOPInstanceUID}/frames/{frames}"))
    assert r.status_code == status, r.text
    assert r.json()["message"]


def test_pixeldata_resources(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client) -> None:
    target = multiframe(studies)
    series = gateway.url("dcmqrscp", f"/studies/{target.StudyInstanceUID}/series/{target.SeriesInstanceUID}")
    r = client.get(series + f"/instances/{target.SOPInstanceUID}/pixeldata")
    assert r.status_code == 200
    for number in range(1, int(target.NumberOfFrames) + 1):
        assert frame_bytes(target, number) in r.content
    r = client.get(series + "/pixeldata")
    assert r.status_code == 200
    for ds in (d for d in studies if d.SeriesInstanceUID == target.SeriesInstanceUID):
        assert frame_bytes(ds, 1) in r.content
    assert r.content.rstrip().endswith(b"--")


# ------------------------------------------------------------------------------------------------
# Rendered


@pytest.mark.parametrize("node", ("demo", "orthanc-move", "dcmqrscp"))
def test_rendered_images(gateway: GatewayProcess, studies: list[Dataset], node: str) -> None:
    client = web_client(gateway.url(node, ""))
    target = multiframe(studies)
    jpeg = client.retrieve_instance_rendered(target.StudyInstanceUID, target.SeriesInstanceUID,
                                             target.SOPInstanceUID, media_types=("image/jpeg",))
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (int(target.Columns), int(target.Rows))
    frames = [client.retrieve_instance_frames_rendered(target.StudyInstanceUID, target.SeriesInstanceUID,
                                                       target.SOPInstanceUID, frame_numbers=[n],
                                                       media_types=("image/png",)) for n in (1, 2)]
    first, second = (np.asarray(Image.open(io.BytesIO(f))) for f in frames)
    assert first.shape == second.shape and not np.array_equal(first, second), "frame 2 is not frame 1"
    ct = ct_series(studies)[0]
    png = client.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID,
                                            media_types=("image/png",), params={"window": "40,400,linear"})
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert pixels.min() < pixels.max(), "a windowed CT is not blank"
    many = client.retrieve_series_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID, media_types=("image/jpeg",))
    assert many.count(b"\xff\xd8\xff") >= len(ct_series(studies))


def test_thumbnails_and_rendered_errors(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client) -> None:
    ct = ct_series(studies)[0]
    series = gateway.url("demo", f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}")
    instance = f"{series}/instances/{ct.SOPInstanceUID}"
    for url in (f"{series}/thumbnail", f"{instance}/thumbnail", f"{instance}/frames/1/thumbnail",
                gateway.url("demo", f"/studies/{ct.StudyInstanceUID}/thumbnail")):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", (url, r.text)
        assert max(Image.open(io.BytesIO(r.content)).size) <= 128
    bad = [(f"{instance}/rendered?quality=0", 400), (f"{instance}/rendered?window=40,400", 400),
           (f"{instance}/rendered?viewport=0,0", 400), (f"{instance}/thumbnail?annotation=patient", 400),
           (f"{instance}/rendered?iccprofile=srgb", 400), (f"{instance}/frames/2/rendered", 404),
           (f"{instance}/frames/1,2/rendered", 400)]
    for url, status in bad:
        r = client.get(url)
        assert r.status_code == status, (url, r.status_code, r.text)
        assert r.json()["message"]
    r = client.get(f"{instance}/rendered", headers={"Accept": "image/tiff"})
    assert r.status_code == 406
    r = client.get(f"{instance}/rendered", headers={"Accept": "image/jpeg, application/dicom"})
    assert r.status_code == 400
    r = client.get(f"{instance}/rendered?annotation=patient,nonsense")
    assert r.status_code == 200 and "nonsense" in r.headers["warning"]


# ------------------------------------------------------------------------------------------------
# WADO-URI


@pytest.mark.parametrize("node", ("demo", "orthanc"))
def test_wado_uri(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client, node: str) -> None:
    ct = ct_series(studies)[0]
    url = gateway.base + f"/nodes/{node}/wado"
    uids = {"requestType": "WADO", "studyUID": ct.StudyInstanceUID, "seriesUID": ct.SeriesInstanceUID,
            "objectUID": ct.SOPInstanceUID}
    r = client.get(url, params={**uids, "contentType": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom")
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.SOPInstanceUID == ct.SOPInstanceUID and bytes(ds.PixelData) == bytes(ct.PixelData)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    r = client.get(url, params=uids)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = client.get(url, params={**uids, "contentType": "image/png", "rows": "32", "columns": "32",
                                "windowCenter": "40", "windowWidth": "400", "region": "0,0,0.5,0.5"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (32, 32)
    for params, name in [({**uids, "requestType": "WADOX"}, "requestType"), ({"requestType": "WADO"}, "studyUID"),
                         ({**uids, "objectUID": "abc"}, "objectUID"), ({**uids, "windowCenter": "40"}, "windowWidth"),
                         ({**uids, "region": "0.5,0.5,0.1,1"}, "region"), ({**uids, "anonymize": "yes"}, "anonymize"),
                         ({**uids, "rows": "0"}, "rows"), ({**uids, "frameNumber": "x"}, "frameNumber")]:
        r = client.get(url, params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["parameter"] == name
    r = client.get(url, params={**uids, "contentType": "text/html"})
    assert r.status_code == 406


# ------------------------------------------------------------------------------------------------
# HTTP caching, compression, failures


def test_etag_and_not_modified(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client) -> None:
    ct = ct_series(studies)[0]
    series = gateway.url("demo", f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}")
    instance = f"{series}/instances/{ct.SOPInstanceUID}"
    for url in (f"{instance}/metadata", f"{instance}/frames/1", f"{instance}/rendered",
                f"{instance}/bulkdata/7FE00010"):
        first = client.get(url)
        assert first.status_code == 200, url
        etag = first.headers["etag"]
        assert "immutable" in first.headers["cache-control"] and "private" in first.headers["cache-control"]
        again = client.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        other = client.get(url, headers={"If-None-Match": '"something-else"'})
        assert other.status_code == 200 and other.content == first.content
    png = client.get(f"{instance}/rendered", headers={"Accept": "image/png"})
    assert png.headers["etag"] != client.get(f"{instance}/rendered").headers["etag"], "one ETag per representation"
    listed = client.get(f"{series}/metadata")
    assert "no-cache" in listed.headers["cache-control"]
    assert client.get(f"{series}/metadata", headers={"If-None-Match": listed.headers["etag"]}).status_code == 304


def test_metadata_is_gzip_compressed_when_accepted(gateway: GatewayProcess, studies: list[Dataset]) -> None:
    ct = ct_series(studies)[0]
    url = gateway.url("orthanc", f"/studies/{ct.StudyInstanceUID}/metadata")
    with httpx.Client(timeout=30) as c:
        plain = c.get(url, headers={"Accept-Encoding": "identity"})
        packed = c.get(url, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    def by_uid(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(items, key=lambda i: i["00080018"]["Value"][0])  # arrival order may differ

    assert by_uid(json.loads(packed.content)) == by_uid(json.loads(plain.content))
    raw = httpx.get(url, headers={"Accept-Encoding": "gzip"}, timeout=30)
    assert int(raw.num_bytes_downloaded) < len(plain.content) / 2, "compressed on the wire"


def test_range_requests_on_bulk_data(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client) -> None:
    ct = ct_series(studies)[0]
    url = gateway.url("demo", f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                              f"{ct.SOPInstanceUID}/bulkdata/7FE00010")
    pixels = bytes(ct.PixelData)
    single = {"Accept": "application/octet-stream"}
    r = client.get(url, headers={**single, "Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == pixels[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(pixels)}"
    r = client.get(url, headers={**single, "Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == pixels[-10:]
    r = client.get(url, headers={**single, "Range": f"bytes={len(pixels)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(pixels)}"
    etag = client.get(url, headers=single).headers["etag"]
    r = client.get(url, headers={**single, "Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == pixels, "If-Range that does not match: the whole value"
    r = client.get(url, headers={**single, "Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == pixels[:10]
    client_ = web_client(gateway.url("demo", ""))
    [part] = client_.retrieve_bulkdata(url, byte_range=(0, 99))
    assert bytes(part) == pixels[:100]


def test_cors_for_a_viewer_on_another_origin(gateway: GatewayProcess, studies: list[Dataset]) -> None:
    origin = "http://viewer.example"
    ct = ct_series(studies)[0]
    settings = {"server": {"cors_origins": [origin]}, "nodes": [
        {"name": "demo", "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": _node_port(gateway, "demo"),
         "default": True}]}
    with GatewayProcess(settings) as gw, httpx.Client(timeout=30) as c:
        url = gw.url(None, f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/metadata")
        pre = c.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                      "Access-Control-Request-Headers": "authorization, accept"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == origin
        allowed = pre.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "accept" in allowed
        r = c.get(url, headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "etag" in r.headers["access-control-expose-headers"].lower()
        stranger = c.get(url, headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in stranger.headers
        refused = c.options(url, headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "GET"})
        assert refused.status_code == 400


def _node_port(gateway: GatewayProcess, name: str) -> int:
    nodes = tomllib.loads(gateway.config_path.read_text())["nodes"]
    return int(next(n["port"] for n in nodes if n["name"] == name))


@pytest.mark.parametrize("path", ["/metadata", "/series/1.2.3/metadata", "/series/1.2.3/instances/1.2.4/frames/1",
                                  "/series/1.2.3/instances/1.2.4/rendered", "/series/1.2.3/thumbnail"])
def test_a_pacs_that_is_down_gets_a_prompt_gateway_error(gateway: GatewayProcess, client: httpx.Client,
                                                         path: str) -> None:
    r = client.get(gateway.url("down", "/studies/1.2.9" + path))
    assert r.status_code in (502, 503, 504), r.text
    assert r.json()["error"].startswith("pacs-")


@pytest.mark.parametrize("path", ["/bulkdata/7FE0001", "/bulkdata/7FE00010/0", "/bulkdata/0008XX18",
                                  "/bulkdata/00081115/x/00081150", "/frames/", "/frames/1,,2"])
def test_malformed_resource_paths(gateway: GatewayProcess, studies: list[Dataset], client: httpx.Client,
                                  path: str) -> None:
    ct = ct_series(studies)[0]
    url = gateway.url("demo", f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                              f"{ct.SOPInstanceUID}{path}")
    r = client.get(url)
    assert r.status_code in (400, 404), (path, r.status_code, r.text)
    assert r.status_code != 404 or path == "/frames/", path


@pytest.mark.parametrize("path", ["/studies", "/studies/1.2.3"])
def test_a_wrong_method_is_405_naming_every_allowed_method(gateway: GatewayProcess, client: httpx.Client,
                                                           path: str) -> None:
    r = client.delete(gateway.url("demo", path))
    assert r.status_code == 405 and r.json()["error"] == "method-not-allowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
