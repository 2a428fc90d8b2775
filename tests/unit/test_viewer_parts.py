"""The pieces under the viewer routes, without sockets: the instance cache's cap and TTL, frames cut
from native and encapsulated pixel data, bulk data paths, frame lists and byte ranges."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate_extended
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from starlette.requests import Request

from gateway.dicomweb.cache import InstanceCache
from gateway.dicomweb.instance import CachedInstance, NoPixelData, NoSuchFrame, NoSuchValue
from gateway.dicomweb.viewer import _byte_range, format_tag_path, parse_frame_list, parse_tag_path
from gateway.problems import HttpProblem


def instance(ds: Dataset, sop: str = "1.2.3.4") -> CachedInstance:
    buffer = io.BytesIO()
    ds.SOPInstanceUID = sop
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    return CachedInstance("1.2", "1.2.3", sop, ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID), data, meta_end)


def image(frames: int = 3, rows: int = 4, cols: int = 5, bits: int = 16, syntax: str = ExplicitVRLittleEndian) -> tuple[Dataset, np.ndarray]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, cols, frames, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    dtype = np.uint16 if bits == 16 else np.uint8
    pixels = (np.arange(frames * rows * cols) * 7 % 250).astype(dtype).reshape(frames, rows, cols)
    ds.PixelData = pixels.tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, pixels)
    return ds, pixels


# ------------------------------------------------------------------------------------------------
# Frames


@pytest.mark.parametrize("bits", [8, 16])
def test_native_frames_are_slices_of_the_pixel_data(bits: int) -> None:
    ds, pixels = image(bits=bits, rows=40, cols=50)  # large enough to stay deferred
    inst = instance(ds)
    assert inst.layout().number_of_frames == 3 and not inst.layout().encapsulated
    for n in (1, 2, 3):
        assert b"".join(bytes(c) for c in inst.frame(n)) == pixels[n - 1].tobytes()
    with pytest.raises(NoSuchFrame):
        inst.frame(4)
    with pytest.raises(NoSuchFrame):
        inst.frame(0)


def test_tiny_native_pixel_data_read_with_the_header_is_found_too() -> None:
    ds, pixels = image(frames=2, rows=2, cols=3)
    inst = instance(ds)
    assert b"".join(bytes(c) for c in inst.frame(2)) == pixels[1].tobytes()


def test_encapsulated_frames_one_fragment_each() -> None:
    ds, _ = image(frames=4, rows=16, cols=16, syntax=RLELossless)
    inst = instance(ds)
    from pydicom.encaps import generate_frames

    expected = [bytes(f) for f in generate_frames(ds.PixelData, number_of_frames=4)]
    assert inst.layout().encapsulated
    assert [b"".join(bytes(c) for c in inst.frame(n)) for n in (1, 2, 3, 4)] == expected


def encapsulated(fragments_per_frame: list[list[bytes]], with_bot: bool, extended: bool = False) -> CachedInstance:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 8, 8, len(fragments_per_frame), 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    frames = [b"".join(f) for f in fragments_per_frame]
    if extended:
        data, offsets, lengths = encapsulate_extended(frames)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        items = b""
        bot: list[int] = []
        position = 0
        for fragments in fragments_per_frame:
            bot.append(position)
            for fragment in fragments:
                items += struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
                position += 8 + len(fragment)
        table = struct.pack(f"<{len(bot)}I", *bot) if with_bot else b""
        ds.PixelData = struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table + items + struct.pack(
            "<HHI", 0xFFFE, 0xE0DD, 0)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return instance(ds)


JPEG_A = [b"\xff\xd8" + b"a" * 600, b"b" * 500 + b"\xff\xd9"]
JPEG_B = [b"\xff\xd8" + b"c" * 700 + b"\xff\xd9"]
JPEG_C = [b"\xff\xd8" + b"d" * 300, b"e" * 300, b"f" * 300 + b"\xff\xd9\x00"]


@pytest.mark.parametrize("with_bot", [True, False], ids=["offset-table", "end-markers"])
def test_encapsulated_frames_of_several_fragments(with_bot: bool) -> None:
    inst = encapsulated([JPEG_A, JPEG_B, JPEG_C], with_bot)
    assert [b"".join(bytes(c) for c in inst.frame(n)) for n in (1, 2, 3)] == [
        b"".join(JPEG_A), b"".join(JPEG_B), b"".join(JPEG_C)]


def test_encapsulated_frames_by_the_extended_offset_table() -> None:
    frames = [[b"\xff\xd8" + bytes([i]) * (100 + 2 * i) + b"\xff\xd9"] for i in range(3)]  # even: no padding
    inst = encapsulated(frames, with_bot=False, extended=True)
    assert [b"".join(bytes(c) for c in inst.frame(n)) for n in (1, 2, 3)] == [f[0] for f in frames]


def test_fragments_that_cannot_be_assigned_to_frames_are_refused() -> None:
    inst = encapsulated([[b"x" * 100, b"y" * 100], [b"z" * 100]], with_bot=False)
    with pytest.raises(NoPixelData):
        inst.layout()


def test_no_pixel_data_is_said_once_and_kept() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName = "X"
    inst = instance(ds)
    for _ in range(2):
        with pytest.raises(NoPixelData):
            inst.frame(1)


# ------------------------------------------------------------------------------------------------
# Bulk data values and metadata


def test_bulk_values_top_level_and_nested_and_metadata_paths() -> None:
    ds, pixels = image(frames=1, rows=40, cols=40)
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 1000)
    item = Dataset()
    item.add_new(0x00091010, "LO", "CREATOR")
    item.add_new(0x00091011, "OB", b"\x07" * 3000)
    ds.add_new(0x00540016, "SQ", Sequence([Dataset(), item]))
    ds.add_new(0x00101000, "LO", "SHORT")
    inst = instance(ds)
    value, vr = inst.bulk_value((0x7FE00010,))
    assert bytes(value) == pixels.tobytes() and vr in ("OW", "OB")
    assert bytes(inst.bulk_value((0x60003000,))[0]) == b"\x01\x02" * 1000
    assert bytes(inst.bulk_value((0x00540016, 1, 0x00091011))[0]) == b"\x07" * 3000
    for missing in [(0x00540016, 2, 0x00091011), (0x00540016, 0, 0x00091011), (0x00100010,), (0x00101000, 0, 0x1)]:
        with pytest.raises(NoSuchValue):
            inst.bulk_value(missing)
    seen: list[tuple[int, ...]] = []
    text = inst.metadata_json(lambda path, vr: seen.append(tuple(path)) or "URI:" + format_tag_path(path), 1024)
    assert (0x00540016, 1, 0x00091011) in seen and (0x7FE00010,) in seen
    assert "URI:00540016/1/00091011" in text and "URI:7FE00010" in text
    assert '"SHORT"' in text, "small values inline"


@pytest.mark.parametrize("text", ["7FE00010", "00540016/0/00181072", "00540016/12/00400275/3/7FE00010"])
def test_tag_paths_round_trip(text: str) -> None:
    assert format_tag_path(parse_tag_path(text)) == text


@pytest.mark.parametrize("text", ["", "7FE0001", "7FE00010/0", "GGGG0010", "00540016/x/00181072", "00540016/-1/1",
                                  "00540016/01/00181072"])
def test_bad_tag_paths(text: str) -> None:
    with pytest.raises(HttpProblem) as info:
        parse_tag_path(text)
    assert info.value.status == 400


@pytest.mark.parametrize(("text", "frames"), [("1", [1]), ("3,1,2", [3, 1, 2]), ("10,200", [10, 200])])
def test_frame_lists(text: str, frames: list[int]) -> None:
    assert parse_frame_list(text) == frames


@pytest.mark.parametrize("text", ["", "0", "1,", ",1", "1,,2", "a", "1;2", "-1", "01", "1 2", "1234567890"])
def test_bad_frame_lists(text: str) -> None:
    with pytest.raises(HttpProblem) as info:
        parse_frame_list(text)
    assert info.value.status == 400


def request_with(headers: dict[str, str]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [
        (k.lower().encode(), v.encode()) for k, v in headers.items()]})


@pytest.mark.parametrize(("header", "span"), [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=90-", (90, 99)), ("bytes=-5", (95, 99)), ("bytes=95-500", (95, 99)),
    ("bytes=0-1,5-6", None), ("items=0-9", None), ("bytes=-", None)])
def test_byte_ranges(header: str | None, span: tuple[int, int] | None) -> None:
    assert _byte_range(request_with({"Range": header} if header else {}), 100) == span


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-2", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(HttpProblem) as info:
        _byte_range(request_with({"Range": header}), 100)
    assert info.value.status == 416 and info.value.headers["Content-Range"] == "bytes */100"


# ------------------------------------------------------------------------------------------------
# The cache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sized(sop: str, size: int) -> CachedInstance:
    return CachedInstance("1", "2", sop, "3", ExplicitVRLittleEndian, b"\0" * size)


def test_cache_evicts_the_least_recently_used_to_stay_under_its_cap() -> None:
    cache = InstanceCache(max_bytes=3 * 5096, ttl=60)
    a, b, c, d = (sized(s, 1000) for s in "abcd")
    for inst in (a, b, c):
        cache.put("n", inst)
    assert cache.get("n", "a") is a  # a is now the most recent
    cache.put("n", d)
    assert cache.get("n", "b") is None, "b was the least recently used"
    assert {x for x in "acd" if cache.get("n", x)} == set("acd")
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    assert cache.get("other-node", "a") is None, "keyed by node"


def test_cache_ttl_and_oversized_and_off() -> None:
    clock = Clock()
    cache = InstanceCache(max_bytes=100_000, ttl=10, clock=clock)
    cache.put("n", sized("a", 1000))
    clock.now = 9.9
    assert cache.get("n", "a") is not None
    clock.now = 10.1
    assert cache.get("n", "a") is None and cache.bytes == 0
    cache.put("n", sized("big", 200_000))
    assert cache.get("n", "big") is None and cache.bytes == 0, "bigger than the cap: not kept"
    for off in (InstanceCache(0, 10), InstanceCache(100_000, 0)):
        off.put("n", sized("a", 10))
        assert not off.enabled and off.get("n", "a") is None and len(off) == 0


def test_cache_counts_what_an_entry_derives_later() -> None:
    cache = InstanceCache(max_bytes=20_000, ttl=60)
    inst = sized("a", 1000)
    cache.put("n", inst)
    inst._metadata = "x" * 3000
    cache.resize(inst, "n")
    assert cache.bytes == inst.size
    inst._metadata = "x" * 9000  # derived again without telling the cache: dropping it still balances
    assert cache.get("n", "a") is inst
    cache.clear()
    assert cache.bytes == 0
    cache.put("n", inst)
    cache.put("n", sized("b", 15_000))
    assert cache.bytes == sized("b", 15_000).size and cache.get("n", "a") is None


def test_the_allocator_threshold_is_fixed_on_glibc() -> None:
    """gateway/memory.py: on this (glibc) platform the call takes; the memory effect itself is
    measured from outside by the cache memory test and the viewer benchmark."""
    import platform

    from gateway.memory import tune_allocator

    assert tune_allocator() is (platform.libc_ver()[0] == "glibc")
