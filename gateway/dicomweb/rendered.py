"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3-4) and WADO-URI (PS3.18 9), on top of the
instance cache; the pixels themselves are turned into images by gateway/dicomweb/render.py.

Choices where the standard leaves room (also in the conformance statement):

- ``.../instances/{i}/rendered`` renders the first frame; ``.../frames/{f}/rendered`` one frame
  (a list of several frames is a 400).
- Series and study ``rendered``: ``multipart/related`` with one image per instance (its first frame),
  in the order the instances arrive.
- Thumbnails: an instance's or frame's thumbnail is that frame shrunk; a series' is the thumbnail of
  its middle instance (in the PACS's listing order), a study's that of its first series.
- WADO-URI: ``contentType`` ``application/dicom``, ``image/jpeg`` (the default for an instance with
  pixel data) or ``image/png``; ``rows``/``columns`` fit the image in that box, ``region`` crops,
  ``windowCenter``/``windowWidth`` window, ``frameNumber`` picks the frame, ``imageQuality`` is
  the JPEG quality, ``transferSyntax`` the syntax of an ``application/dicom`` answer.
  ``anonymize`` and ``presentationUID`` are refused with a 400.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.dimse.errors import DimseError
from gateway.middleware import StreamAborted
from gateway.problems import HttpProblem, bad_request, from_dimse, not_acceptable, not_found

from . import render, transcode
from .attributes import Level
from .cache import FetchFailed, NotInSeries
from .instance import DOUBLE_PIXEL_DATA, FLOAT_PIXEL_DATA, PIXEL_DATA, CachedInstance, NoPixelData
from .qido import warning_value
from .streaming import StallGuardedResponse, closing, new_boundary, part_header
from .viewer import (
    ViewerContext,
    first_item,
    _matches,
    _study_series,
    cache_headers,
    etag_for,
    get_instance,
    in_thread,
    instance_url,
    not_modified,
    parse_frame_list,
)

log = logging.getLogger("gateway.viewer")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _params(request: Request, thumbnail: bool) -> render.RenderParams:
    try:
        return render.parse_render_params(request.query_params.multi_items(), request.headers.get("accept"),
                                          thumbnail=thumbnail)
    except render.RenderError as exc:
        raise bad_request(str(exc), getattr(exc, "parameter", None)) from None
    except render.NotAcceptableMedia as exc:
        raise not_acceptable(str(exc)) from None


def _representation(request: Request, params: render.RenderParams) -> str:
    query = sorted((k, v) for k, v in request.query_params.multi_items() if k not in ("accept", "charset"))
    return f"{params.media_type}|{query}"


def _render(inst: CachedInstance, frame: int, params: render.RenderParams) -> bytes:
    """In a worker thread: a parse of its own (the pixel data is read), then the image."""
    try:
        return render.render_frame(inst.fresh_dataset(), frame, params)
    except render.NotRenderable as exc:
        raise HttpProblem(422, "not-renderable", f"the instance cannot be rendered: {exc}") from None
    except render.RenderError as exc:
        raise bad_request(str(exc), getattr(exc, "parameter", None)) from None


def _check_frame(inst: CachedInstance, frame: int) -> None:
    """A frame beyond NumberOfFrames is a 404, as for the frames resource."""
    try:
        count = inst.layout().number_of_frames
    except NoPixelData:
        return  # the renderer says why it cannot render (422)
    if frame > count:
        raise not_found(f"frame {frame} is beyond the instance's {count} frame(s)")


def _checked_render(inst: CachedInstance, frame: int, params: render.RenderParams) -> bytes:
    """In a worker thread: the frame checked (404), then rendered; one trip to the thread."""
    _check_frame(inst, frame)
    return _render(inst, frame, params)


def _headers(ctx: ViewerContext, etag: str, params: render.RenderParams) -> dict[str, str]:
    headers = cache_headers(ctx, etag)
    text = render.annotation_warning(params)
    if text:
        headers["Warning"] = warning_value(ctx.base_url, text, quoted=ctx.warning_quoted)
    return headers


async def rendered(request: Request, ctx: ViewerContext, level: Level, study: str, series: str | None,
                   sop: str | None, frame_list: str | None = None, *, thumbnail: bool = False) -> Response:
    params = _params(request, thumbnail)
    frame = 1
    if frame_list is not None:
        numbers = parse_frame_list(frame_list)
        if len(numbers) != 1:
            raise bad_request("a rendered or thumbnail frame resource takes one frame number", "frames")
        frame = numbers[0]
    etag = etag_for(ctx, request, _representation(request, params))
    if level == Level.IMAGE or thumbnail:
        if _matches(request, etag) and level == Level.IMAGE:
            return not_modified(ctx, etag)
        if level != Level.IMAGE:
            series, sop = await _representative(ctx, study, series)
        assert series is not None and sop is not None
        inst = await get_instance(ctx, study, series, sop)
        image = await in_thread(_checked_render, inst, frame, params)
        headers = _headers(ctx, etag, params) if level == Level.IMAGE else {"Cache-Control": "private, no-cache"}
        return Response(image, media_type=params.media_type, headers=headers)
    return await _rendered_many(ctx, study, series, params)


async def _representative(ctx: ViewerContext, study: str, series: str | None) -> tuple[str, str]:
    """The series and instance whose thumbnail stands for a series or a study."""
    try:
        series_list = [series] if series is not None else await _study_series(ctx, study)
        for uid in series_list:
            listing = await ctx.fetcher.list(study, uid)
            if listing:
                return uid, listing[len(listing) // 2][1]
    except DimseError as exc:
        raise from_dimse(exc) from None
    raise not_found("no such " + ("series" if series is not None else "study") + f" on node {ctx.node.name!r}")


async def _rendered_many(ctx: ViewerContext, study: str, series: str | None,
                         params: render.RenderParams) -> Response:
    series_list = [series] if series is not None else await _study_series(ctx, study)
    if not series_list:
        raise not_found(f"no such study on node {ctx.node.name!r}")
    boundary = new_boundary()

    async def images() -> AsyncIterator[bytes]:
        for uid in series_list:
            async with aclosing(ctx.fetcher.series(study, uid)) as instances:
                async for inst in instances:
                    try:
                        image = await in_thread(_render, inst, 1, params)
                    except HttpProblem as exc:
                        if exc.status == 422:
                            continue  # an instance without pixels (a report, say) has no image
                        raise
                    ctx.note(inst)
                    yield part_header(boundary, params.media_type, len(image),
                                      instance_url(ctx.base_url, inst) + "/rendered") + image + b"\r\n"

    generator = images()
    first = await first_item(ctx, generator, "series" if series else "study",
                             HttpProblem(422, "not-renderable", "no instance there can be rendered"))

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async with aclosing(generator) as rest:
                async for part in rest:
                    yield part
            yield closing(boundary)
        except (FetchFailed, NotInSeries, DimseError, HttpProblem) as exc:
            log.warning("rendered series on node %r aborted: %s", ctx.node.name, type(exc).__name__)
            raise StreamAborted(str(exc)) from None

    return StallGuardedResponse(body(), stall_timeout=ctx.stall_timeout,
                                media_type=f'multipart/related; type="{params.media_type}"; boundary={boundary}',
                                headers={"Cache-Control": "private, no-cache"})


# ------------------------------------------------------------------------------------------------
# WADO-URI

_WADO_URI_KNOWN = frozenset({
    "requestType", "studyUID", "seriesUID", "objectUID", "contentType", "charset", "anonymize", "annotation",
    "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber", "imageQuality",
    "presentationUID", "presentationSeriesUID", "transferSyntax",
})


def _one(request: Request, name: str, required: bool = False) -> str | None:
    values = [v for k, v in request.query_params.multi_items() if k == name]
    if len(values) > 1:
        raise bad_request(f"{name} may be given once", name)
    if not values or values[0] == "":
        if required:
            raise bad_request(f"{name} is required", name)
        return None
    return values[0]


def _uid(request: Request, name: str) -> str:
    value = _one(request, name, required=True)
    assert value is not None
    if len(value) > 64 or not _UID.match(value):
        raise bad_request(f"{name} is not a UID (digits and dots, at most 64 characters)", name)
    return value


def _int_param(request: Request, name: str, low: int, high: int) -> int | None:
    value = _one(request, name)
    if value is None:
        return None
    if not value.isdigit() or not low <= int(value) <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}", name)
    return int(value)


def _wado_content_type(request: Request) -> str:
    """The first type of ``contentType`` produced here; a wildcard after others is a JPEG."""
    value = _one(request, "contentType")
    if value is None:
        return "image/jpeg"
    for item in value.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("application/dicom", "image/jpeg", "image/png", "image/gif"):
            return media
        if media in ("*/*", "image/*"):
            return "image/jpeg"
    raise not_acceptable("WADO-URI here produces application/dicom, image/jpeg, image/png and image/gif")


def _wado_render_params(request: Request, media: str) -> tuple[render.RenderParams, int]:
    query: list[tuple[str, str]] = []
    rows, columns = _int_param(request, "rows", 1, render.MAX_VIEWPORT), _int_param(request, "columns", 1,
                                                                                     render.MAX_VIEWPORT)
    region = _one(request, "region")
    center, width = _one(request, "windowCenter"), _one(request, "windowWidth")
    if (center is None) != (width is None):
        raise bad_request("windowCenter and windowWidth go together", "windowCenter" if center is None
                          else "windowWidth")
    if center is not None:
        query.append(("window", f"{center},{width},linear"))
    quality = _one(request, "imageQuality")
    if quality is not None:
        query.append(("quality", quality))
    annotation = _one(request, "annotation")
    if annotation is not None:
        query.append(("annotation", annotation))
    viewport = _wado_viewport(rows, columns, region)
    if viewport is not None:
        query.append(("viewport", viewport))
    frame = _int_param(request, "frameNumber", 1, 1_000_000_000) or 1
    try:
        params = render.parse_render_params(query, media, thumbnail=False)
    except render.RenderError as exc:
        names = {"window": "windowCenter", "quality": "imageQuality", "viewport": "rows", "annotation": "annotation"}
        parameter = getattr(exc, "parameter", None)
        raise bad_request(str(exc), names.get(parameter or "", parameter)) from None
    return params, frame


def _wado_viewport(rows: int | None, columns: int | None, region: str | None) -> str | None:
    """``rows``/``columns`` and ``region=x1,y1,x2,y2`` (fractions of the image) as a viewport. The
    region needs the image size, so it is left to the renderer as a fractional crop: here it is
    checked, and applied below once the size is known."""
    if region is not None:
        parts = region.split(",")
        try:
            x1, y1, x2, y2 = (float(p) for p in parts)
        except ValueError:
            raise bad_request("region is x1,y1,x2,y2, fractions from 0.0 to 1.0", "region") from None
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise bad_request("region is x1,y1,x2,y2, fractions from 0.0 to 1.0, with x1 < x2 and y1 < y2",
                              "region")
    if rows is None and columns is None:
        return None if region is None else f"{render.MAX_VIEWPORT},{render.MAX_VIEWPORT}"
    return f"{columns or render.MAX_VIEWPORT},{rows or render.MAX_VIEWPORT}"


def _region_viewport(params: render.RenderParams, region: str, inst: CachedInstance) -> render.RenderParams:
    from dataclasses import replace

    ds = inst.dataset()
    columns, rows = int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
    if not columns or not rows:
        return params  # no image to crop: the renderer says why it cannot render (422)
    x1, y1, x2, y2 = (float(p) for p in region.split(","))
    sx, sy = int(x1 * columns), int(y1 * rows)
    sw, sh = max(1, int((x2 - x1) * columns)), max(1, int((y2 - y1) * rows))
    viewport = params.viewport
    vw = viewport.vw if viewport and (viewport.vw != render.MAX_VIEWPORT) else sw
    vh = viewport.vh if viewport and (viewport.vh != render.MAX_VIEWPORT) else sh
    return replace(params, viewport=render.Viewport(vw, vh, sx, sy, sw, sh))


async def wado_uri(request: Request, ctx: ViewerContext) -> Response:
    unknown = sorted(k for k in request.query_params if k not in _WADO_URI_KNOWN)
    if _one(request, "requestType", required=True) != "WADO":
        raise bad_request("requestType must be WADO", "requestType")
    study, series, sop = _uid(request, "studyUID"), _uid(request, "seriesUID"), _uid(request, "objectUID")
    for refused in ("anonymize", "presentationUID", "presentationSeriesUID"):
        if _one(request, refused) is not None:
            raise bad_request(f"{refused} is not supported by this gateway", refused)
    declared = _one(request, "contentType")
    # a wildcard first leaves the choice to the instance: an image if it has pixels
    wildcard = declared is not None and declared.split(",")[0].split(";")[0].strip() in ("*/*", "image/*")
    media = _wado_content_type(request) if declared is not None and not wildcard else None
    render_params: tuple[render.RenderParams, int] | None = None
    if media is not None and media != "application/dicom":
        render_params = _wado_render_params(request, media)
    etag = etag_for(ctx, request, str(sorted(request.query_params.multi_items())))
    if _matches(request, etag):
        return not_modified(ctx, etag)
    inst = await get_instance(ctx, study, series, sop)
    if media is None:
        has_pixels = await in_thread(_has_pixels, inst)
        media = "image/jpeg" if has_pixels else "application/dicom"
        if media != "application/dicom":
            render_params = _wado_render_params(request, media)
    headers = cache_headers(ctx, etag)
    if unknown:
        headers["Warning"] = warning_value(ctx.base_url, "ignored parameters: " + ", ".join(unknown)[:200],
                                           ctx.warning_quoted)
    if media == "application/dicom":
        for name in ("annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber",
                     "imageQuality"):
            if _one(request, name) is not None:
                raise bad_request(f"{name} applies to images, not to contentType=application/dicom", name)
        body, ts = await in_thread(_as_dicom, inst, _one(request, "transferSyntax"))
        return Response(body, media_type=f"application/dicom; transfer-syntax={ts}", headers=headers)
    assert render_params is not None
    params, frame = render_params
    region = _one(request, "region")
    if region is not None:
        params = await in_thread(_region_viewport, params, region, inst)
    image = await in_thread(_checked_render, inst, frame, params)
    return Response(image, media_type=params.media_type, headers=headers)


def _has_pixels(inst: CachedInstance) -> bool:
    ds = inst.dataset()
    return any(tag in ds for tag in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA))


def _as_dicom(inst: CachedInstance, wanted: str | None) -> tuple[Any, str]:
    """Explicit VR Little Endian unless ``transferSyntax`` says otherwise (PS3.18 9.1.2.3.3); data
    that cannot be decompressed here goes as stored when no syntax was named."""
    if wanted is not None and not _UID.match(wanted):
        raise bad_request("transferSyntax is not a UID", "transferSyntax")
    target = wanted or transcode.EXPLICIT_VR_LE
    if target == inst.transfer_syntax:
        return inst.p10, inst.transfer_syntax
    acceptable = [target] if wanted else [target, "*"]
    try:
        data, ts = transcode.convert_to_first(inst.p10[inst.dataset_offset:], inst.transfer_syntax, acceptable)
    except transcode.NotProducible as exc:
        raise not_acceptable(f"the instance cannot be sent in that transfer syntax: {exc}") from None
    return transcode.file_meta_bytes(inst.sop_class_uid, inst.sop_uid, ts) + data, ts
