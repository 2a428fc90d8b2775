"""Transfer syntax conversion for instances retrieved over DIMSE and sent over the web.

The gateway receives each instance from the PACS (C-GET / C-MOVE sub-operations) as the encoded
data set (no File Meta Information) plus the transfer syntax it travelled in, and sends it to a
web client as a PS3.10 file in a transfer syntax the client accepted (PS3.18 8.7.3):
``file_meta_bytes(...) + data set bytes in that transfer syntax``.

Everything here is pure: bytes in, bytes out; the only work besides Python's is what the codecs
do in memory.

API
---
- :func:`file_meta_bytes`: preamble, ``DICM`` and group 0002 for a PS3.10 file.
- :func:`convert`: data set bytes from one transfer syntax to another, or :class:`NotProducible`.
- :func:`can_produce`: cheap check, without data, of what :func:`convert` can attempt.
- :func:`pick_target`: the transfer syntax to send, from the client's acceptable list (or ``"*"``).
- :func:`convert_to_first`: :func:`convert` to the first candidate that works for this instance.
- :func:`producible` / :data:`PRODUCIBLE`: what this installation can decode and encode, for the
  conformance statement.

What can be produced from what
------------------------------
Targets (what :func:`convert` writes), from any source listed below:

======================================  =========================  ===============================
Target transfer syntax                  Codec                      Lossy?
======================================  =========================  ===============================
1.2.840.10008.1.2.1   Explicit VR LE    (native, the default)      never
1.2.840.10008.1.2.1.99 Deflated EVR LE  zlib (raw deflate)         never
1.2.840.10008.1.2.5   RLE Lossless      pylibjpeg-rle (or pydicom) never
1.2.840.10008.1.2.4.80 JPEG-LS Lossless pyjpegls (CharLS)          never
1.2.840.10008.1.2.4.81 JPEG-LS Near-L.  pyjpegls (CharLS)          only if lossy_allowed (NEAR=2);
                                                                   otherwise NEAR=0, i.e. lossless
1.2.840.10008.1.2.4.90 JPEG 2000 L.     pylibjpeg-openjpeg         never
1.2.840.10008.1.2.4.91 JPEG 2000        pylibjpeg-openjpeg         only if lossy_allowed (10:1);
                                                                   otherwise reversible, lossless
1.2.840.10008.1.2.4.50 JPEG Baseline    Pillow                     always: needs lossy_allowed;
                                                                   8-bit unsigned MONOCHROME1/2,
                                                                   RGB, YBR_FULL only
======================================  =========================  ===============================

Never produced: Implicit VR Little Endian and Explicit VR Big Endian (not allowed on the web,
PS3.18 8.7.3), JPEG Lossless (.4.57) and JPEG Lossless SV1 (.4.70) (pydicom 3.0 has no encoder
for them, not even through GDCM), JPEG Extended (.4.51), HTJ2K (.4.201-.4.203), the MPEG/HEVC
video syntaxes, JPIP and anything unknown: those go out only unchanged, when the source already
is in them.

Sources (what :func:`convert` reads): Implicit VR LE, Explicit VR LE, Explicit VR Big Endian,
Deflated Explicit VR LE, and the compressed syntaxes pydicom 3.0 decodes with the installed
plugins: RLE (pylibjpeg-rle), JPEG Baseline and 8-bit JPEG Extended (Pillow, python-gdcm), JPEG
Lossless and Lossless SV1 (python-gdcm), JPEG-LS (pyjpegls), JPEG 2000 and HTJ2K
(pylibjpeg-openjpeg). 12-bit JPEG Extended needs pylibjpeg-libjpeg (GPL-3.0, not a dependency;
used when installed). Native to native never decodes pixels: Implicit VR and Big Endian data are
re-encoded element by element, values kept byte for byte (Big Endian ones byte-swapped by VR);
compressed to anything else decodes, then encodes. An instance without pixel data can only be
sent in a native syntax (a compressed label on a data set without pixel data is dropped for
free: the data set encoding is Explicit VR LE already).

:func:`pick_target` prefers the source syntax whenever it is acceptable (no work, no loss), then
follows the client's order.

Decisions
---------
- No silent lossy step: a lossy encoding happens only with ``lossy_allowed=True`` and a lossy
  target; lossless encodings are refused (:class:`NotProducible`) when a pixel value does not
  fit Bits Stored, since the codecs would drop the extra bits.
- A lossy step sets Lossy Image Compression "01" and appends Lossy Image Compression Ratio and
  Method (PS3.3 C.7.6.1.1.5). The SOP Instance UID is *not* changed, although PS3.3 suggests a
  new one for a lossy derivative: the web client asked for this representation of *this*
  instance (PS3.18 8.7.3 lets the origin server send a lossy rendition in the accepted transfer
  syntax), and a new UID would break every reference to the instance the client holds (the URL
  it asked for, its QIDO results, KOs and presentation states).
- Decoding JPEG Baseline/Extended (inherently lossy, YBR decoded to RGB by the codec) sets Lossy
  Image Compression "01" when the source omitted it. Other codecs are decoded without colour
  conversion (values kept exactly); JPEG 2000 multi-component data comes out RGB as the codec
  returns it.
- RGB into JPEG 2000 uses the multi-component transform (Photometric Interpretation YBR_RCT for
  lossless, YBR_ICT for lossy, PS3.5 8.2.4); JPEG Baseline colour is YBR_FULL_422 (4:2:2).
- Re-encoded Implicit VR / Big Endian data: ambiguous VRs resolved (US/SS by the nearest Pixel
  Representation, Pixel Data OB for Bits Allocated <= 8 else OW, Overlay/LUT data OW), private
  elements of unknown VR stay UN, values longer than 0xFFFF in a VR with a 16-bit length become
  UN (PS3.5 6.2.2), as do numeric values whose length does not fit their VR; sequences and items
  get defined lengths; group length elements (gggg,0000) and any group 0002 element are dropped
  since their values would be wrong after re-encoding (they are retired anyway). Big Endian
  Pixel Data of 32 or 64 Bits Allocated is swapped per pixel, 8/16-bit OW per 16-bit word.
"""

from __future__ import annotations

import array
import functools
import importlib.util
import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_sequence
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.uid import UID

from gateway.dimse.net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

from .syntaxes import (
    IMPLICIT_VR_LE,
    EXPLICIT_VR_LE,
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    HTJ2K,
    RLE_LOSSLESS,
    NEVER_ON_THE_WEB,
)

__all__ = [
    "DEFLATED_EXPLICIT_VR_LE",
    "EXPLICIT_VR_BE",
    "EXPLICIT_VR_LE",
    "IMPLICIT_VR_LE",
    "PASS_THROUGH_SYNTAXES",
    "PRODUCIBLE",
    "NotProducible",
    "can_produce",
    "convert",
    "convert_to_first",
    "file_meta_bytes",
    "is_web_safe",
    "pick_target",
    "producible",
]

#: Data set encodings without encapsulated pixel data.
NATIVE = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE})
#: Never sent to a web client (PS3.18 8.7.3, 8.6.2.1).
NOT_ON_THE_WEB = NEVER_ON_THE_WEB

# Encoder settings of the lossy targets (only used with lossy_allowed=True).
JPEG_BASELINE_QUALITY = 90
JPEG_LS_NEAR = 2  # maximum absolute error per sample
JPEG_2000_RATIO = 10.0  # compression ratio asked of OpenJPEG

_LOSSY_METHOD = {
    JPEG_BASELINE: "ISO_10918_1",
    JPEG_LS_NEAR_LOSSLESS: "ISO_14495_1",
    JPEG_2000: "ISO_15444_1",
}
# Targets encoded losslessly when lossy is not allowed: the codestream of the lossless syntax,
# labelled with the lossy one (both allow a lossless codestream: NEAR=0, reversible wavelet).
_LOSSLESS_STAND_IN = {JPEG_LS_NEAR_LOSSLESS: JPEG_LS_LOSSLESS, JPEG_2000: JPEG_2000_LOSSLESS}
_ALWAYS_LOSSY = frozenset({JPEG_BASELINE})
_DCT_SOURCES = frozenset({JPEG_BASELINE, JPEG_EXTENDED})

#: The common forms a PACS stores images in, which go to a web client unchanged (for
#: ``transfer-syntax=*`` or when the client accepts them): proposed to the PACS so that it can
#: send what it stores instead of decompressing. Explicit VR LE first; video syntaxes are left
#: out (each one costs a presentation context per SOP class).
PASS_THROUGH_SYNTAXES: tuple[str, ...] = (
    EXPLICIT_VR_LE,
    JPEG_LOSSLESS_SV1,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    RLE_LOSSLESS,
)

_ENCODED_TARGETS = (
    RLE_LOSSLESS,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    JPEG_BASELINE,
)
_DECODED_SOURCES = (
    RLE_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    HTJ2K,
)
# Preferred pydicom plugins, fastest first (pydicom's own RLE codec is pure Python and about a
# hundred times slower; GDCM decodes a multi-frame JPEG three times slower than Pillow). The
# others available are tried when these fail on a stream.
_DECODE_PLUGINS = {
    RLE_LOSSLESS: ("pylibjpeg", "gdcm", "pydicom"),
    JPEG_LS_LOSSLESS: ("pyjpegls", "pylibjpeg", "gdcm"),
    JPEG_LS_NEAR_LOSSLESS: ("pyjpegls", "pylibjpeg", "gdcm"),
}
_DEFAULT_DECODE_PLUGINS = ("pylibjpeg", "pyjpegls", "pillow", "gdcm")
_ENCODE_PLUGINS = {RLE_LOSSLESS: ("pylibjpeg", "gdcm", "pydicom")}

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
_EXTENDED_OFFSET_TABLE = (0x7FE00001, 0x7FE00002)


class NotProducible(Exception):
    """The requested transfer syntax cannot be produced for this instance (or at all here)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------ file meta ---


def _ui(value: str) -> bytes:
    b = value.strip(" \0").encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The 128-byte preamble, ``DICM`` and the File Meta Information (group 0002) of a PS3.10 file.

    A PS3.10 file is ``file_meta_bytes(...) + data set bytes`` encoded in `transfer_syntax`.
    """
    name = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    if len(name) % 2:
        name += b" "
    body = b"".join(
        (
            b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",
            _short(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
            _short(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
            _short(0x0002, 0x0010, b"UI", _ui(transfer_syntax)),
            _short(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _short(0x0002, 0x0013, b"SH", name),
        )
    )
    return b"".join((bytes(128), b"DICM", struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)), body))


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


# --------------------------------------------------------------- capability (import checks) ---


def _normalise(uid: str) -> str:
    return str(uid).strip(" \0")


def is_web_safe(transfer_syntax: str) -> bool:
    """False for the two transfer syntaxes that never go out on the web."""
    return _normalise(transfer_syntax) not in NOT_ON_THE_WEB


@functools.cache
def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _decoder_plugins(ts: str) -> tuple[str, ...]:
    """pydicom's usable decoding plugins for `ts`, preferred first; () when it can't decode."""
    if not _module_present("numpy"):
        return ()
    try:
        from pydicom.pixels import get_decoder

        available = get_decoder(ts).available_plugins
    except Exception:  # noqa: BLE001 - unknown syntax, broken plugin install
        return ()
    preferred = _DECODE_PLUGINS.get(ts, _DEFAULT_DECODE_PLUGINS)
    ordered = [p for p in preferred if p in available]
    return tuple(ordered + [p for p in available if p not in ordered])


@functools.cache
def _encoder_plugin(ts: str) -> str | None:
    """The pydicom encoding plugin used for `ts` ("" = pydicom's choice), None if unavailable."""
    if not _module_present("numpy"):
        return None
    if ts == JPEG_BASELINE:
        return "" if _module_present("PIL") else None
    try:
        from pydicom.pixels import get_encoder

        available = get_encoder(ts).available_plugins
    except Exception:  # noqa: BLE001 - unknown syntax, broken plugin install
        return None
    if not available:
        return None
    for plugin in _ENCODE_PLUGINS.get(ts, ()):
        if plugin in available:
            return plugin
    return ""


def _can_decode(ts: str) -> bool:
    return ts in _DECODED_SOURCES and bool(_decoder_plugins(ts))


def _can_encode(ts: str, lossy_allowed: bool) -> bool:
    if ts not in _ENCODED_TARGETS or _encoder_plugin(ts) is None:
        return False
    if ts in _LOSSLESS_STAND_IN and not lossy_allowed:
        return _encoder_plugin(_LOSSLESS_STAND_IN[ts]) is not None
    return lossy_allowed or ts not in _ALWAYS_LOSSY


def can_produce(source_ts: str, target_ts: str, *, has_pixel_data: bool, lossy_allowed: bool) -> bool:
    """Whether :func:`convert` can attempt `source_ts` -> `target_ts`, judged without the data.

    True does not promise success: the image may still not fit the codec (bit depth, photometric
    interpretation), and :func:`convert` then raises :class:`NotProducible`.
    """
    source_ts, target_ts = _normalise(source_ts), _normalise(target_ts)
    if source_ts == target_ts:
        return True
    if target_ts in NOT_ON_THE_WEB:
        return False
    native_target = target_ts in (EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE)
    if source_ts not in NATIVE:
        if source_ts not in _DECODED_SOURCES and source_ts not in _OTHER_COMPRESSED:
            return False
        if not has_pixel_data:  # the data set of a compressed syntax is plain Explicit VR LE
            return native_target
        if not _can_decode(source_ts):
            return False
    if native_target:
        return True
    return has_pixel_data and _can_encode(target_ts, lossy_allowed)


# Compressed syntaxes that are recognised (data set Explicit VR LE) though never decoded here.
_OTHER_COMPRESSED = (
    "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.100.1",
    "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.101.1",
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103",
    "1.2.840.10008.1.2.4.103.1",
    "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106",
    "1.2.840.10008.1.2.4.106.1",
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265
    "1.2.840.10008.1.2.4.108",
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.94",  # JPIP referenced
    "1.2.840.10008.1.2.4.95",
    "1.2.840.10008.1.2.4.110",  # JPEG XL
    "1.2.840.10008.1.2.4.111",
    "1.2.840.10008.1.2.4.112",
)


def pick_target(
    source_ts: str,
    acceptable: list[str] | Literal["*"],
    *,
    has_pixel_data: bool,
    lossy_allowed: bool,
) -> str | None:
    """The transfer syntax to send an instance stored in `source_ts` in, or None (-> 406).

    `acceptable` is the client's list, most preferred first, or ``"*"`` (PS3.18 8.7.3.5.2: "send
    as stored"). The source itself wins when it is acceptable (nothing to do); otherwise the first
    acceptable syntax that :func:`can_produce` allows. ``"*"`` (also as a list entry) stands for
    the source when it is web-safe, else Explicit VR LE. Implicit VR LE and Explicit VR Big
    Endian are never returned.
    """
    source_ts = _normalise(source_ts)
    web_source = source_ts if is_web_safe(source_ts) else EXPLICIT_VR_LE
    if acceptable == "*":
        candidates = [web_source]
    else:
        candidates = [web_source if _normalise(ts) == "*" else _normalise(ts) for ts in acceptable]
    candidates = [ts for ts in candidates if is_web_safe(ts)]
    if source_ts in candidates:
        return source_ts
    for ts in candidates:
        if can_produce(source_ts, ts, has_pixel_data=has_pixel_data, lossy_allowed=lossy_allowed):
            return ts
    return None


@dataclass(frozen=True)
class Capability:
    """What the code here does with one transfer syntax (a row of :data:`PRODUCIBLE`)."""

    transfer_syntax: str
    name: str
    lossy: Literal["never", "if allowed", "always"]  # as a target of convert()
    encoder: str  # the package that encodes it ("" = never a target; "-" = no codec needed)
    decoder: str  # the package that decodes it ("" = never decoded; "-" = no codec needed)


_OPENJPEG = "pylibjpeg-openjpeg"

#: Everything :func:`convert` knows, whether or not the codec packages are installed here;
#: :func:`producible` says what this installation can actually do.
PRODUCIBLE: dict[str, Capability] = {
    row.transfer_syntax: row
    for row in (
        Capability(IMPLICIT_VR_LE, "Implicit VR Little Endian", "never", "", "-"),
        Capability(EXPLICIT_VR_LE, "Explicit VR Little Endian", "never", "-", "-"),
        Capability(DEFLATED_EXPLICIT_VR_LE, "Deflated Explicit VR Little Endian", "never", "-", "-"),
        Capability(EXPLICIT_VR_BE, "Explicit VR Big Endian", "never", "", "-"),
        Capability(RLE_LOSSLESS, "RLE Lossless", "never", "pylibjpeg-rle", "pylibjpeg-rle"),
        Capability(JPEG_BASELINE, "JPEG Baseline (Process 1)", "always", "pillow", "pillow, python-gdcm"),
        Capability(JPEG_EXTENDED, "JPEG Extended (Process 2 & 4)", "never", "", "pillow, python-gdcm (8-bit)"),
        Capability(JPEG_LOSSLESS, "JPEG Lossless (Process 14)", "never", "", "python-gdcm"),
        Capability(JPEG_LOSSLESS_SV1, "JPEG Lossless SV1", "never", "", "python-gdcm"),
        Capability(JPEG_LS_LOSSLESS, "JPEG-LS Lossless", "never", "pyjpegls", "pyjpegls"),
        Capability(JPEG_LS_NEAR_LOSSLESS, "JPEG-LS Near-Lossless", "if allowed", "pyjpegls", "pyjpegls"),
        Capability(JPEG_2000_LOSSLESS, "JPEG 2000 (Lossless Only)", "never", _OPENJPEG, _OPENJPEG),
        Capability(JPEG_2000, "JPEG 2000", "if allowed", _OPENJPEG, _OPENJPEG),
        Capability(HTJ2K_LOSSLESS, "HTJ2K (Lossless Only)", "never", "", _OPENJPEG),
        Capability(HTJ2K_LOSSLESS_RPCL, "HTJ2K with RPCL (Lossless Only)", "never", "", _OPENJPEG),
        Capability(HTJ2K, "HTJ2K", "never", "", _OPENJPEG),
    )
}


def producible() -> dict[str, dict[str, bool]]:
    """What this installation can do now: ``{uid: {"encode": ..., "decode": ...}}``.

    ``encode``: :func:`convert` can write that syntax (lossy ones counted as if allowed);
    ``decode``: it can read pixel data from it. Native syntaxes need no codec.
    """
    table = {}
    for ts in PRODUCIBLE:
        if ts in NATIVE:
            table[ts] = {"encode": ts not in NOT_ON_THE_WEB, "decode": True}
        else:
            table[ts] = {"encode": _can_encode(ts, lossy_allowed=True), "decode": _can_decode(ts)}
    return table


def _name(ts: str) -> str:
    row = PRODUCIBLE.get(ts)
    return f"{row.name} ({ts})" if row else f"transfer syntax {ts}"


# ----------------------------------------------------------------------------- conversion ---


def convert(
    data: bytes | bytearray | memoryview,
    source_ts: str,
    target_ts: str,
    *,
    lossy_allowed: bool = False,
) -> tuple[bytes, str]:
    """Return (`data` re-encoded in `target_ts`, `target_ts`); `data` is a data set without meta.

    The same object is returned when the syntaxes are equal and `data` is ``bytes`` (other
    buffers are copied into ``bytes``). Raises :class:`NotProducible` with the reason when the
    target cannot be produced for this instance.
    """
    source_ts, target_ts = _normalise(source_ts), _normalise(target_ts)
    if source_ts == target_ts:
        return (data if isinstance(data, bytes) else bytes(data)), target_ts
    if target_ts in NOT_ON_THE_WEB:
        raise NotProducible(f"{_name(target_ts)} is never produced (not allowed on the web)")
    native_target = target_ts in (EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE)
    if not native_target:
        if target_ts in _ALWAYS_LOSSY and not lossy_allowed:
            raise NotProducible(f"{_name(target_ts)} is lossy and lossy compression is not allowed")
        if not _can_encode(target_ts, lossy_allowed):
            raise NotProducible(f"no encoder for {_name(target_ts)} in this installation")
    source_native = source_ts in NATIVE
    if not source_native and source_ts not in _DECODED_SOURCES + _OTHER_COMPRESSED:
        raise NotProducible(f"unknown source transfer syntax {source_ts}")

    # 1. the data set in Explicit VR Little Endian encoding (compressed syntaxes already are)
    if source_ts == DEFLATED_EXPLICIT_VR_LE:
        evrle: bytes | bytearray | memoryview = _inflate(data)
    elif source_ts == IMPLICIT_VR_LE:
        evrle = _reencode(data, little_endian=True)
    elif source_ts == EXPLICIT_VR_BE:
        evrle = _reencode(data, little_endian=False)
    else:
        evrle = data

    if source_native:
        if target_ts == EXPLICIT_VR_LE:
            return _as_bytes(evrle), target_ts
        if target_ts == DEFLATED_EXPLICIT_VR_LE:
            return _deflate(evrle), target_ts
        ds = _parse(evrle, EXPLICIT_VR_LE)
        _encode_pixels(ds, target_ts, lossy_allowed)
        return _write(ds), target_ts

    # 2. compressed source
    ds = _parse(evrle, source_ts)
    if _PIXEL_DATA not in ds:
        if native_target:  # nothing encapsulated: the data set already is Explicit VR LE
            return (_as_bytes(evrle) if target_ts == EXPLICIT_VR_LE else _deflate(evrle)), target_ts
        raise NotProducible("the instance has no Pixel Data, so it cannot be sent in a compressed syntax")
    if not _can_decode(source_ts):
        raise NotProducible(f"no decoder for {_name(source_ts)} in this installation")
    _decode_pixels(ds, source_ts)
    if target_ts == EXPLICIT_VR_LE:
        return _write(ds), target_ts
    if target_ts == DEFLATED_EXPLICIT_VR_LE:
        return _deflate(_write(ds)), target_ts
    _encode_pixels(ds, target_ts, lossy_allowed)
    return _write(ds), target_ts


def convert_to_first(
    data: bytes | bytearray | memoryview,
    source_ts: str,
    acceptable: list[str] | Literal["*"],
    *,
    lossy_allowed: bool = False,
) -> tuple[bytes, str]:
    """:func:`convert` to the first syntax :func:`pick_target` would choose that works for `data`.

    Unlike :func:`pick_target` it looks at the data, so an image the codec can't take (say, a
    16-bit CT for JPEG Baseline) falls through to the client's next choice. Raises
    :class:`NotProducible` (with the last reason) when nothing acceptable can be produced.
    """
    source_ts = _normalise(source_ts)
    has_pixels = _has_pixel_data(data, source_ts)
    web_source = source_ts if is_web_safe(source_ts) else EXPLICIT_VR_LE
    wanted = [web_source] if acceptable == "*" else [web_source if ts == "*" else ts for ts in acceptable]
    last = "no acceptable transfer syntax"
    tried: set[str] = set()
    while True:
        remaining = [ts for ts in wanted if _normalise(ts) not in tried]
        target = pick_target(source_ts, remaining, has_pixel_data=has_pixels, lossy_allowed=lossy_allowed)
        if target is None:
            raise NotProducible(last)
        tried.add(target)
        try:
            return convert(data, source_ts, target, lossy_allowed=lossy_allowed)
        except NotProducible as exc:
            last = exc.reason


def convert_for_storage(
    data: bytes | bytearray | memoryview, source_ts: str, accepted: Iterable[str]
) -> tuple[bytes, str]:
    """Re-encode a data set for a PACS that did not accept its own transfer syntax (STOW-RS).

    Tries the PACS's `accepted` syntaxes in this order: Explicit VR Little Endian, Implicit VR
    Little Endian (allowed here: it goes to the PACS, not to the web), then the others as given,
    never lossy (a compressed source is decoded, which adds no loss of its own). Raises
    :class:`NotProducible` with the last reason when none can be produced.
    """
    source = _normalise(source_ts)
    targets = list(dict.fromkeys(_normalise(ts) for ts in accepted))
    targets.sort(key=lambda ts: (ts != EXPLICIT_VR_LE, ts != IMPLICIT_VR_LE))
    last = "no transfer syntax accepted for this SOP class"
    for target in targets:
        try:
            if target == IMPLICIT_VR_LE:
                evrle, _ = convert(data, source, EXPLICIT_VR_LE)
                fp = DicomBytesIO()
                fp.is_implicit_VR = True
                fp.is_little_endian = True
                write_dataset(fp, _parse(evrle, EXPLICIT_VR_LE))
                return fp.getvalue(), target
            if target == EXPLICIT_VR_BE:
                last = "Explicit VR Big Endian is retired and never produced"
                continue
            return convert(data, source, target, lossy_allowed=False)
        except NotProducible as exc:
            last = exc.reason
    raise NotProducible(last)


def _has_pixel_data(data: bytes | bytearray | memoryview, source_ts: str) -> bool:
    """Whether the top-level data set has (7FE0,0010/0008/0009), without reading the values."""
    found = False

    def stop(tag: Any, vr: Any, length: int) -> bool:
        nonlocal found
        found = tag in (_PIXEL_DATA, *_FLOAT_PIXEL_DATA)
        return found or tag > _PIXEL_DATA

    if source_ts == DEFLATED_EXPLICIT_VR_LE:
        data = _inflate(data)
    try:
        read_dataset(
            io.BytesIO(data),
            source_ts == IMPLICIT_VR_LE,
            source_ts != EXPLICIT_VR_BE,
            stop_when=stop,
            defer_size=256,
        )
    except Exception:  # noqa: BLE001 - let convert() report whatever is wrong
        return True
    return found


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def _inflate(data: bytes | bytearray | memoryview) -> bytes:
    try:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        return d.decompress(data) + d.flush()
    except zlib.error:
        try:  # some writers add a zlib header, against PS3.5 A.5
            return zlib.decompress(data)
        except zlib.error as exc:
            raise NotProducible(f"the deflated data set does not inflate: {exc}") from None


def _deflate(data: bytes | bytearray | memoryview) -> bytes:
    # level 6 costs ~9x the time of level 1 on pixel data for ~2 % smaller output (512x512 CT:
    # 65 ms vs 7 ms); the small structured data sets deflate is meant for still get level 6
    level = 1 if len(data) > 256 * 1024 else 6
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _parse(data: bytes | bytearray | memoryview, ts: str) -> Dataset:
    try:
        ds = read_dataset(io.BytesIO(data), False, True)
    except Exception as exc:  # noqa: BLE001 - any undecodable data set
        raise NotProducible(f"the data set does not parse as Explicit VR Little Endian: {exc}") from None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds


def _write(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = False
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


# ---------------------------------------------------------------------------- pixel codecs ---


def _decode_pixels(ds: Dataset, ts: str) -> None:
    """Decompress in place (Explicit VR LE native pixel data), keeping the SOP Instance UID."""
    as_rgb = ts in _DCT_SOURCES  # the JPEG codec itself converts YBR to RGB
    errors = []
    for plugin in _decoder_plugins(ts):
        try:
            ds.decompress(decoding_plugin=plugin, as_rgb=as_rgb, generate_instance_uid=False)
            break
        except Exception as exc:  # noqa: BLE001 - a plugin failing on this stream: try the next
            errors.append(f"{plugin}: {exc}")
    else:
        raise NotProducible(f"could not decode {_name(ts)}: " + "; ".join(errors))
    for tag in _EXTENDED_OFFSET_TABLE:
        if tag in ds:
            del ds[tag]
    if ts in _DCT_SOURCES and "LossyImageCompression" not in ds:
        ds.LossyImageCompression = "01"


def _encode_pixels(ds: Dataset, target: str, lossy_allowed: bool) -> None:
    """Compress the native pixel data of `ds` in place into `target` or raise NotProducible."""
    if _PIXEL_DATA not in ds:
        if any(tag in ds for tag in _FLOAT_PIXEL_DATA):
            raise NotProducible("float pixel data cannot be sent in a compressed syntax")
        raise NotProducible("the instance has no Pixel Data, so it cannot be sent in a compressed syntax")
    lossy = target in _ALWAYS_LOSSY or (target in _LOSSLESS_STAND_IN and lossy_allowed)
    if lossy and not lossy_allowed:  # pragma: no cover - convert() checks first
        raise NotProducible(f"{_name(target)} is lossy and lossy compression is not allowed")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        spp = int(ds.SamplesPerPixel)
        bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        pixel_rep = int(ds.PixelRepresentation)
        photometric = str(ds.PhotometricInterpretation).strip()
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotProducible(f"incomplete Image Pixel module: {exc}") from None
    native_length = rows * columns * spp * frames * bits_allocated // 8
    if bits_allocated not in (8, 16, 32) or len(ds.PixelData) < native_length:
        raise NotProducible(
            f"{bits_allocated}-bit pixel data ({len(ds.PixelData)} bytes for {frames} frame(s)) "
            f"cannot be sent in {_name(target)}"
        )
    if not lossy:
        _check_fits_bits_stored(ds, bits_allocated, bits_stored, pixel_rep, native_length)
    if spp > 1 and int(ds.get("PlanarConfiguration") or 0) == 1:
        _interleave(ds, frames, spp, rows * columns * bits_allocated // 8, native_length)

    try:
        if target == JPEG_BASELINE:
            _encode_jpeg_baseline(ds, rows, columns, spp, bits_allocated, bits_stored, pixel_rep, photometric)
        else:
            uid = target if lossy else _LOSSLESS_STAND_IN.get(target, target)
            kwargs: dict[str, Any] = {}
            if lossy and uid == JPEG_LS_NEAR_LOSSLESS:
                kwargs["jls_error"] = JPEG_LS_NEAR
            elif lossy and uid == JPEG_2000:
                kwargs["j2k_cr"] = [JPEG_2000_RATIO]
            if uid in (JPEG_2000, JPEG_2000_LOSSLESS) and spp == 3 and photometric == "RGB":
                ds.PhotometricInterpretation = "YBR_ICT" if lossy else "YBR_RCT"
            plugin = _encoder_plugin(uid) or ""
            ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False, **kwargs)
            if spp > 1:
                ds.PlanarConfiguration = 0  # PS3.5 8.2: the codestream defines the component order
            ds.file_meta.TransferSyntaxUID = UID(target)
    except NotProducible:
        raise
    except Exception as exc:  # noqa: BLE001 - the codec refuses this image (profile, bit depth...)
        raise NotProducible(f"cannot encode this image in {_name(target)}: {exc}") from None

    if lossy:
        compressed = len(ds.PixelData)
        _mark_lossy(ds, native_length / max(compressed, 1), _LOSSY_METHOD[target])


def _check_fits_bits_stored(
    ds: Dataset, bits_allocated: int, bits_stored: int, pixel_rep: int, native_length: int
) -> None:
    """Lossless codecs keep Bits Stored bits: refuse pixel values that need more."""
    if bits_stored >= bits_allocated:
        return
    import numpy as np

    dtype = f"<{'i' if pixel_rep else 'u'}{bits_allocated // 8}"
    values = np.frombuffer(ds.PixelData, dtype=dtype, count=native_length // (bits_allocated // 8))
    if pixel_rep:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
        bad = values.size and (values.min() < low or values.max() > high)
    else:
        bad = values.size and values.max() >> bits_stored
    if bad:
        raise NotProducible(
            f"pixel values use more than Bits Stored ({bits_stored}) bits; a lossless codec would alter them"
        )


def _interleave(ds: Dataset, frames: int, spp: int, plane_bytes: int, native_length: int) -> None:
    """Planar Configuration 1 (colour-by-plane) -> 0: not every encoder plugin honours 1."""
    import numpy as np

    bytes_per_sample = plane_bytes // (int(ds.Rows) * int(ds.Columns))
    planes = np.frombuffer(ds.PixelData, dtype="u1", count=native_length)
    pixels = planes.reshape(frames, spp, -1, bytes_per_sample).transpose(0, 2, 1, 3)
    ds.PixelData = pixels.tobytes()
    ds[_PIXEL_DATA].VR = "OW" if bytes_per_sample > 1 else "OB"
    ds.PlanarConfiguration = 0


def _encode_jpeg_baseline(
    ds: Dataset,
    rows: int,
    columns: int,
    spp: int,
    bits_allocated: int,
    bits_stored: int,
    pixel_rep: int,
    photometric: str,
) -> None:
    from PIL import Image
    from pydicom.encaps import encapsulate

    if bits_allocated != 8 or bits_stored != 8 or pixel_rep != 0:
        raise NotProducible(f"{_name(JPEG_BASELINE)} takes 8-bit unsigned samples only")
    # pixel_array gives YBR_FULL as RGB; Pillow's encoder turns RGB into YCbCr 4:2:2
    modes = {(1, "MONOCHROME1"): "L", (1, "MONOCHROME2"): "L", (3, "RGB"): "RGB", (3, "YBR_FULL"): "RGB"}
    mode = modes.get((spp, photometric))
    if mode is None:
        raise NotProducible(f"{_name(JPEG_BASELINE)} does not take {photometric} with {spp} sample(s)")
    arr = ds.pixel_array  # (frames,) rows, columns(, samples), planar configuration undone
    if int(ds.get("NumberOfFrames") or 1) == 1:
        arr = arr[None]
    frames = []
    for frame in arr:
        out = io.BytesIO()
        image = Image.frombuffer(mode, (columns, rows), frame.tobytes(), "raw", mode, 0, 1)
        image.save(out, format="JPEG", quality=JPEG_BASELINE_QUALITY, subsampling="4:2:2")
        frames.append(out.getvalue())
    ds.PixelData = encapsulate(frames)
    elem = ds[_PIXEL_DATA]
    elem.VR = "OB"
    elem.is_undefined_length = True
    if spp == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = UID(JPEG_BASELINE)


def _mark_lossy(ds: Dataset, ratio: float, method: str) -> None:
    """PS3.3 C.7.6.1.1.5: record the lossy step (values appended to any earlier ones)."""

    def values(keyword: str) -> list[str]:
        value = ds.get(keyword)
        if value is None or value == "":
            return []
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            return [str(value)]
        return [str(v) for v in value]

    ratios = values("LossyImageCompressionRatio")
    methods = values("LossyImageCompressionMethod")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"[:16]]
    ds.LossyImageCompressionMethod = [*methods, method]


# ------------------------------------------------- Implicit VR LE / Big Endian -> Explicit LE ---

_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_VR_WIDTH = {
    "US": 2, "SS": 2, "OW": 2, "AT": 2,
    "UL": 4, "SL": 4, "FL": 4, "OF": 4, "OL": 4,
    "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8,
}  # fmt: skip
_ARRAY_CODE = {2: "H", 4: "I" if array.array("I").itemsize == 4 else "L", 8: "Q"}
_US_SS_PIXEL = frozenset(
    {0x00189810, 0x00221452, 0x00280071, 0x00280104, 0x00280105, 0x00280106, 0x00280107, 0x00280108,
     0x00280109, 0x00280110, 0x00280111, 0x00280120, 0x00280121, 0x00281100, 0x00281101, 0x00281102,
     0x00281103, 0x00281111, 0x00281112, 0x00281113, 0x00283002, 0x00409211, 0x00409216, 0x00603004,
     0x00603006}
)  # fmt: skip
_WAVEFORM_OB_OW = frozenset({0x54000110, 0x54000112, 0x5400100A, 0x54001010})
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def _swapped(value: bytes, width: int) -> bytes:
    """`value` with each `width`-byte unit byte-swapped (a trailing remainder is kept)."""
    usable = len(value) - len(value) % width
    if usable == 0:
        return value
    values = array.array(_ARRAY_CODE[width])
    values.frombytes(value[:usable])
    values.byteswap()
    return values.tobytes() + value[usable:]


def _reencode(data: bytes | bytearray | memoryview, *, little_endian: bool) -> bytes:
    """Implicit VR LE (`little_endian`) or Explicit VR BE data set bytes -> Explicit VR LE bytes.

    Values are copied byte for byte (Big Endian ones byte-swapped by their VR); only the element
    headers change. Nothing is decoded, so no value can be altered by a character set or number
    round trip.
    """
    implicit = little_endian
    try:
        ds = read_dataset(io.BytesIO(data), implicit, little_endian)
        chunks: list[bytes] = []
        _Reencoder(little_endian, chunks).dataset(ds, [ds])
    except NotProducible:
        raise
    except Exception as exc:  # noqa: BLE001 - any undecodable data set
        kind = "Implicit VR Little Endian" if implicit else "Explicit VR Big Endian"
        raise NotProducible(f"the data set does not parse as {kind}: {exc}") from None
    return b"".join(chunks)


class _Reencoder:
    def __init__(self, little_endian: bool, chunks: list[bytes]) -> None:
        self.little_endian = little_endian
        self.chunks = chunks

    def dataset(self, ds: Dataset, ancestors: list[Dataset]) -> int:
        """Append the elements of `ds`; return the number of bytes appended."""
        total = 0
        for tag in sorted(ds.keys()):
            if tag.element == 0 or tag.group == 0x0002 or tag.group == 0xFFFE:
                continue  # group lengths would be wrong after re-encoding; meta isn't data set
            total += self.element(ds, ds.get_item(tag), ancestors)
        return total

    def element(self, ds: Dataset, elem: DataElement | RawDataElement, ancestors: list[Dataset]) -> int:
        tag = int(elem.tag)
        if isinstance(elem, RawDataElement):
            value = elem.value or b""
            if elem.length != 0xFFFFFFFF and len(value) != elem.length:
                raise NotProducible(f"the data set is truncated in element {elem.tag}")
            vr = elem.VR if elem.VR else _implicit_vr(elem.tag, ds)
            if " or " in vr:
                vr = _resolve_ambiguous(tag, vr, len(value), ancestors)
            if vr == "SQ":
                if elem.length == 0xFFFFFFFF and not value:
                    return self.sequence(tag, [], ancestors)
                try:
                    seq = read_sequence(  # pydicom reads explicit VR data sent as implicit as such
                        io.BytesIO(value), elem.is_implicit_VR, self.little_endian, len(value), ds._character_set
                    )
                except Exception:  # noqa: BLE001 - not really a sequence (wrong private VR): keep bytes
                    vr = "UN"
                else:
                    return self.sequence(tag, list(seq), ancestors)
            width = _VR_WIDTH.get(vr)
            if width and tag == _PIXEL_DATA:
                bits = _int_value(ds, 0x00280100, self.little_endian)
                width = bits // 8 if bits in (32, 64) else 2  # 8-bit OW: swapped in pairs
            elif width and len(value) % (4 if vr == "AT" else width):
                vr, width = "UN", 0  # wrong length for its VR: keep the bytes, say UN
            if width and not self.little_endian:
                value = _swapped(value, width)
            if elem.length == 0xFFFFFFFF:  # undefined length, not a sequence: UN (PS3.5 6.2.2)
                vr = vr if vr in ("OB", "OW", "UN") else "UN"
                self.chunks.append(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, 0xFFFFFFFF))
                self.chunks.append(value)
                self.chunks.append(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
                return 12 + len(value) + 8
            return self._header_and_value(tag, vr, value)

        if elem.VR == "SQ":
            return self.sequence(tag, list(elem.value or []), ancestors)
        # a DataElement pydicom made while reading (rare): let pydicom encode it
        fp = DicomBytesIO()
        fp.is_implicit_VR = False
        fp.is_little_endian = True
        if " or " in elem.VR:
            elem.VR = _resolve_ambiguous(tag, elem.VR, len(elem.value or b""), ancestors)
        write_data_element(fp, elem)
        encoded = fp.getvalue()
        self.chunks.append(encoded)
        return len(encoded)

    def _header_and_value(self, tag: int, vr: str, value: bytes) -> int:
        if len(value) % 2:
            value += b"\0" if vr in ("UI", "OB", "UN") else b" "
        if vr not in _LONG_LENGTH_VRS and len(value) > 0xFFFF:
            vr = "UN"  # PS3.5 6.2.2
        if vr in _LONG_LENGTH_VRS:
            self.chunks.append(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)))
            size = 12
        else:
            self.chunks.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)))
            size = 8
        self.chunks.append(value)
        return size + len(value)

    def sequence(self, tag: int, items: list[Dataset], ancestors: list[Dataset]) -> int:
        header = len(self.chunks)
        self.chunks.append(b"")  # placeholder for the SQ header, once the length is known
        length = 0
        for item in items:
            at = len(self.chunks)
            self.chunks.append(b"")
            item_length = self.dataset(item, [item, *ancestors])
            self.chunks[at] = _ITEM + struct.pack("<I", item_length)
            length += 8 + item_length
        self.chunks[header] = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, length)
        return 12 + length


def _implicit_vr(tag: Any, ds: Dataset) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        pass
    if tag.is_private:
        if 0x0010 <= tag.element <= 0x00FF:
            return "LO"  # private creator
        creator_elem = ds.get_item((tag.group << 16) | (tag.element >> 8))
        if creator_elem is not None and tag.element > 0x00FF:
            creator = creator_elem.value
            if isinstance(creator, bytes):
                creator = creator.decode("latin-1")
            try:
                return private_dictionary_VR(tag, str(creator).strip(" \0"))
            except KeyError:
                pass
    return "UN"


def _int_value(ds: Dataset, tag: int, little_endian: bool) -> int | None:
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        if len(value) < 2:
            return None
        return struct.unpack_from("<H" if little_endian else ">H", value)[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _resolve_ambiguous(tag: int, vr: str, length: int, ancestors: list[Dataset]) -> str:
    """The explicit VR for an element whose dictionary VR is ambiguous (data from Implicit VR)."""
    ds = ancestors[0]
    if tag == _PIXEL_DATA or (tag >> 16) & 0xFF01 == 0x7F00 and tag & 0xFFFF == 0x0010:
        bits = _int_value(ds, 0x00280100, True)
        return "OB" if bits is not None and bits <= 8 else "OW"
    if tag in _US_SS_PIXEL:
        for level in ancestors:
            rep = _int_value(level, 0x00280103, True)
            if rep is not None:
                return "SS" if rep == 1 else "US"
        return "US"
    if tag in _WAVEFORM_OB_OW:
        bits = _int_value(ds, 0x54001004, True)
        return "OB" if bits is not None and bits <= 8 else "OW"
    if tag == 0x00283006:  # LUT Data: US when it is a single value (PS3.3 C.11.1.1.1)
        return "US" if length == 2 else "OW"
    if "OW" in vr:
        return "OW"
    return "UN"
