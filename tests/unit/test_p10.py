"""PS3.10 structural check for STOW-RS parts (gateway.dicomweb.p10): inspect and peek_uids."""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from gateway.dicomweb.p10 import (
    JPIP_REFERENCED_DEFLATE,
    P10Error,
    P10Info,
    inspect,
    peek_uids,
)

UNDEF = 0xFFFFFFFF
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.826.0.1.3680043.8.498.2"
SERIES = "1.2.826.0.1.3680043.8.498.3"

ROWS = 0x00280010
PIXEL_DATA = 0x7FE00010

# ------------------------------------------------------------------------------------------------
# Test data: pydicom's bundled files, and a small encoder for byte-exact structures


def bundled(name: str) -> bytes:
    """A file bundled with pydicom. A missing one fails the test: they ship with pydicom."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path).read_bytes()


def read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data))


def count_elements(data: bytes) -> int:
    """All data elements of the data set at every level, as pydicom sees them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iterall converts values, some of which are invalid
        return sum(1 for _ in read(data).iterall())


def meta_end(data: bytes) -> int:
    """Where the data set starts, from pydicom's reading of the File Meta group length."""
    return 132 + 12 + read(data).file_meta.FileMetaInformationGroupLength


def top_level_ends(data: bytes, start: int, implicit: bool, little: bool) -> list[tuple[int, int]]:
    """(tag, end offset) of each top-level element, with pydicom's element generator as the oracle."""
    fp = io.BytesIO(data)
    fp.seek(start)
    ends = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for elem in data_element_generator(fp, implicit, little, defer_size=None):
            ends.append((int(elem.tag), fp.tell()))
    return ends


def undetectable_cuts(data: bytes, start: int, implicit: bool, little: bool) -> set[int]:
    """Cuts at the end of a top-level element, which leave a structurally complete data set, and
    that the Rows-without-Pixel-Data rule cannot catch either."""
    cuts = set()
    tags: set[int] = set()
    for tag, end in top_level_ends(data, start, implicit, little):
        tags.add(tag)
        pixels = bool(tags & {0x7FE00008, 0x7FE00009, PIXEL_DATA, 0x00287FE0})
        if end < len(data) and (ROWS not in tags or pixels):
            cuts.add(end)
    return cuts


LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


class Enc:
    """Element, item and sequence encoder for one encoding, to build exact byte structures."""

    def __init__(self, ts: str, explicit: bool = True, little: bool = True) -> None:
        self.ts = ts
        self.explicit = explicit
        self.little = little
        self.o = "<" if little else ">"

    def el(self, tag: int, vr: str, value: bytes = b"", length: int | None = None) -> bytes:
        n = len(value) if length is None else length
        g, e = tag >> 16, tag & 0xFFFF
        if not self.explicit:
            return struct.pack(self.o + "HHL", g, e, n) + value
        if vr in LONG_VRS:
            return struct.pack(self.o + "HH2s2xL", g, e, vr.encode(), n) + value
        return struct.pack(self.o + "HH2sH", g, e, vr.encode(), n) + value

    def raw(self, g: int, e: int, n: int) -> bytes:
        return struct.pack(self.o + "HHL", g, e, n)

    def item(self, *content: bytes, defined: bool = True, length: int | None = None) -> bytes:
        body = b"".join(content)
        if defined:
            return self.raw(0xFFFE, 0xE000, len(body) if length is None else length) + body
        return self.raw(0xFFFE, 0xE000, UNDEF) + body + self.raw(0xFFFE, 0xE00D, 0)

    def seq(self, tag: int, *items: bytes, defined: bool = True, vr: str = "SQ") -> bytes:
        body = b"".join(items)
        if defined:
            return self.el(tag, vr, body)
        return self.el(tag, vr, length=UNDEF) + body + self.raw(0xFFFE, 0xE0DD, 0)

    def ui(self, tag: int, uid: str) -> bytes:
        return self.el(tag, "UI", pad(uid))

    def uids(self, study: bool = True) -> bytes:
        out = self.ui(0x00080016, CT_IMAGE) + self.ui(0x00080018, SOP_INSTANCE)
        if study:
            out += self.ui(0x0020000D, STUDY) + self.ui(0x0020000E, SERIES)
        return out


EXPL = Enc(ExplicitVRLittleEndian)
IMPL = Enc(ImplicitVRLittleEndian, explicit=False)
BIG = Enc(ExplicitVRBigEndian, little=False)


def pad(text: str, fill: bytes = b"\x00") -> bytes:
    raw = text.encode("ascii")
    return raw + fill if len(raw) % 2 else raw


def meta(ts: str | None = ExplicitVRLittleEndian, *, group_length: int | bool = True, extra: bytes = b"") -> bytes:
    """Preamble, DICM and a File Meta group (Explicit VR Little Endian)."""
    body = EXPL.el(0x00020001, "OB", b"\x00\x01") + EXPL.ui(0x00020002, CT_IMAGE) + EXPL.ui(0x00020003, SOP_INSTANCE)
    if ts is not None:
        body += EXPL.ui(0x00020010, ts)
    body += EXPL.ui(0x00020012, "1.2.3.4") + extra
    if group_length is True:
        body = EXPL.el(0x00020000, "UL", struct.pack("<L", len(body))) + body
    elif group_length is not False:
        body = EXPL.el(0x00020000, "UL", struct.pack("<L", group_length)) + body
    return b"\x00" * 128 + b"DICM" + body


def p10(body: bytes, ts: str | None = ExplicitVRLittleEndian, *, group_length: int | bool = True) -> bytes:
    return meta(ts, group_length=group_length) + body


def nested(enc: Enc, *, top_series: bool = True) -> bytes:
    """A data set with every combination of defined and undefined sequence and item lengths,
    three levels deep, then an image. No tag repeats within one data set (pydicom would merge)."""
    leaf = enc.ui(0x00081150, CT_IMAGE) + enc.ui(0x00081155, SOP_INSTANCE)
    inner = b""
    for tag, seq_defined in ((0x00081140, True), (0x00082112, False)):  # Referenced, Source Image Sequence
        inner += enc.seq(tag, *(enc.item(leaf, defined=d) for d in (True, False)), defined=seq_defined)
    middle = b""
    for tag, seq_defined in ((0x00081110, True), (0x00081115, False)):  # Referenced Study, Series Sequence
        items = [enc.item(inner, enc.ui(0x0020000E, SERIES), defined=d) for d in (True, False)]
        middle += enc.seq(tag, *items, defined=seq_defined)
    outer = enc.seq(0x00081200, enc.item(middle, defined=True), enc.item(middle, defined=False), defined=False)
    image = enc.el(ROWS, "US", struct.pack(enc.o + "H", 2)) + enc.el(0x00280011, "US", struct.pack(enc.o + "H", 2))
    body = enc.ui(0x00080016, CT_IMAGE) + enc.ui(0x00080018, SOP_INSTANCE) + outer + enc.ui(0x0020000D, STUDY)
    if top_series:
        body += enc.ui(0x0020000E, SERIES)
    return body + image + enc.el(PIXEL_DATA, "OW", bytes(8))


def build(ds: Dataset, ts: str, *, sop_class: str = CT_IMAGE, sop_instance: str = SOP_INSTANCE) -> bytes:
    """Write ``ds`` as a PS3.10 file in ``ts`` with pydicom."""
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_instance
    fm.TransferSyntaxUID = ts
    ds.file_meta = fm
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def sample_dataset(undefined: bool) -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    inner = Dataset()
    inner.CodeValue = "ABC"
    inner.CodingSchemeDesignator = "99X"
    inner.CodeMeaning = "odd"  # odd length, padded by pydicom
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [item, Dataset()]
    if undefined:
        for elem in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
            elem.is_undefined_length = True
        item.is_undefined_length_sequence_item = True
        inner.is_undefined_length_sequence_item = True
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    return ds


def expect_error(data: bytes | bytearray | memoryview, *fragments: str, **kwargs: int) -> P10Error:
    with pytest.raises(P10Error) as caught:
        inspect(data, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(caught.value.info, P10Info)
    return caught.value


# ------------------------------------------------------------------------------------------------
# Valid files

BUNDLED = [
    ("CT_small.dcm", ExplicitVRLittleEndian),  # ends with (FFFC,FFFC) Data Set Trailing Padding
    ("MR_small.dcm", ExplicitVRLittleEndian),
    ("MR_small_padded.dcm", ExplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ("MR_small_expb.dcm", ExplicitVRBigEndian),
    ("ExplVR_BigEnd.dcm", ExplicitVRBigEndian),
    ("liver_expb_1frame.dcm", ExplicitVRBigEndian),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),  # with a gzip-style CRC-32 and size trailer
    ("rtplan.dcm", ImplicitVRLittleEndian),  # nested sequences
    ("test-SR.dcm", ExplicitVRLittleEndian),  # deeply nested content items
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "1.2.840.10008.1.2.4.91"),  # (FFFE,E0DD) bytes in a fragment
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("SC_rgb_rle.dcm", RLELossless),
    ("SC_rgb_rle_2frame.dcm", RLELossless),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("UN_sequence.dcm", "1.2.840.10008.1.2.4.70"),  # private UN with undefined length
    ("nested_priv_SQ.dcm", ImplicitVRLittleEndian),  # private sequence in a private sequence
    ("priv_SQ.dcm", ImplicitVRLittleEndian),
    ("no_meta_group_length.dcm", ImplicitVRLittleEndian),  # File Meta without (0002,0000)
    ("waveform_ecg.dcm", ExplicitVRLittleEndian),
    ("SC_rgb_small_odd_big_endian.dcm", ExplicitVRBigEndian),
]


@pytest.mark.parametrize(("name", "ts"), BUNDLED, ids=[name for name, _ in BUNDLED])
def test_bundled_files_pass_and_agree_with_pydicom(name: str, ts: str) -> None:
    data = bundled(name)
    ds = read(data)
    info = inspect(data)
    assert info.transfer_syntax == ts == ds.file_meta.TransferSyntaxUID
    assert info.media_sop_class == (ds.file_meta.get("MediaStorageSOPClassUID") or None)
    assert info.media_sop_instance == (ds.file_meta.get("MediaStorageSOPInstanceUID") or None)
    assert info.sop_class_uid == ds.get("SOPClassUID")
    assert info.sop_instance_uid == ds.get("SOPInstanceUID")
    assert info.study_instance_uid == ds.get("StudyInstanceUID")
    assert info.series_instance_uid == ds.get("SeriesInstanceUID")
    assert info.elements == count_elements(data)
    if "FileMetaInformationGroupLength" in ds.file_meta:
        assert info.dataset_offset == meta_end(data)
    # The same answer from every kind of buffer.
    assert inspect(bytearray(data)) == info == inspect(memoryview(data))


def test_defined_length_un_sequence_is_skipped_not_walked() -> None:
    # rtdose_rle.dcm has the Referenced RT Plan Sequence as UN with a defined length; pydicom
    # turns it back into SQ from its dictionary, this check skips it as opaque bytes.
    data = bundled("rtdose_rle.dcm")
    info = inspect(data)
    assert info.elements == count_elements(data) - 6
    assert info.sop_instance_uid == "1.9.999.999.99.9.9999.9999.20030818153516"


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_each_native_transfer_syntax(ts: str, undefined: bool) -> None:
    ds = sample_dataset(undefined)
    ds.PixelData = bytes(8)
    data = build(ds, ts)
    info = inspect(data)
    assert (info.transfer_syntax, info.sop_class_uid, info.sop_instance_uid) == (ts, CT_IMAGE, SOP_INSTANCE)
    assert (info.study_instance_uid, info.series_instance_uid) == (STUDY, SERIES)
    assert (info.media_sop_class, info.media_sop_instance) == (CT_IMAGE, SOP_INSTANCE)
    assert info.elements == count_elements(data)
    assert info.dataset_offset == meta_end(data)
    # pydicom wrote the lengths asked for (outside the deflated stream, where they can be seen).
    if ts != DeflatedExplicitVRLittleEndian:
        little = ts != ExplicitVRBigEndian
        has_undefined = struct.pack("<L" if little else ">L", UNDEF) in data
        assert has_undefined == undefined


def test_deflated_files_are_inflated_and_walked() -> None:
    ds = sample_dataset(undefined=True)
    ds.PixelData = bytes(1000)
    data = build(ds, DeflatedExplicitVRLittleEndian)
    offset = meta_end(data)
    inflated = zlib.decompress(data[offset:], -15)
    assert len(inflated) > len(data) - offset  # really deflated
    assert inspect(data).elements == count_elements(data)
    # A JPIP Referenced Deflate file is deflated too.
    jpip = meta(JPIP_REFERENCED_DEFLATE) + data[offset:]
    info = inspect(jpip)
    assert info.transfer_syntax == JPIP_REFERENCED_DEFLATE and info.sop_instance_uid == SOP_INSTANCE


def test_deflated_pad_byte_and_crc_trailer() -> None:
    body = EXPL.uids() + EXPL.el(0x00100010, "PN", b"Doe^Jane")
    compressor = zlib.compressobj(wbits=-15)
    stream = compressor.compress(body) + compressor.flush()
    trailer = struct.pack("<LL", zlib.crc32(body), len(body))
    head = meta(DeflatedExplicitVRLittleEndian)
    for tail in (b"", b"\x00", trailer, trailer + b"\x00"):
        assert inspect(head + stream + tail).sop_instance_uid == SOP_INSTANCE
    bad_crc = struct.pack("<LL", zlib.crc32(body) ^ 1, len(body))
    for tail in (bad_crc, trailer[:7], b"\x00\x00", b"garbage!"):
        expect_error(head + stream + tail, "trailing data after the deflated data set")


def test_deflated_corrupt_or_truncated_stream() -> None:
    ds = sample_dataset(undefined=False)
    ds.PixelData = bytes(64)
    data = build(ds, DeflatedExplicitVRLittleEndian)
    offset = meta_end(data)
    expect_error(data[:offset] + b"\xff" * 40, "corrupt deflated data set")
    error = expect_error(data[:-12], "truncated")
    # The UIDs come from the part of the stream that does inflate.
    assert error.info.sop_instance_uid == SOP_INSTANCE
    assert error.info.transfer_syntax == DeflatedExplicitVRLittleEndian
    # A complete stream holding a truncated data set.
    body = zlib.decompress(data[offset:], -15)
    compressor = zlib.compressobj(wbits=-15)
    expect_error(data[:offset] + compressor.compress(body[:-3]) + compressor.flush(), "truncated: element (7FE0,0010)")


@pytest.mark.parametrize("enc", [EXPL, IMPL, BIG], ids=["explicit-le", "implicit-le", "explicit-be"])
def test_nested_sequences_defined_and_undefined(enc: Enc) -> None:
    data = p10(nested(enc), enc.ts)
    info = inspect(data)
    # The hand-built encoding is valid DICOM: pydicom reads it and sees the same elements.
    assert info.elements == count_elements(data) == 100
    assert (info.sop_instance_uid, info.study_instance_uid, info.series_instance_uid) == (SOP_INSTANCE, STUDY, SERIES)
    # The Series Instance UIDs inside the items are not taken for the top-level one.
    without_top_series = inspect(p10(nested(enc, top_series=False), enc.ts))
    assert without_top_series.series_instance_uid is None and without_top_series.elements == 99


def test_encapsulated_pixel_data() -> None:
    ds = sample_dataset(undefined=False)
    ds.PixelData = encapsulate([b"frame-one!", b"frame-2!"])
    data = build(ds, JPEG2000Lossless)
    assert inspect(data).elements == count_elements(data)
    fragments = data.rindex(b"frame-one!") - 8
    assert data[fragments:fragments + 4] == b"\xfe\xff\x00\xe0"
    # A fragment length that runs past the end of the file.
    longer = bytearray(data)
    longer[fragments + 4:fragments + 8] = struct.pack("<L", 100)
    expect_error(longer, "truncated: fragment of (7FE0,0010) needs 100 bytes")
    # A fragment length that makes the walk land in the middle of the next fragment.
    shorter = bytearray(data)
    shorter[fragments + 4:fragments + 8] = struct.pack("<L", 6)
    expect_error(shorter, "where a fragment of (7FE0,0010) should be")
    # Undefined fragment length, and no sequence delimiter.
    undefined = bytearray(data)
    undefined[fragments + 4:fragments + 8] = struct.pack("<L", UNDEF)
    expect_error(undefined, "fragment of (7FE0,0010) with undefined length")
    expect_error(data[:-8], "truncated: item header in (7FE0,0010) needs 8 bytes, 0 left")
    delimiter = bytearray(data)
    delimiter[-4:] = struct.pack("<L", 4)
    expect_error(delimiter, "Sequence Delimitation Item of (7FE0,0010) with length 4")


def test_encapsulated_in_explicit_big_endian_and_undefined_length_ow() -> None:
    fragments = BIG.item(b"") + BIG.item(b"abcd")
    body = BIG.uids() + BIG.el(PIXEL_DATA, "OB", length=UNDEF) + fragments + BIG.raw(0xFFFE, 0xE0DD, 0)
    assert inspect(p10(body, ExplicitVRBigEndian)).elements == 5
    # Undefined-length OW (and OB outside Pixel Data) read as fragments too, as pydicom does.
    body = EXPL.uids() + EXPL.el(0x00091010, "OW", length=UNDEF) + EXPL.item(b"ab") + EXPL.raw(0xFFFE, 0xE0DD, 0)
    assert inspect(p10(body)).elements == 5
    # Other VRs cannot have an undefined length.
    body = EXPL.uids() + EXPL.el(0x00204000, "UT", length=UNDEF) + EXPL.raw(0xFFFE, 0xE0DD, 0)
    expect_error(p10(body), "undefined length at (0020,4000), which has VR UT")


def test_un_with_undefined_length_is_an_implicit_sequence() -> None:
    content = IMPL.item(IMPL.el(0x00100010, "PN", b"Doe^Jane"), IMPL.seq(0x00081140, IMPL.item(b""), defined=False))
    un = EXPL.el(0x00091001, "UN", length=UNDEF) + content + IMPL.raw(0xFFFE, 0xE0DD, 0)
    body = EXPL.uids() + EXPL.el(0x00090010, "LO", b"ACME") + un
    data = p10(body)
    assert inspect(data).elements == count_elements(data) == 8
    # In a Big Endian file the UN content is still Implicit VR Little Endian.
    big = BIG.uids() + BIG.el(0x00091001, "UN", length=UNDEF) + content + IMPL.raw(0xFFFE, 0xE0DD, 0)
    assert inspect(p10(big, ExplicitVRBigEndian)).elements == 7
    # A corrupt length inside the UN content is found.
    corrupt = bytearray(data)
    name = corrupt.index(b"Doe^Jane") - 4
    corrupt[name:name + 4] = struct.pack("<L", 200)
    expect_error(corrupt, "corrupt: element (0010,0010) needs 200 bytes")
    expect_error(data[:-8], "truncated")


def test_implicit_defined_length_sequence_uses_the_dictionary() -> None:
    broken_item = IMPL.item(IMPL.el(0x00081155, "UI", b"1.2", length=40))  # the element overruns its item
    public = IMPL.uids() + IMPL.el(0x00081140, "SQ", broken_item)  # Referenced Image Sequence
    expect_error(p10(public, ImplicitVRLittleEndian), "corrupt: element (0008,1155) needs 40 bytes, 3 left")
    # The same bytes under a private tag are an opaque value.
    private = IMPL.uids() + IMPL.el(0x00090010, "LO", b"ACME") + IMPL.el(0x00091040, "SQ", broken_item)
    assert inspect(p10(private, ImplicitVRLittleEndian)).elements == 6
    # An unknown public tag is not looked at either.
    unknown = IMPL.uids() + IMPL.el(0x00231234, "UN", broken_item)
    assert inspect(p10(unknown, ImplicitVRLittleEndian)).elements == 5


def test_odd_lengths_are_tolerated() -> None:
    body = EXPL.uids() + EXPL.el(0x00100010, "PN", b"Doe") + EXPL.el(0x00091010, "OB", b"abc")
    body += EXPL.seq(0x00081140, EXPL.item(EXPL.el(0x00081150, "UI", b"1.2.3")))
    assert inspect(p10(body)).elements == 8


def test_trailing_padding_element_is_allowed() -> None:
    body = EXPL.uids() + EXPL.el(0xFFFCFFFC, "OB", bytes(100))
    assert inspect(p10(body)).elements == 5
    ct = bundled("CT_small.dcm")
    assert top_level_ends(ct, meta_end(ct), False, True)[-1] == (0xFFFCFFFC, len(ct))


def test_unknown_transfer_syntax_is_read_as_explicit_little_endian() -> None:
    body = EXPL.uids()
    assert inspect(p10(body, "1.2.3.4.5")).sop_instance_uid == SOP_INSTANCE
    expect_error(p10(IMPL.uids(), "1.2.3.4.5"), "invalid VR")


def test_uid_values_are_returned_as_read() -> None:
    body = EXPL.el(0x00080016, "UI", b"1.2.3\x00") + EXPL.el(0x00080018, "UI", b"not a uid  ")
    body += EXPL.el(0x0020000D, "UI", b"")
    info = inspect(p10(body))
    assert info.sop_class_uid == "1.2.3"
    assert info.sop_instance_uid == "not a uid"  # the caller validates
    assert info.study_instance_uid is None and info.series_instance_uid is None
    long_uid = "1." * 40 + "1"
    assert inspect(p10(EXPL.ui(0x00080018, long_uid))).sop_instance_uid == long_uid
    # Only the top level counts.
    nested_only = EXPL.seq(0x00081140, EXPL.item(EXPL.ui(0x00080018, "1.2.3")))
    assert inspect(p10(nested_only)).sop_instance_uid is None


def test_max_depth() -> None:
    def nest(levels: int) -> bytes:
        value = EXPL.el(0x00100010, "PN", b"Doe^Jane")
        for level in range(levels):
            value = EXPL.seq(0x00081140, EXPL.item(value, defined=level % 2 == 0), defined=level % 3 == 0)
        return p10(EXPL.uids() + value)

    assert inspect(nest(5), max_depth=5).elements == 10
    expect_error(nest(5), "nested deeper than 4 levels", max_depth=4)
    assert inspect(nest(32)).elements == 37
    expect_error(nest(33), "nested deeper than 32 levels")
    # Deeper than the interpreter's own stack allows: still a P10Error.
    expect_error(nest(1200), "nested too deeply", max_depth=100_000)


def test_input_buffers_are_released() -> None:
    data = bytearray(bundled("MR_small.dcm"))
    inspect(data)
    data += b"\x00"  # would raise BufferError if a view were still exported
    expect_error(data, "truncated")
    peek_uids(data)
    data += b"\x00"
    assert len(data) == len(bundled("MR_small.dcm")) + 2


def test_large_pixel_data_is_skipped_without_copying() -> None:
    ds = sample_dataset(undefined=True)
    header = build(ds, ExplicitVRLittleEndian)
    size = 300 * 1024 * 1024
    element = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", size)
    data = bytearray(len(header) + len(element) + size)  # zeros, not touched by the walk
    data[:len(header)] = header
    data[len(header):len(header) + len(element)] = element
    tracemalloc.start()
    try:
        info = inspect(data)
        error = expect_error(memoryview(data)[:-1], f"truncated: element (7FE0,0010) needs {size} bytes, {size - 1}")
        peeked = peek_uids(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    assert info.elements == count_elements(header) + 1
    assert info.sop_instance_uid == peeked.sop_instance_uid == error.info.sop_instance_uid == SOP_INSTANCE


# ------------------------------------------------------------------------------------------------
# Invalid files


def test_bundled_invalid_files() -> None:
    expect_error(bundled("MR_truncated.dcm"), "truncated: element (7FE0,0010) needs 8192 bytes, 8130 left")
    expect_error(bundled("rtplan_truncated.dcm"), "truncated: element (300A,00B0)")
    expect_error(bundled("meta_missing_tsyntax.dcm"), "no TransferSyntaxUID (0002,0010)")
    for name in ("no_meta.dcm", "rtstruct.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):
        expect_error(bundled(name), "not a DICOM file: no DICM prefix")
    # The File Meta says JPEG Baseline (explicit VR), the data set is encoded with implicit VR;
    # pydicom reads it anyway, after a warning.
    expect_error(bundled("SC_rgb_jpeg.dcm"), "invalid VR", "(0008,0008)")
    with pytest.warns(UserWarning, match="Expected explicit VR, but found implicit VR"):
        dcmread(io.BytesIO(bundled("SC_rgb_jpeg.dcm")))


def test_error_message_names_what_is_missing() -> None:
    body = EXPL.uids() + EXPL.el(ROWS, "US", b"\x01\x00") + EXPL.el(PIXEL_DATA, "OB", bytes(524288))
    data = p10(body)
    error = expect_error(data[:len(data) - 524288 + 1200])
    assert str(error) == "truncated: element (7FE0,0010) needs 524288 bytes, 1200 left"
    assert error.info.sop_instance_uid == SOP_INSTANCE and error.info.study_instance_uid == STUDY
    assert error.info.dataset_offset == len(meta())


def test_not_dicom() -> None:
    expect_error(b"", "shorter than the 128-byte preamble")
    expect_error(bytes(131), "shorter than the 128-byte preamble")
    expect_error(bytes(128) + b"DICN" + EXPL.uids(), "no DICM prefix")
    expect_error(EXPL.uids() * 10, "no DICM prefix")


def test_file_meta_problems() -> None:
    expect_error(p10(EXPL.uids(), None), "no TransferSyntaxUID")
    expect_error(meta(), "truncated: no data set after the File Meta Information")
    expect_error(p10(EXPL.uids(), group_length=500), "the File Meta Information needs")
    expect_error(p10(EXPL.uids(), group_length=20), "Group Length (0002,0000) says it ends at offset")
    assert inspect(p10(EXPL.uids(), group_length=False)).sop_instance_uid == SOP_INSTANCE
    bad_vr = meta(extra=EXPL.el(0x00020016, "AE", b"AET1").replace(b"AE", b"ae"))
    expect_error(bad_vr + EXPL.uids(), "invalid VR b'ae' at (0002,0016) in the File Meta Information")
    undefined = meta(extra=EXPL.el(0x00020102, "OB", length=UNDEF))
    expect_error(undefined + EXPL.uids(), "undefined length at (0002,0102)")
    wrong_group_length = meta(group_length=False).replace(b"DICM", b"DICM" + EXPL.el(0x00020000, "UL", bytes(2)))
    expect_error(wrong_group_length + EXPL.uids(), "Group Length (0002,0000) has 2 bytes, not 4")


@pytest.mark.parametrize("group", [0x0002, 0x0000])
def test_groups_0000_and_0002_not_allowed_in_the_data_set(group: int) -> None:
    element = EXPL.el(group << 16 | 0x0010, "UI", pad(ExplicitVRLittleEndian))
    expect_error(p10(EXPL.uids() + element), f"({group:04X},0010) in the data set")
    # Nested in an item they are tolerated.
    assert inspect(p10(EXPL.uids() + EXPL.seq(0x00081140, EXPL.item(element)))).elements == 6


def test_trailing_garbage() -> None:
    good = p10(EXPL.uids())
    expect_error(good + b"junk", "truncated: element header needs 8 bytes, 4 left")
    expect_error(good + b"garbage!", "invalid VR b'ag' at (6167,6272)")
    expect_error(good + bytes(8), "invalid VR b'\\x00\\x00'")
    # Zeros after an Implicit VR data set read as (0000,0000) elements of length 0.
    expect_error(p10(IMPL.uids(), ImplicitVRLittleEndian) + bytes(16), "(0000,0000) in the data set")
    expect_error(p10(IMPL.uids(), ImplicitVRLittleEndian) + b"garbage!", "truncated: element (6167,6272)")
    expect_error(bundled("MR_small.dcm") + b"\x00\x00", "truncated: element header needs 8 bytes, 2 left")


def test_unknown_and_invalid_vr() -> None:
    expect_error(p10(EXPL.uids() + EXPL.el(0x00100010, "XY", b"ab")), "unknown VR 'XY' at (0010,0010)")
    expect_error(p10(EXPL.uids() + EXPL.el(0x00100010, "P1", b"ab")), "invalid VR b'P1' at (0010,0010)")
    nested_bad = EXPL.seq(0x00081140, EXPL.item(EXPL.el(0x00081150, "QQ", b"ab")), defined=False)
    expect_error(p10(EXPL.uids() + nested_bad), "unknown VR 'QQ' at (0008,1150)")


def test_corrupted_length_in_a_nested_item() -> None:
    data = p10(nested(EXPL))
    target = data.index(pad(SOP_INSTANCE), len(meta()) + 100) - 2  # a (0008,1155) deep inside
    assert data[target - 6:target - 2] == b"\x08\x00\x55\x11"
    for length in (0, 2, len(pad(SOP_INSTANCE)) + 2, 0xFFFF):
        corrupt = bytearray(data)
        corrupt[target:target + 2] = struct.pack("<H", length)
        with pytest.raises(P10Error):
            inspect(corrupt)


def test_defined_length_sequence_whose_item_overruns() -> None:
    item = EXPL.item(EXPL.el(0x00081150, "UI", b"1.2.3\x00"))
    seq = EXPL.el(0x00081140, "SQ", item, length=len(item) - 4)  # the sequence ends inside its item
    expect_error(p10(EXPL.uids() + seq + EXPL.el(0x00100010, "PN", b"Doe^Jane")),
                 "corrupt: item in (0008,1140) needs 14 bytes, 10 left in its item or sequence")
    # An element that runs past the end of its defined-length item.
    item = EXPL.item(EXPL.el(0x00081150, "UI", b"1.2.3\x00"), length=10)
    expect_error(p10(EXPL.uids() + EXPL.seq(0x00081140, item, defined=False)),
                 "corrupt: element (0008,1150) needs 6 bytes, 2 left")
    # A defined-length item that is longer than its elements: the walk reads a header from the rest.
    item = EXPL.item(EXPL.el(0x00081150, "UI", b"1.2.3\x00"), length=18)
    expect_error(p10(EXPL.uids() + EXPL.seq(0x00081140, item, defined=False)), "corrupt: element header needs 8 bytes")


def test_delimiters() -> None:
    ok = EXPL.seq(0x00081140, EXPL.item(b"", defined=False), defined=False)
    assert inspect(p10(EXPL.uids() + ok)).elements == 5
    item_end = EXPL.raw(0xFFFE, 0xE00D, 0)
    seq_end = EXPL.raw(0xFFFE, 0xE0DD, 0)
    bad_item_end = EXPL.el(0x00081140, "SQ", length=UNDEF) + EXPL.raw(0xFFFE, 0xE000, UNDEF) + \
        EXPL.raw(0xFFFE, 0xE00D, 4)
    expect_error(p10(EXPL.uids() + bad_item_end + seq_end), "Item Delimitation Item (FFFE,E00D) with length 4")
    bad_seq_end = EXPL.seq(0x00081140, EXPL.item(b""), defined=False)[:-4] + struct.pack("<L", 2)
    expect_error(p10(EXPL.uids() + bad_seq_end), "Sequence Delimitation Item of (0008,1140) with length 2")
    in_defined = EXPL.el(0x00081140, "SQ", EXPL.item(b"") + seq_end)
    expect_error(p10(EXPL.uids() + in_defined), "(FFFE,E0DD) where an item of (0008,1140) should be")
    in_defined_item = EXPL.seq(0x00081140, EXPL.item(item_end))
    expect_error(p10(EXPL.uids() + in_defined_item), "unexpected (FFFE,E00D) in a data set")
    expect_error(p10(EXPL.uids() + item_end), "unexpected (FFFE,E00D) in a data set")
    not_an_item = EXPL.el(0x00081140, "SQ", EXPL.el(0x00100010, "PN", b"Doe^"))
    expect_error(p10(EXPL.uids() + not_an_item), "(0010,0010) where an item of (0008,1140) should be")
    unclosed = EXPL.el(0x00081140, "SQ", length=UNDEF) + EXPL.item(b"")
    expect_error(p10(EXPL.uids() + unclosed), "truncated: the Sequence Delimitation Item of (0008,1140)")
    unclosed_item = EXPL.el(0x00081140, "SQ", length=UNDEF) + EXPL.raw(0xFFFE, 0xE000, UNDEF)
    expect_error(p10(EXPL.uids() + unclosed_item), "truncated: Item Delimitation Item (FFFE,E00D)")


def test_image_attributes_without_pixel_data() -> None:
    image = EXPL.uids() + EXPL.el(ROWS, "US", b"\x02\x00") + EXPL.el(0x00280011, "US", b"\x02\x00")
    expect_error(p10(image), "truncated: the data set has Rows (0028,0010) but no Pixel Data")
    for tag, vr in ((PIXEL_DATA, "OW"), (0x7FE00008, "OF"), (0x7FE00009, "OD"), (0x00287FE0, "UR")):
        assert inspect(p10(image + EXPL.el(tag, vr, bytes(8)))).elements == 7
    assert inspect(p10(EXPL.uids())).elements == 4  # no Rows: nothing to check


# ------------------------------------------------------------------------------------------------
# Truncation at every offset


def check_every_cut(data: bytes, allowed: set[int], *, complete: frozenset[int] = frozenset()) -> None:
    """Every proper prefix of ``data`` fails, except exactly the cuts in ``allowed``, which give a
    shorter data set (or the same one: ``complete``)."""
    full = inspect(data)
    view = memoryview(data)
    passed = set()
    for cut in range(len(data)):
        try:
            info = inspect(view[:cut])
        except P10Error as exc:
            assert str(exc)
            continue
        passed.add(cut)
        assert info.elements == full.elements if cut in complete else info.elements < full.elements
    assert passed == allowed


TRUNCATED = [
    ("CT_small.dcm", False, True),
    ("rtplan.dcm", True, True),
    ("MR_small_bigendian.dcm", False, False),
    ("JPEG2000.dcm", False, True),
    ("SC_rgb_rle.dcm", False, True),
    ("UN_sequence.dcm", False, True),
    ("test-SR.dcm", False, True),
]


@pytest.mark.parametrize(("name", "implicit", "little"), TRUNCATED, ids=[name for name, *_ in TRUNCATED])
def test_truncation_at_every_offset_of_bundled_files(name: str, implicit: bool, little: bool) -> None:
    data = bundled(name)
    allowed = undetectable_cuts(data, meta_end(data), implicit, little)
    # Only a cut at the end of a top-level element of a data set that is complete without the
    # rest can pass; everything else (inside the File Meta, inside any element, sequence or item)
    # is an error.
    assert len(allowed) < len(top_level_ends(data, meta_end(data), implicit, little))
    check_every_cut(data, allowed)


@pytest.mark.parametrize("enc", [EXPL, IMPL, BIG], ids=["explicit-le", "implicit-le", "explicit-be"])
def test_truncation_at_every_offset_of_a_built_file(enc: Enc) -> None:
    data = p10(nested(enc), enc.ts)
    start = len(meta(enc.ts))
    ends = top_level_ends(data, start, not enc.explicit, enc.little)
    assert [tag for tag, _ in ends] == [0x00080016, 0x00080018, 0x00081200, 0x0020000D, 0x0020000E, ROWS,
                                        0x00280011, PIXEL_DATA]
    # The cuts after the UIDs and the sequence pass (a data set without what follows is complete);
    # those after Rows and Columns are caught by the Rows rule.
    allowed = {end for _, end in ends[:5]}
    assert undetectable_cuts(data, start, not enc.explicit, enc.little) == allowed
    check_every_cut(data, allowed)


def test_truncation_at_every_offset_of_a_deflated_file() -> None:
    data = bundled("image_dfl.dcm")
    # Only the cut that removes exactly the optional CRC-32 and size trailer passes.
    check_every_cut(data, {len(data) - 8}, complete=frozenset({len(data) - 8}))


def test_truncated_file_at_an_element_boundary_is_a_known_limit() -> None:
    # Cut right after (0008,0018): structurally complete, the caller's UID checks still apply.
    data = bundled("MR_small.dcm")
    ends = dict(top_level_ends(data, meta_end(data), False, True))
    info = inspect(data[:ends[0x00080018]])
    assert info.sop_instance_uid == read(data).SOPInstanceUID and info.study_instance_uid is None
    # Cut right before the pixel data: Rows is there, so it is caught.
    expect_error(data[:ends[0x00281051]], "Rows (0028,0010) but no Pixel Data")


# ------------------------------------------------------------------------------------------------
# peek_uids


@pytest.mark.parametrize(("name", "implicit", "little"), [("MR_small.dcm", False, True), ("rtplan.dcm", True, True),
                                                          ("MR_small_bigendian.dcm", False, False)])
def test_peek_uids_on_every_prefix(name: str, implicit: bool, little: bool) -> None:
    data = bundled(name)
    ds = read(data)
    start = meta_end(data)
    ends = dict(top_level_ends(data, start, implicit, little))
    meta_ends = dict(top_level_ends(data[:start], 132, False, True))
    expected = {
        "media_sop_instance": (meta_ends[0x00020003], ds.file_meta.MediaStorageSOPInstanceUID),
        "transfer_syntax": (meta_ends[0x00020010], ds.file_meta.TransferSyntaxUID),
        "sop_class_uid": (ends[0x00080016], ds.SOPClassUID),
        "sop_instance_uid": (ends[0x00080018], ds.SOPInstanceUID),
        "study_instance_uid": (ends[0x0020000D], ds.StudyInstanceUID),
        "series_instance_uid": (ends[0x0020000E], ds.SeriesInstanceUID),
    }
    view = memoryview(data)
    for cut in range(len(data) + 1):
        info = peek_uids(view[:cut])
        for field, (end, value) in expected.items():
            assert getattr(info, field) == (value if cut >= end else None), (cut, field)


def test_peek_uids_stops_early() -> None:
    data = bundled("CT_small.dcm")
    full = inspect(data)
    peeked = peek_uids(data)
    assert (peeked.sop_class_uid, peeked.sop_instance_uid, peeked.study_instance_uid, peeked.series_instance_uid) == \
        (full.sop_class_uid, full.sop_instance_uid, full.study_instance_uid, full.series_instance_uid)
    assert 0 < peeked.elements < full.elements
    assert peeked.dataset_offset == full.dataset_offset
    # Without a Series Instance UID, the first top-level tag after (0020,000E) ends the search.
    data = p10(EXPL.uids(study=False) + EXPL.el(ROWS, "US", b"\x01\x00") + EXPL.el(PIXEL_DATA, "OB", b"xy"))
    assert (inspect(data).elements, peek_uids(data).elements) == (4, 3)
    assert peek_uids(data).sop_instance_uid == SOP_INSTANCE


def test_peek_uids_on_deflated_prefixes() -> None:
    ds = sample_dataset(undefined=True)
    ds.PixelData = random.Random(7).randbytes(400_000)  # incompressible: a long deflated stream
    data = build(ds, DeflatedExplicitVRLittleEndian)
    start = meta_end(data)
    body = zlib.decompress(data[start:], -15)
    ends = dict(top_level_ends(body, 0, False, True))
    expected = {"sop_class_uid": (ends[0x00080016], CT_IMAGE), "sop_instance_uid": (ends[0x00080018], SOP_INSTANCE),
                "study_instance_uid": (ends[0x0020000D], STUDY), "series_instance_uid": (ends[0x0020000E], SERIES)}
    for cut in [*range(start, start + 1500), len(data) // 2, len(data) - 1, len(data)]:
        inflater = zlib.decompressobj(-15)
        available = len(inflater.decompress(data[start:cut]))  # what the received prefix inflates to
        info = peek_uids(data[:cut])
        assert info.media_sop_instance == SOP_INSTANCE
        for field, (end, value) in expected.items():
            assert getattr(info, field) == (value if available >= end else None), (cut, field)
    assert len(zlib.compress(body)) > 400_000  # really a long stream
    # The data set is walked up to the UIDs, not to the pixel data.
    assert peek_uids(data).elements < count_elements(data)
    # A stream that goes bad after the UIDs still names the instance.
    corrupt = data[:start + 1000] + b"\xff" * 64
    assert peek_uids(corrupt).sop_instance_uid == SOP_INSTANCE
    assert expect_error(corrupt).info.sop_instance_uid == SOP_INSTANCE


def fuzz_inputs(rng: random.Random) -> Iterator[bytes]:
    """Random bytes, random bytes behind a valid prefix, and cut or bit-flipped real files."""
    names = ["rtplan.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm", "UN_sequence.dcm",
             "test-SR.dcm", "MR_small_implicit.dcm", "nested_priv_SQ.dcm"]
    files = [bundled(name) for name in names]
    files.append(p10(nested(EXPL)))
    for _ in range(1000):
        yield rng.randbytes(rng.randrange(0, 600))
    for _ in range(200):
        yield bytes(128) + b"DICM" + rng.randbytes(rng.randrange(0, 400))
    for _ in range(500):
        yield meta(rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])) + \
            rng.randbytes(rng.randrange(1, 400))
    for _ in range(500):
        source = rng.choice(files)
        yield meta(rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                               DeflatedExplicitVRLittleEndian])) + source[rng.randrange(132, len(source)):]
    for _ in range(1500):
        data = bytearray(rng.choice(files))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.5:
            data = data[:rng.randrange(len(data) + 1)]
        yield bytes(data)
    for _ in range(1000):
        source = rng.choice(files)
        yield source[:rng.randrange(len(source))]


def test_fuzz_inspect_and_peek_never_fail_otherwise() -> None:
    rejected = accepted = 0
    for data in fuzz_inputs(random.Random(20240611)):
        try:
            info = inspect(data)
        except P10Error as exc:
            assert str(exc) and isinstance(exc.info, P10Info)
            rejected += 1
        else:
            assert isinstance(info, P10Info) and info.transfer_syntax is not None
            accepted += 1
        peeked = peek_uids(data)
        assert isinstance(peeked, P10Info)
    # Nearly everything is rejected; bit flips inside values are invisible to a structural check.
    assert rejected > 4000 and accepted > 0
