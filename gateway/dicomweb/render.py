"""Rendered and thumbnail resources: one frame of DICOM pixel data as a JPEG, PNG or GIF image.

PS3.18 8.3.5.1 (rendering query parameters), 8.7.4 (rendered media types), 10.4.1 (Rendered and
Thumbnail resources). Pure functions: no I/O and no HTTP framework. The routes call
:func:`parse_render_params` with the query items and the ``Accept`` header, fetch the instance,
and call :func:`render_frame` in a worker thread.

Errors
------
- :class:`RenderError`: a bad query parameter (400). ``.parameter`` names it (``None`` for the
  ``Accept`` header); ``str(exc)`` says what is wrong. :func:`render_frame` raises it too, when a
  viewport's source region lies outside the image (only the image can tell).
- :class:`NotAcceptableMedia`: nothing in ``accept`` / ``Accept`` is a type this module writes (406).
- :class:`NotRenderable`: no pixel data, a frame number out of range, no codec for the transfer
  syntax, a photometric interpretation that is not supported, or data that does not decode.
No message carries patient data or UIDs.

Media types (:func:`choose_rendered_media`)
-------------------------------------------
``image/jpeg`` (the default, for rendered and thumbnail resources), ``image/png``, ``image/gif``.
The selection follows ``negotiation`` (8.7.8.1): the ``accept`` query parameter wins over the
``Accept`` header (it may not use wildcards); within one source, explicit types go by ``q`` (ties
keep the client's order), then wildcards (``*/*``, ``image/*``) by ``q``, which stand for JPEG, then
PNG, then GIF; ``q=0`` refuses a type. A missing header counts as ``*/*``. Unsupported or invalid
ranges are ignored (8.7.7); DICOM types (``application/dicom``, ``multipart/related``,
``application/dicom+json``, ...) next to rendered ones in the same source are a 400 (8.7.5).

Query parameters (:func:`parse_render_params`)
----------------------------------------------
- ``quality=1..100`` (integer): Pillow's (libjpeg's) JPEG quality, which scales the quantisation
  tables; :data:`DEFAULT_QUALITY` when absent. It has no effect on PNG or GIF, which are lossless
  (GIF after reducing colour images to a 256-colour palette).
- ``viewport=vw,vh[,sx,sy,sw,sh]``: the source region (``sx``, ``sy``: its top-left corner,
  default 0; ``sw``, ``sh``: its size, default the rest of the image; a negative ``sw`` / ``sh``
  takes the region ``sx .. sx+|sw|`` and flips it horizontally / vertically) is scaled, up or down,
  to fit ``vw`` x ``vh`` keeping its aspect ratio. The image is *not* padded to the viewport, so
  one side may be smaller than asked. Omitted values keep their commas (``512,512,,,256,256``);
  trailing ones may be left out. A region reaching past the image is cut at its edges; one that
  starts outside it is a 400. ``vw`` and ``vh`` are at most :data:`MAX_VIEWPORT` (an upscale to
  any size would be a memory bomb). Without a viewport the image keeps its size (one pixel per
  pixel). Pixel aspect ratio is not corrected.
- ``window=center,width,function`` with ``linear`` (width >= 1, PS3.3 C.11.2.1.2.1),
  ``linear-exact`` or ``sigmoid`` (width > 0, C.11.2.1.3): all three values are required. It
  replaces the data set's VOI. Colour images ignore it.
- ``annotation=patient,technique`` (comma list, repeatable): burnt into the rendered image (top
  left: patient name, ID, birth date and sex; bottom left: modality, kVp, exposure time, mAs,
  slice thickness, the window used, frame n/N) with Pillow's default font, which has ASCII
  glyphs only (accents are dropped, other characters show as "?"). Unknown keywords are returned
  in ``ignored_annotation`` for a Warning header; an empty item or one that is not a keyword is a
  400. Keywords are matched case-insensitively.
- ``iccprofile=no`` is accepted; any other value is a 400, since no ICC profile is embedded.
- ``accept`` as above; ``charset`` and unknown parameters are ignored. ``quality``, ``viewport``,
  ``window`` and ``iccprofile`` may be given once only.

Thumbnails: ``annotation`` is a 400 (a thumbnail never shows patient data); a viewport may only
give ``vw,vh``. Without a viewport the frame is shrunk (never enlarged) to fit
:data:`THUMBNAIL_SIZE` x :data:`THUMBNAIL_SIZE`, keeping its aspect ratio. ``quality``,
``window`` and ``iccprofile`` work as for rendered resources.

Rendering pipeline (:func:`render_frame`)
-----------------------------------------
1. Decode only the requested frame: ``pydicom``'s decoder ``as_array(index=frame - 1)`` with the
   installed plugins (fastest first, as in ``transcode``). Colour comes out RGB: YBR_FULL and
   YBR_FULL_422, stored natively or in JPEG, are converted by pydicom once (the JPEG plugins
   return YCbCr untouched, and pydicom follows the JFIF / Adobe markers and component IDs when
   they contradict the Photometric Interpretation); YBR_ICT / YBR_RCT come out of the JPEG 2000
   codecs as RGB. Unsigned values above Bits Stored are masked, signed ones sign-extended.
2. Greyscale (MONOCHROME1/2): the Modality LUT (Modality LUT Sequence if present, else Rescale
   Slope / Intercept, also from the Pixel Value Transformation functional group of enhanced
   objects); then the VOI: the ``window`` parameter, else the VOI LUT Sequence (its first item;
   output scaled from its bit depth to 8 bits), else Window Center / Width (first value; from the
   Frame VOI LUT functional group of enhanced objects first) with VOI LUT Function LINEAR,
   LINEAR_EXACT or SIGMOID, else the minimum and maximum of the frame (a flat frame renders
   black). MONOCHROME1 is then inverted. Output: 8-bit grey.
3. Colour: RGB as is (more than 8 bits stored scaled down); PALETTE COLOR through its LUTs.
   Other photometric interpretations are :class:`NotRenderable`.
4. Viewport crop, flip and scale (Pillow, bicubic), then annotations, then encoding: JPEG
   baseline 8-bit (Huffman, not progressive), PNG 8-bit grey or RGB, GIF grey or a 256-colour
   adaptive palette.
"""

from __future__ import annotations

import functools
import io
import math
import re
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .negotiation import MediaRange, parse_accept, parse_accept_param
from .transcode import _decoder_plugins

if TYPE_CHECKING:  # numpy and Pillow are imported when the first image is rendered
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_VIEWPORT",
    "RENDERED_MEDIA_TYPES",
    "THUMBNAIL_SIZE",
    "NotAcceptableMedia",
    "NotRenderable",
    "RenderError",
    "RenderParams",
    "Viewport",
    "Window",
    "annotation_warning",
    "choose_rendered_media",
    "number_of_frames",
    "parse_render_params",
    "render_frame",
]

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
RENDERED_MEDIA_TYPES = (JPEG, PNG, GIF)
"""What this module writes, in the order a wildcard prefers them."""

DEFAULT_QUALITY = 90
"""JPEG quality when the ``quality`` parameter is absent."""
THUMBNAIL_SIZE = 128
"""A thumbnail without a viewport fits in this many pixels each way."""
MAX_VIEWPORT = 4096
"""Largest ``vw`` / ``vh`` accepted."""

ANNOTATIONS = ("patient", "technique")
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")


class RenderError(Exception):
    """A rendering parameter is wrong (400). ``parameter`` names it; ``None`` means ``Accept``."""

    def __init__(self, message: str, parameter: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter


class NotAcceptableMedia(Exception):
    """None of the acceptable media types is one this module writes (406)."""


class NotRenderable(Exception):
    """The instance (or this frame of it) cannot be rendered: no pixel data, no codec, bad data."""


@dataclass(frozen=True)
class Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]``; ``None`` is an omitted value."""

    vw: int
    vh: int
    sx: int | None = None
    sy: int | None = None
    sw: int | None = None
    sh: int | None = None

    @property
    def has_region(self) -> bool:
        return any(v is not None for v in (self.sx, self.sy, self.sw, self.sh))


@dataclass(frozen=True)
class Window:
    """``window=center,width,function``: function is ``linear``, ``linear-exact`` or ``sigmoid``."""

    center: float
    width: float
    function: str


@dataclass(frozen=True)
class RenderParams:
    """Validated rendering parameters. ``quality`` None means :data:`DEFAULT_QUALITY`."""

    media_type: str = JPEG
    quality: int | None = None
    viewport: Viewport | None = None
    window: Window | None = None
    annotation: tuple[str, ...] = ()
    ignored_annotation: tuple[str, ...] = ()
    thumbnail: bool = False


def annotation_warning(params: RenderParams) -> str | None:
    """The text of the Warning for unknown annotation keywords (8.3.5.1.1), or None."""
    if not params.ignored_annotation:
        return None
    return "The following annotation values are not supported: " + ", ".join(params.ignored_annotation)


# ------------------------------------------------------------------------------------------------
# Media type selection

_DICOM_TYPES = frozenset({
    "application/dicom",
    "application/dicom+json",
    "application/dicom+xml",
    "application/json",
    "application/octet-stream",
    "image/dicom-rle",
    "image/jls",
    "image/jpx",
    "image/jphc",
})


def _is_dicom(media_range: MediaRange) -> bool:
    return not media_range.is_wildcard and (
        media_range.type == "multipart" or media_range.media_type in _DICOM_TYPES
    )


def _is_rendered(media_range: MediaRange) -> bool:
    return not media_range.is_wildcard and not _is_dicom(media_range) and media_range.type in ("image", "video", "text")


def _check_not_mixed(ranges: Sequence[MediaRange], parameter: str | None) -> None:
    wanted = [r for r in ranges if r.q > 0]
    if any(_is_dicom(r) for r in wanted) and any(_is_rendered(r) for r in wanted):
        where = "the accept query parameter" if parameter else "the Accept header"
        raise RenderError(
            f"{where} mixes DICOM media types (application/dicom, multipart/related, ...) with rendered "
            "ones (image/jpeg, image/png, image/gif); a rendered resource is sent as an image",
            parameter,
        )


def _matches(media_range: MediaRange) -> tuple[str, ...]:
    if media_range.media_type in ("*/*", "image/*"):
        return RENDERED_MEDIA_TYPES
    return (media_range.media_type,) if media_range.media_type in RENDERED_MEDIA_TYPES else ()


def _ranked(ranges: Sequence[MediaRange], wildcards: bool) -> list[str]:
    """Supported types from one source: explicit ranges by q, then (if allowed) wildcards by q."""

    def by_q(selected: Iterable[MediaRange]) -> list[MediaRange]:
        return sorted(selected, key=lambda r: -r.q)  # stable: ties keep the client's order

    refused_explicitly = {t for r in ranges if r.q == 0 and not r.is_wildcard for t in _matches(r)}
    ordered = [t for r in by_q(r for r in ranges if r.q > 0 and not r.is_wildcard) for t in _matches(r)]
    ordered = [t for t in ordered if t not in refused_explicitly]
    if wildcards:
        # An explicit range beats a wildcard (RFC 9110 12.5.1): "*/*;q=0" refuses only what no
        # explicit range asked for, and those are already in ``ordered``.
        refused = refused_explicitly | {t for r in ranges if r.q == 0 and r.is_wildcard for t in _matches(r)}
        wild = [t for r in by_q(r for r in ranges if r.q > 0 and r.is_wildcard) for t in _matches(r)]
        ordered += [t for t in wild if t not in refused]
    return ordered


def choose_rendered_media(accept_header: str | None, accept_params: Iterable[str] = ()) -> str:
    """The media type for a rendered or thumbnail resource: ``image/jpeg``, ``image/png`` or ``image/gif``.

    Raises :class:`RenderError` (400) when a source mixes DICOM and rendered types, and
    :class:`NotAcceptableMedia` (406) when nothing acceptable is left.
    """
    from_param = parse_accept_param(list(accept_params))
    _check_not_mixed(from_param, "accept")
    header_missing = not (accept_header and accept_header.strip(" \t"))
    from_header = [MediaRange("*", "*")] if header_missing else parse_accept(accept_header)
    _check_not_mixed(from_header, None)
    for media_type in _ranked(from_param, wildcards=False) + _ranked(from_header, wildcards=True):
        return media_type
    raise NotAcceptableMedia(
        "nothing in the accept parameter or the Accept header can be produced; a rendered resource "
        "is sent as image/jpeg (the default), image/png or image/gif"
    )


# ------------------------------------------------------------------------------------------------
# Query parameters

_INT = re.compile(r"[0-9]{1,9}")
_SIGNED_INT = re.compile(r"[+-]?[0-9]{1,9}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def parse_render_params(
    query: Iterable[tuple[str, str]], accept_header: str | None, *, thumbnail: bool
) -> RenderParams:
    """Validate the query of a rendered (``thumbnail=False``) or thumbnail resource.

    ``query`` is ``request.query_params.multi_items()``. Raises :class:`RenderError` for a bad
    parameter and :class:`NotAcceptableMedia` when no rendered type is acceptable; the parameters
    are checked first, so a request that is wrong in both ways gets the 400.
    """
    values: dict[str, list[str]] = {}
    for name, value in query:
        values.setdefault(name, []).append(value)

    quality = _parse_quality(_single(values, "quality"))
    viewport = _parse_viewport(_single(values, "viewport"), thumbnail)
    window = _parse_window(_single(values, "window"))
    if thumbnail and "annotation" in values:
        raise RenderError("a thumbnail carries no annotation (it never shows patient data)", "annotation")
    annotation, ignored = _parse_annotation(values.get("annotation", []))
    _check_icc_profile(_single(values, "iccprofile"))
    media_type = choose_rendered_media(accept_header, values.get("accept", []))
    return RenderParams(media_type, quality, viewport, window, annotation, ignored, thumbnail)


def _single(values: dict[str, list[str]], name: str) -> str | None:
    given = values.get(name)
    if not given:
        return None
    if len(given) > 1:
        raise RenderError(f"{name} may be given only once", name)
    return given[0].strip()


def _parse_quality(value: str | None) -> int | None:
    if value is None:
        return None
    if not _INT.fullmatch(value) or not 1 <= int(value) <= 100:
        raise RenderError("quality must be an integer from 1 to 100", "quality")
    return int(value)


def _parse_viewport(value: str | None, thumbnail: bool) -> Viewport | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",")]
    syntax = "viewport must be vw,vh[,sx,sy,sw,sh] (integers; omitted values keep their commas)"
    if not 2 <= len(items) <= 6:
        raise RenderError(syntax, "viewport")
    items += [""] * (6 - len(items))
    vw, vh, sx, sy, sw, sh = items
    for size in (vw, vh):
        if not _INT.fullmatch(size) or not 1 <= int(size) <= MAX_VIEWPORT:
            raise RenderError(f"{syntax}; vw and vh are required, from 1 to {MAX_VIEWPORT}", "viewport")
    region: list[int | None] = []
    for offset in (sx, sy):
        if offset and not _INT.fullmatch(offset):
            raise RenderError(f"{syntax}; sx and sy are pixel offsets, 0 or more", "viewport")
        region.append(int(offset) if offset else None)
    for extent in (sw, sh):
        if extent and (not _SIGNED_INT.fullmatch(extent) or int(extent) == 0):
            raise RenderError(f"{syntax}; sw and sh are non-zero (negative flips the image)", "viewport")
        region.append(int(extent) if extent else None)
    viewport = Viewport(int(vw), int(vh), *region)
    if thumbnail and viewport.has_region:
        raise RenderError("a thumbnail viewport takes only vw,vh", "viewport")
    return viewport


def _parse_window(value: str | None) -> Window | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",")]
    if len(items) != 3 or not all(items):
        raise RenderError("window must be center,width,function (all three)", "window")
    center, width, function = items
    if not _DECIMAL.fullmatch(center) or not _DECIMAL.fullmatch(width):
        raise RenderError("window center and width must be decimal numbers", "window")
    function = function.lower()
    if function not in WINDOW_FUNCTIONS:
        raise RenderError(f"window function must be one of {', '.join(WINDOW_FUNCTIONS)}", "window")
    c, w = float(center), float(width)
    if not (math.isfinite(c) and math.isfinite(w)):
        raise RenderError("window center and width must be finite numbers", "window")
    if function == "linear" and w < 1:
        raise RenderError("a linear window needs a width of 1 or more (PS3.3 C.11.2.1.2.1)", "window")
    if w <= 0:
        raise RenderError("the window width must be greater than 0", "window")
    return Window(c, w, function)


def _parse_annotation(values: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    wanted: list[str] = []
    ignored: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item or not _KEYWORD.fullmatch(item):
                raise RenderError(
                    "annotation must be a comma-separated list of keywords (patient, technique)", "annotation"
                )
            keyword = item.lower()
            if keyword in ANNOTATIONS:
                if keyword not in wanted:
                    wanted.append(keyword)
            elif item not in ignored:
                ignored.append(item)
    return tuple(wanted), tuple(ignored)


def _check_icc_profile(value: str | None) -> None:
    if value is not None and value.lower() != "no":
        raise RenderError("iccprofile: only 'no' is supported; rendered images carry no ICC profile", "iccprofile")


# ------------------------------------------------------------------------------------------------
# Rendering

_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames, 1 when absent or unreadable."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


@dataclass
class _Rendered:
    """An 8-bit image (H, W) or (H, W, 3) and what the technique annotation says about its VOI."""

    pixels: np.ndarray
    voi: str | None = None


def render_frame(ds: Dataset, frame: int, params: RenderParams) -> bytes:
    """Frame ``frame`` (1-based) of ``ds`` rendered and encoded as ``params.media_type``.

    Raises :class:`NotRenderable` (no pixel data, frame out of range, no codec, undecodable or
    unsupported data) and :class:`RenderError` (a viewport region outside the image).
    """
    from PIL import Image

    arr, meta = _decode(ds, frame)
    spp = int(meta.get("samples_per_pixel") or 1)
    photometric = str(meta.get("photometric_interpretation") or "").strip().upper()
    if spp == 1 and photometric != "PALETTE COLOR":
        rendered = _render_grey(arr, ds, frame - 1, photometric, params.window)
    else:
        rendered = _render_colour(arr, ds, spp, photometric, meta)

    image = Image.fromarray(_viewport_region(rendered.pixels, params.viewport))
    image = _scale(image, params)
    if params.annotation:
        _annotate(image, ds, frame, rendered.voi, params.annotation)
    return _encode(image, params)


def _decode(ds: Dataset, frame: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Only frame ``frame`` of the pixel data, as pydicom decodes it (colour as RGB)."""
    import numpy as np
    from pydicom.pixels import get_decoder

    if not any(tag in ds for tag in _PIXEL_DATA_TAGS):
        raise NotRenderable("the instance has no pixel data")
    frames = number_of_frames(ds)
    if not 1 <= frame <= frames:
        raise NotRenderable(f"frame {frame} does not exist: the instance has {frames} frame(s)")
    file_meta = getattr(ds, "file_meta", None)
    ts = str(getattr(file_meta, "TransferSyntaxUID", "") or "").strip(" \0")
    if not ts:
        raise NotRenderable("the instance has no transfer syntax")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise NotRenderable(f"pixel data in transfer syntax {ts} cannot be decoded here") from None
    plugins: tuple[str, ...] = ("",) if decoder.is_native else _decoder_plugins(ts)
    if not plugins:
        raise NotRenderable(f"no codec for transfer syntax {ts} is installed")
    errors = []
    for plugin in plugins:
        try:
            arr, meta = decoder.as_array(ds, index=frame - 1, as_rgb=True, decoding_plugin=plugin)
            break
        except Exception as exc:  # noqa: BLE001 - a broken stream or a plugin refusing it: try the next
            errors.append(f"{plugin or 'native'}: {type(exc).__name__}: {exc}")
    else:
        raise NotRenderable("the pixel data could not be decoded (" + "; ".join(errors) + ")")
    if arr.ndim == 3 and arr.shape[0] == 1 and int(meta.get("samples_per_pixel") or 1) == 1:
        arr = arr[0]
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr, meta


# -- greyscale ------------------------------------------------------------------------------------


def _render_grey(arr: np.ndarray, ds: Dataset, index: int, photometric: str, window: Window | None) -> _Rendered:
    import numpy as np

    values = _modality(arr, ds, index)
    voi_lut = _first_item(ds, "VOILUTSequence")
    if window is not None:
        out = _window(values, window.center, window.width, window.function)
        label = _window_label(window.center, window.width)
    elif voi_lut is not None and "LUTDescriptor" in voi_lut and "LUTData" in voi_lut:
        first, data, bits = _lut(voi_lut, ds, signed_input=bool(values.size) and float(values.min()) < 0)
        out = data[_lut_index(values, first, len(data))].astype(np.float32)
        out *= 255.0 / ((1 << bits) - 1)
        label = "VOI LUT"
    else:
        stored = _stored_window(ds, index)
        if stored is not None:
            out = _window(values, *stored)
            label = _window_label(stored[0], stored[1])
        else:
            out, label = _min_max(values)
    pixels = np.rint(np.clip(out, 0, 255, out=out), out=out).astype(np.uint8)
    if photometric == "MONOCHROME1":
        np.subtract(255, pixels, out=pixels)
    return _Rendered(pixels, label)


def _modality(arr: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Stored values to modality values (PS3.3 C.11.1), as float32."""
    import numpy as np

    lut = _first_item(ds, "ModalityLUTSequence")
    if lut is not None and "LUTDescriptor" in lut and "LUTData" in lut:
        first, data, _ = _lut(lut, ds, signed_input=arr.dtype.kind == "i")
        return data[_lut_index(arr, first, len(data))].astype(np.float32)
    slope, intercept = 1.0, 0.0
    source = _functional_item(ds, index, "PixelValueTransformationSequence") or ds
    try:
        if "RescaleSlope" in source:
            slope = float(source.RescaleSlope)
        if "RescaleIntercept" in source:
            intercept = float(source.RescaleIntercept)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    values = arr.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window (PS3.3 C.11.2.1.2.1, C.11.2.1.3) to the output range 0..255, unclipped float32."""
    import numpy as np

    if function == "sigmoid":
        out = values - np.float32(center)
        out *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: y = 0 there
            np.exp(out, out=out)
        out += 1
        return np.divide(np.float32(255.0), out, out=out)
    if function == "linear-exact":
        out = values - np.float32(center)
        out *= np.float32(255.0 / width)
        out += np.float32(127.5)
        return out
    # linear: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped; a width of 1 is a step at c - 0.5
    if width <= 1:
        return np.where(values > center - 0.5, np.float32(255), np.float32(0)).astype(np.float32)
    out = values - np.float32(center - 0.5)
    out *= np.float32(255.0 / (width - 1))
    out += np.float32(127.5)
    return out


def _min_max(values: np.ndarray) -> tuple[np.ndarray, str]:
    """No VOI in the request or the data set: the frame's range maps to 0..255."""
    import numpy as np

    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.float32), "flat"
    out = values - np.float32(low)
    out *= np.float32(255.0 / (high - low))
    return out, _window_label((low + high) / 2, high - low)


def _window_label(center: float, width: float) -> str:
    return f"WL {center:g} WW {width:g}"


def _stored_window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    """The data set's first Window Center / Width and VOI LUT Function, if usable."""
    for source in (_functional_item(ds, index, "FrameVOILUTSequence"), ds):
        if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
            continue
        try:
            center = float(_first_value(source.WindowCenter))
            width = float(_first_value(source.WindowWidth))
        except (TypeError, ValueError, IndexError):
            continue
        function = str(source.get("VOILUTFunction") or "LINEAR").strip().lower().replace("_", "-")
        if function not in WINDOW_FUNCTIONS:
            function = "linear"
        if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
            continue
        return center, width, function
    return None


def _first_value(value: Any) -> Any:
    from pydicom.multival import MultiValue

    return value[0] if isinstance(value, (list, tuple, MultiValue)) else value


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` in the frame's functional groups (per-frame, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = []
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if shared is not None:
        groups.append(shared)
    for group in groups:
        item = _first_item(group, keyword)
        if item is not None:
            return item
    return None


def _lut(item: Dataset, ds: Dataset, signed_input: bool) -> tuple[int, np.ndarray, int]:
    """A Modality or VOI LUT: first mapped value, its entries, bits per entry (PS3.3 C.11.1, C.11.2).

    ``signed_input``: the values looked up may be negative, so a first mapped value encoded as US
    above 32767 is read as the negative SS value it stands for.
    """
    import numpy as np

    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
    except (TypeError, ValueError) as exc:
        raise NotRenderable(f"bad LUT Descriptor: {exc}") from None
    entries = entries or 1 << 16
    if first >= 1 << 15 and signed_input:
        first -= 1 << 16  # descriptor encoded US although the first mapped value is signed
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        big = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) == "1.2.840.10008.1.2.2"
        if len(raw) >= 2 * entries:
            data = np.frombuffer(raw, ">u2" if big else "<u2", count=entries)
        else:
            data = np.frombuffer(raw, "u1", count=min(entries, len(raw)))
    else:
        data = np.asarray(raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") else [raw])
    data = data.astype(np.int64)
    if not len(data):
        raise NotRenderable("empty LUT Data")
    if not 1 <= bits <= 16:
        bits = 16 if int(data.max()) > 255 else 8
    return first, data, bits


def _lut_index(values: np.ndarray, first: int, entries: int) -> np.ndarray:
    """Indices into a LUT: values below the first entry take the first, above the last the last."""
    import numpy as np

    if values.dtype.kind == "f":
        values = np.rint(values)
    index = values.astype(np.int64) - first
    return np.clip(index, 0, entries - 1, out=index)


# -- colour ---------------------------------------------------------------------------------------


def _render_colour(arr: np.ndarray, ds: Dataset, spp: int, photometric: str, meta: dict[str, Any]) -> _Rendered:
    import numpy as np
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR" and spp == 1:
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001 - missing or malformed palette
            raise NotRenderable(f"the palette could not be applied: {type(exc).__name__}") from None
        if rgb.dtype.itemsize > 1:
            rgb = rgb >> 8  # 16-bit palette entries: the high byte
        return _Rendered(rgb.astype(np.uint8))
    if spp != 3:
        raise NotRenderable(f"{spp} samples per pixel with {photometric or 'no'} photometric interpretation")
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # not converted by the decoder
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif photometric != "RGB":
        raise NotRenderable(f"photometric interpretation {photometric} is not supported for rendering")
    bits = int(meta.get("bits_stored") or 8)
    if arr.dtype != np.uint8 or bits != 8:
        scaled = arr.astype(np.float32) * np.float32(255.0 / ((1 << bits) - 1))
        arr = np.rint(np.clip(scaled, 0, 255, out=scaled), out=scaled)
    return _Rendered(np.ascontiguousarray(arr, dtype=np.uint8))


# -- geometry -------------------------------------------------------------------------------------


def _viewport_region(pixels: np.ndarray, viewport: Viewport | None) -> np.ndarray:
    """The source region of the viewport, flipped when sw / sh are negative."""
    if viewport is None or not viewport.has_region:
        return pixels
    rows, columns = pixels.shape[:2]
    sx, sy = viewport.sx or 0, viewport.sy or 0
    if sx >= columns or sy >= rows:
        raise RenderError(
            f"the viewport's source region starts outside the image ({columns} x {rows} pixels)", "viewport"
        )
    sw = viewport.sw if viewport.sw is not None else columns - sx
    sh = viewport.sh if viewport.sh is not None else rows - sy
    region = pixels[sy : min(rows, sy + abs(sh)), sx : min(columns, sx + abs(sw))]
    if sw < 0:
        region = region[:, ::-1]
    if sh < 0:
        region = region[::-1]
    return region.copy()


def _fit(width: int, height: int, box_width: int, box_height: int) -> tuple[int, int]:
    scale = min(box_width / width, box_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _scale(image: Image.Image, params: RenderParams) -> Image.Image:
    """Scale to fit the viewport (keeping the aspect ratio, no padding), or to a thumbnail."""
    from PIL import Image

    width, height = image.size
    if params.viewport is not None:
        size = _fit(width, height, params.viewport.vw, params.viewport.vh)
    elif params.thumbnail and (width > THUMBNAIL_SIZE or height > THUMBNAIL_SIZE):
        size = _fit(width, height, THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    else:
        return image
    if size == (width, height):
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# -- annotation -----------------------------------------------------------------------------------


_TEXT_LOCK = threading.Lock()  # one FreeType face per size, shared by the worker threads


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _ascii(text: str) -> str:
    """Pillow's default font has ASCII glyphs only: accents are dropped ("Jörg" -> "Jorg"), other
    characters become "?" rather than empty boxes."""
    folded = unicodedata.normalize("NFKD", text)
    return "".join(c for c in folded if not unicodedata.combining(c)).encode("ascii", "replace").decode("ascii")


def _text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _date(value: Any) -> str:
    text = _text(value)
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def _number(value: Any) -> str:
    try:
        return f"{float(_first_value(value)):g}"
    except (TypeError, ValueError, IndexError):
        return ""


def _patient_lines(ds: Dataset) -> list[str]:
    lines = []
    name = ds.get("PatientName")
    if name:
        pn = _first_value(name)
        family, given = _text(getattr(pn, "family_name", "")), _text(getattr(pn, "given_name", ""))
        middle = _text(getattr(pn, "middle_name", ""))
        forenames = " ".join(p for p in (given, middle) if p)
        lines.append(", ".join(p for p in (family, forenames) if p) or _text(pn))
    if ds.get("PatientID"):
        lines.append(f"ID: {_text(ds.PatientID)}")
    born, sex = _date(ds.get("PatientBirthDate")), _text(ds.get("PatientSex"))
    details = "  ".join(p for p in (f"Born: {born}" if born else "", f"Sex: {sex}" if sex else "") if p)
    if details:
        lines.append(details)
    return lines


def _technique_lines(ds: Dataset, frame: int, voi: str | None) -> list[str]:
    first = [_text(ds.get("Modality"))]
    for keyword, unit in (("KVP", "kVp"), ("ExposureTime", "ms"), ("Exposure", "mAs"), ("SliceThickness", "mm")):
        value = _number(ds.get(keyword)) if keyword in ds else ""
        if value:
            first.append(f"{value} {unit}")
    lines = ["  ".join(p for p in first if p)]
    if voi:
        lines.append(voi)
    frames = number_of_frames(ds)
    if frames > 1:
        lines.append(f"Frame {frame}/{frames}")
    return [line for line in lines if line]


def _annotate(image: Image.Image, ds: Dataset, frame: int, voi: str | None, keywords: Sequence[str]) -> None:
    """Burn the requested annotations into the rendered image (PS3.18 8.3.5.1.1)."""
    from PIL import ImageDraw

    width, height = image.size
    size = max(10, min(width, height) // 32)
    with _TEXT_LOCK:
        font = _font(size)
    draw = ImageDraw.Draw(image)
    fill: Any = 255 if image.mode == "L" else (255, 255, 255)
    stroke: Any = 0 if image.mode == "L" else (0, 0, 0)
    margin = max(2, size // 3)

    def write(lines: list[str], bottom: bool) -> None:
        if not lines:
            return
        text = _ascii("\n".join(lines))
        with _TEXT_LOCK:
            _, top, _, low = draw.multiline_textbbox((0, 0), text, font=font, stroke_width=1)
            y = height - margin - (low - top) if bottom else margin
            draw.multiline_text((margin, y - top), text, font=font, fill=fill, stroke_width=1, stroke_fill=stroke)

    if "patient" in keywords:
        write(_patient_lines(ds), bottom=False)
    if "technique" in keywords:
        write(_technique_lines(ds, frame, voi), bottom=True)


# -- encoding -------------------------------------------------------------------------------------


def _encode(image: Image.Image, params: RenderParams) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    if params.media_type == PNG:
        image.save(out, format="PNG", compress_level=3)
    elif params.media_type == GIF:
        if image.mode != "L":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
        image.save(out, format="GIF")
    elif params.media_type == JPEG:
        quality = params.quality or DEFAULT_QUALITY
        image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        raise RenderError(f"{params.media_type} is not a rendered media type this server writes", "accept")
    return out.getvalue()
