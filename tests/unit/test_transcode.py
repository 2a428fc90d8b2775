"""Transfer syntax conversion (gateway.dicomweb.transcode): file meta, native re-encoding, codecs."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.dicomweb import transcode as t
from gateway.dicomweb.transcode import DEFLATED_EXPLICIT_VR_LE as DEFLATED
from gateway.dicomweb.transcode import EXPLICIT_VR_BE as BE
from gateway.dicomweb.transcode import EXPLICIT_VR_LE as EVRLE
from gateway.dicomweb.transcode import IMPLICIT_VR_LE as IMPLICIT
from gateway.dicomweb.transcode import (
    NotProducible,
    can_produce,
    convert,
    convert_to_first,
    file_meta_bytes,
    pick_target,
)
from gateway.dimse.net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
MPEG2 = "1.2.840.10008.1.2.4.100"

LOSSLESS_TARGETS = [RLE, JLS, JLS_NEAR, J2K_LOSSLESS, J2K]
CAN = t.producible()


def test_the_codec_dependencies_are_installed() -> None:
    """The codecs are dependencies of the gateway: a missing one is a broken install, not a skip."""
    missing = [ts for ts in (RLE, JLS, J2K_LOSSLESS, JPEG_BASELINE) if not (CAN[ts]["encode"] and CAN[ts]["decode"])]
    assert not missing, f"no codec for {missing}: install the gateway's dependencies (pyproject.toml)"

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


# ------------------------------------------------------------------------------- datasets ---


def _base(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "PID-1"
    ds.StudyDescription = "Transcode test"
    ds.InstanceNumber = "7"
    return ds


def _image(ds: Dataset, arr: np.ndarray, *, bits_stored: int, photometric: str, planar: int = 0) -> Dataset:
    frames = arr.shape[0] if arr.ndim == 4 or (arr.ndim == 3 and photometric.startswith("MONO")) else 1
    spp = arr.shape[-1] if not photometric.startswith("MONO") else 1
    rows, cols = (arr.shape[1:3] if frames > 1 or arr.ndim == 4 else arr.shape[:2])
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    if spp > 1:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    if spp > 1 and planar == 1:
        # (frames,) rows, columns, samples -> (frames,) samples, rows, columns
        data = np.moveaxis(arr, -1, -3).tobytes()
    else:
        data = arr.tobytes()
    ds.PixelData = data
    return ds


def _smooth(shape: tuple[int, ...], low: int, high: int, dtype: str, seed: int = 1) -> np.ndarray:
    """Gradient plus noise: compressible, but exercises every bit."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, num=int(np.prod(shape))).reshape(shape)
    values = low + (high - low) * (0.9 * ramp + 0.1 * rng.random(shape))
    return np.clip(np.rint(values), low, high).astype(dtype)


def ct_signed() -> tuple[Dataset, np.ndarray]:
    arr = _smooth((64, 64), -1024, 2047, "<i2")
    ds = _image(_base(CT, "CT"), arr, bits_stored=12, photometric="MONOCHROME2")
    ds.SmallestImagePixelValue = int(arr.min())
    ds.LargestImagePixelValue = int(arr.max())
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1.000"
    return ds, arr


def ct_unsigned() -> tuple[Dataset, np.ndarray]:
    arr = _smooth((64, 64), 0, 65535, "<u2", seed=2)
    ds = _image(_base(CT, "CT"), arr, bits_stored=16, photometric="MONOCHROME2")
    ds.RescaleIntercept = "-32768"
    ds.RescaleSlope = "1"
    return ds, arr


def mr() -> tuple[Dataset, np.ndarray]:
    arr = _smooth((64, 48), 0, 4095, "<u2", seed=3)
    ds = _image(_base(MR, "MR"), arr, bits_stored=12, photometric="MONOCHROME2")
    ds.RepetitionTime = "500.0"
    ds.EchoTime = "12.5"
    return ds, arr


def mono8() -> tuple[Dataset, np.ndarray]:
    arr = _smooth((40, 64), 0, 255, "u1", seed=4)
    return _image(_base(SC, "OT"), arr, bits_stored=8, photometric="MONOCHROME2"), arr


def rgb(planar: int = 0) -> tuple[Dataset, np.ndarray]:
    arr = _smooth((48, 64, 3), 0, 255, "u1", seed=5)
    return _image(_base(US, "US"), arr, bits_stored=8, photometric="RGB", planar=planar), arr


def multiframe() -> tuple[Dataset, np.ndarray]:
    arr = _smooth((8, 32, 32), 0, 4095, "<u2", seed=6)
    ds = _image(_base(ENHANCED_CT, "CT"), arr, bits_stored=12, photometric="MONOCHROME2")
    return ds, arr


def sr() -> Dataset:
    ds = _base(SR, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = Sequence([name])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "No findings."
    ds.ContentSequence = Sequence([item])
    return ds


def with_extras(ds: Dataset) -> Dataset:
    """Private tags (known and unknown VR), nested and undefined-length sequences, odd VRs."""
    block = ds.private_block(0x0029, "GATEWAY TEST 1.0", create=True)
    block.add_new(0x10, "LO", "private text")
    block.add_new(0x11, "OB", b"\x01\x02\x03\x04")
    block.add_new(0x12, "US", 513)
    block.add_new(0x13, "SQ", Sequence([Dataset()]))
    block[0x13].value[0].PatientID = "inner"
    ds[block.get_tag(0x13)].is_undefined_length = True  # implicit: found as SQ by look-ahead
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D1100", "SRT", "Head"
    region = Dataset()
    region.AnatomicRegionSequence = Sequence([code])  # nested, defined length
    ds.add_new(0x00400260, "SQ", Sequence([region]))  # Performed Protocol Code Sequence
    voi = Dataset()
    voi.LUTDescriptor = [4, 0, 16]
    voi.add_new(0x00283006, "OW", struct.pack("<4H", 0, 100, 200, 300))  # LUT Data: "US or OW"
    voi.LUTExplanation = "identity-ish"
    ds.VOILUTSequence = Sequence([voi])
    ds.add_new(0x00089459, "FL", 29.97)  # RecommendedDisplayFrameRateInFloat
    ds.add_new(0x00082134, "FD", [1.5, -2.25])  # EventTimeOffset
    dim = Dataset()
    dim.DimensionIndexPointer = 0x00209157
    dim.FunctionalGroupPointer = 0x00209111
    ds.DimensionIndexSequence = Sequence([dim])
    ds.add_new(0x00181638, "OF", struct.pack("<4f", 1.0, 2.5, -3.0, 4.25))  # VerticesOfThePolygonalOutline
    return ds


def encode(ds: Dataset, ts: str) -> bytes:
    """`ds` encoded in a native `ts` (as the PACS would send it)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = ts == IMPLICIT
    fp.is_little_endian = ts != BE
    if ts == BE:
        ds = _big_endian_copy(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    data = fp.getvalue()
    return t._deflate(data) if ts == DEFLATED else data


def _big_endian_copy(ds: Dataset) -> Dataset:
    """pydicom writes OW/OF bytes unchanged: swap them so that the Big Endian data is genuine."""
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", Sequence([_big_endian_copy(item) for item in elem.value]))
            continue
        out.add_new(elem.tag, elem.VR, elem.value)
        if elem.tag == 0x7FE00010 and ds.BitsAllocated > 8:
            out[elem.tag].VR = "OW"
            out[elem.tag].value = np.frombuffer(elem.value, "<u2").byteswap().tobytes()
        elif elem.VR == "OF":
            out[elem.tag].value = np.frombuffer(elem.value, "<f4").byteswap().tobytes()
        elif elem.VR == "OW" and elem.tag != 0x7FE00010:
            out[elem.tag].value = np.frombuffer(elem.value, "<u2").byteswap().tobytes()
    return out


def read(data: bytes, ts: str, ds: Dataset | None = None) -> Dataset:
    """Read back a PS3.10 file made of our file meta and `data`."""
    sop_class = ds.get("SOPClassUID", CT) if ds is not None else CT
    sop_instance = ds.get("SOPInstanceUID", "1.2.3") if ds is not None else "1.2.3"
    return dcmread(io.BytesIO(file_meta_bytes(sop_class, sop_instance, ts) + data))


def pixels(data: bytes, ts: str) -> np.ndarray:
    return read(data, ts).pixel_array


def assert_same_elements(a: Dataset, b: Dataset, path: str = "", *, binary: bool = True) -> None:
    """Every element of `a` is in `b` with an equal value (sequences item by item).

    ``binary=False`` skips OB/OW/OF/OD/OL/OV/UN values (pydicom leaves Big Endian ones unswapped).
    """
    tags_a = {e.tag for e in a if e.tag.element != 0}
    tags_b = {e.tag for e in b if e.tag.element != 0}
    assert tags_a == tags_b, f"{path}: {sorted(tags_a ^ tags_b)}"
    for elem in a:
        if elem.tag.element == 0:
            continue
        other = b[elem.tag]
        where = f"{path}{elem.tag}"
        if elem.VR == "SQ":
            assert other.VR == "SQ", where
            assert len(elem.value) == len(other.value), where
            for x, y in zip(elem.value, other.value, strict=True):
                assert_same_elements(x, y, where + ">", binary=binary)
        elif binary or elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            value = elem.value
            if isinstance(value, bytes) and len(value) % 2:
                value += b"\0"  # an odd length (invalid) is padded to even
            assert value == other.value, where


# ------------------------------------------------------------------------------ file meta ---


def test_file_meta_reads_back_with_pydicom() -> None:
    ds, _ = ct_signed()
    data = encode(ds, EVRLE)
    meta = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, EVRLE)
    assert meta[:128] == bytes(128) and meta[128:132] == b"DICM" and len(meta) % 2 == 0
    (group_length,) = struct.unpack_from("<I", meta, 140)
    assert group_length == len(meta) - 144
    back = dcmread(io.BytesIO(meta + data))
    fm = back.file_meta
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == CT
    assert fm.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert fm.TransferSyntaxUID == EVRLE
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID == "1.2.826.0.1.3680043.10.1137.1"
    assert fm.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert back.PatientName == "Müller^Jörg"
    assert np.array_equal(back.pixel_array, np.frombuffer(ds.PixelData, "<i2").reshape(64, 64))


def test_file_meta_pads_odd_uids() -> None:
    meta = file_meta_bytes("1.2.3", "1.2.34\0", "1.2.840.10008.1.2.4.50 ")
    fm = dcmread(io.BytesIO(meta + b""), force=True).file_meta
    assert fm.MediaStorageSOPClassUID == "1.2.3"
    assert fm.MediaStorageSOPInstanceUID == "1.2.34"
    assert fm.TransferSyntaxUID == JPEG_BASELINE


# ------------------------------------------------------------------ native <-> native ---


def test_same_syntax_is_returned_unchanged() -> None:
    data = encode(ct_signed()[0], EVRLE)
    out, ts = convert(data, EVRLE, EVRLE)
    assert out is data and ts == EVRLE
    out, ts = convert(memoryview(data), JLS, JLS)
    assert out == data and isinstance(out, bytes)


@pytest.mark.parametrize("make", [ct_signed, ct_unsigned, mr, mono8, rgb, multiframe])
def test_implicit_to_explicit_keeps_every_value(make) -> None:
    ds, _ = make()
    ds = with_extras(ds)
    implicit = encode(ds, IMPLICIT)
    out, ts = convert(implicit, IMPLICIT, EVRLE)
    assert ts == EVRLE
    back = read(out, EVRLE, ds)
    source = dcmread(io.BytesIO(file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, IMPLICIT) + implicit))
    assert_same_elements(source, back)
    assert back.PixelData == ds.PixelData
    assert back["PixelData"].VR == ("OB" if ds.BitsAllocated == 8 else "OW")
    private = back.private_block(0x0029, "GATEWAY TEST 1.0")
    assert back[private.get_tag(0x10)].VR == "UN"  # unknown private VR stays UN
    assert back[private.get_tag(0x10)].value == b"private text"
    assert back[private.get_tag(0x13)].VR == "SQ"  # undefined length: a sequence
    assert back[private.get_tag(0x13)].value[0].PatientID == "inner"
    assert back.VOILUTSequence[0]["LUTData"].VR in ("US", "OW")
    assert back.DimensionIndexSequence[0].DimensionIndexPointer == 0x00209157
    if ds.PixelRepresentation == 1 and "SmallestImagePixelValue" in ds:
        assert back["SmallestImagePixelValue"].VR == "SS"
        assert back.SmallestImagePixelValue == ds.SmallestImagePixelValue


def test_implicit_to_explicit_is_byte_faithful_for_text() -> None:
    """Values are copied, not decoded: bytes that are invalid in the declared charset survive."""
    ds, _ = mono8()
    ds.SpecificCharacterSet = "ISO_IR 192"
    implicit = encode(ds, IMPLICIT)
    bad_name = b"Caf\xe9^Latin1InUtf8 "
    raw = struct.pack("<HHI", 0x0010, 0x0010, len(bad_name)) + bad_name
    start = implicit.index(struct.pack("<HH", 0x0010, 0x0010))
    (length,) = struct.unpack_from("<I", implicit, start + 4)
    implicit = implicit[:start] + raw + implicit[start + 8 + length :]
    out, _ = convert(implicit, IMPLICIT, EVRLE)
    assert struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", len(bad_name)) + bad_name in out


def test_implicit_long_values_and_private_sequences_become_un() -> None:
    ds = sr()
    ds.ContentSequence[0].TextValue = "x" * 70000  # UT: 32-bit length, stays UT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # longer than LT allows: that is the point
        ds.add_new(0x00204000, "LT", "y" * 70001)  # Image Comments: 16-bit length in explicit VR
    block = ds.private_block(0x0011, "SOMEONE", create=True)
    block.add_new(0x01, "SQ", Sequence([Dataset()]))
    block[0x01].value[0].PatientID = "hidden"  # defined length, unknown private VR -> UN
    implicit = encode(ds, IMPLICIT)
    out, _ = convert(implicit, IMPLICIT, EVRLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = read(out, EVRLE, ds)
        assert back.ContentSequence[0].TextValue == "x" * 70000
        assert back["ImageComments"].VR == "UN"
        assert back["ImageComments"].value.rstrip(b" ") == b"y" * 70001
        hidden = back[block.get_tag(0x01)]
        assert hidden.VR in ("UN", "SQ")  # pydicom may infer SQ from UN contents
    # the UN value is the implicit encoding of the item, unchanged (PS3.5 6.2.2)
    assert struct.pack("<HH", 0xFFFE, 0xE000) in out and b"hidden" in out


@pytest.mark.parametrize("make", [ct_signed, ct_unsigned, mono8, rgb, multiframe])
def test_big_endian_to_explicit_swaps_values(make) -> None:
    ds, arr = make()
    ds = with_extras(ds)
    be = encode(ds, BE)
    if ds.BitsAllocated > 8:
        assert be[-arr.nbytes :] == arr.byteswap().tobytes()  # the source really is big endian
    out, _ = convert(be, BE, EVRLE)
    back = read(out, EVRLE, ds)
    assert np.array_equal(back.pixel_array, arr)
    assert back.PixelData == ds.PixelData
    assert back.SmallestImagePixelValue == ds.SmallestImagePixelValue if "SmallestImagePixelValue" in ds else True
    assert back.RecommendedDisplayFrameRateInFloat == pytest.approx(29.97)
    assert back.EventTimeOffset == [1.5, -2.25]
    assert back.DimensionIndexSequence[0].DimensionIndexPointer == 0x00209157
    assert back.DimensionIndexSequence[0].FunctionalGroupPointer == 0x00209111
    assert back.VerticesOfThePolygonalOutline == struct.pack("<4f", 1.0, 2.5, -3.0, 4.25)
    assert back.VOILUTSequence[0].LUTDescriptor == [4, 0, 16]
    lut = back.VOILUTSequence[0]["LUTData"]
    assert (lut.value if lut.VR == "US" else list(np.frombuffer(lut.value, "<u2"))) == [0, 100, 200, 300]
    private = back.private_block(0x0029, "GATEWAY TEST 1.0")
    assert back[private.get_tag(0x12)].value == 513
    assert back.PatientName == "Müller^Jörg"


def test_deflate_both_ways() -> None:
    ds, arr = ct_signed()
    ds = with_extras(ds)
    evrle = encode(ds, EVRLE)
    deflated, ts = convert(evrle, EVRLE, DEFLATED)
    assert ts == DEFLATED and len(deflated) < len(evrle)
    assert zlib.decompress(deflated, -15) == evrle  # raw deflate, PS3.5 A.5
    back = dcmread(io.BytesIO(file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, DEFLATED) + deflated))
    assert np.array_equal(back.pixel_array, arr)
    inflated, ts = convert(deflated, DEFLATED, EVRLE)
    assert ts == EVRLE and inflated == evrle
    # Implicit -> Deflated is Implicit -> Explicit, then deflated
    implicit = encode(ds, IMPLICIT)
    deflated2, _ = convert(implicit, IMPLICIT, DEFLATED)
    assert zlib.decompress(deflated2, -15) == convert(implicit, IMPLICIT, EVRLE)[0]
    # a zlib header (against the standard) is tolerated on input
    assert convert(zlib.compress(evrle), DEFLATED, EVRLE)[0] == evrle


def test_sr_without_pixels_in_native_syntaxes() -> None:
    ds = sr()
    for source in (IMPLICIT, BE, DEFLATED, EVRLE):
        out, ts = convert(encode(ds, source), source, EVRLE)
        assert ts == EVRLE
        assert_same_elements(ds, read(out, EVRLE, ds))


# -------------------------------------------------------------------------------- codecs ---

IMAGES = {
    "ct_signed": ct_signed,
    "ct_unsigned": ct_unsigned,
    "mr": mr,
    "mono8": mono8,
    "rgb": rgb,
    "rgb_planar": lambda: rgb(planar=1),
    "multiframe": multiframe,
}


@pytest.mark.parametrize("target", LOSSLESS_TARGETS)
@pytest.mark.parametrize("kind", list(IMAGES))
def test_lossless_round_trip_is_pixel_exact(kind: str, target: str) -> None:
    ds, arr = IMAGES[kind]()
    evrle = encode(ds, EVRLE)
    encoded, ts = convert(evrle, EVRLE, target)
    assert ts == target
    out = read(encoded, target, ds)
    assert out.file_meta.TransferSyntaxUID == target
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert out.get("LossyImageCompression") != "01"
    assert "LossyImageCompressionMethod" not in out
    assert out["PixelData"].is_undefined_length
    assert np.array_equal(out.pixel_array, arr)  # decoded by pydicom's own choice of plugin
    # and back to Explicit VR LE through our decoder
    native, ts = convert(encoded, target, EVRLE)
    back = read(native, EVRLE, ds)
    assert np.array_equal(back.pixel_array, arr)
    assert back.PhotometricInterpretation in (ds.PhotometricInterpretation, "RGB")
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    if ds.get("PlanarConfiguration", 0) == 0:
        assert back.PixelData == ds.PixelData
    assert back.PatientName == ds.PatientName


def test_implicit_and_big_endian_sources_encode_directly() -> None:
    ds, arr = ct_signed()
    for source in (IMPLICIT, BE, DEFLATED):
        encoded, _ = convert(encode(ds, source), source, JLS)
        assert np.array_equal(pixels(encoded, JLS), arr)


def test_compressed_to_compressed() -> None:
    ds, arr = rgb()
    jls, _ = convert(encode(ds, EVRLE), EVRLE, JLS)
    for target in (RLE, J2K_LOSSLESS, DEFLATED):
        out, ts = convert(jls, JLS, target)
        assert ts == target
        assert np.array_equal(read(out, target, ds).pixel_array, arr)


def test_rgb_jpeg2000_uses_the_reversible_colour_transform() -> None:
    ds, arr = rgb()
    out, _ = convert(encode(ds, EVRLE), EVRLE, J2K_LOSSLESS)
    assert read(out, J2K_LOSSLESS, ds).PhotometricInterpretation == "YBR_RCT"
    native, _ = convert(out, J2K_LOSSLESS, EVRLE)
    back = read(native, EVRLE, ds)
    assert back.PhotometricInterpretation == "RGB"
    assert np.array_equal(back.pixel_array, arr)


@pytest.mark.parametrize(
    "target, method",
    [(JLS_NEAR, "ISO_14495_1"), (J2K, "ISO_15444_1"), (JPEG_BASELINE, "ISO_10918_1")],
)
@pytest.mark.parametrize("kind", ["mono8", "rgb", "ct_signed", "multiframe"])
def test_lossy_only_when_allowed_and_recorded(kind: str, target: str, method: str) -> None:
    ds, arr = IMAGES[kind]()
    evrle = encode(ds, EVRLE)
    if target == JPEG_BASELINE:
        with pytest.raises(NotProducible, match="lossy"):
            convert(evrle, EVRLE, target)
        if ds.BitsAllocated != 8:
            with pytest.raises(NotProducible, match="8-bit"):
                convert(evrle, EVRLE, target, lossy_allowed=True)
            return
    encoded, ts = convert(evrle, EVRLE, target, lossy_allowed=True)
    out = read(encoded, ts, ds)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == method
    assert float(out.LossyImageCompressionRatio) > 1
    assert out.SOPInstanceUID == ds.SOPInstanceUID  # same instance, lossy rendition
    decoded = out.pixel_array.astype(np.int32)
    error = np.abs(decoded - arr.astype(np.int32))
    if target == JLS_NEAR:
        assert error.max() <= t.JPEG_LS_NEAR
    else:
        assert error.mean() < 0.05 * (1 << ds.BitsStored)
    if target == JPEG_BASELINE and ds.SamplesPerPixel == 3:
        assert out.PhotometricInterpretation == "YBR_FULL_422"
    native, _ = convert(encoded, ts, EVRLE)  # decoding a lossy source keeps the record
    back = read(native, EVRLE, ds)
    assert back.LossyImageCompression == "01" and back.LossyImageCompressionMethod == method
    assert back.PhotometricInterpretation == ds.PhotometricInterpretation


def test_jpeg_baseline_from_ybr_full_colour_by_plane() -> None:
    ds, arr = rgb(planar=1)
    rgb_to_ybr = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ybr = np.clip(np.rint(arr @ rgb_to_ybr.T + [0, 128, 128]), 0, 255).astype("u1")
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = np.moveaxis(ybr, -1, 0).tobytes()
    encoded, ts = convert(encode(ds, EVRLE), EVRLE, JPEG_BASELINE, lossy_allowed=True)
    out = read(encoded, ts, ds)
    assert out.PhotometricInterpretation == "YBR_FULL_422" and out.PlanarConfiguration == 0
    assert np.abs(out.pixel_array.astype(int) - arr).mean() < 8


def test_lossy_attributes_are_appended() -> None:
    ds, _ = mono8()
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "5.0"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    encoded, ts = convert(encode(ds, EVRLE), EVRLE, J2K, lossy_allowed=True)
    out = read(encoded, ts, ds)
    assert list(out.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    assert len(out.LossyImageCompressionRatio) == 2 and out.LossyImageCompressionRatio[0] == 5.0


def test_lossless_request_never_yields_lossy_output() -> None:
    """Every codec target with lossy_allowed=False round-trips exactly, lossy TSs included."""
    for make in (ct_signed, rgb, multiframe):
        ds, arr = make()
        evrle = encode(ds, EVRLE)
        for target in LOSSLESS_TARGETS:
            encoded, _ = convert(evrle, EVRLE, target, lossy_allowed=False)
            out = read(encoded, target, ds)
            assert "LossyImageCompression" not in out
            assert np.array_equal(out.pixel_array, arr), (make.__name__, target)


def test_jpeg_baseline_source_decodes_to_rgb_and_is_marked_lossy() -> None:
    ds, arr = rgb()
    jpeg, _ = convert(encode(ds, EVRLE), EVRLE, JPEG_BASELINE, lossy_allowed=True)
    stripped = read(jpeg, JPEG_BASELINE, ds)
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        del stripped[keyword]  # a source that omits the record
    data = io.BytesIO()
    stripped.save_as(data, enforce_file_format=True)
    raw = data.getvalue()[len(file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, JPEG_BASELINE)) :]
    native, _ = convert(raw, JPEG_BASELINE, EVRLE)
    back = read(native, EVRLE, ds)
    assert back.PhotometricInterpretation == "RGB"
    assert back.LossyImageCompression == "01"
    assert np.abs(back.pixel_array.astype(int) - arr).mean() < 8


# --------------------------------------------------- third-party files bundled with pydicom ---


def _testfile(name: str) -> tuple[Dataset, bytes, str]:
    """pydicom's bundled test file `name`: (dataset as pydicom reads it, data set bytes, syntax)."""
    path = get_testdata_file(name)
    assert path is not None, name
    with open(path, "rb") as f:
        raw = f.read()
    ds = dcmread(path)
    start = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    return ds, raw[start:], str(ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("MR_small_implicit.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("MR_small_expb.dcm", "MR_small.dcm"),
        ("rtdose_expb.dcm", "rtdose.dcm"),  # 32-bit pixels, 15 frames
        ("liver_expb_1frame.dcm", "liver_1frame.dcm"),
        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
        ("image_dfl.dcm", None),
        ("nested_priv_SQ.dcm", None),
        ("priv_SQ.dcm", None),
        ("rtplan.dcm", None),
    ],
)
def test_third_party_native_files(name: str, reference: str | None) -> None:
    ds, data, ts = _testfile(name)
    out, _ = convert(data, ts, EVRLE)
    back = read(out, EVRLE, ds)
    assert_same_elements(ds, back, binary=ts != BE)
    if "PixelData" in ds and "BitsAllocated" in ds:
        expected = dcmread(_testfile(reference)[0].filename).pixel_array if reference else ds.pixel_array
        assert np.array_equal(back.pixel_array, expected)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "SC_rgb_rle_16bit_2frame.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "MR_small_jp2klossless.dcm",
        "GDCMJ2K_TextGBR.dcm",  # YBR_RCT
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless (.57)
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL
        "SC_rgb_jpeg.dcm",
    ],
)
def test_third_party_compressed_files_decode(name: str) -> None:
    ds, data, ts = _testfile(name)
    assert CAN[ts]["decode"], f"no decoder for {ts}: the gateway's codec dependencies are missing"
    out, _ = convert(data, ts, EVRLE)
    back = read(out, EVRLE, ds)
    expected = ds.pixel_array
    if ts == JPEG_BASELINE:  # decoders may round differently
        assert np.abs(back.pixel_array.astype(int) - expected).mean() < 1
    else:
        assert np.array_equal(back.pixel_array, expected)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PhotometricInterpretation in ("RGB", ds.PhotometricInterpretation)
    if back.SamplesPerPixel == 1 or back.PhotometricInterpretation == "RGB":
        again, _ = convert(out, EVRLE, JLS)  # and on to another lossless syntax
        assert np.array_equal(read(again, JLS, ds).pixel_array, back.pixel_array)


def test_twelve_bit_jpeg_extended_decodes_or_is_not_producible() -> None:
    """pydicom decodes 12-bit JPEG only with pylibjpeg-libjpeg (GPL, not a dependency)."""
    ds, data, ts = _testfile("JPGExtended.dcm")
    try:
        out, _ = convert(data, ts, EVRLE)
    except NotProducible as exc:
        assert "decode" in exc.reason
    else:
        assert read(out, EVRLE, ds).pixel_array.shape == ds.pixel_array.shape


# -------------------------------------------------------------------------- not producible ---


def test_never_produces_implicit_or_big_endian() -> None:
    data = encode(ct_signed()[0], EVRLE)
    for target in (IMPLICIT, BE):
        with pytest.raises(NotProducible, match="never"):
            convert(data, EVRLE, target)


def test_unknown_and_encoderless_targets() -> None:
    data = encode(ct_signed()[0], EVRLE)
    with pytest.raises(NotProducible):
        convert(data, EVRLE, JPEG_SV1)  # pydicom 3.0 has no JPEG Lossless encoder
    with pytest.raises(NotProducible):
        convert(data, EVRLE, "1.2.3.4")
    with pytest.raises(NotProducible):
        convert(data, "1.2.3.4", EVRLE)


def test_no_pixel_data_cannot_claim_a_compressed_syntax() -> None:
    data = encode(sr(), EVRLE)
    with pytest.raises(NotProducible, match="Pixel Data"):
        convert(data, EVRLE, JLS)
    # ... but a compressed label on a data set without pixels is relabelled for free
    out, ts = convert(data, JLS, EVRLE)
    assert out is data and ts == EVRLE
    out, ts = convert(data, MPEG2, DEFLATED)
    assert zlib.decompress(out, -15) == data


def test_undecodable_source_with_pixels() -> None:
    ds, _ = mono8()
    with pytest.raises(NotProducible, match="decoder"):
        convert(encode(ds, EVRLE), MPEG2, EVRLE)


def test_values_beyond_bits_stored_refuse_lossless_codecs() -> None:
    ds, arr = mr()  # 12 bits stored in 16
    arr = arr.copy()
    arr[0, 0] = 0x9000  # an overlay bit in the high bits
    ds.PixelData = arr.tobytes()
    evrle = encode(ds, EVRLE)
    for target in (RLE, JLS, J2K_LOSSLESS):
        with pytest.raises(NotProducible, match="Bits Stored"):
            convert(evrle, EVRLE, target)
    assert convert(evrle, EVRLE, DEFLATED)[1] == DEFLATED  # native targets are untouched


def test_codec_refusals_are_not_producible() -> None:
    ds, _ = mono8()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(NotProducible):
        convert(encode(ds, EVRLE), EVRLE, JPEG_BASELINE, lossy_allowed=True)
    ds, _ = ct_signed()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    with pytest.raises(NotProducible):
        convert(encode(ds, EVRLE), EVRLE, JLS)


def test_garbage_is_not_producible() -> None:
    with pytest.raises(NotProducible):
        convert(struct.pack("<HHI", 0x0010, 0x0010, 100) + b"truncated", IMPLICIT, EVRLE)
    with pytest.raises(NotProducible):
        convert(b"not deflated", DEFLATED, EVRLE)


# ------------------------------------------------------------- can_produce / pick_target ---


def test_can_produce() -> None:
    kw = {"has_pixel_data": True, "lossy_allowed": False}
    assert can_produce(IMPLICIT, EVRLE, **kw)
    assert can_produce(BE, DEFLATED, **kw)
    assert can_produce(EVRLE, EVRLE, **kw)
    assert not can_produce(EVRLE, IMPLICIT, **kw)
    assert not can_produce(IMPLICIT, BE, **kw)
    assert not can_produce(EVRLE, JPEG_SV1, **kw)
    assert not can_produce(MPEG2, EVRLE, **kw)
    assert can_produce(MPEG2, EVRLE, has_pixel_data=False, lossy_allowed=False)
    assert not can_produce(EVRLE, JLS, has_pixel_data=False, lossy_allowed=True)
    assert can_produce(EVRLE, EVRLE, has_pixel_data=False, lossy_allowed=False)
    if CAN[JPEG_BASELINE]["encode"]:
        assert not can_produce(EVRLE, JPEG_BASELINE, **kw)
        assert can_produce(EVRLE, JPEG_BASELINE, has_pixel_data=True, lossy_allowed=True)
        assert can_produce(JLS, J2K_LOSSLESS, **kw)
        assert can_produce(IMPLICIT, RLE, **kw)
        assert can_produce(EVRLE, J2K, **kw)  # produced losslessly


def test_pick_target_star_and_source_preference() -> None:
    kw = {"has_pixel_data": True, "lossy_allowed": False}
    assert pick_target(EVRLE, "*", **kw) == EVRLE
    assert pick_target(IMPLICIT, "*", **kw) == EVRLE
    assert pick_target(BE, ["*"], **kw) == EVRLE
    assert pick_target(DEFLATED, "*", **kw) == DEFLATED
    assert pick_target(JLS, "*", **kw) == JLS
    assert pick_target(MPEG2, "*", **kw) == MPEG2  # as stored, even without a decoder
    assert pick_target(JLS, [J2K_LOSSLESS, JLS], **kw) == JLS  # no transcoding needed
    assert pick_target(IMPLICIT, [IMPLICIT, BE], **kw) is None
    assert pick_target(IMPLICIT, [IMPLICIT, EVRLE], **kw) == EVRLE
    assert pick_target(MPEG2, [EVRLE], **kw) is None
    assert pick_target(EVRLE, ["1.2.3", JPEG_SV1], **kw) is None
    assert pick_target(EVRLE, [], **kw) is None
    if CAN[JLS]["encode"]:
        assert pick_target(EVRLE, [JPEG_SV1, JLS], **kw) == JLS
        assert pick_target(EVRLE, [JLS, EVRLE], **kw) == EVRLE  # the source wins: nothing to do
        assert pick_target(EVRLE, [JPEG_BASELINE, JLS], **kw) == JLS
        assert pick_target(EVRLE, [JPEG_BASELINE, JLS], has_pixel_data=True, lossy_allowed=True) == JPEG_BASELINE
        assert pick_target(EVRLE, [JLS, EVRLE], has_pixel_data=False, lossy_allowed=True) == EVRLE
        assert pick_target(JLS, [RLE, "*"], **kw) == JLS
        assert pick_target(IMPLICIT, [RLE, "*"], **kw) == RLE


def test_convert_to_first_falls_through_what_the_image_cannot_take() -> None:
    ds, arr = ct_signed()
    data = encode(ds, IMPLICIT)
    out, ts = convert_to_first(data, IMPLICIT, [JPEG_BASELINE, JLS], lossy_allowed=True)
    assert ts == JLS and np.array_equal(pixels(out, JLS), arr)
    out, ts = convert_to_first(data, IMPLICIT, "*")
    assert ts == EVRLE
    with pytest.raises(NotProducible):
        convert_to_first(data, IMPLICIT, [JPEG_BASELINE], lossy_allowed=True)
    out, ts = convert_to_first(encode(sr(), EVRLE), EVRLE, [JLS, DEFLATED])
    assert ts == DEFLATED


def test_producible_table_matches_the_code() -> None:
    table = t.producible()
    assert set(table) == set(t.PRODUCIBLE)
    assert not table[IMPLICIT]["encode"] and not table[BE]["encode"]
    assert table[EVRLE]["encode"] and table[DEFLATED]["encode"]
    assert not table[JPEG_SV1]["encode"]
    for ts, row in t.PRODUCIBLE.items():
        assert ts in t.__doc__ or row.encoder == ""
