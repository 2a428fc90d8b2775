"""The instance cache and series prefetch, compressed frames and nested bulk data, against a demo
PACS of this module's own (so its retrieve counter counts only what these tests cause).

- N concurrent frame requests for one series cost exactly one C-GET (and one C-MOVE), counted at
  the PACS; with ``prefetch = "off"`` one per instance, and still one for concurrent requests of
  the same instance.
- Compressed instances: frames come as the stored fragments (``transfer-syntax=*`` or the
  compressed type), or decoded to the original pixels.
- A value inside a sequence item gets a BulkDataURI with the item index, and it resolves.
- Memory: a series five times the bound goes through a small cache; the gateway's peak RSS, read
  from /proc, stays under the cache cap plus the per-stream bound.
"""

from __future__ import annotations

import copy
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless, RLELossless

from gateway.demo.data import generate_studies
from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import free_port

from .conftest import LARGE_SLICES
from .test_viewer import frame_bytes

ROOT = "1.2.826.0.1.3680043.10.1137.77"
MB = 1 << 20


def compressed_instance(number: int, syntax: str) -> Dataset:
    """A 4-frame 16-bit instance with distinct frames, compressed in ``syntax``."""
    base = next(d for d in generate_studies() if d.Modality == "CT")
    ds = copy.deepcopy(base)
    ds.StudyInstanceUID = f"{ROOT}.1"
    ds.SeriesInstanceUID = f"{ROOT}.2.{number}"
    ds.SOPInstanceUID = f"{ROOT}.3.{number}"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 32, 24, 4
    for keyword in ("WindowCenter", "WindowWidth"):  # rendered by the frame's min and max
        if keyword in ds:
            delattr(ds, keyword)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 4095, size=(4, 32, 24), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.compress(syntax, pixels)
    ds.original_pixels = pixels  # kept on the object for the test, never written
    return ds


def bulky_instance() -> Dataset:
    """An instance with a large private value, overlay data and an icon image in a sequence."""
    base = next(d for d in generate_studies() if d.Modality == "MR")
    ds = copy.deepcopy(base)
    ds.StudyInstanceUID = f"{ROOT}.1"
    ds.SeriesInstanceUID = f"{ROOT}.2.9"
    ds.SOPInstanceUID = f"{ROOT}.3.9"
    block = ds.private_block(0x0029, "GATEWAY TEST", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 20)
    ds.add_new(0x60003000, "OW", b"\x01\x80" * 2048)
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel = 64, 64, 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = bytes((i * 7) % 251 for i in range(4096))
    ds.IconImageSequence = Sequence([icon])
    return ds


def same_series(count: int) -> list[Dataset]:
    """``count`` single-frame CT instances of one series."""
    base = next(d for d in generate_studies() if d.Modality == "CT")
    out = []
    for i in range(count):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = f"{ROOT}.1"
        ds.SeriesInstanceUID = f"{ROOT}.2.20"
        ds.SOPInstanceUID = f"{ROOT}.3.20.{i + 1}"
        ds.InstanceNumber = i + 1
        ds.PixelData = np.full((int(ds.Rows), int(ds.Columns)), i + 1, dtype=np.uint16).tobytes()
        out.append(ds)
    return out


SERIES = same_series(12)
RLE = compressed_instance(1, RLELossless)
JLS = compressed_instance(2, JPEGLSLossless)
BULKY = bulky_instance()


@pytest.fixture(scope="module")
def viewer_pacs() -> Iterator[tuple[DemoPACS, int]]:
    move_port = free_port()
    with DemoPACS(ae_title="VIEWER-PACS", datasets=[*SERIES, RLE, JLS, BULKY],
                  move_destinations={"VIEWER-GW": ("127.0.0.1", move_port)}) as pacs:
        yield pacs, move_port


@pytest.fixture
def viewer_gateway(viewer_pacs: tuple[DemoPACS, int]) -> Iterator[GatewayProcess]:
    """A fresh gateway (cold cache) for every test."""
    pacs, move_port = viewer_pacs
    node = {"ae_title": "VIEWER-PACS", "host": "127.0.0.1", "port": pacs.port}
    settings = {"gateway": {"ae_title": "VIEWER-GW", "move_port": move_port}, "nodes": [
        {"name": "get", **node, "default": True},
        {"name": "move", **node, "retrieve": "move"},
        {"name": "single", **node, "prefetch": "off"},
    ]}
    with GatewayProcess(settings) as gw:
        yield gw


def frame_url(gw: GatewayProcess, node: str, ds: Dataset, frames: str = "1") -> str:
    return gw.url(node, f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                        f"{ds.SOPInstanceUID}/frames/{frames}")


def parts_of(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body, with their headers."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n") or body.endswith(b"--" + boundary + b"--")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append(({k.lower(): v for k, v in headers.items()}, payload[:-2]))
    return out


@pytest.mark.parametrize("node", ["get", "move"])
def test_concurrent_frame_requests_for_a_series_cost_one_retrieve(viewer_pacs: tuple[DemoPACS, int],
                                                                  viewer_gateway: GatewayProcess, node: str) -> None:
    pacs, _ = viewer_pacs
    pacs.reset_counters()
    start = threading.Barrier(len(SERIES))

    def fetch(ds: Dataset) -> bytes:
        start.wait(10)
        with httpx.Client(timeout=30) as c:
            r = c.get(frame_url(viewer_gateway, node, ds), headers={"Accept": "application/octet-stream"})
            assert r.status_code == 200, r.text
            return r.content

    with ThreadPoolExecutor(len(SERIES)) as pool:
        frames = list(pool.map(fetch, SERIES))
    assert frames == [frame_bytes(ds, 1) for ds in SERIES]
    assert pacs.retrieve_requests == 1, pacs.last_retrieve_levels
    assert pacs.last_retrieve_levels == ["SERIES"]
    # every later request is served from the cache
    with httpx.Client(timeout=30) as c:
        for ds in SERIES:
            assert c.get(frame_url(viewer_gateway, node, ds)).status_code == 200
        finds = pacs.find_requests
        meta = c.get(viewer_gateway.url(node, f"/studies/{SERIES[0].StudyInstanceUID}/series/"
                                              f"{SERIES[0].SeriesInstanceUID}/metadata"))
        assert meta.status_code == 200 and len(meta.json()) == len(SERIES)
        assert pacs.find_requests == finds, "a series that arrived whole and is cached: not even a C-FIND"
        etag = meta.headers["etag"]
        again = c.get(meta.url, headers={"If-None-Match": etag})
        assert again.status_code == 304, "the revalidation lists the series again and finds it unchanged"
        metrics = httpx.get(viewer_gateway.base + "/metrics").text
    # the audit log names every instance each request sent
    records = [json.loads(line) for line in viewer_gateway.audit_path.read_text().splitlines()]
    [metadata_record] = [r for r in records if r["route"].endswith("/metadata") and r["status"] == 200]
    assert sorted(metadata_record["instances"]) == sorted(ds.SOPInstanceUID for ds in SERIES)
    frame_records = [r for r in records if r["route"].endswith("/frames/{frames}")]
    assert len(frame_records) == 2 * len(SERIES)
    assert all(r["instances"] == [r["instance"]] for r in frame_records), frame_records[0]
    assert pacs.retrieve_requests == 1
    hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('dicomweb_gateway_cache_lookups_total{result="hit"}'))
    assert hits >= len(SERIES)


def test_without_prefetch_each_instance_is_retrieved_once(viewer_pacs: tuple[DemoPACS, int],
                                                          viewer_gateway: GatewayProcess) -> None:
    pacs, _ = viewer_pacs
    pacs.reset_counters()
    target = SERIES[3]

    def fetch(ds: Dataset) -> int:
        with httpx.Client(timeout=30) as c:
            return c.get(frame_url(viewer_gateway, "single", ds)).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(fetch, [target] * 6)) == [200] * 6
    assert pacs.retrieve_requests == 1 and pacs.last_retrieve_levels == ["IMAGE"]
    for ds in SERIES[:3]:
        assert fetch(ds) == 200
    assert pacs.retrieve_requests == 4


@pytest.mark.parametrize("source", [RLE, JLS], ids=["rle", "jpeg-ls"])
def test_compressed_frames_as_stored_and_decoded(viewer_gateway: GatewayProcess, source: Dataset) -> None:
    stored = [bytes(f) for f in generate_frames(source.PixelData, number_of_frames=4)]
    syntax = str(source.file_meta.TransferSyntaxUID)
    part_type = "image/dicom-rle" if syntax == RLELossless else "image/jls"
    with httpx.Client(timeout=30) as c:
        for accept in ('multipart/related; type="application/octet-stream"; transfer-syntax=*',
                       f'multipart/related; type="{part_type}"', f'multipart/related; type="{part_type}"; '
                                                                  f'transfer-syntax={syntax}'):
            r = c.get(frame_url(viewer_gateway, "get", source, "1,2,3,4"), headers={"Accept": accept})
            assert r.status_code == 200, (accept, r.text)
            parts = parts_of(r)
            assert [p for _, p in parts] == stored, accept
            assert all(f"transfer-syntax={syntax}" in h["content-type"] for h, _ in parts)
            assert [h["content-location"].rsplit("/", 1)[1] for h, _ in parts] == ["1", "2", "3", "4"]
        # the default: uncompressed, the original pixel values
        r = c.get(frame_url(viewer_gateway, "get", source, "2,4"))
        assert r.status_code == 200
        parts = parts_of(r)
        assert [p for _, p in parts] == [source.original_pixels[1].tobytes(), source.original_pixels[3].tobytes()]
        assert all("transfer-syntax=1.2.840.10008.1.2.1" in h["content-type"] for h, _ in parts)
        # single part, compressed: the frame's bytes alone
        r = c.get(frame_url(viewer_gateway, "get", source, "3"), headers={"Accept": part_type})
        assert r.status_code == 200 and r.content == stored[2]
        # a compressed type the instance is not stored in: transcoded from the pixels, or 406
        other = "image/jls" if part_type == "image/dicom-rle" else "image/dicom-rle"
        r = c.get(frame_url(viewer_gateway, "get", source, "1"), headers={"Accept": f'multipart/related; type="{other}"'})
        assert r.status_code in (200, 406)
        if r.status_code == 200:
            [(headers, payload)] = parts_of(r)
            assert headers["content-type"].startswith(other)
            assert payload != stored[0]


def test_rendered_compressed_multiframe_matches_its_pixels(viewer_gateway: GatewayProcess) -> None:
    url = frame_url(viewer_gateway, "get", RLE, "3").replace("/frames/3", "/frames/3/rendered")
    r = httpx.get(url, headers={"Accept": "image/png"}, timeout=30)
    assert r.status_code == 200
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(r.content))).astype(int)
    pixels = RLE.original_pixels[2].astype(float)
    low, high = pixels.min(), pixels.max()
    expected = np.rint((pixels - low) / (high - low) * 255)
    assert image.shape == pixels.shape
    assert np.abs(image - expected).max() <= 1, "no window in the data set: the frame's min and max"


def test_bulk_data_uris_resolve_top_level_and_inside_sequences(viewer_gateway: GatewayProcess) -> None:
    ds = BULKY
    base = viewer_gateway.url("get", f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                                     f"{ds.SOPInstanceUID}")
    with httpx.Client(timeout=30) as c:
        [item] = c.get(base + "/metadata").json()
        private_tag = next(f"{e.tag:08X}" for e in ds if e.tag.is_private and e.VR == "OB")
        expected = {
            private_tag: bytes(ds[int(private_tag, 16)].value),
            "60003000": bytes(ds[0x60003000].value),
            "7FE00010": bytes(ds.PixelData),
        }
        for tag, value in expected.items():
            uri = item[tag]["BulkDataURI"]
            assert uri == f"{base}/bulkdata/{tag}"
            r = c.get(uri, headers={"Accept": "application/octet-stream"})
            assert r.status_code == 200 and r.content == value, tag
        icon_uri = item["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
        assert icon_uri == f"{base}/bulkdata/00880200/0/7FE00010"
        r = c.get(icon_uri)
        assert r.status_code == 200
        [(headers, payload)] = parts_of(r)
        assert payload == bytes(ds.IconImageSequence[0].PixelData)
        assert headers["content-location"] == icon_uri
        assert item["00280010"]["Value"] == [ds.Rows], "small values stay inline"
        for missing in ("/bulkdata/00880200/1/7FE00010", "/bulkdata/00291099", "/bulkdata/00100010/0/00100020"):
            r = c.get(base + missing)
            assert r.status_code == 404, (missing, r.text)


CACHE_MB = 32


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_a_series_five_times_the_bound_keeps_rss_under_cache_cap_plus_stream_bound(
        large_ct: tuple[DemoPACS, list[str], str, str, int]) -> None:
    pacs, uids, study, series, largest = large_ct
    # the retrieve's per-stream bound (test_wado_memory.py) plus the cache's cap
    bound = 200 * MB + 2 * largest + CACHE_MB * MB
    node = {"name": "large", "ae_title": "LARGE-PACS", "host": "127.0.0.1", "port": pacs.port, "default": True}
    settings = {"nodes": [node], "cache": {"max_mb": CACHE_MB}, "wado": {"stall_timeout": 60}}
    started = time.monotonic()
    with GatewayProcess(settings) as gw, httpx.Client(timeout=120) as c:
        assert gw.proc is not None
        count = 0
        with c.stream("GET", gw.url(None, f"/studies/{study}/series/{series}/metadata")) as r:
            assert r.status_code == 200
            text = b"".join(r.iter_bytes())
        count = text.count(b'"00080018"')
        assert count == LARGE_SLICES
        # frames of instances spread over the series: most were evicted, so each is fetched alone
        picks = uids[:: max(1, len(uids) // 40)]

        def frame(uid: str) -> int:
            response = c.get(gw.url(None, f"/studies/{study}/series/{series}/instances/{uid}/frames/1"))
            assert time.monotonic() - started < 600, "bounded in time"
            return len(response.content) if response.status_code == 200 else -response.status_code

        with ThreadPoolExecutor(6) as pool:
            sizes = list(pool.map(frame, picks))
        assert all(size > 512 * 512 * 2 for size in sizes), sizes
        metrics = httpx.get(gw.base + "/metrics").text
        peak = peak_rss(gw.proc.pid)
    cached = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("dicomweb_gateway_cache_bytes"))
    assert cached <= CACHE_MB * 1_000_000
    moved = LARGE_SLICES * largest
    assert moved > 5 * bound, (moved, bound)
    assert peak < bound, f"peak RSS {peak / MB:.0f} MB over the bound {bound / MB:.0f} MB"
    print(f"\nseries {moved / MB:.0f} MB through a {CACHE_MB} MB cache: gateway peak RSS {peak / MB:.0f} MB, "
          f"bound {bound / MB:.0f} MB")


def test_bulkdata_resources_send_every_value_named_by_its_uri(viewer_gateway: GatewayProcess) -> None:
    ds = BULKY
    series = viewer_gateway.url("get", f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}")
    base = f"{series}/instances/{ds.SOPInstanceUID}"
    with httpx.Client(timeout=30) as c:
        [item] = c.get(base + "/metadata").json()

        def uris(node: object) -> list[str]:
            if isinstance(node, dict):
                return ([node["BulkDataURI"]] if "BulkDataURI" in node else []) + [
                    u for v in node.values() for u in uris(v)]
            if isinstance(node, list):
                return [u for v in node for u in uris(v)]
            return []

        expected = uris(item)
        assert len(expected) == 4  # private OB, overlay, icon pixels in a sequence, pixel data
        r = c.get(base + "/bulkdata")
        assert r.status_code == 200
        parts = parts_of(r)
        assert sorted(h["content-location"] for h, _ in parts) == sorted(expected)
        for headers, payload in parts:
            single = c.get(headers["content-location"])
            assert parts_of(single)[0][1] == payload
        # a series: every instance's values; the pixel data of each of SERIES' 12 instances
        r = c.get(viewer_gateway.url("get", f"/studies/{SERIES[0].StudyInstanceUID}/series/"
                                            f"{SERIES[0].SeriesInstanceUID}/bulkdata"))
        assert r.status_code == 200
        payloads = sorted(p for _, p in parts_of(r))
        assert payloads == sorted(frame_bytes(d, 1) for d in SERIES)
        assert c.get(series.replace(ds.SeriesInstanceUID, "1.2.3.999") + "/bulkdata").status_code == 404
