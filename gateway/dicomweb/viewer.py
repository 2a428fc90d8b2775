"""What a web viewer asks for: metadata, frames, pixel data, bulk data, rendered images, thumbnails.

Every answer is cut from whole instances that the cache (gateway/dicomweb/cache.py) holds or is
fetching: DIMSE frame-level retrieval is rare, so a frame costs its instance's retrieve, and a
series prefetch makes a viewer's burst of frame requests cost one retrieve for the whole series.

HTTP caching: a representation of an instance (its metadata, a frame, a rendered image, a bulk
data value) never changes, since instances are immutable. The ETag is a hash of the gateway's
version, the node, the resource and the negotiated representation, so a matching If-None-Match is
answered 304 without asking the PACS. Study and series metadata can change (instances get added):
their ETag covers the current instance list, so a revalidation costs one C-FIND.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from contextlib import aclosing
from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.audit import note_instances
from gateway.dimse.errors import DimseError
from gateway.dimse.node import NodeClient
from gateway.middleware import StreamAborted
from gateway.problems import HttpProblem, bad_request, from_dimse, not_acceptable, not_found

from . import transcode
from .attributes import Level
from .cache import Fetcher, FetchFailed, NotInSeries
from .instance import CachedInstance, NoPixelData, NoSuchValue, PIXEL_DATA, TagPath
from .negotiation import OCTET_STREAM, PART_TYPE_SYNTAXES, BulkChoice, choose_bulk_media
from .plan import SERIES_UID, Resource, build_plan, first_value
from .qido import SearchCounters, choose_media_type, run_plan, warning_value
from .query import parse_query
from .streaming import StallGuardedResponse, closing, new_boundary, part_header
from .syntaxes import EXPLICIT_VR_LE

log = logging.getLogger("gateway.viewer")
_MARKER = "@" + secrets.token_hex(12) + "@"  # stands for the request's base URL in cached metadata
_FRAME_LIST = re.compile(r"^[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_FRAMES_PER_REQUEST = 10000
_OCTET_LE = f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LE}"  # raw little-endian bytes


@dataclass(frozen=True)
class ViewerContext:
    node: NodeClient
    fetcher: Fetcher
    base_url: str
    strict_accept: bool
    bulk_threshold: int
    max_age: int
    stall_timeout: float
    fanout_concurrency: int = 4
    fanout_max_parents: int = 1000
    scope: Any = None  # the request's ASGI scope, for its audit record
    warning_quoted: bool = False  # qido.warning_quoted: the form of Warning headers

    def note(self, *instances: CachedInstance) -> None:
        """The instances this request sends, for the audit log."""
        if self.scope is not None:
            note_instances(self.scope, [inst.sop_uid for inst in instances])


# ------------------------------------------------------------------------------------------------
# Shared pieces


def instance_url(base: str, inst: CachedInstance) -> str:
    return f"{base}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5``: 1-based frame numbers (PS3.18 10.1.1); a malformed list is a 400."""
    if not _FRAME_LIST.match(text):
        raise bad_request(f"{text!r} is not a frame list: comma-separated frame numbers from 1", "frames")
    frames = [int(n) for n in text.split(",")]
    if len(frames) > MAX_FRAMES_PER_REQUEST:
        raise bad_request(f"at most {MAX_FRAMES_PER_REQUEST} frames per request", "frames")
    return frames


def parse_tag_path(text: str) -> TagPath:
    """``7FE00010`` or ``00540016/0/00181072``: tags (8 hex digits) and item indices (from 0)."""
    parts = text.strip("/").split("/")
    if not parts or len(parts) % 2 == 0:
        raise bad_request(f"{text!r} is not a bulk data path: tag, or tag/item/tag/...", "path")
    out: list[int] = []
    for i, part in enumerate(parts):
        pattern = _TAG if i % 2 == 0 else _INDEX
        if not pattern.match(part):
            raise bad_request(f"{text!r} is not a bulk data path: tag, or tag/item/tag/...", "path")
        out.append(int(part, 16) if i % 2 == 0 else int(part))
    return tuple(out)


def format_tag_path(path: Sequence[int]) -> str:
    return "/".join(f"{v:08X}" if i % 2 == 0 else str(int(v)) for i, v in enumerate(path))


def etag_for(ctx: ViewerContext, request: Request, representation: str, extra: Iterable[str] = ()) -> str:
    text = "\n".join([__version__, ctx.node.name, request.url.path, representation, *extra])
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def _matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


def cache_headers(ctx: ViewerContext, etag: str, immutable: bool = True) -> dict[str, str]:
    control = f"private, max-age={ctx.max_age}, immutable" if immutable and ctx.max_age else "private, no-cache"
    return {"ETag": etag, "Cache-Control": control, "Vary": "Accept, Accept-Encoding"}


def not_modified(ctx: ViewerContext, etag: str, immutable: bool = True) -> Response:
    return Response(status_code=304, headers=cache_headers(ctx, etag, immutable))


def accept_params(request: Request) -> list[str]:
    return [v for k, v in request.query_params.multi_items() if k == "accept"]


async def get_instance(ctx: ViewerContext, study: str, series: str, sop: str) -> CachedInstance:
    try:
        inst = await ctx.fetcher.instance(study, series, sop)
        ctx.note(inst)
        return inst
    except NotInSeries:
        raise not_found(f"no such instance in that series on node {ctx.node.name!r}") from None
    except FetchFailed as exc:
        raise _fetch_problem(ctx, exc) from None
    except DimseError as exc:
        raise from_dimse(exc) from None


def _fetch_problem(ctx: ViewerContext, exc: FetchFailed) -> HttpProblem:
    if exc.error is not None:
        return from_dimse(exc.error)
    outcome = exc.outcome
    if outcome is not None and outcome.rejected_classes:
        return HttpProblem(502, "pacs-service-not-supported",
                           f"node {ctx.node.name!r} refused the storage contexts for "
                           + ", ".join(outcome.rejected_classes))
    if outcome is not None and outcome.completed and not outcome.delivered:
        return HttpProblem(502, "pacs-failure",
                           f"node {ctx.node.name!r} reports instances sent, but none arrived: is the gateway "
                           "registered at the PACS with the right host and port?")
    return HttpProblem(502, "pacs-failure", str(exc))


async def in_thread(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


# ------------------------------------------------------------------------------------------------
# Metadata


def _bulk_uri_for(inst: CachedInstance) -> Any:
    prefix = f"{_MARKER}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}/bulkdata/"

    def uri(path: tuple[int, ...], vr: str) -> str:
        return prefix + format_tag_path(path)

    return uri


def _marked_metadata(ctx: ViewerContext, inst: CachedInstance) -> str:
    """In a worker thread: the instance's metadata JSON with the base-URL marker, worked out once
    per instance; the cache counts what it adds to the instance."""
    before = inst.size
    text = inst.metadata_json(_bulk_uri_for(inst), ctx.bulk_threshold)
    if inst.size != before:
        ctx.fetcher.cache.resize(inst, ctx.node.name)
    return text


async def instance_metadata_text(ctx: ViewerContext, inst: CachedInstance) -> str:
    return (await in_thread(_marked_metadata, ctx, inst)).replace(_MARKER, ctx.base_url)


def _gzip_wanted(request: Request) -> bool:
    for item in request.headers.get("accept-encoding", "").split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def _metadata_media(request: Request, ctx: ViewerContext) -> str:
    charset = tuple(v for k, v in request.query_params.multi_items() if k == "charset")
    return choose_media_type(request.headers.get("accept"), tuple(accept_params(request)), charset, ctx.strict_accept)


async def metadata(request: Request, ctx: ViewerContext, level: Level, study: str, series: str | None,
                   sop: str | None) -> Response:
    media = _metadata_media(request, ctx)
    gzip = _gzip_wanted(request)
    representation = f"{media};gzip={gzip};threshold={ctx.bulk_threshold}"
    if level == Level.IMAGE:
        assert series is not None and sop is not None
        etag = etag_for(ctx, request, representation)
        if _matches(request, etag):
            return not_modified(ctx, etag)
        inst = await get_instance(ctx, study, series, sop)
        body = ("[" + await instance_metadata_text(ctx, inst) + "]").encode()
        headers = cache_headers(ctx, etag)
        if gzip:
            body = _gzip_bytes(body)
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type=media, headers=headers)

    series_list = [series] if series is not None else await _study_series(ctx, study)
    if not series_list:
        raise not_found(f"no such study on node {ctx.node.name!r}")
    if request.headers.get("if-none-match") and series is not None:
        listed = await _instance_uids(ctx, study, series)
        etag = etag_for(ctx, request, representation, sorted(listed))
        if listed and _matches(request, etag):
            return not_modified(ctx, etag, immutable=False)
    listed: list[str] = []
    items = _series_metadata(ctx, study, series_list, listed if series is not None else None)
    level_name = "series" if series else "study"
    first = await first_item(ctx, items, level_name, not_found(f"no such {level_name} on node {ctx.node.name!r}"))
    headers = cache_headers(ctx, etag_for(ctx, request, representation, sorted(listed)), immutable=False) \
        if listed else {"Cache-Control": "private, no-cache", "Vary": "Accept, Accept-Encoding"}

    async def body() -> AsyncIterator[bytes]:
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        count = 0
        try:
            async with aclosing(items) as rest:
                chunk = "[" + first
                count = 1
                async for text in rest:
                    chunk += "," + text
                    count += 1
                    if len(chunk) >= 65536:
                        yield _out(compressor, chunk.encode())
                        chunk = ""
                chunk += "]"
                yield _out(compressor, chunk.encode())
                if compressor is not None:
                    yield compressor.flush()
        except (FetchFailed, NotInSeries, DimseError) as exc:
            log.warning("metadata on node %r aborted after %d instance(s): %s", ctx.node.name, count,
                        type(exc).__name__)
            raise StreamAborted(str(exc)) from None

    if gzip:
        headers["Content-Encoding"] = "gzip"
    return StallGuardedResponse(body(), stall_timeout=ctx.stall_timeout, media_type=media, headers=headers)


def _out(compressor: Any, data: bytes) -> bytes:
    return compressor.compress(data) if compressor is not None else data


def _gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


async def first_item(ctx: ViewerContext, items: AsyncIterator[Any], level: str, empty: HttpProblem) -> Any:
    """The first item of a stream over a series or a study, before any header is sent: ``empty``
    when there is none, a 404 for a series or study the PACS does not have, the PACS's failure as
    502/503/504."""
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        raise empty from None
    except NotInSeries:
        raise not_found(f"no such {level} on node {ctx.node.name!r}") from None
    except FetchFailed as exc:
        raise _fetch_problem(ctx, exc) from None
    except DimseError as exc:
        raise from_dimse(exc) from None


async def _series_metadata(ctx: ViewerContext, study: str, series_list: list[str],
                           listed: list[str] | None = None) -> AsyncIterator[str]:
    for series in series_list:
        try:
            async with aclosing(ctx.fetcher.series(study, series, listed)) as instances:
                async for inst in instances:
                    ctx.note(inst)
                    yield await instance_metadata_text(ctx, inst)
        except NotInSeries:
            if len(series_list) == 1:
                raise
            continue  # a series deleted since the study's listing


async def _study_series(ctx: ViewerContext, study: str) -> list[str]:
    query = parse_query("")
    out: list[str] = []
    try:
        caps = await ctx.node.capabilities()
        plan = build_plan(Resource(Level.SERIES, study, None), query, relational=caps.relational,
                          fuzzy_accepted=False, charset=ctx.node.settings.charset, defaults=False)
        async with aclosing(run_plan(ctx.node, plan, concurrency=ctx.fanout_concurrency,
                                     max_parents=ctx.fanout_max_parents, counters=SearchCounters())) as results:
            async for found in results:
                if found.outcome.keep:
                    uid = first_value(found.dataset, SERIES_UID)
                    if uid and uid not in out:
                        out.append(uid)
    except DimseError as exc:
        raise from_dimse(exc) from None
    return out


async def _instance_uids(ctx: ViewerContext, study: str, series: str) -> list[str]:
    try:
        found = await ctx.fetcher.list(study, series)
    except DimseError as exc:
        raise from_dimse(exc) from None
    return [sop for _, sop, _ in found]


# ------------------------------------------------------------------------------------------------
# Frames and pixel data


@dataclass
class _FramePart:
    content_type: str
    location: str
    chunks: list[Any]

    @property
    def length(self) -> int:
        return sum(len(c) for c in self.chunks)


def _frame_plan(inst: CachedInstance, choice: BulkChoice) -> tuple[str, str] | None:
    """(part type, transfer syntax) to send this instance's frames in, or None when only a
    transcode of the instance can give what the client accepts."""
    stored = inst.transfer_syntax
    native = stored in transcode.NATIVE
    for part in choice.parts:
        if part.part_type == OCTET_STREAM:
            if part.transfer_syntax == "*" or part.transfer_syntax == stored:
                return OCTET_STREAM, stored if not native else EXPLICIT_VR_LE
            if part.transfer_syntax == EXPLICIT_VR_LE:
                return OCTET_STREAM, EXPLICIT_VR_LE  # decoded when stored compressed
        elif stored in PART_TYPE_SYNTAXES.get(part.part_type, ()) and part.transfer_syntax in ("*", stored):
            return part.part_type, stored
    return None


def _decode_frame(inst: CachedInstance, number: int) -> bytes:
    import io

    from pydicom.pixels import pixel_array

    inst.frame(number)  # range check first
    try:
        array = pixel_array(io.BytesIO(inst.p10), index=number - 1)
    except Exception as exc:  # a codec's own error types: the data cannot be decoded here
        raise transcode.NotProducible(f"frame cannot be decoded: {type(exc).__name__}") from None
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _frame_parts(ctx: ViewerContext, inst: CachedInstance, frames: list[int], choice: BulkChoice) -> list[_FramePart]:
    """In a worker thread: the parts for ``frames`` of ``inst``."""
    plan = _frame_plan(inst, choice)
    source = inst
    if plan is None:
        wanted = [p.transfer_syntax for p in choice.parts if p.transfer_syntax != "*"]
        try:
            data, target = transcode.convert_to_first(inst.p10[inst.dataset_offset:], inst.transfer_syntax, wanted,
                                                      lossy_allowed=choice.lossy_allowed)
        except transcode.NotProducible as exc:
            raise not_acceptable(f"the frames cannot be sent in an accepted type: {exc}") from None
        source = CachedInstance.from_dataset_bytes(inst.study_uid, inst.series_uid, inst.sop_uid,
                                                   inst.sop_class_uid, target, [data])
        part_type = next((p.part_type for p in choice.parts if p.transfer_syntax in (target, "*")), OCTET_STREAM)
        plan = part_type, target
    part_type, ts = plan
    decode = part_type == OCTET_STREAM and ts == EXPLICIT_VR_LE and source.transfer_syntax not in transcode.NATIVE
    base = instance_url(ctx.base_url, inst)
    out = []
    for number in frames:
        try:
            chunks: list[Any] = [_decode_frame(source, number)] if decode else source.frame(number)
        except transcode.NotProducible as exc:
            raise not_acceptable(str(exc)) from None
        out.append(_FramePart(f"{part_type}; transfer-syntax={ts}", f"{base}/frames/{number}", chunks))
    return out


def _all_frame_parts(ctx: ViewerContext, inst: CachedInstance, choice: BulkChoice) -> list[_FramePart]:
    """In a worker thread: every frame of the instance; ``NoPixelData`` when it has none."""
    return _frame_parts(ctx, inst, list(range(1, inst.layout().number_of_frames + 1)), choice)


def _whole_value(parts: list[_FramePart], location: str) -> list[_FramePart]:
    """Uncompressed frames as the one Pixel Data value they are cut from, named ``location``."""
    if parts and parts[0].content_type == _OCTET_LE:
        return [_FramePart(parts[0].content_type, location, [c for p in parts for c in p.chunks])]
    return parts


def _check_frames(inst: CachedInstance, frames: list[int]) -> None:
    try:
        layout = inst.layout()
    except NoPixelData as exc:
        raise not_found(f"the instance has no frames: {exc}") from None
    beyond = [n for n in frames if n > layout.number_of_frames]
    if beyond:
        raise not_found(f"frame {beyond[0]} is beyond the instance's {layout.number_of_frames} frame(s)")


async def frames(request: Request, ctx: ViewerContext, study: str, series: str, sop: str, frame_list: str) -> Response:
    numbers = parse_frame_list(frame_list)
    choice = choose_bulk_media(request.headers.get("accept"), accept_params(request), strict=ctx.strict_accept,
                               single_part=len(numbers) == 1)
    etag = etag_for(ctx, request, _choice_text(choice))
    if _matches(request, etag):
        return not_modified(ctx, etag)
    inst = await get_instance(ctx, study, series, sop)
    if inst.layout_known and _frame_plan(inst, choice) is not None and (
            inst.transfer_syntax in transcode.NATIVE or choice.parts[0].transfer_syntax != EXPLICIT_VR_LE):
        # the common case, slices of bytes already in memory: no trip to a worker thread
        _check_frames(inst, numbers)
        parts = _frame_parts(ctx, inst, numbers, choice)
    else:
        parts = await in_thread(_checked_frame_parts, ctx, inst, numbers, choice)
    return _bulk_response(parts, choice, cache_headers(ctx, etag))


def _checked_frame_parts(ctx: ViewerContext, inst: CachedInstance, numbers: list[int],
                         choice: BulkChoice) -> list[_FramePart]:
    _check_frames(inst, numbers)
    return _frame_parts(ctx, inst, numbers, choice)


def _choice_text(choice: BulkChoice) -> str:
    return choice.media_type + "|" + ",".join(f"{p.part_type}:{p.transfer_syntax}" for p in choice.parts)


def _boundary_for(headers: dict[str, str]) -> str:
    """A boundary derived from the ETag: the same representation is then the same bytes, as a
    strong ETag promises (a random boundary would differ each time)."""
    etag = headers.get("ETag", "").strip('"')
    return "dwgw-" + etag[:24] if etag else new_boundary()


def _bulk_response(parts: list[_FramePart], choice: BulkChoice, headers: dict[str, str],
                   status: int = 200) -> Response:
    if choice.media_type != "multipart/related":
        (part,) = parts
        return _ChunkResponse(part.chunks, status=status, media_type=part.content_type,
                              headers={**headers, "Content-Location": part.location})
    boundary = _boundary_for(headers)
    chunks: list[Any] = []
    for part in parts:
        chunks.append(part_header(boundary, part.content_type, part.length, part.location))
        chunks.extend(part.chunks)
        chunks.append(b"\r\n")
    chunks.append(closing(boundary))
    first_type = parts[0].content_type.split(";")[0] if parts else OCTET_STREAM
    return _ChunkResponse(chunks, status=status, media_type=f'multipart/related; type="{first_type}"; '
                          f"boundary={boundary}", headers=headers)


class _ChunkResponse(Response):
    """A body already in memory as a few buffers (slices of cached instances): sent as they are,
    with a Content-Length, without joining them into one copy."""

    def __init__(self, chunks: list[Any], status: int, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(b"", status_code=status, headers=headers, media_type=media_type)
        self.chunks = chunks
        self.headers["content-length"] = str(sum(len(c) for c in chunks))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        pending: list[Any] = []
        size = 0
        for chunk in self.chunks:
            if len(chunk) >= 1 << 20:
                if pending:
                    await send({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
                    pending, size = [], 0
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
                continue
            pending.append(chunk)
            size += len(chunk)
            if size >= 1 << 20:
                await send({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
                pending, size = [], 0
        await send({"type": "http.response.body", "body": b"".join(pending), "more_body": False})


async def pixeldata(request: Request, ctx: ViewerContext, level: Level, study: str, series: str | None,
                    sop: str | None) -> Response:
    """Every frame of the instance(s), multipart (Table 10.4.1.6-1)."""
    choice = choose_bulk_media(request.headers.get("accept"), accept_params(request), strict=ctx.strict_accept)
    etag = etag_for(ctx, request, _choice_text(choice))
    if level == Level.IMAGE:
        assert series is not None and sop is not None
        if _matches(request, etag):
            return not_modified(ctx, etag)
        inst = await get_instance(ctx, study, series, sop)
        try:
            parts = await in_thread(_all_frame_parts, ctx, inst, choice)
        except NoPixelData as exc:
            raise not_found(f"the instance has no pixel data: {exc}") from None
        return _bulk_response(parts, choice, cache_headers(ctx, etag))
    return await _streamed_parts(ctx, choice, study, series, _pixel_parts, "pixel data")


def _pixel_parts(ctx: ViewerContext, inst: CachedInstance, choice: BulkChoice) -> list[_FramePart]:
    """In a worker thread: every frame of the instance, or nothing when it has no pixel data."""
    try:
        return _all_frame_parts(ctx, inst, choice)
    except NoPixelData:
        return []


def _all_bulk_parts(ctx: ViewerContext, inst: CachedInstance, choice: BulkChoice) -> list[_FramePart]:
    """In a worker thread: every value the instance's metadata gives a BulkDataURI, in the order
    of the metadata; each part's Content-Location is that URI (Table 10.4.1.5-1)."""
    text = _marked_metadata(ctx, inst)
    octet = any(p.part_type == OCTET_STREAM for p in choice.parts)
    out: list[_FramePart] = []
    for marked in re.findall(r'"BulkDataURI":"([^"]+)"', text):
        location = marked.replace(_MARKER, ctx.base_url)
        path = parse_tag_path(marked.split("/bulkdata/", 1)[1])
        if path == (PIXEL_DATA,):
            out.extend(_whole_value(_pixel_parts(ctx, inst, choice), location))
        elif octet:
            try:
                value, _vr = inst.bulk_value(path)
            except NoSuchValue:
                continue
            out.append(_FramePart(_OCTET_LE, location, [value]))
    return out


async def all_bulkdata(request: Request, ctx: ViewerContext, level: Level, study: str, series: str | None,
                       sop: str | None) -> Response:
    """Every bulk data value of the instance(s), multipart, each part named by its BulkDataURI."""
    choice = choose_bulk_media(request.headers.get("accept"), accept_params(request), strict=ctx.strict_accept)
    if level == Level.IMAGE:
        assert series is not None and sop is not None
        # which values are bulk data depends on the threshold
        etag = etag_for(ctx, request, _choice_text(choice) + f";threshold={ctx.bulk_threshold}")
        if _matches(request, etag):
            return not_modified(ctx, etag)
        inst = await get_instance(ctx, study, series, sop)
        parts = await in_thread(_all_bulk_parts, ctx, inst, choice)
        if not parts:
            raise not_found("the instance has no bulk data")
        return _bulk_response(parts, choice, cache_headers(ctx, etag))
    return await _streamed_parts(ctx, choice, study, series, _all_bulk_parts, "bulk data")


async def _streamed_parts(ctx: ViewerContext, choice: BulkChoice, study: str, series: str | None,
                          parts_for: Any, what: str) -> Response:
    series_list = [series] if series is not None else await _study_series(ctx, study)
    if not series_list:
        raise not_found(f"no such study on node {ctx.node.name!r}")
    boundary = new_boundary()

    async def parts_of_all() -> AsyncIterator[list[_FramePart]]:
        for uid in series_list:
            async with aclosing(ctx.fetcher.series(study, uid)) as instances:
                async for inst in instances:
                    parts = await in_thread(parts_for, ctx, inst, choice)
                    if parts:
                        ctx.note(inst)
                        yield parts

    generator = parts_of_all()
    level_name = "series" if series else "study"
    first = await first_item(ctx, generator, level_name, not_found(f"no {what} in that {level_name}"))

    def framed(batch: list[_FramePart]) -> Iterable[bytes]:
        for part in batch:
            yield part_header(boundary, part.content_type, part.length, part.location)
            for chunk in part.chunks:
                yield bytes(chunk)
            yield b"\r\n"

    async def body() -> AsyncIterator[bytes]:
        try:
            async with aclosing(generator) as rest:
                for chunk in framed(first):
                    yield chunk
                async for batch in rest:
                    for chunk in framed(batch):
                        yield chunk
            yield closing(boundary)
        except (FetchFailed, NotInSeries, DimseError, HttpProblem) as exc:
            log.warning("%s on node %r aborted: %s", what, ctx.node.name, type(exc).__name__)
            raise StreamAborted(str(exc)) from None

    first_type = first[0].content_type.split(";")[0] if first else OCTET_STREAM
    return StallGuardedResponse(body(), stall_timeout=ctx.stall_timeout,
                                media_type=f'multipart/related; type="{first_type}"; boundary={boundary}',
                                headers={"Cache-Control": "private, no-cache"})


# ------------------------------------------------------------------------------------------------
# Bulk data


def _byte_range(request: Request, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` range, clipped; None for no (or an ignored) Range header."""
    header = request.headers.get("range")
    if not header:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if not match or (not match.group(1) and not match.group(2)):
        return None  # several ranges, or another unit: send it whole (RFC 9110 14.2)
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or (last and int(last) < start):
            raise HttpProblem(416, "range-not-satisfiable", f"the value is {size} bytes long",
                              headers={"Content-Range": f"bytes */{size}"})
    else:
        suffix = int(last)
        if suffix == 0:
            raise HttpProblem(416, "range-not-satisfiable", f"the value is {size} bytes long",
                              headers={"Content-Range": f"bytes */{size}"})
        start, end = max(0, size - suffix), size - 1
    return start, end


async def bulkdata(request: Request, ctx: ViewerContext, study: str, series: str, sop: str, path_text: str) -> Response:
    path = parse_tag_path(path_text)
    choice = choose_bulk_media(request.headers.get("accept"), accept_params(request), strict=ctx.strict_accept,
                               single_part=True)
    etag = etag_for(ctx, request, _choice_text(choice))
    if _matches(request, etag) and not request.headers.get("range"):
        return not_modified(ctx, etag)
    inst = await get_instance(ctx, study, series, sop)
    location = f"{instance_url(ctx.base_url, inst)}/bulkdata/{format_tag_path(path)}"
    if path == (PIXEL_DATA,):
        try:
            parts = await in_thread(_all_frame_parts, ctx, inst, choice)
        except NoPixelData:
            parts = None
        if parts is not None:
            # uncompressed: the whole value, every frame in one part; compressed: one part per
            # frame, the frame's fragments joined (8.7.3.3.2)
            parts = _whole_value(parts, location)
            if len(parts) > 1 and choice.media_type != "multipart/related":
                raise not_acceptable("compressed pixel data of several frames is sent as multipart/related only")
            return _ranged(request, ctx, parts, choice, etag, location)
    try:
        value, _vr = await in_thread(inst.bulk_value, path)
    except NoSuchValue as exc:
        raise not_found(f"no bulk data at that path: {exc}") from None
    if not any(p.part_type == OCTET_STREAM for p in choice.parts):
        raise not_acceptable("this bulk data value is sent as application/octet-stream only")
    part = _FramePart(_OCTET_LE, location, [value])
    return _ranged(request, ctx, [part], choice, etag, location)


def _ranged(request: Request, ctx: ViewerContext, parts: list[_FramePart], choice: BulkChoice, etag: str,
            location: str) -> Response:
    headers = {**cache_headers(ctx, etag), "Accept-Ranges": "bytes"}
    if len(parts) != 1:
        return _bulk_response(parts, choice, headers)
    part = parts[0]
    size = part.length
    if_range = request.headers.get("if-range")
    span = _byte_range(request, size) if not if_range or if_range.strip() == etag else None
    if span is None:
        return _bulk_response(parts, choice, headers)
    start, end = span
    joined = memoryview(b"".join(bytes(c) for c in part.chunks) if len(part.chunks) > 1 else part.chunks[0])
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if choice.media_type == "multipart/related":
        boundary = _boundary_for(headers)
        head = part_header(boundary, part.content_type, end - start + 1, location)
        head = head[:-2] + f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n".encode()
        return _ChunkResponse([head, joined[start:end + 1], b"\r\n", closing(boundary)], status=206,
                              media_type=f'multipart/related; type="{part.content_type.split(";")[0]}"; '
                              f"boundary={boundary}", headers=headers)
    return _bulk_response([_FramePart(part.content_type, location, [joined[start:end + 1]])], choice, headers,
                          status=206)


__all__ = [
    "ViewerContext", "metadata", "frames", "pixeldata", "bulkdata", "get_instance", "parse_frame_list",
    "parse_tag_path", "etag_for", "cache_headers", "not_modified", "instance_metadata_text", "warning_value",
]
