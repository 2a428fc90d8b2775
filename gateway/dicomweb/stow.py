"""STOW-RS (PS3.18 10.5): uploads streamed into C-STORE, answered with a Store Instances Response.

The request body is read as a stream and fed to the multipart push parser. Each part is kept in
memory only until it is complete, checked (``p10.inspect`` walks its whole element structure, so a
truncated or corrupt instance never reaches the PACS), and handed to a ``StoreSession``, which
sends its data set bytes unchanged when the PACS accepted their transfer syntax. ``submit`` waits
while every lane is busy, so reading stops while the PACS is behind: at most ``stow.lanes + 1``
parts are in memory at once.

Request forms:

- ``multipart/related; type="application/dicom"``: one PS3.10 file per part;
- ``application/dicom``: the body is one PS3.10 file (an extension many servers accept);
- ``multipart/related; type="application/dicom+json"``: the first part is a JSON array of
  instances, the following parts bulk data, matched by Content-Location to the BulkDataURIs.
  The whole body is needed before any instance is complete, so this form is held in memory
  (within ``stow.max_part_mb``).

What each part becomes (the codes are in the conformance statement):

- stored: a ReferencedSOPSequence item with its RetrieveURL (and WarningReason when the PACS
  answered with a warning);
- failed with known SOP Class and Instance UIDs: a FailedSOPSequence item with the FailureReason:
  the PACS's status, 0x0122 (class refused), 0xC122 (syntax refused and no lossless conversion),
  0xA900 (Study Instance UID differs from the URL), 0xC000 (not a valid DICOM file), 0xA700 (part
  larger than ``stow.max_part_mb``, or cut off by the body limit);
- broken so badly that its UIDs are unknown: no item is possible (the UIDs are Type 1), so it is
  counted in a Warning header and in the log.

Overall status: 200 when every instance was stored without warning; 202 when some were stored and
others failed, carried warnings, or could not be read; 409 when none was stored; 400 when the body
is not a parseable multipart body or holds no part; 413 and 415 as usual. When nothing was stored
because the PACS could not be reached, the answer is the DIMSE failure's own 502/503/504.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.audit import note_instances
from gateway.dimse.node import NodeClient
from gateway.dimse.store import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    ConversionFailed,
    StoreItem,
    StoreOutcome,
    StoreSession,
    is_stored,
)
from gateway.problems import HttpProblem, bad_request, from_dimse

from . import p10
from .multipart import MultipartError, PartData, PartEnd, PartStart, RelatedParser, parse_content_type
from .negotiation import is_uid
from .qido import choose_media_type, warning_value
from .transcode import NotProducible, convert_for_storage

log = logging.getLogger("gateway.stow")

INSPECT_INLINE = 4 << 20  # larger parts are checked in a worker thread
PEEK_BYTES = 1 << 16  # what an oversized part keeps, to name it in the response

# The FailureReason codes the gateway assigns itself (PS3.18 Table I.2-2) are in gateway.dimse.store,
# but for this one, which only the web side knows
STUDY_MISMATCH = 0xA900  # PS3.18 names no code for it: the gateway's choice (conformance statement)


@dataclass
class StowContext:
    node: NodeClient
    base_url: str
    service_url: str
    max_body: int
    max_part: int
    lanes: int
    read_timeout: float
    warning_quoted: bool = False

    def warning(self, text: str) -> str:
        return warning_value(self.service_url, text, self.warning_quoted)


@dataclass
class _Result:
    """One part's fate; ``sop_class``/``sop_instance`` None when they could not be read."""

    index: int
    sop_class: str | None = None
    sop_instance: str | None = None
    study: str | None = None
    series: str | None = None
    status: int | None = None  # None: still being stored
    reason: str = ""
    outcome: StoreOutcome | None = None

    @property
    def named(self) -> bool:
        return bool(self.sop_class and self.sop_instance)

    @property
    def stored(self) -> bool:
        return self.status is not None and is_stored(self.status)


@dataclass
class _Upload:
    results: list[_Result] = field(default_factory=list)
    body_problem: str | None = None  # why reading stopped early, for the Warning header
    disconnected: bool = False
    cut_off: bool = False  # passed the body limit
    timed_out: bool = False
    bytes_read: int = 0


# ------------------------------------------------------------------------------------------------
# Request entry point


async def store_instances(request: Request, ctx: StowContext, study: str | None) -> Response:
    if request.query_params:
        raise bad_request("STOW-RS takes no query parameters", next(iter(request.query_params)))
    response_type = choose_media_type(request.headers.get("accept"), (), (), strict=False)
    media, params = _content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise bad_request(f"Content-Length {declared!r} is not a number") from None
        if length > ctx.max_body:
            raise HttpProblem(413, "payload-too-large",
                              f"the body ({length} bytes) is over the limit of {ctx.max_body} bytes (stow.max_body_mb)")
    upload = _Upload()
    started = time.monotonic()
    if media == "application/dicom":
        await _store_single(request, ctx, study, upload)
    elif params.get("type", "application/dicom").lower() == "application/dicom":
        await _store_multipart(request, ctx, study, upload, params)
    else:  # application/dicom+json, checked by _content_type
        await _store_json(request, ctx, study, upload, params)
    stored = [r for r in upload.results if r.stored]
    note_instances(request, [r.sop_instance or "" for r in stored], studies=[r.study or "" for r in stored])
    return _respond(ctx, study, upload, response_type, time.monotonic() - started)


def _content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        raise HttpProblem(415, "unsupported-media-type",
                          'a Content-Type is required: multipart/related; type="application/dicom"')
    try:
        media, params = parse_content_type(value)
    except MultipartError as exc:
        raise HttpProblem(415, "unsupported-media-type", f"the Content-Type cannot be read: {exc}") from None
    if media == "application/dicom":
        return media, params
    if media != "multipart/related":
        raise HttpProblem(415, "unsupported-media-type",
                          f'{media} is not supported; send multipart/related; type="application/dicom", '
                          "application/dicom+json bulk data, or a single application/dicom instance")
    kind = params.get("type", "application/dicom").lower()
    if kind not in ("application/dicom", "application/dicom+json"):
        raise HttpProblem(415, "unsupported-media-type",
                          f"multipart/related with type={kind!r} is not supported "
                          "(application/dicom and application/dicom+json are)")
    if "boundary" not in params:
        raise bad_request("the multipart/related Content-Type has no boundary parameter")
    return media, params


def _related_parser(params: dict[str, str]) -> RelatedParser:
    try:
        return RelatedParser(params["boundary"])
    except MultipartError as exc:
        raise bad_request(f"the multipart boundary is not valid: {exc}") from None


async def _body(request: Request, ctx: StowContext, upload: _Upload) -> AsyncIterator[bytes]:
    """The body's chunks, stopping at the body limit, a read timeout, or a disconnect (each noted
    in ``upload``; none raises)."""
    stream = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(ctx.read_timeout):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            upload.timed_out = True
            upload.body_problem = f"the client sent nothing for {ctx.read_timeout:g} s; the rest was not read"
            return
        except ClientDisconnect:
            upload.disconnected = True
            upload.body_problem = "the client disconnected before the end of the body"
            return
        if not chunk:
            continue
        upload.bytes_read += len(chunk)
        if upload.bytes_read > ctx.max_body:
            upload.cut_off = True
            upload.body_problem = (f"the body passed the limit of {ctx.max_body} bytes (stow.max_body_mb); "
                                   "the rest was not read")
            return
        yield chunk


# ------------------------------------------------------------------------------------------------
# PS3.10 parts


class _Parts:
    """Checks complete parts and submits them to the session, recording each part's result."""

    def __init__(self, ctx: StowContext, study: str | None, upload: _Upload, session: StoreSession) -> None:
        self.ctx = ctx
        self.study = study
        self.upload = upload
        self.session = session

    async def part(self, data: bytearray, oversized: bool, content_type: str | None) -> None:
        result = _Result(index=len(self.upload.results))
        self.upload.results.append(result)
        if oversized:
            self._name(result, p10.peek_uids(data))
            self._fail(result, OUT_OF_RESOURCES,
                       f"the instance is larger than the limit of {self.ctx.max_part} bytes (stow.max_part_mb)")
            return
        if content_type not in (None, "application/dicom"):
            self._name(result, p10.peek_uids(data))
            self._fail(result, CANNOT_UNDERSTAND, f"the part's Content-Type is {content_type}, not application/dicom")
            return
        try:
            if len(data) > INSPECT_INLINE:
                info = await anyio.to_thread.run_sync(p10.inspect, data)
            else:
                info = p10.inspect(data)
        except p10.P10Error as exc:
            self._name(result, exc.info)
            self._fail(result, CANNOT_UNDERSTAND, f"not a valid DICOM file: {exc}")
            return
        self._name(result, info)
        if not result.named:
            self._fail(result, CANNOT_UNDERSTAND, "the data set has no valid SOP Class UID and SOP Instance UID")
            return
        if info.transfer_syntax is None or not is_uid(info.transfer_syntax):
            self._fail(result, CANNOT_UNDERSTAND, "the File Meta Information has no valid Transfer Syntax UID")
            return
        if self.study is not None and result.study != self.study:
            self._fail(result, STUDY_MISMATCH,
                       "the instance's Study Instance UID is not the one in the URL" if result.study
                       else "the instance has no Study Instance UID, and the URL names a study")
            return
        if (info.media_sop_instance and info.media_sop_instance != result.sop_instance) or \
                (info.media_sop_class and info.media_sop_class != result.sop_class):
            self._fail(result, CANNOT_UNDERSTAND,
                       "the File Meta Information names another SOP Class or Instance than the data set")
            return
        item = StoreItem(result.sop_class or "", result.sop_instance or "", info.transfer_syntax,
                         memoryview(data)[info.dataset_offset:])
        await self.submit(result, item)

    async def submit(self, result: _Result, item: StoreItem) -> None:
        def done(outcome: StoreOutcome) -> None:
            result.outcome = outcome
            result.status = outcome.status
            result.reason = outcome.reason

        await self.session.submit(item, done)

    def partial(self, data: bytearray | None) -> None:
        """The part that was being received when the body ended early: never sent."""
        result = _Result(index=len(self.upload.results))
        self.upload.results.append(result)
        if data:
            self._name(result, p10.peek_uids(data))
        self._fail(result, OUT_OF_RESOURCES if self.upload.cut_off else PROCESSING_FAILURE,
                   "the instance was not received completely: " + (self.upload.body_problem or "the body ended"))

    @staticmethod
    def _name(result: _Result, info: p10.P10Info) -> None:
        valid = [v if v and is_uid(v) else None
                 for v in (info.sop_class_uid, info.sop_instance_uid, info.study_instance_uid, info.series_instance_uid)]
        result.sop_class, result.sop_instance, result.study, result.series = valid

    @staticmethod
    def _fail(result: _Result, status: int, reason: str) -> None:
        result.status = status
        result.reason = reason


def _session(ctx: StowContext) -> StoreSession:
    return StoreSession(ctx.node.pool, lanes=ctx.lanes, convert=_convert)


def _convert(data: bytes | bytearray | memoryview, source_ts: str, accepted: Sequence[str]) -> tuple[bytes, str]:
    try:
        return convert_for_storage(data, source_ts, accepted)
    except NotProducible as exc:
        raise ConversionFailed(f"cannot be converted without loss: {exc.reason}") from None


async def _store_multipart(request: Request, ctx: StowContext, study: str | None, upload: _Upload,
                           params: dict[str, str]) -> None:
    parser = _related_parser(params)
    malformed: str | None = None
    async with _session(ctx) as session:
        parts = _Parts(ctx, study, upload, session)
        buffer: bytearray | None = None
        oversized = False
        content_type: str | None = None
        try:
            async for chunk in _body(request, ctx, upload):
                for event in parser.feed(chunk):
                    if isinstance(event, PartData):
                        assert buffer is not None
                        if oversized:
                            continue
                        buffer += event.data
                        if len(buffer) > ctx.max_part:
                            oversized = True
                            del buffer[PEEK_BYTES:]
                    elif isinstance(event, PartStart):
                        buffer, oversized, content_type = bytearray(), False, event.content_type
                    elif isinstance(event, PartEnd):
                        assert buffer is not None
                        data, buffer = buffer, None
                        await parts.part(data, oversized, content_type)
                if parser.finished:
                    break
            if upload.body_problem is None:
                parser.close()
        except MultipartError as exc:
            malformed = str(exc)
        if upload.body_problem is not None or malformed is not None:
            if parser.in_part:
                parts.partial(buffer)
    if malformed is not None:
        if not any(r.stored for r in upload.results):
            raise bad_request(f"the multipart body cannot be parsed: {malformed}")
        upload.body_problem = f"the multipart body is malformed after the stored instances: {malformed}"
    if not upload.results and upload.body_problem is None:
        raise bad_request("the multipart body holds no part")


async def _store_single(request: Request, ctx: StowContext, study: str | None, upload: _Upload) -> None:
    data = bytearray()
    oversized = False
    async for chunk in _body(request, ctx, upload):
        if not oversized:
            data += chunk
            if len(data) > ctx.max_part:
                oversized = True
                del data[PEEK_BYTES:]
    if not data and upload.body_problem is None:
        raise bad_request("the body is empty")
    async with _session(ctx) as session:
        parts = _Parts(ctx, study, upload, session)
        if upload.body_problem is not None:
            parts.partial(data)
        else:
            await parts.part(data, oversized, None)


# ------------------------------------------------------------------------------------------------
# DICOM JSON with bulk data


async def _store_json(request: Request, ctx: StowContext, study: str | None, upload: _Upload,
                      params: dict[str, str]) -> None:
    from .stow_json import build_instances  # noqa: PLC0415 - only this form needs pydicom's JSON reader

    parser = _related_parser(params)
    parts: list[tuple[dict[str, str], bytearray]] = []
    total = 0
    try:
        async for chunk in _body(request, ctx, upload):
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    parts.append((event.headers, bytearray()))
                elif isinstance(event, PartData):
                    parts[-1][1].extend(event.data)
                    total += len(event.data)
                    if total > ctx.max_part:
                        raise HttpProblem(413, "payload-too-large",
                                          f"a DICOM JSON upload is held in memory whole, and this one passed "
                                          f"stow.max_part_mb ({ctx.max_part} bytes)")
            if parser.finished:
                break
        if upload.body_problem is not None:
            raise bad_request(f"the upload did not complete: {upload.body_problem}")
        parser.close()
    except MultipartError as exc:
        raise bad_request(f"the multipart body cannot be parsed: {exc}") from None
    if not parts:
        raise bad_request("the multipart body holds no part")
    # pydicom's JSON reader and writer, off the event loop; HttpProblem(400) when the metadata is unusable
    built = await anyio.to_thread.run_sync(build_instances, parts)
    async with _session(ctx) as session:
        checker = _Parts(ctx, study, upload, session)
        for instance in built:
            if instance.error is not None:
                result = _Result(index=len(upload.results), sop_class=instance.sop_class,
                                 sop_instance=instance.sop_instance, study=instance.study, series=instance.series)
                upload.results.append(result)
                checker._fail(result, instance.error[0], instance.error[1])
                continue
            await checker.part(instance.data, False, None)


# ------------------------------------------------------------------------------------------------
# The response


def _respond(ctx: StowContext, study: str | None, upload: _Upload, media_type: str, elapsed: float) -> Response:
    results = upload.results
    stored = [r for r in results if r.stored]
    failed = [r for r in results if not r.stored and r.named]
    unnamed = [r for r in results if not r.stored and not r.named]
    warned = [r for r in stored if r.status != 0]
    log.info("STOW-RS to node %r: %d part(s), %d stored (%d with a warning), %d failed, %d unreadable, "
             "%d bytes in %.1f s%s", ctx.node.name, len(results), len(stored), len(warned), len(failed),
             len(unnamed), upload.bytes_read, elapsed, f"; {upload.body_problem}" if upload.body_problem else "")
    for r in results:
        if not r.stored:
            log.warning("STOW-RS part %d not stored: 0x%04X %s", r.index + 1, r.status or 0, r.reason)
    if not stored:
        # nothing stored: the reason that concerns the whole request wins over the parts' own
        errors = [r.outcome.error for r in results if r.outcome is not None and r.outcome.error is not None]
        if errors:
            raise from_dimse(errors[0])
        if upload.cut_off:
            raise HttpProblem(413, "payload-too-large", upload.body_problem or "the body is too large")
        if upload.timed_out:
            raise HttpProblem(408, "request-timeout", upload.body_problem or "the upload stalled")
    if upload.disconnected:
        # nobody is there to read it; the log above is what remains
        return Response(status_code=400)
    body: dict[str, Any] = {}
    studies = {r.study for r in stored if r.study}
    body["00081190"] = {"vr": "UR", "Value": [f"{ctx.base_url}/studies/{studies.pop()}"]} if len(studies) == 1 \
        else {"vr": "UR"}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_failed_item(r) for r in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_referenced_item(ctx, r) for r in stored]}
    headers: list[tuple[str, str]] = []
    if unnamed:
        reasons = "; ".join(f"part {r.index + 1}: {r.reason}" for r in unnamed[:5])
        more = f" (and {len(unnamed) - 5} more)" if len(unnamed) > 5 else ""
        headers.append(("warning", ctx.warning(
            f"{len(unnamed)} part(s) could not be read as DICOM instances and were not stored: {reasons}{more}")))
    if failed:
        codes = sorted({r.status or 0 for r in failed})
        headers.append(("warning", ctx.warning(
            f"{len(failed)} instance(s) were not stored (FailureReason " + ", ".join(f"{c:04X}" for c in codes)
            + "); see FailedSOPSequence")))
    if upload.body_problem:
        headers.append(("warning", ctx.warning(upload.body_problem)))
    if not stored:
        status = 409
    elif failed or unnamed or warned or upload.body_problem:
        status = 202
    else:
        status = 200
    response = Response(json.dumps(body).encode(), status_code=status, media_type=media_type)
    for name, value in headers:
        response.headers.append(name, value)
    return response


def _failed_item(r: _Result) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [r.sop_class]},
        "00081155": {"vr": "UI", "Value": [r.sop_instance]},
        "00081197": {"vr": "US", "Value": [r.status]},
    }


def _referenced_item(ctx: StowContext, r: _Result) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [r.sop_class]},
        "00081155": {"vr": "UI", "Value": [r.sop_instance]},
    }
    if r.study and r.series:
        item["00081190"] = {"vr": "UR", "Value": [
            f"{ctx.base_url}/studies/{r.study}/series/{r.series}/instances/{r.sop_instance}"]}
    else:
        item["00081190"] = {"vr": "UR"}
    if r.status:
        item["00081196"] = {"vr": "US", "Value": [r.status]}
    return item



