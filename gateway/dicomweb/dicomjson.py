"""DICOM JSON Model (PS3.18 Annex F) encoder.

This is a pure encoder: no I/O and no network access.  It exists because
``pydicom.Dataset.to_json_dict`` deviates from PS3.18 F.2 in several ways
that DICOMweb clients notice (IS/DS rewritten through ``float``, empty
components emitted as ``""`` instead of ``null``, ambiguous VRs such as
``"US or SS"`` leaking into the output, group lengths and file meta
elements kept, the source Specific Character Set echoed, exceptions on
invalid numeric strings from a PACS, ...).

The canonical entry point is :func:`dataset_to_json`, which writes the
JSON text itself so that IS and DS values can be emitted *exactly* as
they were written in the dataset (``"1.50"`` stays ``1.50``).
:func:`dataset_to_dict` returns the same content as plain Python objects
(it is equal to ``json.loads(dataset_to_json(...))``).

Raw elements (datasets decoded from bytes) are serialized directly from
their encoded bytes without being converted and stored back into the
dataset, so serializing does not modify the input dataset, does not emit
pydicom validation warnings for odd values and never raises on invalid
values.  Sequences are parsed (but not stored) with pydicom's own reader.

Decisions where PS3.18 leaves a choice:

* Output is compact (no insignificant whitespace) with non-ASCII text
  emitted as-is (the caller encodes the text as UTF-8).
* (0008,0005) Specific Character Set, when present (at any level), is
  emitted as ``"ISO_IR 192"`` since the JSON text is Unicode.
* (FFFC,FFFC) Data Set Trailing Padding and (FFFE,xxxx) item delimitation
  tags are dropped together with group lengths, group 0000 and group 0002.
* IS/DS values that are not numbers at all are emitted as JSON strings
  (F.2.3 allows String for IS/DS); NaN and infinities of FL/FD (and of
  DS values given as Python floats) are emitted as ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"``.
* FL values are written with the shortest decimal text that reads back to
  the same 32-bit float (``0.1`` rather than ``0.10000000149011612``).
* Padding is stripped: leading and trailing spaces for AE AS CS DA DS DT
  IS LO SH TM UI and PN, trailing spaces only for LT ST UT UC UR (leading
  spaces are significant there); NUL padding is stripped everywhere.
* Ambiguous VRs are resolved: ``US or SS`` by the nearest Pixel
  Representation (0 when absent); LUT descriptors keep their first value
  unsigned, as pydicom does.  ``OB or OW``: encapsulated Pixel Data is OB,
  native Pixel Data is OB only for Bits Allocated <= 8 in data not read as
  Implicit VR, otherwise OW; Waveform data follows Waveform Bits Allocated;
  everything else OW.  ``US or OW`` / ``US or SS or OW`` are OW when the
  value is bytes and US (or SS, by Pixel Representation) when it is numbers.
* Numeric values whose byte length does not fit their VR (invalid data)
  are emitted as ``UN`` binary, like pydicom's ``convert_wrong_length_to_UN``.
* ``exclude`` is applied to the top-level dataset only, so that filters
  built from QIDO ``includefield`` lists do not empty sequence items.
* The bulk data handler is never called for empty elements.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from pydicom.charset import decode_bytes
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.hooks import hooks
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, TM, TEXT_VR_DELIMS

__all__ = [
    "BulkDataHandler",
    "BULK_DATA_VRS",
    "BINARY_VRS",
    "dataset_to_dict",
    "dataset_to_json",
]

BulkDataHandler = Callable[[tuple[BaseTag, ...], str], str | None]
"""Called with the tag path and the VR; returns a BulkDataURI or ``None``."""

#: VRs whose values are emitted as InlineBinary or BulkDataURI.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Non-binary VRs that may be replaced by a BulkDataURI (PS3.18 F.2.7).
BULK_DATA_VRS = frozenset(
    {"DS", "FL", "FD", "IS", "LT", "SL", "SS", "ST", "SV", "UC", "UL", "US", "UT", "UV"}
)

_NUMERIC_FORMATS = {
    "FL": ("f", 4),
    "FD": ("d", 8),
    "SL": ("l", 4),
    "SS": ("h", 2),
    "UL": ("L", 4),
    "US": ("H", 2),
    "SV": ("q", 8),
    "UV": ("Q", 8),
}
_FLOAT_VRS = frozenset({"FL", "FD"})
_NUMBER_STRING_VRS = frozenset({"IS", "DS"})
# Text VRs: which padding to strip and whether backslash delimits values.
_STRIP_BOTH_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI"})
_STRIP_TRAILING_VRS = frozenset({"LT", "ST", "UT", "UC", "UR"})
_TEXT_VRS = _STRIP_BOTH_VRS | _STRIP_TRAILING_VRS
_SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})
# VRs restricted to the default repertoire (decoded as ASCII).
_DATE_TIME_TYPES = {"DA": DA, "DT": DT, "TM": TM}

# Delimiters that switch ISO 2022 code extensions back to the initial set
# (PS3.5 6.1.2.5.3).
_SINGLE_TEXT_DELIMS = set(TEXT_VR_DELIMS)
_MULTI_TEXT_DELIMS = set(TEXT_VR_DELIMS) | {0x5C}
_PN_DELIMS = set(TEXT_VR_DELIMS) | {0x5C, 0x5E, 0x3D}

_PIXEL_DATA = 0x7FE00010
_PIXEL_REPRESENTATION = 0x00280103
_BITS_ALLOCATED = 0x00280100
_WAVEFORM_BITS_ALLOCATED = 0x5400_1004
_SPECIFIC_CHARACTER_SET = 0x00080005
_TRAILING_PADDING = 0xFFFCFFFC
_WAVEFORM_OB_OW_TAGS = frozenset({0x54000110, 0x54000112, 0x5400100A, 0x54001010})
_LUT_DESCRIPTOR_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_ENCAPSULATION_ITEM = b"\xfe\xff\x00\xe0"
_DEFAULT_ENCODINGS = ["iso8859"]
_UNDEFINED_LENGTH = 0xFFFFFFFF

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_DICOM_NUMBER = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:([eE])([+-]?[0-9]+))?")
_PADDING = " \0"
_F32 = struct.Struct("<f")

_encode_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]


class _Number(str):
    """Text that is already valid JSON number syntax; written verbatim."""

    __slots__ = ()


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def dataset_to_json(
    ds: Dataset,
    *,
    bulk_data: BulkDataHandler | None = None,
    bulk_threshold: int = 1024,
    exclude: Callable[[BaseTag], bool] | None = None,
    binary_threshold: int | None = None,
    item_indices: bool = False,
) -> str:
    """Return the DICOM JSON text of one dataset object (``{...}``).

    Parameters
    ----------
    ds
        The dataset; may hold raw (undecoded) elements.
    bulk_data
        Called with the tag path (top level down to the element; sequence
        items do not count) and the resolved VR for every non-empty binary
        value (OB OD OF OL OV OW UN) and for values of the other
        BulkDataURI-capable VRs longer than `bulk_threshold` bytes.  A
        returned URI is emitted as ``"BulkDataURI"``; ``None`` inlines the
        value.  Without a handler, binary values are InlineBinary.
    bulk_threshold
        Byte length above which non-binary values are offered to `bulk_data`.
    exclude
        Predicate for top-level tags to leave out.
    binary_threshold
        When given, binary values of at most this many bytes are InlineBinary without asking
        `bulk_data` (pixel data is always offered).
    item_indices
        Put the index of the sequence item in the tag path after each sequence's tag, so that
        a path names one value (``(seq, 0, tag)``).
    """
    node = _Encoder(bulk_data, bulk_threshold, binary_threshold, item_indices).dataset(ds, (), None, exclude)
    parts: list[str] = []
    _write(node, parts.append)
    return "".join(parts)


def dataset_to_dict(
    ds: Dataset,
    *,
    bulk_data: BulkDataHandler | None = None,
    bulk_threshold: int = 1024,
    exclude: Callable[[BaseTag], bool] | None = None,
) -> dict[str, Any]:
    """Return the DICOM JSON object of `ds` as plain Python structures.

    Equal to ``json.loads(dataset_to_json(ds, ...))``: IS/DS/FL numbers are
    ``int`` or ``float`` here, so use :func:`dataset_to_json` where the
    original number text matters.
    """
    node = _Encoder(bulk_data, bulk_threshold).dataset(ds, (), None, exclude)
    return _plain(node)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


def _write(node: Any, out: Callable[[str], Any]) -> None:
    kind = type(node)
    if kind is str:
        out(_encode_string(node))
    elif kind is _Number:
        out(node)
    elif kind is dict:
        out("{")
        first = True
        for key, value in node.items():
            if first:
                first = False
            else:
                out(",")
            out(_encode_string(key))
            out(":")
            _write(value, out)
        out("}")
    elif kind is list:
        out("[")
        first = True
        for value in node:
            if first:
                first = False
            else:
                out(",")
            _write(value, out)
        out("]")
    elif node is None:
        out("null")
    elif kind is int:
        out(int.__repr__(node))
    elif kind is float:  # only finite floats reach the tree
        out(float.__repr__(node))
    else:  # pragma: no cover - the encoder only builds the types above
        raise TypeError(f"unexpected node type {kind!r}")


def _plain(node: Any) -> Any:
    kind = type(node)
    if kind is dict:
        return {key: _plain(value) for key, value in node.items()}
    if kind is list:
        return [_plain(value) for value in node]
    if kind is _Number:
        if "." in node or "e" in node or "E" in node:
            return float(node)
        return int(node)
    return node


# ---------------------------------------------------------------------------
# Value helpers
# ---------------------------------------------------------------------------


def _json_number(text: str) -> _Number | str | None:
    """IS/DS text -> JSON number text, ``None`` (empty) or a string (invalid)."""
    text = text.strip(" \0\t\r\n")
    if not text:
        return None
    if _JSON_NUMBER.fullmatch(text):
        return _Number(text)
    match = _DICOM_NUMBER.fullmatch(text)
    if match is None or not (match[2] or match[3]):
        return text  # not a number: F.2.3 allows IS/DS as a JSON String
    sign, integer, fraction, exp_mark, exponent = match.groups()
    out = ("-" if sign == "-" else "") + (integer.lstrip("0") or "0")
    if fraction:
        out += "." + fraction
    if exp_mark:
        out += exp_mark + exponent
    return _Number(out)


def _special_float(value: float) -> str | None:
    if value != value:
        return "NaN"
    if value == math.inf:
        return "Infinity"
    if value == -math.inf:
        return "-Infinity"
    return None


def _float32_text(value: float) -> _Number | str:
    special = _special_float(value)
    if special is not None:
        return special
    try:
        packed = _F32.pack(value)
    except (OverflowError, struct.error):
        return _Number(float.__repr__(value))
    for precision in (6, 7, 8, 9):
        text = "%.*g" % (precision, value)
        try:
            if _F32.pack(float(text)) == packed:
                return _Number(text)
        except OverflowError:
            break
    return _Number(float.__repr__(value))


def _float64_value(value: float) -> float | str:
    special = _special_float(value)
    return value if special is None else special


def _number_value(vr: str, value: Any) -> Any:
    """One FL/FD/SL/SS/UL/US/SV/UV value as a tree node."""
    if value is None:
        return None
    try:
        if vr == "FL":
            return _float32_text(float(value))
        if vr == "FD":
            return _float64_value(float(value))
        if isinstance(value, float) and not value.is_integer():
            special = _special_float(value)
            return special if special is not None else value
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return _text_value(str(value), "LO")


def _text_value(text: str, vr: str) -> str | None:
    if vr in _STRIP_TRAILING_VRS:
        text = text.rstrip(_PADDING)
    else:
        text = text.strip(_PADDING)
    return text or None


def _person_name(text: str) -> dict[str, str] | None:
    groups = text.strip(_PADDING).split("=")
    if len(groups) > 3:
        groups[2:] = ["=".join(groups[2:])]
    name: dict[str, str] = {}
    for key, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        group = group.strip(_PADDING)
        if group:
            name[key] = group
    return name or None


def _tag_text(value: Any) -> str:
    try:
        return f"{int(Tag(value)):08X}"
    except Exception:  # invalid data: keep what we were given
        return str(value)


def _is_encapsulated(data: Any) -> bool:
    return isinstance(data, (bytes, bytearray)) and data[:4] == _ENCAPSULATION_ITEM


def _peek_int(ds: Dataset, tag: int) -> int | None:
    """First value of a small unsigned element without converting it."""
    try:
        elem = ds.get_item(tag, keep_deferred=True)
    except Exception:
        return None
    if elem is None:
        return None
    value = elem.value
    if isinstance(elem, RawDataElement):
        if isinstance(value, bytes) and len(value) >= 2:
            return int.from_bytes(value[:2], "little" if elem.is_little_endian else "big")
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy
        listed = value.tolist()
        return listed if isinstance(listed, list) else [listed]
    return [value]


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    try:
        return len(value) == 0
    except TypeError:
        return False


def _charset(ds: Dataset) -> list[str]:
    """Python codecs for the text of `ds` (the same choice pydicom makes)."""
    try:
        encodings = ds.original_character_set or ds._character_set
    except Exception:
        return _DEFAULT_ENCODINGS
    if isinstance(encodings, str):
        return [encodings]
    return list(encodings) or _DEFAULT_ENCODINGS


def _decode(data: bytes, vr: str, encodings: list[str]) -> str:
    if b"\x1b" not in data and data.isascii():
        return data.decode("ascii")
    if vr == "PN":
        delimiters = _PN_DELIMS
    elif vr in _SINGLE_VALUED_VRS:
        delimiters = _SINGLE_TEXT_DELIMS
    else:
        delimiters = _MULTI_TEXT_DELIMS
    try:
        return decode_bytes(data, encodings, delimiters)
    except Exception:  # unknown codec / strict validation mode
        try:
            return data.decode(encodings[0], errors="replace")
        except LookupError:
            return data.decode("latin-1")


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    try:
        return bytes(value)
    except Exception:
        return str(value).encode("utf-8")


def _unpack(vr: str, data: bytes, little_endian: bool) -> tuple[Any, ...] | None:
    code, size = _NUMERIC_FORMATS[vr]
    count, remainder = divmod(len(data), size)
    if remainder:
        return None
    return struct.unpack(f"{'<' if little_endian else '>'}{count}{code}", data)


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------


class _Level:
    """Per-dataset state while encoding one dataset (or sequence item)."""

    __slots__ = ("ds", "path", "pixel_rep", "_charset")

    def __init__(self, ds: Dataset, path: tuple[BaseTag, ...], pixel_rep: int | None):
        self.ds = ds
        self.path = path
        self.pixel_rep = pixel_rep
        self._charset: list[str] | None = None

    @property
    def charset(self) -> list[str]:
        if self._charset is None:
            self._charset = _charset(self.ds)
        return self._charset


class _Encoder:
    def __init__(self, bulk_data: BulkDataHandler | None, bulk_threshold: int, binary_threshold: int | None = None,
                 item_indices: bool = False):
        self.bulk_data = bulk_data
        self.bulk_threshold = bulk_threshold
        self.binary_threshold = binary_threshold
        self.item_indices = item_indices

    # -- datasets ---------------------------------------------------------

    def dataset(
        self,
        ds: Dataset | None,
        path: tuple[BaseTag, ...],
        inherited_pixel_rep: int | None,
        exclude: Callable[[BaseTag], bool] | None = None,
    ) -> dict[str, Any]:
        if ds is None:
            return {}
        pixel_rep = _peek_int(ds, _PIXEL_REPRESENTATION)
        level = _Level(ds, path, inherited_pixel_rep if pixel_rep is None else pixel_rep)
        out: dict[str, Any] = {}
        for tag in sorted(ds.keys()):
            group = tag >> 16
            if (
                (tag & 0xFFFF) == 0
                or group in (0x0000, 0x0002, 0xFFFE)
                or tag == _TRAILING_PADDING
            ):
                continue
            if exclude is not None and exclude(tag):
                continue
            if tag == _SPECIFIC_CHARACTER_SET:
                out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
                continue
            elem = ds.get_item(tag, keep_deferred=True)
            if isinstance(elem, RawDataElement):
                node = self.raw_element(level, tag, elem)
            else:
                node = self.element(level, tag, elem)
            out[f"{tag:08X}"] = node
        return out

    # -- bulk data ----------------------------------------------------------

    def _bulk_uri(self, level: _Level, tag: BaseTag, vr: str) -> str | None:
        if self.bulk_data is None:
            return None
        return self.bulk_data(level.path + (tag,), vr) or None

    def _offer_bulk(
        self, level: _Level, tag: BaseTag, vr: str, length: Callable[[], int]
    ) -> str | None:
        if self.bulk_data is None or vr not in BULK_DATA_VRS:
            return None
        if length() <= self.bulk_threshold:
            return None
        return self._bulk_uri(level, tag, vr)

    def _inline_binary(self, tag: BaseTag, length: int) -> bool:
        return (self.binary_threshold is not None and tag != _PIXEL_DATA
                and length != _UNDEFINED_LENGTH and length <= self.binary_threshold)

    def _binary(
        self, level: _Level, tag: BaseTag, vr: str, data: Callable[[], bytes]
    ) -> dict[str, Any]:
        if self.binary_threshold is not None and tag != _PIXEL_DATA:
            value = data()
            if len(value) <= self.binary_threshold:
                return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
        uri = self._bulk_uri(level, tag, vr)
        if uri is not None:
            return {"vr": vr, "BulkDataURI": uri}
        payload = data()
        if not payload:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(payload).decode("ascii")}

    # -- ambiguous VRs ------------------------------------------------------

    def _resolve_vr(
        self,
        level: _Level,
        tag: BaseTag,
        vr: str,
        value: Any,
        undefined_length: bool,
        implicit: bool | None,
    ) -> str:
        numbers = value is not None and not isinstance(value, (bytes, bytearray, memoryview))
        signed = "SS" if level.pixel_rep == 1 else "US"
        if vr == "US or SS":
            if numbers:
                values = [v for v in _as_list(value) if isinstance(v, int)]
                if tag not in _LUT_DESCRIPTOR_TAGS and any(v < 0 for v in values):
                    return "SS"
            return signed
        if vr == "US or SS or OW":
            return signed if numbers else "OW"
        if vr == "US or OW":
            return "US" if numbers else "OW"
        if vr == "OB or OW":
            ds = level.ds
            if tag == _PIXEL_DATA:
                if undefined_length or _is_encapsulated(value):
                    return "OB"
                if implicit is None:
                    implicit = bool(ds.original_encoding[0])
                bits = _peek_int(ds, _BITS_ALLOCATED)
                return "OB" if bits is not None and bits <= 8 and not implicit else "OW"
            if tag in _WAVEFORM_OB_OW_TAGS:
                bits = _peek_int(ds, _WAVEFORM_BITS_ALLOCATED)
                return "OB" if bits is not None and bits <= 8 else "OW"
            return "OW"
        # Any other multi-choice VR string: binary when bytes, else numbers.
        return "OW" if not numbers else signed

    # -- raw elements -------------------------------------------------------

    def _raw_vr(self, level: _Level, raw: RawDataElement) -> str:
        data: dict[str, Any] = {}
        try:
            hooks.raw_element_vr(
                raw, data, encoding=level.charset, ds=level.ds, **hooks.raw_element_kwargs
            )
            vr = data.get("VR")
        except Exception:
            vr = None
        return str(vr) if vr else "UN"

    def raw_element(self, level: _Level, tag: BaseTag, raw: RawDataElement) -> dict[str, Any]:
        vr = self._raw_vr(level, raw)
        value = raw.value
        if " or " in vr:
            vr = self._resolve_vr(
                level, tag, vr, value, raw.length == _UNDEFINED_LENGTH, raw.is_implicit_VR
            )
        if value is None:
            if raw.length == 0:
                return {"vr": vr}
            # Deferred read: binary values may go to bulk data unread.
            if vr in BINARY_VRS and not self._inline_binary(tag, raw.length):
                uri = self._bulk_uri(level, tag, vr)
                if uri is not None:
                    return {"vr": vr, "BulkDataURI": uri}
            return self.element(level, tag, level.ds.get_item(tag))
        if not value:
            return {"vr": vr}

        if vr == "SQ":
            try:
                elem = convert_raw_data_element(raw, encoding=level.charset, ds=level.ds)
            except Exception:
                return self._binary(level, tag, "UN", lambda: value)
            return self.element(level, tag, elem)

        if vr in BINARY_VRS:
            return self._binary(level, tag, vr, lambda: value)

        uri = self._offer_bulk(level, tag, vr, lambda: len(value))
        if uri is not None:
            return {"vr": vr, "BulkDataURI": uri}

        if vr in _NUMERIC_FORMATS:
            numbers = _unpack(vr, value, raw.is_little_endian)
            if numbers is None:
                return self._binary(level, tag, "UN", lambda: value)
            if tag in _LUT_DESCRIPTOR_TAGS and vr == "SS" and numbers and numbers[0] < 0:
                numbers = (numbers[0] + 65536,) + numbers[1:]
            return self._values(vr, [_number_value(vr, n) for n in numbers])

        if vr == "AT":
            if len(value) % 4:
                return self._binary(level, tag, "UN", lambda: value)
            halves = struct.unpack(
                f"{'<' if raw.is_little_endian else '>'}{len(value) // 2}H", value
            )
            tags = [f"{halves[i]:04X}{halves[i + 1]:04X}" for i in range(0, len(halves), 2)]
            return self._values(vr, tags)

        if vr in _NUMBER_STRING_VRS:
            text = value.decode("latin-1")
            return self._values(vr, [_json_number(t) for t in text.split("\\")])

        if vr == "PN":
            text = _decode(value, vr, level.charset)
            return self._values(vr, [_person_name(t) for t in text.split("\\")])

        if vr in _TEXT_VRS:
            text = _decode(value, vr, level.charset)
            parts = [text] if vr in _SINGLE_VALUED_VRS else text.split("\\")
            return self._values(vr, [_text_value(t, vr) for t in parts])

        # Unknown VR in the source data: keep the bytes.
        return self._binary(level, tag, "UN", lambda: value)

    # -- converted elements -------------------------------------------------

    def element(self, level: _Level, tag: BaseTag, elem: DataElement) -> dict[str, Any]:
        vr = str(elem.VR) if elem.VR else "UN"
        value = elem.value
        if " or " in vr:
            vr = self._resolve_vr(
                level, tag, vr, value, bool(getattr(elem, "is_undefined_length", False)), None
            )
        if vr == "SQ":
            if _is_empty(value):
                return {"vr": "SQ"}
            path = level.path + (tag,)
            if self.item_indices:
                items = [self.dataset(item, path + (BaseTag(i),), level.pixel_rep) for i, item in enumerate(value)]
            else:
                items = [self.dataset(item, path, level.pixel_rep) for item in value]
            return {"vr": "SQ", "Value": items}
        if _is_empty(value):
            return {"vr": vr}

        if vr in BINARY_VRS:
            return self._binary(level, tag, vr, lambda: _to_bytes(value))

        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._encoded_value(level, tag, vr, bytes(value))

        values = _as_list(value)
        if vr in BULK_DATA_VRS and self.bulk_data is not None:
            uri = self._offer_bulk(level, tag, vr, lambda: _value_length(vr, values))
            if uri is not None:
                return {"vr": vr, "BulkDataURI": uri}

        if vr in _NUMERIC_FORMATS:
            return self._values(vr, [_number_value(vr, v) for v in values])
        if vr in _NUMBER_STRING_VRS:
            return self._values(vr, [_number_string_value(v) for v in values])
        if vr == "AT":
            return self._values(vr, [None if v is None else _tag_text(v) for v in values])
        if vr == "PN":
            return self._values(
                vr,
                [
                    None
                    if v is None
                    else _person_name(
                        _decode(bytes(v), vr, level.charset)
                        if isinstance(v, (bytes, bytearray))
                        else str(v)
                    )
                    for v in values
                ],
            )
        if vr in _TEXT_VRS:
            if len(values) == 1 and isinstance(values[0], str) and vr not in _SINGLE_VALUED_VRS:
                values = values[0].split("\\")
            return self._values(vr, [_converted_text(v, vr, level.charset) for v in values])
        # Unknown VR given in code: keep the value as bytes.
        return self._binary(level, tag, "UN", lambda: _to_bytes(value))

    def _encoded_value(self, level: _Level, tag: BaseTag, vr: str, data: bytes) -> dict[str, Any]:
        """A non-binary VR whose value was given as encoded bytes."""
        little = level.ds.original_encoding[1]
        raw = RawDataElement(
            tag, vr, len(data), data, 0, False, True if little is None else little
        )
        return self.raw_element(level, tag, raw)

    @staticmethod
    def _values(vr: str, values: list[Any]) -> dict[str, Any]:
        if not values or (len(values) == 1 and values[0] is None):
            return {"vr": vr}
        return {"vr": vr, "Value": values}


def _number_string_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and not hasattr(value, "original_string"):
        special = _special_float(value)
        if special is not None:
            return special
        return _json_number(float.__repr__(value))
    if isinstance(value, (bytes, bytearray)):
        return _json_number(bytes(value).decode("latin-1"))
    return _json_number(str(value))


def _converted_text(value: Any, vr: str, encodings: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        text = _decode(bytes(value), vr, encodings)
    elif isinstance(value, str):
        text = value
    elif vr in _DATE_TIME_TYPES and isinstance(value, (datetime.date, datetime.time)):
        try:
            text = str(_DATE_TIME_TYPES[vr](value))
        except Exception:
            text = str(value)
    else:
        text = str(value)
    return _text_value(text, vr)


def _value_length(vr: str, values: list[Any]) -> int:
    """Approximate encoded byte length of a converted value."""
    if vr in _NUMERIC_FORMATS:
        return _NUMERIC_FORMATS[vr][1] * len(values)
    total = max(len(values) - 1, 0)
    for value in values:
        text = "" if value is None else str(value)
        total += len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
    return total
