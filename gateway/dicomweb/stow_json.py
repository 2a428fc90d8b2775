"""STOW-RS with DICOM JSON metadata and bulk data (PS3.18 10.5, Annex F): parts to PS3.10 files.

A ``multipart/related; type="application/dicom+json"`` upload carries a JSON array of instances
in its first part and their bulk data in the following parts, each part named by a
``Content-Location`` equal to a ``BulkDataURI`` of the metadata. :func:`build_instances` turns
the whole set of parts into one PS3.10 file per instance; ``stow._store_json`` then checks and
stores those files exactly as it does uploaded ones.

What makes the whole request a 400 (:func:`gateway.problems.bad_request`), because no instance
can be read from it:

- the first part has a Content-Type other than ``application/dicom+json`` or
  ``application/json`` (parameters allowed; a ``charset`` other than UTF-8 is refused; a missing
  Content-Type is taken as DICOM JSON, since the request's ``type`` parameter says so);
- its body is not UTF-8 (a leading byte order mark is allowed), not JSON, or not an array of
  objects (a single object counts as an array of one); an empty array;
- a bulk data part without a Content-Location, two parts with the same one, or a bulk data part
  whose Content-Type cannot be parsed.

What makes one instance fail (``BuiltInstance.error``, FailureReason and a short reason; the
other instances go on): 0xC000 when its JSON cannot be read by pydicom, names a BulkDataURI that
no part carries, has no valid SOP Class UID and SOP Instance UID, holds VR UN, an item delimiter
tag, or a value pydicom cannot encode; 0xC122 for bulk pixel data in a form that is not
supported (see below). The UIDs are taken from the JSON even when pydicom cannot read it, so the
failure can still be reported in the FailedSOPSequence.

Bulk data media types
---------------------
A part without Content-Type is taken as ``application/octet-stream``.

- ``application/octet-stream`` (or any type with ``transfer-syntax=`` Explicit or Implicit VR
  Little Endian): the bytes are the value, little endian, as is.
- For the top-level Pixel Data (7FE0,0010) only, a compressed frame: ``image/jpeg`` (default
  JPEG Baseline), ``image/jls`` (JPEG-LS Lossless), ``image/jp2`` (JPEG 2000 Lossless),
  ``image/jpx`` (JPEG 2000 Part 2 Lossless), ``image/jphc`` (HTJ2K Lossless),
  ``image/dicom-rle`` (RLE Lossless), or any type with a ``transfer-syntax=`` parameter naming
  one of the still-image compressed syntaxes in :data:`COMPRESSED` (the parameter wins over the
  type's default). The part is one frame: it is encapsulated as one fragment with a Basic
  Offset Table (``pydicom.encaps.encapsulate``), Pixel Data becomes OB, and the file's transfer
  syntax is that syntax; Number of Frames must be absent or 1 (a multi-frame instance would need
  one part per frame, which is not supported). Since only the top-level Pixel Data can be
  compressed, an instance has at most one compressed transfer syntax.
- ``image/png``, ``image/gif``, ``video/*``, other types and transfer syntaxes (video, JPIP, Big
  Endian, Deflated, unknown) are refused for pixel data (0xC122), as is any compressed type on
  another element or on nested Pixel Data (icons are never encapsulated, PS3.5 A.4).
- Other elements (not Pixel Data, Float Pixel Data or Double Float Pixel Data) take the bytes of
  any other type as is: ``application/pdf`` for Encapsulated Document, for example.
- Bulk data of numeric VRs (FL, FD, SL, SS, SV, UL, US, UV, AT) and of IS and DS is decoded into
  values (little endian), since pydicom keeps those as numbers; a length that does not fit the
  VR fails the instance (0xC000). Text VRs (LT, ST, UT, UC, ...) keep the bytes, taken to be in
  the instance's Specific Character Set.

Bulk data parts that no instance references are ignored (neither an error nor a warning): the
response lists instances, and an unused part does not stop any of them from being stored.

The data set is written in Explicit VR Little Endian (also for the encapsulated syntaxes, whose
data set encoding is the same) after File Meta from :func:`transcode.file_meta_bytes`. Top-level
group 0000 and 0002 elements and group lengths from the JSON are dropped. JSON text is Unicode
and has no byte encoding: when a text value cannot be encoded in the Specific Character Set the
JSON declares (or in ASCII, the default repertoire, when it declares none), the instance is written with
Specific Character Set ``ISO_IR 192`` (UTF-8) at the top level and without the nested ones,
rather than with replacement characters.

Failure reasons are kept free of element values as far as pydicom's messages allow: only their
first line is used (pydicom appends the element, value included, on further lines), they are cut
after pydicom's "could not be loaded from JSON" (the value follows), quoted text is kept only
when it is a tag, a VR, a key of the DICOM JSON model or a Python type name, and the whole is at
most 200 characters. A message that named a value without quotes would still carry it.

pydicom's own warnings while reading the JSON (invalid values, for example) go to Python's
warnings and the ``pydicom`` logger as usual; they do not fail the instance, since the PACS
decides what it accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import Tag
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_value

from gateway.dimse.store import CANNOT_UNDERSTAND
from gateway.dimse.store import TRANSFER_SYNTAX_NOT_SUPPORTED as SYNTAX_NOT_SUPPORTED
from gateway.problems import bad_request

from .multipart import MultipartError, parse_content_type
from .negotiation import OCTET_STREAM, is_uid
from .syntaxes import (
    EXPLICIT_VR_LE,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    HTJ2K,
    IMPLICIT_VR_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_2000_MC,
    JPEG_2000_MC_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    RLE_LOSSLESS,
)
from .transcode import file_meta_bytes

__all__ = ["COMPRESSED", "MEDIA_TYPE_SYNTAX", "BuiltInstance", "build_instances"]

# FailureReason codes (PS3.18 Table I.2-2; the same as stow.py's)

#: Still-image compressed transfer syntaxes a bulk data part may carry for Pixel Data.
COMPRESSED = frozenset({
    JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS, JPEG_2000, JPEG_2000_MC_LOSSLESS, JPEG_2000_MC, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K,
    RLE_LOSSLESS,
})
#: The transfer syntax of a compressed media type without a ``transfer-syntax`` parameter.
MEDIA_TYPE_SYNTAX = {
    "image/jpeg": JPEG_BASELINE,
    "image/jls": JPEG_LS_LOSSLESS,
    "image/jp2": JPEG_2000_LOSSLESS,
    "image/jpx": JPEG_2000_MC_LOSSLESS,
    "image/jphc": HTJ2K_LOSSLESS,
    "image/dicom-rle": RLE_LOSSLESS,
}
_NATIVE_LE = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE})
_METADATA_TYPES = ("application/dicom+json", "application/json")
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA})  # Float, Double Float, Pixel Data
# VRs whose bulk data (little endian bytes) is decoded into values; the others keep the bytes
_DECODED_VRS = frozenset({"AT", "DS", "FD", "FL", "IS", "SL", "SS", "SV", "UL", "US", "UV"})
_REASON_LIMIT = 200


@dataclass
class BuiltInstance:
    """One instance of the metadata array, as a PS3.10 file or as the reason it is not one."""

    data: bytearray  # the PS3.10 file (preamble, DICM, File Meta, data set); empty when error is set
    sop_class: str | None = None
    sop_instance: str | None = None
    study: str | None = None
    series: str | None = None
    error: tuple[int, str] | None = None  # (FailureReason, short reason without patient data)


@dataclass(frozen=True)
class _Bulk:
    part: int  # 1-based position in the multipart body
    media: str
    params: dict[str, str]
    value: bytes


class _Failed(Exception):
    """This instance cannot be built: (FailureReason, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def build_instances(parts: list[tuple[dict[str, str], bytearray]]) -> list[BuiltInstance]:
    """parts[0] is the metadata part (headers with lower-cased names, body bytes); the rest are bulk data parts.

    Returns one :class:`BuiltInstance` per object of the metadata array, in order. Raises
    :class:`gateway.problems.HttpProblem` (400) when the parts as a whole cannot be used.
    """
    if not parts:
        raise bad_request("the multipart body holds no part")
    headers, body = parts[0]
    _check_metadata_type(headers.get("content-type"))
    objects = _metadata(body)
    bulk = _bulk_parts(parts[1:])
    return [_build(obj, bulk) for obj in objects]


# ------------------------------------------------------------------------------------------------
# The parts


def _check_metadata_type(value: str | None) -> None:
    if value is None:
        return
    try:
        media, params = parse_content_type(value)
    except MultipartError as exc:
        raise bad_request(f"the Content-Type of the metadata part (part 1) cannot be read: {exc}") from None
    if media not in _METADATA_TYPES:
        raise bad_request(f"the first part must be the application/dicom+json metadata, not {media}")
    charset = params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise bad_request(f"the metadata part must be UTF-8, not charset={charset}")


def _metadata(body: bytes | bytearray) -> list[dict[str, Any]]:
    try:
        text = bytes(body).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the metadata part is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the metadata part is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno} (char {exc.pos})") from None
    except RecursionError:
        raise bad_request("the metadata part is not usable JSON: it is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's conversion limit
        raise bad_request(f"the metadata part is not usable JSON: {exc}") from None
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise bad_request("the metadata part must be a JSON array of DICOM JSON objects, "
                          f"not a JSON {type(value).__name__}")
    if not value:
        raise bad_request("the metadata array is empty: there is no instance to store")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad_request(f"item {i + 1} of the metadata array is not a JSON object")
    return value


def _bulk_parts(parts: Iterable[tuple[dict[str, str], bytearray]]) -> dict[str, _Bulk]:
    table: dict[str, _Bulk] = {}
    for number, (headers, body) in enumerate(parts, start=2):
        location = (headers.get("content-location") or "").strip()
        if not location:
            raise bad_request(f"bulk data part {number} has no Content-Location: it cannot be matched to a "
                              "BulkDataURI")
        if location in table:
            raise bad_request(f"parts {table[location].part} and {number} have the same Content-Location")
        try:
            media, params = parse_content_type(headers.get("content-type") or OCTET_STREAM)
        except MultipartError as exc:
            raise bad_request(f"the Content-Type of bulk data part {number} cannot be read: {exc}") from None
        table[location] = _Bulk(number, media, params, bytes(body))
    return table


# ------------------------------------------------------------------------------------------------
# One instance


def _build(obj: dict[str, Any], bulk: dict[str, _Bulk]) -> BuiltInstance:
    built = BuiltInstance(bytearray(), _json_uid(obj, "00080016"), _json_uid(obj, "00080018"),
                          _json_uid(obj, "0020000D"), _json_uid(obj, "0020000E"))
    try:
        ds, syntax = _dataset(obj, bulk)
        for keyword, attr in (("SOPClassUID", "sop_class"), ("SOPInstanceUID", "sop_instance"),
                              ("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series")):
            setattr(built, attr, _uid(ds.get(keyword)))
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
            raise _Failed(CANNOT_UNDERSTAND, "SOP Class UID or SOP Instance UID missing")
        if built.sop_class is None or built.sop_instance is None:
            raise _Failed(CANNOT_UNDERSTAND, "SOP Class UID or SOP Instance UID is not a valid UID")
        built.data = _write(ds, built.sop_class, built.sop_instance, syntax)
    except _Failed as exc:
        built.error = (exc.status, exc.reason)
    return built


def _dataset(obj: dict[str, Any], bulk: dict[str, _Bulk]) -> tuple[Dataset, str]:
    """The data set of one JSON object, and the transfer syntax its Pixel Data calls for."""
    calls: list[tuple[int, _Bulk]] = []

    def handler(tag: str, vr: str, uri: str) -> Any:
        part = _lookup(bulk, uri)
        if part is None:
            raise _Failed(CANNOT_UNDERSTAND, "BulkDataURI not found among the parts")
        calls.append((int(tag, 16), part))
        if vr in _DECODED_VRS:  # pydicom holds these as numbers, not bytes
            raw = RawDataElement(Tag(int(tag, 16)), vr, len(part.value), part.value, 0, False, True)
            return convert_value(vr, raw)
        return part.value

    try:
        ds = Dataset.from_json(obj, bulk_data_uri_handler=handler)
    except _Failed:
        raise
    except Exception as exc:  # pydicom raises many types on malformed client JSON
        raise _Failed(CANNOT_UNDERSTAND, "the DICOM JSON cannot be read: " + _describe(exc)) from None
    for tag in [t for t in ds.keys() if t.group in (0x0000, 0x0002) or t.element == 0]:
        del ds[tag]

    top = _top_pixel_part(obj, bulk)
    top_calls = [part for tag, part in calls if tag == _PIXEL_DATA and part is top]
    syntax = EXPLICIT_VR_LE
    for tag, part in calls:
        kind, detail = _classify(part)
        if tag == _PIXEL_DATA and part is top and len(top_calls) == 1:
            if kind == "other":
                raise _Failed(SYNTAX_NOT_SUPPORTED, detail)
            if kind == "compressed":
                syntax = detail
        elif kind == "compressed":
            raise _Failed(SYNTAX_NOT_SUPPORTED, "compressed bulk data is only supported for the top-level Pixel Data")
        elif kind == "other" and tag in _PIXEL_TAGS:
            raise _Failed(SYNTAX_NOT_SUPPORTED, detail)
    if syntax != EXPLICIT_VR_LE:
        _encapsulate(ds, top.value if top is not None else b"")
    return ds, syntax


def _top_pixel_part(obj: dict[str, Any], bulk: dict[str, _Bulk]) -> _Bulk | None:
    for key, element in obj.items():
        if key.upper() == "7FE00010" and isinstance(element, dict):
            uri = element.get("BulkDataURI")
            if isinstance(uri, list) and uri:
                uri = uri[0]
            if isinstance(uri, str):
                return _lookup(bulk, uri)
    return None


def _lookup(bulk: dict[str, _Bulk], uri: str) -> _Bulk | None:
    """The part whose Content-Location is `uri`, exactly or without surrounding whitespace."""
    return bulk.get(uri) or bulk.get(uri.strip())


def _classify(part: _Bulk) -> tuple[str, str]:
    """("native", ""), ("compressed", transfer syntax) or ("other", why it is no pixel data)."""
    media = part.media
    if media in ("image/png", "image/gif") or media.startswith("video/"):
        return "other", f"{media} is not supported as pixel data"
    ts = part.params.get("transfer-syntax")
    if ts is not None:
        ts = ts.strip()
        if ts in _NATIVE_LE:
            return "native", ""
        if ts in COMPRESSED:
            return "compressed", ts
        named = ts if is_uid(ts) else "named by the transfer-syntax parameter"
        return "other", f"transfer syntax {named} is not supported for bulk pixel data"
    if media == OCTET_STREAM:
        return "native", ""
    if media in MEDIA_TYPE_SYNTAX:
        return "compressed", MEDIA_TYPE_SYNTAX[media]
    return "other", f"{media} is not supported as pixel data"


def _encapsulate(ds: Dataset, frame: bytes) -> None:
    frames = ds.get("NumberOfFrames")
    if frames not in (None, ""):
        try:
            count = int(frames)
        except (TypeError, ValueError):
            raise _Failed(CANNOT_UNDERSTAND, "Number of Frames is not a number") from None
        if count != 1:
            raise _Failed(SYNTAX_NOT_SUPPORTED, "compressed multi-frame bulk data in one part is not supported")
    elem = DataElement(_PIXEL_DATA, "OB", encapsulate([frame]))
    elem.is_undefined_length = True
    ds[_PIXEL_DATA] = elem


# ------------------------------------------------------------------------------------------------
# Writing


def _write(ds: Dataset, sop_class: str, sop_instance: str, syntax: str) -> bytearray:
    try:
        if _needs_utf8(ds, []):
            _use_utf8(ds)
        _check_writable(ds, [])
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        fp.write(file_meta_bytes(sop_class, sop_instance, syntax))
        write_dataset(fp, ds)
        return bytearray(fp.getvalue())
    except _Failed:
        raise
    except Exception as exc:  # values pydicom cannot encode, from client input
        raise _Failed(CANNOT_UNDERSTAND, "the data set cannot be encoded: " + _describe(exc)) from None


def _charsets(ds: Dataset, inherited: list[str]) -> list[str]:
    declared = ds.get("SpecificCharacterSet")
    if not declared:
        return inherited
    return [declared] if isinstance(declared, str) else [str(v) for v in declared]


def _needs_utf8(ds: Dataset, inherited: list[str]) -> bool:
    """True when some text value cannot be encoded in the character set in effect for it."""
    charsets = _charsets(ds, inherited)
    codecs: list[str] | None = None
    for elem in ds:
        if elem.VR == "SQ":
            if any(_needs_utf8(item, charsets) for item in elem.value):
                return True
        elif elem.VR in CUSTOMIZABLE_CHARSET_VR and not elem.is_empty:
            for value in (elem.value if elem.VM > 1 else [elem.value]):
                text = str(value)
                if text.isascii():
                    continue
                # no Specific Character Set: the default repertoire, ASCII (pydicom would write Latin-1)
                codecs = codecs or (convert_encodings(charsets) if charsets else ["ascii"])
                if not _encodable(text, codecs):
                    return True
    return False


def _encodable(text: str, codecs: list[str]) -> bool:
    for codec in codecs:
        try:
            text.encode(codec)
            return True
        except UnicodeError:
            continue
        except LookupError:  # a codec pydicom handles itself: trust it
            return True
    if len(codecs) == 1:
        return False
    return all(any(_encodes(ch, codec) for codec in codecs) for ch in set(text) if not ch.isascii())


def _encodes(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
        return True
    except (UnicodeError, LookupError):
        return False


def _use_utf8(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"

    def drop_nested(item: Dataset) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for nested in elem.value:
                    if "SpecificCharacterSet" in nested:
                        del nested.SpecificCharacterSet
                    drop_nested(nested)

    drop_nested(ds)


def _check_writable(ds: Dataset, inherited: list[str]) -> None:
    """Refuse what would not be stored as sent: VR UN, item delimiters as elements, and values too
    long for a 16-bit length (pydicom would silently write those as UN)."""
    charsets = _charsets(ds, inherited)
    for elem in ds:
        where = f"element ({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.tag.group == 0xFFFE:
            raise _Failed(CANNOT_UNDERSTAND, f"{where} is an item delimitation tag, not an attribute")
        if elem.VR == "UN":
            raise _Failed(CANNOT_UNDERSTAND, f"{where} has VR UN, which cannot be stored as sent")
        if elem.VR == "SQ":
            for item in elem.value:
                _check_writable(item, charsets)
        elif elem.VR not in EXPLICIT_VR_LENGTH_32:
            trial = DicomBytesIO()
            trial.is_little_endian = True
            trial.is_implicit_VR = False
            write_data_element(trial, elem, charsets or None)
            if trial.getvalue()[4:6] == b"UN":
                raise _Failed(CANNOT_UNDERSTAND, f"{where} ({elem.VR}) has a value longer than 65534 bytes")


# ------------------------------------------------------------------------------------------------
# Small helpers


def _uid(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip(" \0")
    return value if is_uid(value) else None


def _json_uid(obj: dict[str, Any], tag: str) -> str | None:
    element = obj.get(tag) or obj.get(tag.lower())
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if isinstance(values, list) and len(values) == 1:
        return _uid(values[0])
    return None


_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_SAFE_QUOTED = re.compile(
    r"[0-9A-Fa-f]{8}|\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)|[A-Z]{2}|vr|Value|BulkDataURI|InlineBinary"
    r"|Alphabetic|Ideographic|Phonetic|NoneType|bool|int|float|str|bytes|bytearray|list|dict|tuple"
    r"|MultiValue|Dataset|Sequence|PersonName|DSfloat|DSdecimal|IS|UID"
)
_CUT_AFTER = "could not be loaded from JSON"


def _describe(exc: BaseException) -> str:
    """The exception's type and message without quoted values, at most 200 characters."""
    text = str(exc).split("\n", 1)[0]  # pydicom appends the element, value included, on further lines
    cut = text.find(_CUT_AFTER)
    if cut >= 0:  # pydicom appends the element's value here
        text = text[:cut + len(_CUT_AFTER)]
        if exc.__cause__ is not None:
            text += f" ({type(exc.__cause__).__name__})"
    text = _QUOTED.sub(_keep_if_safe, text)
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = f"{name}: {text}" if text else name
    return text if len(text) <= _REASON_LIMIT else text[:_REASON_LIMIT - 3] + "..."


def _keep_if_safe(match: re.Match[str]) -> str:
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    return match.group(0) if _SAFE_QUOTED.fullmatch(inner) else "'...'"

