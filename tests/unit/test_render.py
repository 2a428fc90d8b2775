"""Rendered and thumbnail resources (gateway.dicomweb.render): parameters, media types, pixels.

Every image here is a synthetic data set made in the test; the rendered output is decoded with
Pillow and its pixel values are compared with what PS3.3 (VOI functions, Modality and VOI LUTs)
and PS3.18 8.3.5.1 (viewport, quality, annotation) say they must be.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.dicomweb.render import (
    DEFAULT_QUALITY,
    THUMBNAIL_SIZE,
    NotAcceptableMedia,
    NotRenderable,
    RenderError,
    RenderParams,
    Viewport,
    Window,
    annotation_warning,
    choose_rendered_media,
    number_of_frames,
    parse_render_params,
    render_frame,
)

EVRLE = "1.2.840.10008.1.2.1"
EVRBE = "1.2.840.10008.1.2.2"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
MPEG2 = "1.2.840.10008.1.2.4.100"
SC = "1.2.840.10008.5.1.4.1.1.7"

IDENTITY = Window(128, 256, "linear")  # y = x for 0 <= x <= 255 (PS3.3 C.11.2.1.2.1)


# ------------------------------------------------------------------------------- helpers ---


def make_image(
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int | None = None,
    **attrs: object,
) -> Dataset:
    """A native (Explicit VR LE) image whose pixel data are ``arr``, frames first if ``frames``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EVRLE
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    colour = photometric in ("RGB", "YBR_FULL")
    shape = arr.shape[1:] if frames else arr.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    if frames:
        ds.NumberOfFrames = frames
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    return ds


def decode(data: bytes) -> np.ndarray:
    """The pixels of a rendered PNG/JPEG/GIF (a GIF palette resolved to grey or RGB)."""
    image = Image.open(io.BytesIO(data))
    if image.mode == "P":
        image = image.convert("RGB")
    return np.asarray(image)


def png(ds: Dataset, frame: int = 1, **kwargs: object) -> np.ndarray:
    return decode(render_frame(ds, frame, RenderParams(media_type="image/png", **kwargs)))


def linear_ps33(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), output range 0..255 before rounding, as the standard writes it."""
    x = np.asarray(x, dtype=float)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y))


def linear_exact_ps33(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 (LINEAR_EXACT)."""
    x = np.asarray(x, dtype=float)
    y = ((x - c) / w + 0.5) * 255
    return np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))


def sigmoid_ps33(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 (SIGMOID)."""
    x = np.asarray(x, dtype=float)
    return 255 / (1 + np.exp(-4 * (x - c) / w))


def assert_rounds_to(out: np.ndarray, y: np.ndarray, tie: float = 1e-6) -> None:
    """``out`` is ``y`` rounded to the nearest integer; where ``y`` is (within ``tie``) halfway
    between two integers, either one will do (the standard does not say how to round)."""
    assert out.shape == y.shape
    nearest = np.round(y)
    near_tie = np.abs(y - np.floor(y) - 0.5) < tie
    ok = (out == nearest) | (near_tie & ((out == np.floor(y)) | (out == np.ceil(y))))
    assert ok.all(), f"{(~ok).sum()} pixels differ, e.g. {out[~ok][:5]} for {y[~ok][:5]}"


def ct_gradient() -> Dataset:
    """A CT-like image: stored 0..2047 (12 bits), Rescale Intercept -1024, so HU -1024..1023."""
    stored = np.arange(2048, dtype=np.uint16).reshape(32, 64)
    return make_image(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, Modality="CT")


def ct_hu() -> np.ndarray:
    return np.arange(2048, dtype=float).reshape(32, 64) - 1024


def quadrants() -> Dataset:
    """64 columns x 32 rows, 8-bit: top-left 50, top-right 100, bottom-left 150, bottom-right 200."""
    arr = np.empty((32, 64), np.uint8)
    arr[:16, :32], arr[:16, 32:], arr[16:, :32], arr[16:, 32:] = 50, 100, 150, 200
    return make_image(arr)


def red_and_blue() -> np.ndarray:
    """64 x 64 RGB: left half pure red, right half pure blue."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (255, 0, 0)
    rgb[:, 32:] = (0, 0, 255)
    return rgb


def jpeg_baseline(ds: Dataset, frames: list[bytes], photometric: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    ds.PhotometricInterpretation = photometric
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def compressed(ds: Dataset, ts: str, tmp_path) -> Dataset:
    """``ds`` in a lossless compressed syntax: pydicom's encoders, or GDCM for JPEG Lossless SV1."""
    out = copy.deepcopy(ds)
    if ts != JPEG_SV1:
        out.compress(ts, generate_instance_uid=False)
        return out
    # GDCM encodes one frame at a time here (its writer refuses signed multi-frame data)
    frames = number_of_frames(ds)
    stack = ds.pixel_array.reshape(frames, ds.Rows, ds.Columns)
    codestreams = []
    for index, frame in enumerate(stack):
        single = make_image(frame, bits_stored=ds.BitsStored)
        codestreams.append(gdcm_jpeg_lossless(single, tmp_path / f"frame{index}"))
    out.file_meta.TransferSyntaxUID = JPEG_SV1
    out.PixelData = encapsulate(codestreams)
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    return out


def gdcm_jpeg_lossless(ds: Dataset, stem) -> bytes:
    """The JPEG Lossless SV1 codestream of a single-frame image, as GDCM writes it."""
    import gdcm
    from pydicom.encaps import generate_frames

    source, target = f"{stem}-native.dcm", f"{stem}-sv1.dcm"
    ds.save_as(source, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(source)
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(target)
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    written = dcmread(target)
    assert written.file_meta.TransferSyntaxUID == JPEG_SV1
    return next(generate_frames(written.PixelData, number_of_frames=1))


# ------------------------------------------------------------------------------ windowing ---


def test_a_linear_window_gives_the_ps33_greys_after_the_rescale() -> None:
    out = png(ct_gradient(), window=Window(40, 400, "linear"))
    assert out.dtype == np.uint8 and out.shape == (32, 64)
    assert_rounds_to(out, linear_ps33(ct_hu(), 40, 400))
    # spot checks: below the window black, above white, the centre mid-grey
    hu = ct_hu()
    assert out[hu == -161].item() == 0 and out[hu == 241].item() == 255
    assert out[hu == 40].item() == 128


def test_the_rescale_is_applied_before_the_window() -> None:
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    ds = make_image(stored, RescaleSlope=2, RescaleIntercept=-100)
    out = png(ds, window=IDENTITY)
    assert np.array_equal(out, np.clip(2 * stored.astype(int) - 100, 0, 255))
    assert not np.array_equal(out, np.clip(stored, 0, 255))


def test_linear_exact_matches_ps33() -> None:
    out = png(ct_gradient(), window=Window(100, 50, "linear-exact"))
    assert_rounds_to(out, linear_exact_ps33(ct_hu(), 100, 50))


def test_sigmoid_matches_ps33_and_differs_from_linear() -> None:
    ds = ct_gradient()
    sigmoid = png(ds, window=Window(0, 300, "sigmoid")).astype(int)
    assert_rounds_to(sigmoid, sigmoid_ps33(ct_hu(), 0, 300), tie=1e-3)  # float32 exp here
    linear = png(ds, window=Window(0, 300, "linear")).astype(int)
    hu = ct_hu()
    # at the window's lower edge the linear function is black; the sigmoid is 255 / (1 + e^2)
    assert linear[hu == -150].item() == 0
    assert sigmoid[hu == -150].item() == round(255 / (1 + math.e**2))


def test_a_width_one_linear_window_is_a_step() -> None:
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    out = png(make_image(stored), window=Window(20, 1, "linear"))
    assert np.array_equal(out, np.where(stored > 19.5, 255, 0))


def test_the_data_sets_first_window_and_voi_lut_function_are_used() -> None:
    ds = ct_gradient()
    ds.WindowCenter = [40, -600]
    ds.WindowWidth = [400, 1500]
    assert_rounds_to(png(ds), linear_ps33(ct_hu(), 40, 400))
    ds.VOILUTFunction = "LINEAR_EXACT"
    assert_rounds_to(png(ds), linear_exact_ps33(ct_hu(), 40, 400))
    ds.VOILUTFunction = "SIGMOID"
    assert_rounds_to(png(ds), sigmoid_ps33(ct_hu(), 40, 400), tie=1e-3)
    # the window parameter wins over the data set's
    assert_rounds_to(png(ds, window=Window(-600, 1500, "linear")), linear_ps33(ct_hu(), -600, 1500))


def test_the_voi_lut_sequence_is_used_and_clamped_at_its_ends() -> None:
    stored = np.arange(98, 106, dtype=np.uint16).reshape(1, 8)
    ds = make_image(stored, WindowCenter=0, WindowWidth=1)  # would make everything white
    lut = Dataset()
    lut.LUTDescriptor = [4, 100, 16]
    lut.LUTData = [0, 21845, 43690, 65535]
    ds.VOILUTSequence = Sequence([lut])
    assert png(ds).tolist() == [[0, 0, 0, 85, 170, 255, 255, 255]]


def test_a_voi_lut_for_negative_modality_values_may_give_its_first_value_as_us() -> None:
    stored = np.arange(922, 930, dtype=np.uint16).reshape(1, 8)  # HU -102 .. -95
    ds = make_image(stored, RescaleSlope=1, RescaleIntercept=-1024)
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4, 65536 - 100, 16])  # first mapped value -100, written as US
    lut.LUTData = [0, 21845, 43690, 65535]
    ds.VOILUTSequence = Sequence([lut])
    assert png(ds).tolist() == [[0, 0, 0, 85, 170, 255, 255, 255]]


def test_an_eight_bit_voi_lut_in_ow_is_scaled_from_its_own_depth() -> None:
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    ds = make_image(stored)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.add_new(0x00283006, "OW", (255 - np.arange(256, dtype="<u2")).tobytes())
    ds.VOILUTSequence = Sequence([lut])
    assert np.array_equal(png(ds), 255 - stored)


def test_the_modality_lut_sequence_replaces_the_rescale() -> None:
    stored = np.array([[0, 1, 2, 3, 4]], np.uint16)
    ds = make_image(stored, RescaleSlope=100, RescaleIntercept=5)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.LUTData = [0, 1000, 2000, 3000]
    lut.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([lut])
    ds.Modality = "US"
    del ds.RescaleSlope, ds.RescaleIntercept
    assert png(ds, window=Window(1500, 3000, "linear-exact")).tolist() == [[0, 85, 170, 255, 255]]


def test_without_any_window_the_frame_range_is_stretched() -> None:
    stored = (np.arange(256, dtype=np.uint16) + 1000).reshape(16, 16)
    assert np.array_equal(png(make_image(stored)), stored - 1000)
    flat = make_image(np.full((4, 4), 700, np.uint16))
    assert np.array_equal(png(flat), np.zeros((4, 4)))


def test_monochrome1_is_inverted() -> None:
    stored = (np.arange(256, dtype=np.uint16) + 1000).reshape(16, 16)
    ds = make_image(stored, photometric="MONOCHROME1")
    assert np.array_equal(png(ds), 255 - (stored - 1000))
    eight_bit = make_image(np.arange(256, dtype=np.uint8).reshape(16, 16), photometric="MONOCHROME1")
    assert np.array_equal(png(eight_bit, window=IDENTITY), 255 - np.arange(256).reshape(16, 16))


def test_signed_16_bit_values_stay_negative() -> None:
    stored = np.arange(-200, 200, dtype=np.int16).reshape(20, 20)
    out = png(make_image(stored), window=Window(0, 256, "linear"))  # y = x + 128, clipped
    assert np.array_equal(out, np.clip(stored.astype(int) + 128, 0, 255))


def test_signed_12_bit_values_are_sign_extended() -> None:
    raw = np.array([[0x0FFF, 0x0800, 0x07FF, 0x0000, 0xF001]], np.uint16)  # -1, -2048, 2047, 0, 1
    ds = make_image(raw, bits_stored=12)
    ds.PixelRepresentation = 1
    assert png(ds, window=Window(0, 256, "linear")).tolist() == [[127, 0, 255, 128, 129]]


def test_unsigned_bits_above_bits_stored_are_ignored() -> None:
    raw = np.array([[0xF000 | 5, 5, 0x1000 | 200]], np.uint16)
    assert png(make_image(raw, bits_stored=12), window=IDENTITY).tolist() == [[5, 5, 200]]


def test_eight_bit_unsigned_grey() -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(png(make_image(stored), window=IDENTITY), stored)


def test_float_pixel_data_renders() -> None:
    values = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    ds = make_image(np.zeros((8, 8), np.uint16))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    out = png(ds)
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)


def test_functional_groups_give_the_rescale_and_each_frames_window() -> None:
    stored = np.stack([np.arange(2048, dtype=np.uint16).reshape(32, 64)] * 2)
    ds = make_image(stored, frames=2)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for center, width in ((40, 400), (-600, 1500)):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    assert_rounds_to(png(ds, 1), linear_ps33(ct_hu(), 40, 400))
    assert_rounds_to(png(ds, 2), linear_ps33(ct_hu(), -600, 1500))


# --------------------------------------------------------------------------------- colour ---


def test_rgb_colours_come_out_unchanged() -> None:
    rgb = red_and_blue()
    ds = make_image(rgb, photometric="RGB")
    assert np.array_equal(png(ds), rgb)
    jpeg = decode(render_frame(ds, 1, RenderParams()))
    assert np.abs(jpeg[32, 8].astype(int) - (255, 0, 0)).max() <= 12
    assert np.abs(jpeg[32, 56].astype(int) - (0, 0, 255)).max() <= 12
    # a window does not apply to colour
    assert np.array_equal(png(ds, window=Window(10, 5, "linear")), rgb)


def test_rgb_planar_configuration_one() -> None:
    rgb = red_and_blue()
    ds = make_image(rgb, photometric="RGB")
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    assert np.array_equal(png(ds), rgb)


def test_sixteen_bit_rgb_is_scaled_to_eight_bits() -> None:
    rgb = red_and_blue().astype(np.uint16) * 257  # 255 -> 65535
    assert np.array_equal(png(make_image(rgb, photometric="RGB")), red_and_blue())


def test_native_ybr_full_becomes_the_right_rgb() -> None:
    rgb = red_and_blue()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = make_image(ybr, photometric="YBR_FULL")
    assert np.abs(png(ds).astype(int) - rgb).max() <= 2


def test_native_ybr_full_422_becomes_the_right_rgb() -> None:
    rgb = red_and_blue()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(int)
    # PS3.3 C.7.6.3.1.2: per two pixels of a row, Y1 Y2 Cb Cr (chroma shared)
    pairs = ybr.reshape(64, 32, 2, 3)
    packed = np.stack(
        [pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, :, 1].mean(axis=2), pairs[:, :, :, 2].mean(axis=2)],
        axis=-1,
    )
    ds = make_image(ybr.astype(np.uint8), photometric="YBR_FULL")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = np.rint(packed).astype(np.uint8).tobytes()
    out = png(ds).astype(int)
    assert np.abs(out - rgb).max() <= 2


@pytest.mark.parametrize("subsampling", ["4:2:2", "4:2:0", "4:4:4"])
def test_jpeg_baseline_ybr_full_422_becomes_the_right_rgb(subsampling: str) -> None:
    """The JPEG codec stores YCbCr; pydicom converts it to RGB once (no double conversion)."""
    rgb = red_and_blue()
    stream = io.BytesIO()
    Image.fromarray(rgb).save(stream, format="JPEG", quality=95, subsampling=subsampling)
    ds = jpeg_baseline(make_image(rgb, photometric="RGB"), [stream.getvalue()], "YBR_FULL_422")
    out = png(ds).astype(int)
    assert np.abs(out[32, 8] - (255, 0, 0)).max() <= 12
    assert np.abs(out[32, 56] - (0, 0, 255)).max() <= 12


def test_jpeg_baseline_stored_as_rgb_is_not_converted_again() -> None:
    rgb = red_and_blue()
    stream = io.BytesIO()
    Image.fromarray(rgb).save(stream, format="JPEG", quality=95, subsampling="4:4:4", keep_rgb=True)
    ds = jpeg_baseline(make_image(rgb, photometric="RGB"), [stream.getvalue()], "RGB")
    out = png(ds).astype(int)
    assert np.abs(out[32, 8] - (255, 0, 0)).max() <= 12
    assert np.abs(out[32, 56] - (0, 0, 255)).max() <= 12


def test_jpeg_baseline_grey() -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    stream = io.BytesIO()
    Image.fromarray(grey).save(stream, format="JPEG", quality=100)
    ds = jpeg_baseline(make_image(grey), [stream.getvalue()], "MONOCHROME2")
    out = png(ds, window=IDENTITY).astype(int)
    assert np.abs(out - grey).max() <= 3


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL (DCMTK)
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG Baseline, YBR_FULL_422 (DCMTK)
        "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG Baseline, RGB without colour transform (DCMTK)
        "SC_rgb_jpeg_lossy_gdcm.dcm",  # JPEG Baseline, YBR_FULL (GDCM)
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless (.57), RGB
        "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
        "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
        "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    ],
)
def test_third_party_colour_encodings_render_like_the_lossless_original(name: str) -> None:
    """pydicom's own test files (shipped with it): one RGB picture written by DCMTK and GDCM in
    several ways, rendered and compared with its RLE (lossless) version."""
    from pydicom.data import get_testdata_file

    reference = png(dcmread(get_testdata_file("SC_rgb_rle.dcm"))).astype(int)
    assert reference[5, 50].tolist() == [255, 0, 0] and reference[25, 50].tolist() == [0, 255, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about some of these files' own labels
        out = png(dcmread(get_testdata_file(name))).astype(int)
    assert out.shape == reference.shape
    assert np.abs(out - reference).mean() < 4
    for row in range(5, 100, 10):  # the middle of each colour band
        assert np.abs(out[row, 50] - reference[row, 50]).max() <= 8, row


def test_palette_colour() -> None:
    indices = np.array([[0, 1, 2, 3]], np.uint8)
    ds = make_image(indices, photometric="PALETTE COLOR")
    red, green, blue = (np.zeros(256, "<u2") for _ in range(3))
    red[1], green[2], blue[3] = 0xFFFF, 0xFFFF, 0xFF00
    red[3] = 0x8000
    for name, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds.add_new({"Red": 0x00281201, "Green": 0x00281202, "Blue": 0x00281203}[name], "OW", table.tobytes())
    assert png(ds).tolist() == [[[0, 0, 0], [255, 0, 0], [0, 255, 0], [128, 0, 255]]]


def test_an_unsupported_photometric_interpretation_is_not_renderable() -> None:
    ds = make_image(red_and_blue(), photometric="RGB")
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    with pytest.raises(NotRenderable):
        png(ds)


# ------------------------------------------------------------------------ compressed data ---


@pytest.mark.parametrize("ts", [RLE, JLS, J2K_LOSSLESS, JPEG_SV1])
@pytest.mark.parametrize("signed", [False, True])
def test_compressed_frames_render_like_the_native_ones(ts: str, signed: bool, tmp_path) -> None:
    """Each frame decodes on its own, losslessly: the same pixels as the native data set."""
    base = np.arange(2048).reshape(32, 64)
    stack = np.stack([base, 2047 - base, (base * 7) % 2048]) - (1024 if signed else 0)
    ds = make_image(
        stack.astype(np.int16 if signed else np.uint16),
        frames=3,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=0 if signed else -1024,
    )
    packed = compressed(ds, ts, tmp_path)
    assert packed.file_meta.TransferSyntaxUID == ts
    window = Window(40, 400, "linear")
    for frame in (1, 2, 3):
        native = png(ds, frame, window=window)
        assert_rounds_to(native, linear_ps33(stack[frame - 1] - (0 if signed else 1024), 40, 400))
        assert np.array_equal(png(packed, frame, window=window), native), f"frame {frame}"


def test_big_endian_native_data() -> None:
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    ds = make_image(stored)
    ds.file_meta.TransferSyntaxUID = EVRBE
    ds.PixelData = stored.astype(">u2").tobytes()
    assert np.array_equal(png(ds, window=IDENTITY), stored)


def test_multi_frame_renders_the_requested_frame_only() -> None:
    stack = np.stack([np.full((8, 8), 10 * k, np.uint8) for k in range(1, 6)])
    ds = make_image(stack, frames=5)
    assert number_of_frames(ds) == 5
    for frame in range(1, 6):
        assert np.all(png(ds, frame, window=IDENTITY) == 10 * frame)
    for frame in (0, 6, -1):
        with pytest.raises(NotRenderable, match="frame"):
            png(ds, frame)


def test_no_pixel_data_is_not_renderable() -> None:
    ds = make_image(np.zeros((4, 4), np.uint8))
    del ds.PixelData
    with pytest.raises(NotRenderable, match="no pixel data"):
        png(ds)


def test_undecodable_or_unsupported_pixel_data_is_not_renderable() -> None:
    ds = jpeg_baseline(make_image(np.zeros((8, 8), np.uint8)), [b"\xff\xd8 not a JPEG stream \xff\xd9"], "MONOCHROME2")
    with pytest.raises(NotRenderable, match="could not be decoded"):
        png(ds)
    ds.file_meta.TransferSyntaxUID = MPEG2
    with pytest.raises(NotRenderable, match="cannot be decoded"):
        png(ds)
    short = make_image(np.zeros((8, 8), np.uint16))
    short.PixelData = b"\0\0" * 10
    with pytest.raises(NotRenderable):
        png(short)


# ------------------------------------------------------------------------------- viewport ---


def test_the_viewport_fits_the_image_keeping_its_aspect_ratio_without_padding() -> None:
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(32, 32))
    assert out.shape == (16, 32)  # 64 x 32 scaled by 1/2, not padded to 32 x 32
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(640, 100))
    assert out.shape == (100, 200)  # scaled up until the height fits
    assert out[10, 20] == 50 and out[10, 180] == 100 and out[90, 20] == 150 and out[90, 180] == 200


def test_the_viewport_source_region_is_cropped_and_scaled() -> None:
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(100, 100, 0, 0, 32, 16))
    assert out.shape == (50, 100) and np.all(out == 50)
    # sx, sy given, sw, sh omitted: the rest of the image
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(32, 16, 32, 16))
    assert out.shape == (16, 32) and np.all(out == 200)
    # a region reaching past the image is cut at its edge (16 x 32 left), then fitted into 10 x 10
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(10, 10, 48, 0, 100, 100))
    assert out.shape == (10, 5)


def test_negative_source_sizes_flip_the_image() -> None:
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(64, 32, 0, 0, -64, 32))
    assert out.shape == (32, 64)
    assert out[4, 4] == 100 and out[4, 60] == 50 and out[28, 4] == 200 and out[28, 60] == 150
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(64, 32, 0, 0, 64, -32))
    assert out[4, 4] == 150 and out[28, 4] == 50 and out[4, 60] == 200
    out = png(quadrants(), window=IDENTITY, viewport=Viewport(32, 16, 0, 0, -32, -16))  # top-left quadrant
    assert out.shape == (16, 32) and np.all(out == 50)
    # a gradient shows the order: flipped, the first column is the region's last
    gradient = make_image(np.tile(np.arange(64, dtype=np.uint8), (4, 1)))
    out = png(gradient, window=IDENTITY, viewport=Viewport(16, 4, 8, 0, -16, 4))
    assert out[0].tolist() == list(range(23, 7, -1))


def test_a_viewport_region_outside_the_image_is_a_400() -> None:
    with pytest.raises(RenderError) as caught:
        png(quadrants(), viewport=Viewport(10, 10, 64, 0))
    assert caught.value.parameter == "viewport"
    with pytest.raises(RenderError):
        png(quadrants(), viewport=Viewport(10, 10, 0, 32))


# ----------------------------------------------------------------------- output encodings ---


def test_jpeg_output_is_baseline_eight_bit_and_quality_changes_its_size() -> None:
    noise = np.random.default_rng(7).integers(0, 256, (128, 128), dtype=np.uint8)
    ds = make_image(noise)
    small = render_frame(ds, 1, RenderParams(quality=10, window=IDENTITY))
    large = render_frame(ds, 1, RenderParams(quality=95, window=IDENTITY))
    default = render_frame(ds, 1, RenderParams(window=IDENTITY))
    assert len(small) < len(default) < len(large)
    assert default == render_frame(ds, 1, RenderParams(quality=DEFAULT_QUALITY, window=IDENTITY))
    image = Image.open(io.BytesIO(large))
    assert image.format == "JPEG" and image.mode == "L" and image.size == (128, 128)
    assert b"\xff\xc0" in large and b"\xff\xc2" not in large  # SOF0 (baseline), no SOF2 (progressive)
    assert not image.info.get("progressive")
    assert np.abs(np.asarray(image).astype(int) - noise).mean() < 8


def test_png_and_gif_are_eight_bit_and_lossless_for_grey() -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = make_image(stored)
    png_image = Image.open(io.BytesIO(render_frame(ds, 1, RenderParams(media_type="image/png", window=IDENTITY))))
    assert png_image.format == "PNG" and png_image.mode == "L"
    assert np.array_equal(np.asarray(png_image), stored)
    gif_bytes = render_frame(ds, 1, RenderParams(media_type="image/gif", window=IDENTITY, quality=5))
    gif = Image.open(io.BytesIO(gif_bytes))
    assert gif.format == "GIF" and gif.mode in ("L", "P")
    assert np.array_equal(np.asarray(gif.convert("L")), stored)


def test_gif_keeps_pure_colours() -> None:
    rgb = red_and_blue()
    out = decode(render_frame(make_image(rgb, photometric="RGB"), 1, RenderParams(media_type="image/gif")))
    assert np.array_equal(out, rgb)


# ----------------------------------------------------------------------------- thumbnails ---


def test_a_thumbnail_fits_in_128_pixels_and_is_never_enlarged() -> None:
    wide = make_image(np.zeros((256, 512), np.uint8))
    out = decode(render_frame(wide, 1, RenderParams(thumbnail=True)))
    assert out.shape == (THUMBNAIL_SIZE // 2, THUMBNAIL_SIZE)
    small = make_image(np.zeros((40, 64), np.uint8))
    assert decode(render_frame(small, 1, RenderParams(thumbnail=True))).shape == (40, 64)
    with_viewport = parse_render_params([("viewport", "50,50")], None, thumbnail=True)
    assert decode(render_frame(wide, 1, with_viewport)).shape == (25, 50)


def test_a_thumbnail_takes_no_annotation_and_only_vw_vh() -> None:
    for query, parameter in (
        ([("annotation", "patient")], "annotation"),
        ([("annotation", "technique")], "annotation"),
        ([("viewport", "64,64,0,0,32,32")], "viewport"),
        ([("viewport", "64,64,10")], "viewport"),
    ):
        with pytest.raises(RenderError) as caught:
            parse_render_params(query, None, thumbnail=True)
        assert caught.value.parameter == parameter
    params = parse_render_params([("viewport", "64,48,,,,")], None, thumbnail=True)
    assert params.viewport == Viewport(64, 48) and params.thumbnail and params.annotation == ()
    # the same requests are fine for a rendered resource
    params = parse_render_params([("annotation", "patient"), ("viewport", "64,64,0,0,32,32")], None, thumbnail=False)
    assert params.annotation == ("patient",) and params.viewport == Viewport(64, 64, 0, 0, 32, 32)


# ----------------------------------------------------------------------------- annotation ---


def annotated_patient() -> Dataset:
    ds = make_image(np.full((128, 192), 128, np.uint8), Modality="CT", KVP=120, SliceThickness="2.5")
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "PID-42"
    ds.PatientBirthDate = "19700102"
    ds.PatientSex = "M"
    ds.ExposureTime = 1000
    ds.Exposure = 250
    return ds


def test_annotations_are_burnt_in_where_asked() -> None:
    ds = annotated_patient()
    plain = png(ds, window=IDENTITY)
    assert np.all(plain == 128)
    top, bottom = slice(0, 40), slice(88, 128)
    patient = png(ds, window=IDENTITY, annotation=("patient",))
    assert np.any(patient[top, :96] != 128) and np.all(patient[bottom] == 128)
    technique = png(ds, window=IDENTITY, annotation=("technique",))
    assert np.any(technique[bottom, :96] != 128) and np.all(technique[top] == 128)
    both = png(ds, window=IDENTITY, annotation=("patient", "technique"))
    assert np.array_equal(both[top], patient[top]) and np.array_equal(both[bottom], technique[bottom])
    # burnt in white with a black outline (anti-aliased), so that it shows on any background
    assert both.max() >= 240 and both.min() <= 15


def test_annotation_on_colour_and_non_latin_names() -> None:
    ds = make_image(red_and_blue(), photometric="RGB")
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    ds.PatientID = "ÅÄÖ-1"
    out = png(ds, annotation=("patient", "technique"))
    assert out.shape == (64, 64, 3) and not np.array_equal(out, red_and_blue())


# ------------------------------------------------------------------------------ parameters ---


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("quality", "0"),
        ("quality", "101"),
        ("quality", "abc"),
        ("quality", "5.5"),
        ("quality", "-5"),
        ("quality", ""),
        ("viewport", ""),
        ("viewport", "10"),
        ("viewport", "10,10,1,2,3,4,5"),
        ("viewport", "a,b"),
        ("viewport", "0,10"),
        ("viewport", "10,-10"),
        ("viewport", ",10"),
        ("viewport", "5000,10"),
        ("viewport", "10,10,-1,0,,"),
        ("viewport", "10,10,0,0,0,5"),
        ("viewport", "10,10,0,0,5,x"),
        ("viewport", "10,10,1.5,0"),
        ("window", ""),
        ("window", "40,400"),
        ("window", "40,400,linear,1"),
        ("window", "40,,linear"),
        ("window", "40,0,linear"),
        ("window", "40,0.5,linear"),
        ("window", "40,0,sigmoid"),
        ("window", "40,-1,linear-exact"),
        ("window", "40,400,cubic"),
        ("window", "x,400,linear"),
        ("window", "nan,400,linear"),
        ("window", "1e999,400,linear"),
        ("annotation", ""),
        ("annotation", "patient,,technique"),
        ("annotation", "patient,"),
        ("annotation", "pat ient"),
        ("annotation", "1patient"),
        ("annotation", "patient;technique"),
        ("iccprofile", "yes"),
        ("iccprofile", "srgb"),
        ("iccprofile", "adobergb"),
        ("iccprofile", "bogus"),
        ("iccprofile", ""),
    ],
)
def test_each_bad_parameter_is_a_400_naming_it(name: str, value: str) -> None:
    with pytest.raises(RenderError) as caught:
        parse_render_params([(name, value)], "image/jpeg", thumbnail=False)
    assert caught.value.parameter == name
    assert str(caught.value)


@pytest.mark.parametrize("name", ["quality", "viewport", "window", "iccprofile"])
def test_single_valued_parameters_may_not_repeat(name: str) -> None:
    good = {"quality": "50", "viewport": "10,10", "window": "40,400,linear", "iccprofile": "no"}[name]
    parse_render_params([(name, good)], None, thumbnail=False)
    with pytest.raises(RenderError) as caught:
        parse_render_params([(name, good), (name, good)], None, thumbnail=False)
    assert caught.value.parameter == name


def test_valid_parameters_are_parsed() -> None:
    params = parse_render_params(
        [
            ("quality", "75"),
            ("viewport", "512,256,,,-100,50"),
            ("window", "-600.5,1500,LINEAR-EXACT"),
            ("annotation", "technique,Patient,overlay"),
            ("annotation", "patient,scale"),
            ("iccprofile", "no"),
            ("charset", "utf-8"),
            ("frobnicate", "yes"),
            ("accept", "image/png"),
        ],
        "image/gif",
        thumbnail=False,
    )
    assert params == RenderParams(
        media_type="image/png",
        quality=75,
        viewport=Viewport(512, 256, None, None, -100, 50),
        window=Window(-600.5, 1500.0, "linear-exact"),
        annotation=("technique", "patient"),
        ignored_annotation=("overlay", "scale"),
        thumbnail=False,
    )
    assert annotation_warning(params) == "The following annotation values are not supported: overlay, scale"
    defaults = parse_render_params([], None, thumbnail=False)
    assert defaults == RenderParams()
    assert annotation_warning(defaults) is None
    assert parse_render_params([("window", "40,1,linear")], None, thumbnail=False).window == Window(40, 1, "linear")
    assert parse_render_params([("window", "40,0.01,sigmoid")], None, thumbnail=False).window.width == 0.01
    assert parse_render_params([("viewport", "64,64,8,8")], None, thumbnail=False).viewport == Viewport(64, 64, 8, 8)


def test_parameter_errors_come_before_media_type_errors() -> None:
    with pytest.raises(RenderError) as caught:
        parse_render_params([("quality", "0")], "text/html", thumbnail=False)
    assert caught.value.parameter == "quality"
    with pytest.raises(NotAcceptableMedia):
        parse_render_params([("quality", "50")], "text/html", thumbnail=False)


# ----------------------------------------------------------------------------- media types ---


@pytest.mark.parametrize(
    ("header", "params", "expected"),
    [
        (None, [], "image/jpeg"),
        ("", [], "image/jpeg"),
        ("*/*", [], "image/jpeg"),
        ("image/*", [], "image/jpeg"),
        ("image/png", [], "image/png"),
        ("image/gif", [], "image/gif"),
        ("IMAGE/PNG", [], "image/png"),
        ("image/png; q=0.5, image/gif", [], "image/gif"),
        ("image/png; q=0.5, image/gif; q=0.4", [], "image/png"),
        ("image/png, image/gif", [], "image/png"),  # equal q: the client's order
        ("text/html, image/gif; q=0.1", [], "image/gif"),  # unsupported types are ignored
        ("image/png; q=2, image/gif", [], "image/gif"),  # an invalid range is ignored
        ("image/webp, */*; q=0.1", [], "image/jpeg"),
        ("image/gif; q=0.2, */*", [], "image/gif"),  # explicit before wildcard
        ("image/jpeg; q=0, */*", [], "image/png"),  # refused by q=0
        ("image/jpeg; q=0, image/png; q=0, image/*", [], "image/gif"),
        ("image/png", ["image/gif"], "image/gif"),  # the accept parameter wins
        ("image/png", ["image/jpeg; q=0.3, image/gif; q=0.6"], "image/gif"),
        ("image/png", ["*/*"], "image/png"),  # no wildcards in the parameter
        ("image/png", ["text/html"], "image/png"),  # nothing supported in the parameter
        ("image/png", ["application/dicom"], "image/png"),  # a DICOM type alone in the parameter
    ],
)
def test_choose_rendered_media(header: str | None, params: list[str], expected: str) -> None:
    assert choose_rendered_media(header, params) == expected


@pytest.mark.parametrize(
    ("header", "params"),
    [
        ("text/html", []),
        ("application/dicom", []),
        ('multipart/related; type="application/dicom"', []),
        ("image/jpeg; q=0", []),
        ("image/*; q=0", []),
        ("*/*; q=0", []),
        ("image/webp", ["text/html"]),
        ("garbage", []),
    ],
)
def test_nothing_acceptable_is_a_406(header: str, params: list[str]) -> None:
    with pytest.raises(NotAcceptableMedia):
        choose_rendered_media(header, params)


@pytest.mark.parametrize(
    ("header", "params", "parameter"),
    [
        ("application/dicom, image/png", [], None),
        ('image/jpeg, multipart/related; type="application/dicom"', [], None),
        ("application/dicom+json; q=0.5, image/gif", [], None),
        ("image/png", ["application/dicom, image/png"], "accept"),
        ("image/png", ["application/dicom", "image/jpeg"], "accept"),
    ],
)
def test_dicom_and_rendered_types_mixed_is_a_400(header: str, params: list[str], parameter: str | None) -> None:
    with pytest.raises(RenderError) as caught:
        choose_rendered_media(header, params)
    assert caught.value.parameter == parameter
    assert "mixes DICOM media types" in str(caught.value)


def test_a_refused_dicom_type_does_not_count_as_mixed() -> None:
    assert choose_rendered_media("application/dicom; q=0, image/png", []) == "image/png"
