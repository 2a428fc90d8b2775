"""A retrieved instance held in memory, and what the viewer resources read from it.

The instance is kept as the Part 10 bytes it arrived as (file meta + data set in the transfer
syntax the PACS sent). Everything else is derived from those bytes once, when first asked for, and
kept with the instance: the parsed header (large values left unread, they are read from the bytes
when needed), where each frame's bytes are, and the metadata JSON. Frames are served as slices of
the bytes, never copied.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from . import transcode
from .dicomjson import dataset_to_json
from .syntaxes import DEFLATED_EXPLICIT_VR_LE

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_PIXEL_DATA = 0x7FE00009
EXTENDED_OFFSETS = 0x7FE00001
_ITEM = 0xE000FFFE  # (FFFE,E000) read as a little-endian uint32 of group, element
_SEQUENCE_END = 0xE0DDFFFE
_UNDEFINED = 0xFFFFFFFF
DEFER_SIZE = 1024  # values longer than this stay in the bytes until asked for

TagPath = tuple[int, ...]  # tag, item index, tag, item index, ..., tag


class NoSuchFrame(Exception):
    """A frame number beyond NumberOfFrames (the route answers 404)."""


class NoPixelData(Exception):
    """The instance has no (top-level) pixel data, or it cannot be cut into frames."""


class NoSuchValue(Exception):
    """A bulk data path that does not lead to a value in this instance."""


@dataclass(frozen=True)
class FrameLayout:
    number_of_frames: int
    encapsulated: bool
    # per frame: the (offset, length) spans in the Part 10 bytes that make up the frame
    spans: tuple[tuple[tuple[int, int], ...], ...]


class CachedInstance:
    """One instance, as received, with lazily derived views. Thread-safe."""

    def __init__(self, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str, transfer_syntax: str,
                 p10: bytes, dataset_offset: int = 0) -> None:
        self.dataset_offset = dataset_offset  # where the data set starts, after the file meta
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.sop_uid = sop_uid
        self.sop_class_uid = sop_class_uid
        self.transfer_syntax = transfer_syntax
        self.p10 = p10
        # re-entrant: deriving one view reads the parsed header, and reading a deferred value
        # moves the shared file position, so one thread at a time per instance
        self._lock = threading.RLock()
        self._dataset: Dataset | None = None
        self._layout: FrameLayout | NoPixelData | None = None
        self._metadata: str | None = None

    @classmethod
    def from_dataset_bytes(cls, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str,
                           transfer_syntax: str, chunks: list[memoryview] | list[bytes]) -> "CachedInstance":
        meta = transcode.file_meta_bytes(sop_class_uid, sop_uid, transfer_syntax)
        return cls(study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax, b"".join([meta, *chunks]),
                   len(meta))

    @property
    def size(self) -> int:
        """What the instance holds in memory, roughly: its bytes plus what was derived from them."""
        return len(self.p10) + (len(self._metadata) * 2 if self._metadata else 0) + 4096

    # -- parsed header --------------------------------------------------------------------------

    def fresh_dataset(self) -> Dataset:
        """A parse of its own, for a caller that reads the pixel data (rendering): not shared."""
        return pydicom.dcmread(io.BytesIO(self.p10), force=True)

    def dataset(self) -> Dataset:
        """The parsed instance; values over ``DEFER_SIZE`` bytes are read from the bytes on access.
        Shared: read deferred values only while holding ``_lock``."""
        with self._lock:
            if self._dataset is None:
                self._dataset = pydicom.dcmread(io.BytesIO(self.p10), defer_size=DEFER_SIZE, force=True)
            return self._dataset

    # -- frames ---------------------------------------------------------------------------------

    def layout(self) -> FrameLayout:
        with self._lock:
            cached = self._layout
            if cached is None:
                try:
                    cached = _layout(self.dataset(), self.p10, self.transfer_syntax)
                except NoPixelData as exc:
                    cached = exc
                self._layout = cached
        if isinstance(cached, NoPixelData):
            raise cached
        return cached

    @property
    def layout_known(self) -> bool:
        """The frames were located already (``layout()`` then costs nothing)."""
        return self._layout is not None

    def frame(self, number: int) -> list[memoryview]:
        """Frame ``number`` (1-based) as stored: raw bytes when native, the fragments when encapsulated."""
        layout = self.layout()
        if not 1 <= number <= layout.number_of_frames:
            raise NoSuchFrame(f"frame {number} is beyond NumberOfFrames ({layout.number_of_frames})")
        view = memoryview(self.p10)
        return [view[offset:offset + length] for offset, length in layout.spans[number - 1]]

    # -- metadata -------------------------------------------------------------------------------

    def metadata_json(self, bulk_uri: Callable[[TagPath, str], str | None], threshold: int) -> str:
        """The DICOM JSON object of the instance; computed once (``bulk_uri`` must not depend on
        the request: the routes give it a placeholder for the base URL)."""
        with self._lock:
            if self._metadata is None:
                self._metadata = dataset_to_json(self.dataset(), bulk_data=bulk_uri, bulk_threshold=threshold,
                                                 binary_threshold=threshold, item_indices=True)
            return self._metadata

    # -- bulk data ------------------------------------------------------------------------------

    def bulk_value(self, path: TagPath) -> tuple[bytes | memoryview, str]:
        """The value at ``path`` and its VR. Top-level deferred values are sliced from the bytes."""
        ds = self.dataset()
        with self._lock:  # reading deferred values moves the shared file position
            for i in range(0, len(path) - 1, 2):
                tag, index = path[i], path[i + 1]
                if tag not in ds:
                    raise NoSuchValue(f"no element {tag:08X}")
                elem = ds[tag]
                if elem.VR != "SQ" or not 0 <= index < len(elem.value):
                    raise NoSuchValue(f"element {tag:08X} has no item {index}")
                ds = elem.value[index]
            tag = path[-1]
            if tag not in ds:
                raise NoSuchValue(f"no element {tag:08X}")
            raw = ds.get_item(tag, keep_deferred=True)
            if isinstance(raw, RawDataElement) and raw.value is None and raw.length != _UNDEFINED and len(path) == 1:
                start = raw.value_tell
                return memoryview(self.p10)[start:start + raw.length], str(raw.VR or "UN")
            elem = ds[tag]
            if elem.VR == "SQ":
                raise NoSuchValue(f"element {tag:08X} is a sequence, not bulk data")
            return _value_bytes(elem, ds), str(elem.VR)


def _value_bytes(elem: Any, ds: Dataset) -> bytes:
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    # a converted value (text, numbers): write it back in Explicit VR Little Endian
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    write_data_element(out, elem)
    written = out.getvalue()
    header = 12 if elem.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV") else 8
    return written[header:]


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _layout(ds: Dataset, p10: bytes, transfer_syntax: str) -> FrameLayout:
    if PIXEL_DATA not in ds:
        if FLOAT_PIXEL_DATA in ds or DOUBLE_PIXEL_DATA in ds:
            raise NoPixelData("float pixel data is not cut into frames")
        raise NoPixelData("the instance has no pixel data")
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames < 1:
        raise NoPixelData(f"NumberOfFrames is {frames}")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not columns:
        raise NoPixelData("Rows or Columns missing")
    if not isinstance(raw, RawDataElement) or raw.value is not None:
        # small enough to have been read: find it in the bytes the slow way
        start = _find_value(p10, raw)
    else:
        start = raw.value_tell
    length = raw.length if isinstance(raw, RawDataElement) else len(ds.PixelData)
    if transfer_syntax in transcode.NATIVE:
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
            raise NoPixelData("deflated data sets are not cut into frames")
        bits = _int(ds, "BitsAllocated", 0) or 0
        samples = _int(ds, "SamplesPerPixel", 1) or 1
        if bits % 8:
            raise NoPixelData(f"BitsAllocated {bits} frames are not byte aligned")
        size = rows * columns * samples * bits // 8
        if size <= 0 or length < size * frames:
            raise NoPixelData("the pixel data is shorter than Rows x Columns x NumberOfFrames")
        return FrameLayout(frames, False, tuple(((start + i * size, size),) for i in range(frames)))
    if length != _UNDEFINED:
        raise NoPixelData("compressed pixel data without encapsulation")
    bot, fragments = _items(p10, start)
    if not fragments:
        raise NoPixelData("encapsulated pixel data without fragments")
    return FrameLayout(frames, True, _map_fragments(ds, p10, frames, bot, fragments))


def _find_value(p10: bytes, raw: Any) -> int:
    """Start of the pixel data value when pydicom read it (a tiny image): search its header."""
    value = raw.value if isinstance(raw, RawDataElement) else None
    marker = b"\xe0\x7f\x10\x00"
    at = p10.rfind(marker)
    if at < 0:
        raise NoPixelData("pixel data element not found")
    # explicit VR: tag, VR, reserved, 4-byte length; implicit VR: tag, 4-byte length
    if p10[at + 4:at + 6] in (b"OB", b"OW"):
        begin = at + 12
    else:
        begin = at + 8
    if value is not None and p10[begin:begin + len(value)] != value and p10[begin:begin + 8][:4] != b"\xfe\xff\x00\xe0":
        raise NoPixelData("pixel data element not found")
    return begin


def _items(p10: bytes, start: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The Basic Offset Table and the fragments (item start, value start, length) of encapsulated data."""
    pos = start
    end = len(p10)
    fragments: list[tuple[int, int, int]] = []
    bot: list[int] = []
    first = True
    while pos + 8 <= end:
        tag, length = struct.unpack_from("<II", p10, pos)
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > end:
            raise NoPixelData("malformed encapsulated pixel data")
        if first:
            bot = list(struct.unpack_from(f"<{length // 4}I", p10, pos + 8)) if length else []
            first = False
        else:
            fragments.append((pos, pos + 8, length))
        pos += 8 + length
    return bot, fragments


def _map_fragments(ds: Dataset, p10: bytes, frames: int, bot: list[int],
                   fragments: list[tuple[int, int, int]]) -> tuple[tuple[tuple[int, int], ...], ...]:
    spans = [(value, length) for _, value, length in fragments]
    if frames == 1:
        return (tuple(spans),)
    base = fragments[0][0]
    offsets: list[int] | None = None
    if EXTENDED_OFFSETS in ds:
        try:
            raw = bytes(ds[EXTENDED_OFFSETS].value)
            offsets = list(struct.unpack(f"<{len(raw) // 8}Q", raw))
        except (struct.error, TypeError, ValueError):
            offsets = None
    if offsets is None and bot:
        offsets = bot
    if offsets is not None and len(offsets) == frames:
        out = []
        for i in range(frames):
            lo = base + offsets[i]
            hi = base + offsets[i + 1] if i + 1 < frames else 1 << 62
            out.append(tuple((v, n) for item, v, n in fragments if lo <= item < hi))
        if all(out):
            return tuple(out)
    if len(fragments) == frames:
        return tuple((s,) for s in spans)
    # several fragments per frame without an offset table: a JPEG family codestream ends with
    # FFD9 (EOI, or EOC for JPEG 2000), possibly followed by one byte of padding
    out, current = [], []
    for value, length in spans:
        current.append((value, length))
        tail = p10[max(value, value + length - 3):value + length]
        if tail.endswith(b"\xff\xd9") or tail.endswith(b"\xff\xd9\x00"):
            out.append(tuple(current))
            current = []
    if current or len(out) != frames:
        raise NoPixelData("cannot tell which fragments belong to which frame (no offset table)")
    return tuple(out)
