"""Structural check of a PS3.10 file before its bytes go to the PACS unchanged (STOW-RS).

STOW-RS hands the gateway one PS3.10 file per part, and the gateway passes the encoded data set
on to the PACS with C-STORE as it is. A truncated or corrupt instance must be caught here: once
the PACS has stored it, nobody notices until a viewer fails to open it. Decoding the whole file
with pydicom would find most problems, but it converts values (slow for a 500 MB multi-frame
object, and beside the point: nothing here needs the values) and it is lenient where this check
must not be. So ``inspect`` walks the element structure of the whole file itself, with
``struct.unpack_from`` on a memoryview: every element header is read, every value is skipped in
O(1) without being copied, and every length has to fit where it is. Only the File Meta UIDs and
the top-level SOP Class, SOP Instance, Study and Series Instance UIDs are read as text.

What is checked (PS3.10 7.1, PS3.5 7.1 to 7.6, A.4, A.5):

- a 128-byte preamble and ``DICM``, then the File Meta group (0002) in Explicit VR Little Endian,
  walked element by element up to the first tag of another group. (0002,0000) is used only as a
  cross-check: a group length that disagrees with the walk is an error. (0002,0010) is required.
- the data set in its transfer syntax: Implicit VR Little Endian, Explicit VR Big Endian, the
  deflated syntaxes (Deflated Explicit VR Little Endian and the two JPIP Referenced Deflate ones,
  inflated in memory first), and Explicit VR Little Endian for every other UID (all the others,
  compressed ones included, use it and encapsulate their pixel data).
- explicit VRs must be one of the 34 VRs of PS3.5 6.2. An unknown VR is an error, not "read it
  like UN": the VR decides the size of the length field, so a wrong guess would only move the
  error further down, and in practice unknown VR bytes mean that the file is corrupt or not in
  the transfer syntax it claims.
- sequences and items with defined lengths must end exactly where they say, those with undefined
  lengths must be closed by their delimitation items (whose length must be 0); nesting deeper than
  ``max_depth`` sequences is an error. Undefined-length UN holds an Implicit VR Little Endian
  sequence (PS3.5 6.2.2); undefined-length OB and OW (encapsulated pixel data, PS3.5 A.4) hold
  fragments: items with defined lengths up to a sequence delimiter. In Implicit VR, a defined
  length element whose tag is an SQ in the data dictionary is walked as a sequence too, so that
  truncation or corruption inside it is found; private elements with defined lengths are skipped,
  and so is defined-length UN in explicit syntaxes (its content is opaque without trusting the
  dictionary over the file; its length still has to fit).
- every element must fit in what is left of the input or of its enclosing item; odd lengths are
  tolerated. Tags need not ascend, but groups 0000 (command) and 0002 (File Meta) must not appear
  at the top level of the data set: the first is how zeros at the end of an Implicit VR file read,
  the second would make receivers take the data set for File Meta.
- the data set must end exactly at the end of the input (a (FFFC,FFFC) Data Set Trailing Padding
  element is an ordinary element). After a deflated stream, only a single NUL pad byte (written
  to make the length even) and a gzip-style CRC-32 and size trailer that match the inflated data
  (some writers add one) are accepted.

PS3.10 has no overall length, so a file cut exactly at the end of a top-level element looks like a
complete, shorter data set. Two such cuts are caught anyway: nothing at all after the File Meta,
and an image whose top level has Rows (0028,0010) but no pixel data element ((7FE0,0008),
(7FE0,0009), (7FE0,0010), or a Pixel Data Provider URL (0028,7FE0) instead). A cut before
(0008,0016) or (0008,0018) leaves the caller without the UIDs it must check anyway. Other cuts at
top-level element boundaries (between those UIDs and Rows, or after the pixel data) cannot be
told from a complete file. Uploads cut off in transit are caught earlier, by the multipart
framing; ``peek_uids`` then names the instance that failed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

from .syntaxes import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE

JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
JPIP_HTJ2K_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.205"
DEFLATED_SYNTAXES = frozenset({DEFLATED_EXPLICIT_VR_LE, JPIP_REFERENCED_DEFLATE, JPIP_HTJ2K_REFERENCED_DEFLATE})
"""Transfer syntaxes whose data set is a raw deflate stream of Explicit VR Little Endian (PS3.5 A.5)."""

UNDEFINED_LENGTH = 0xFFFFFFFF

_PREAMBLE = 128
_PREFIX = b"DICM"
_META_START = _PREAMBLE + len(_PREFIX)
_UID_READ_LIMIT = 1024
"""UID values are decoded up to this many bytes; anything longer is not a UID anyway."""

# PS3.5 Table 7.1-1 and 7.1-2: VRs with 2 reserved bytes and a 4-byte length, and the others.
_LONG_VRS = frozenset({
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
})
_SHORT_VRS = frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
    b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
})
_FRAGMENT_VRS = frozenset({b"OB", b"OW"})

_ITEM = 0xE000
_ITEM_END = 0xE00D
_SEQUENCE_END = 0xE0DD
_ITEM_GROUP = 0xFFFE

_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA, 0x00287FE0})
"""Float, Double Float and Pixel Data, and Pixel Data Provider URL (pixel data held elsewhere)."""
_ROWS = 0x00280010

_TOP_UIDS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
}
_LAST_UID = max(_TOP_UIDS)
_META_UIDS = {
    0x00020002: "media_sop_class",
    0x00020003: "media_sop_instance",
    0x00020010: "transfer_syntax",
}


@dataclass
class P10Info:
    """What the walk read. UIDs are as found (trailing NULs and spaces removed), not validated;
    None when absent or empty."""

    transfer_syntax: str | None = None  # (0002,0010)
    media_sop_class: str | None = None  # (0002,0002)
    media_sop_instance: str | None = None  # (0002,0003)
    sop_class_uid: str | None = None  # (0008,0016), top level of the data set
    sop_instance_uid: str | None = None  # (0008,0018)
    study_instance_uid: str | None = None  # (0020,000D)
    series_instance_uid: str | None = None  # (0020,000E)
    dataset_offset: int = 0
    """Offset in the input where the data set starts, after the File Meta group (for a deflated
    syntax: where the deflated stream starts)."""
    elements: int = 0
    """Data elements walked in the data set, at all levels (File Meta, items, delimiters and pixel
    data fragments not counted)."""


class P10Error(ValueError):
    """The part is not a valid PS3.10 file.

    ``str(exc)`` is a short reason that can go to the client. ``info`` holds whatever was read
    before the problem was found (UIDs may be None).
    """

    info: P10Info

    def __init__(self, reason: str, info: P10Info | None = None) -> None:
        super().__init__(reason)
        self.info = info if info is not None else P10Info()


class _Truncated(P10Error):
    """The input ran out: the file is cut off (``peek_uids`` may inflate more and try again)."""


class _Found(Exception):
    """``peek_uids`` has all it looks for, or has gone past where it could be."""


def inspect(data: bytes | bytearray | memoryview, *, max_depth: int = 32) -> P10Info:
    """Check the whole PS3.10 file and return what was read; raise P10Error otherwise.

    ``max_depth`` is how many sequences may be nested in one another (a top-level sequence is 1).
    """
    with memoryview(data) as view, view.cast("B") as buf:
        info = P10Info()
        try:
            _check(buf, info, max_depth)
        except P10Error as exc:
            if info.transfer_syntax in DEFLATED_SYNTAXES and info.sop_instance_uid is None:
                _uids_from_partial_inflate(buf, info)  # the inflate failed, or the walk early on
            exc.info = info
            raise
        except RecursionError:
            raise P10Error("sequences are nested too deeply", info) from None
        return info


def peek_uids(data: bytes | bytearray | memoryview) -> P10Info:
    """Best effort, never raises: read the File Meta and the top-level UIDs from the start of a
    possibly incomplete file (used when an upload is cut off mid-part, to name the failed
    instance). Stops as soon as the four top-level UIDs are found, or at the first top-level tag
    after (0020,000E)."""
    info = P10Info()
    try:
        with memoryview(data) as view, view.cast("B") as buf:
            _peek(buf, info)
    except Exception:  # noqa: BLE001 - best effort: whatever was read so far is the answer
        return info
    return info


# ------------------------------------------------------------------------------------------------
# File Meta and transfer syntax


def _check(buf: memoryview, info: P10Info, max_depth: int) -> None:
    pos = _read_meta(buf, info)
    ts = info.transfer_syntax
    if ts is None:
        raise P10Error("the File Meta Information has no TransferSyntaxUID (0002,0010)")
    if pos == len(buf):
        raise _Truncated("truncated: no data set after the File Meta Information")
    syntax = _syntax(ts)
    if ts in DEFLATED_SYNTAXES:
        with memoryview(_inflate(buf[pos:])) as inflated:
            if not inflated:
                raise _Truncated("truncated: the deflated data set is empty")
            walker = _Walker(inflated, info, max_depth)
            walker.dataset(0, len(inflated), False, syntax, 0, delimited=False, top=True)
    else:
        walker = _Walker(buf, info, max_depth)
        walker.dataset(pos, len(buf), False, syntax, 0, delimited=False, top=True)
    if walker.rows and not walker.pixels:
        raise _Truncated("truncated: the data set has Rows (0028,0010) but no Pixel Data")


def _peek(buf: memoryview, info: P10Info) -> None:
    try:
        pos = _read_meta(buf, info)
    except P10Error:
        return
    ts = info.transfer_syntax
    if ts is None or pos >= len(buf):
        return
    syntax = _syntax(ts)
    if ts not in DEFLATED_SYNTAXES:
        _peek_walk(buf, info, syntax)
        return
    # Inflate as much as the input allows, a growing slice at a time: the UIDs are near the start,
    # so most of a large deflated object never needs inflating.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    chunk = 16 * 1024
    want = 64 * 1024
    while True:
        failed = False
        while len(inflated) < want and pos < len(buf) and not inflater.eof:
            saved = inflater.copy()
            try:
                inflated += inflater.decompress(buf[pos:pos + chunk])
            except zlib.error:
                # Keep what inflates before the bad spot: go over the chunk again byte by byte.
                inflater = saved
                for byte in range(pos, min(pos + chunk, len(buf))):
                    try:
                        inflated += inflater.decompress(buf[byte:byte + 1])
                    except zlib.error:
                        break
                failed = True
                break
            pos += chunk
        complete = failed or pos >= len(buf) or inflater.eof
        if _peek_walk(memoryview(inflated), info, syntax) or complete:
            return
        want *= 2


def _uids_from_partial_inflate(buf: memoryview, info: P10Info) -> None:
    """After a failed inflate, name the instance from the part of the stream that inflates."""
    peeked = P10Info()
    try:
        _peek(buf, peeked)
    except Exception:  # noqa: BLE001 - best effort, as in peek_uids
        return
    for name in _TOP_UIDS.values():
        if getattr(info, name) is None:
            setattr(info, name, getattr(peeked, name))


def _peek_walk(buf: memoryview, info: P10Info, syntax: _Syntax) -> bool:
    """Walk the data set in ``buf`` for the top-level UIDs. True when there is nothing more to
    find: all found, or a problem that more data would not solve."""
    with buf:
        info.elements = 0
        walker = _Walker(buf, info, 32, peek=True)
        try:
            walker.dataset(0 if info.transfer_syntax in DEFLATED_SYNTAXES else info.dataset_offset,
                           len(buf), False, syntax, 0, delimited=False, top=True)
        except _Truncated:
            return False
        except (_Found, P10Error, RecursionError):
            return True
    return True


def _read_meta(buf: memoryview, info: P10Info) -> int:
    """Walk the File Meta group and return where the data set starts."""
    size = len(buf)
    if size < _META_START:
        raise _Truncated("not a DICOM file: shorter than the 128-byte preamble and DICM prefix")
    if buf[_PREAMBLE:_META_START] != _PREFIX:
        raise P10Error("not a DICOM file: no DICM prefix")
    pos = _META_START
    group_end = None
    while pos + 2 <= size:
        if _U16_LE.unpack_from(buf, pos)[0] != 0x0002:
            break
        if pos + 8 > size:
            raise _Truncated(f"truncated: File Meta element header needs 8 bytes, {size - pos} left")
        _, elem, vr, length = _EXPLICIT_LE.header.unpack_from(buf, pos)
        tag = 0x00020000 | elem
        vpos = pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise _Truncated(f"truncated: File Meta element header needs 12 bytes, {size - pos} left")
            length = _U32_LE.unpack_from(buf, pos + 8)[0]
            vpos = pos + 12
        elif vr not in _SHORT_VRS:
            raise P10Error(f"{_vr_problem(vr)} at {_tag(tag)} in the File Meta Information")
        if length == UNDEFINED_LENGTH:
            raise P10Error(f"undefined length at {_tag(tag)} in the File Meta Information")
        end = vpos + length
        if end > size:
            raise _Truncated(f"truncated: element {_tag(tag)} needs {length} bytes, {size - vpos} left")
        if elem == 0x0000:
            if length != 4:
                raise P10Error(f"File Meta Information Group Length (0002,0000) has {length} bytes, not 4")
            group_end = end + _U32_LE.unpack_from(buf, vpos)[0]
        elif tag in _META_UIDS and length and getattr(info, _META_UIDS[tag]) is None:
            setattr(info, _META_UIDS[tag], _text(buf, vpos, length))
        pos = end
    if pos < size and pos + 2 > size:
        raise _Truncated("truncated: 1 byte after the File Meta Information")
    if group_end is not None and group_end != pos:
        if group_end > size:
            raise _Truncated(f"truncated: the File Meta Information needs {group_end - _META_START} bytes, "
                             f"{size - _META_START} left")
        raise P10Error(f"the File Meta Information Group Length (0002,0000) says it ends at offset "
                       f"{group_end}, its elements end at {pos}")
    info.dataset_offset = pos
    return pos


def _inflate(deflated: memoryview) -> bytes:
    """Inflate a deflated data set (PS3.5 A.5) and check what follows the deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(deflated)
        inflated += inflater.flush()
    except zlib.error as exc:
        raise P10Error(f"corrupt deflated data set: {exc}") from None
    if not inflater.eof:
        raise _Truncated("truncated: the deflated data set ends early")
    rest = inflater.unused_data
    if rest in (b"", b"\x00"):
        return inflated
    if len(rest) in (8, 9) and rest[8:] in (b"", b"\x00") and \
            _U32_LE.unpack_from(rest, 0)[0] == zlib.crc32(inflated) and \
            _U32_LE.unpack_from(rest, 4)[0] == len(inflated) & 0xFFFFFFFF:
        return inflated
    raise P10Error(f"{len(rest)} bytes of trailing data after the deflated data set")


# ------------------------------------------------------------------------------------------------
# The walk


class _Syntax:
    """How element headers are laid out in one encoding."""

    __slots__ = ("explicit", "header", "item", "u32")

    def __init__(self, explicit: bool, little_endian: bool) -> None:
        order = "<" if little_endian else ">"
        self.explicit = explicit
        # Explicit: group, element, VR, 2-byte length; implicit: group, element, 4-byte length.
        self.header = struct.Struct(f"{order}HH2sH" if explicit else f"{order}HHL")
        # Items and delimiters: group, element, 4-byte length, in every syntax.
        self.item = struct.Struct(f"{order}HHL")
        self.u32 = struct.Struct(f"{order}L")


_IMPLICIT_LE = _Syntax(explicit=False, little_endian=True)
_EXPLICIT_LE = _Syntax(explicit=True, little_endian=True)
_EXPLICIT_BE = _Syntax(explicit=True, little_endian=False)
_U16_LE = struct.Struct("<H")
_U32_LE = struct.Struct("<L")


def _syntax(ts: str) -> _Syntax:
    if ts == IMPLICIT_VR_LE:
        return _IMPLICIT_LE
    if ts == EXPLICIT_VR_BE:
        return _EXPLICIT_BE
    return _EXPLICIT_LE


class _Walker:
    """One walk over one buffer.

    Each data set, sequence and fragment list is walked up to a limit: the end of the input, or
    the end that an enclosing item or sequence declared (``declared``). Something that does not
    fit before the end of the input is a truncation; something that does not fit in its declared
    container is corruption, even when that container ends where the input does."""

    __slots__ = ("buf", "info", "max_depth", "peek", "pixels", "rows")

    def __init__(self, buf: memoryview, info: P10Info, max_depth: int, *, peek: bool = False) -> None:
        self.buf = buf
        self.max_depth = max_depth
        self.info = info
        self.peek = peek
        self.rows = False
        self.pixels = False

    @staticmethod
    def short(what: str, need: int, pos: int, limit: int, declared: bool) -> P10Error:
        left = limit - pos
        if declared:
            return P10Error(f"corrupt: {what} needs {need} bytes, {left} left in its item or sequence")
        return _Truncated(f"truncated: {what} needs {need} bytes, {left} left")

    def dataset(self, pos: int, limit: int, declared: bool, syntax: _Syntax, depth: int, *, delimited: bool,
                top: bool) -> int:
        """Walk a data set from ``pos``: up to ``limit`` exactly, or up to its Item Delimitation
        Item (``delimited``, which must come before ``limit``). Return where it ends."""
        buf = self.buf
        explicit = syntax.explicit
        header = syntax.header
        u32 = syntax.u32
        while True:
            if pos + 8 > limit:
                if pos == limit and not delimited:
                    return pos
                what = "Item Delimitation Item (FFFE,E00D)" if pos == limit else "element header"
                raise self.short(what, 8, pos, limit, declared)
            if explicit:
                group, elem, vr, length = header.unpack_from(buf, pos)
            else:
                group, elem, length = header.unpack_from(buf, pos)
                vr = b""
            tag = group << 16 | elem
            if group == _ITEM_GROUP:
                if explicit:
                    length = u32.unpack_from(buf, pos + 4)[0]
                if elem == _ITEM_END and delimited:
                    if length:
                        raise P10Error(f"Item Delimitation Item (FFFE,E00D) with length {length}, not 0")
                    return pos + 8
                raise P10Error(f"unexpected {_tag(tag)} in a data set")
            vpos = pos + 8
            if explicit:
                if vr in _LONG_VRS:
                    if pos + 12 > limit:
                        raise self.short(f"element {_tag(tag)} header", 12, pos, limit, declared)
                    length = u32.unpack_from(buf, vpos)[0]
                    vpos += 4
                elif vr not in _SHORT_VRS:
                    raise P10Error(f"{_vr_problem(vr)} at {_tag(tag)}")
            self.info.elements += 1
            if top:
                if self.peek and tag > _LAST_UID:
                    raise _Found  # tags ascend in a valid data set: the UIDs are not coming
                if group == 0x0002 or group == 0x0000:
                    raise P10Error(f"{_tag(tag)} in the data set: group {group:04X} is not allowed there")
                if tag == _ROWS:
                    self.rows = True
                elif tag in _PIXEL_TAGS:
                    self.pixels = True

            if length == UNDEFINED_LENGTH:
                pos = self.undefined(vpos, limit, declared, syntax, depth, tag, vr)
                continue

            end = vpos + length
            if end > limit:
                raise self.short(f"element {_tag(tag)}", length, vpos, limit, declared)
            if (vr == b"SQ") if explicit else _implicit_sequence(tag):
                self.sequence(vpos, end, True, syntax, depth + 1, tag, defined=True)
            elif top and tag in _TOP_UIDS:
                name = _TOP_UIDS[tag]
                if getattr(self.info, name) is None and length:
                    setattr(self.info, name, _text(buf, vpos, length))
                    if self.peek and None not in (self.info.sop_class_uid, self.info.sop_instance_uid,
                                                  self.info.study_instance_uid, self.info.series_instance_uid):
                        raise _Found
            pos = end

    def undefined(self, pos: int, limit: int, declared: bool, syntax: _Syntax, depth: int, tag: int,
                  vr: bytes) -> int:
        """An element with undefined length whose value starts at ``pos``; return where it ends."""
        if not syntax.explicit:
            if tag == _PIXEL_DATA:
                return self.fragments(pos, limit, declared, syntax, tag)
            return self.sequence(pos, limit, declared, syntax, depth + 1, tag, defined=False)
        if vr == b"SQ":
            return self.sequence(pos, limit, declared, syntax, depth + 1, tag, defined=False)
        if vr == b"UN":
            if tag == _PIXEL_DATA:  # encapsulated pixel data that lost its VR on the way
                return self.fragments(pos, limit, declared, _IMPLICIT_LE, tag)
            return self.sequence(pos, limit, declared, _IMPLICIT_LE, depth + 1, tag, defined=False)
        if vr in _FRAGMENT_VRS:
            return self.fragments(pos, limit, declared, syntax, tag)
        raise P10Error(f"undefined length at {_tag(tag)}, which has VR {vr.decode('ascii')}")

    def sequence(self, pos: int, end: int, declared: bool, syntax: _Syntax, depth: int, tag: int, *,
                 defined: bool) -> int:
        """Walk the items of a sequence from ``pos``: up to ``end`` exactly (``defined``), or up to
        its Sequence Delimitation Item, which must come before ``end``. Return where it ends."""
        if depth > self.max_depth:
            raise P10Error(f"sequence {_tag(tag)} is nested deeper than {self.max_depth} levels")
        buf = self.buf
        item = syntax.item
        while True:
            if pos + 8 > end:
                if pos == end and defined:
                    return pos
                what = f"the Sequence Delimitation Item of {_tag(tag)}" if pos == end else \
                    f"item header in {_tag(tag)}"
                raise self.short(what, 8, pos, end, declared)
            group, elem, length = item.unpack_from(buf, pos)
            pos += 8
            if group == _ITEM_GROUP and elem == _ITEM:
                if length == UNDEFINED_LENGTH:
                    pos = self.dataset(pos, end, declared, syntax, depth, delimited=True, top=False)
                else:
                    item_end = pos + length
                    if item_end > end:
                        raise self.short(f"item in {_tag(tag)}", length, pos, end, declared)
                    pos = self.dataset(pos, item_end, True, syntax, depth, delimited=False, top=False)
            elif group == _ITEM_GROUP and elem == _SEQUENCE_END and not defined:
                if length:
                    raise P10Error(f"Sequence Delimitation Item of {_tag(tag)} with length {length}, not 0")
                return pos
            else:
                raise P10Error(f"{_tag(group << 16 | elem)} where an item of {_tag(tag)} should be")

    def fragments(self, pos: int, limit: int, declared: bool, syntax: _Syntax, tag: int) -> int:
        """Skip the items (fragments) of encapsulated data (PS3.5 A.4) up to its Sequence
        Delimitation Item. Return where it ends."""
        buf = self.buf
        item = syntax.item
        while True:
            if pos + 8 > limit:
                raise self.short(f"item header in {_tag(tag)}", 8, pos, limit, declared)
            group, elem, length = item.unpack_from(buf, pos)
            pos += 8
            if group == _ITEM_GROUP and elem == _ITEM:
                if length == UNDEFINED_LENGTH:
                    raise P10Error(f"fragment of {_tag(tag)} with undefined length")
                if pos + length > limit:
                    raise self.short(f"fragment of {_tag(tag)}", length, pos, limit, declared)
                pos += length
            elif group == _ITEM_GROUP and elem == _SEQUENCE_END:
                if length:
                    raise P10Error(f"Sequence Delimitation Item of {_tag(tag)} with length {length}, not 0")
                return pos
            else:
                raise P10Error(f"{_tag(group << 16 | elem)} where a fragment of {_tag(tag)} should be")


# ------------------------------------------------------------------------------------------------
# Helpers

_SEQUENCE_TAGS: dict[int, bool] = {}
_SEQUENCE_TAGS_MAX = 16384


def _implicit_sequence(tag: int) -> bool:
    """Is this tag a sequence in the data dictionary? Private tags are not looked up."""
    known = _SEQUENCE_TAGS.get(tag)
    if known is not None:
        return known
    if tag & 0x00010000:
        return False
    try:
        result = dictionary_VR(tag) == "SQ"
    except KeyError:
        result = False
    if len(_SEQUENCE_TAGS) < _SEQUENCE_TAGS_MAX:
        _SEQUENCE_TAGS[tag] = result
    return result


def _text(buf: memoryview, pos: int, length: int) -> str | None:
    value = bytes(buf[pos:pos + min(length, _UID_READ_LIMIT)]).decode("ascii", "replace").rstrip("\x00 ")
    return value or None


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _vr_problem(vr: bytes) -> str:
    if len(vr) == 2 and vr.isalpha() and vr.isupper():
        return f"unknown VR '{vr.decode('ascii')}'"
    return f"invalid VR {vr!r}"
