"""WADO-RS retrieve of studies, series and instances (PS3.18 10.4), streamed from C-GET or C-MOVE.

1. Negotiate the media type and transfer syntaxes (406 before anything else when nothing fits).
2. An IMAGE-level C-FIND lists the instances and their SOP classes: 404 when there are none; the
   SOP classes decide the C-GET storage contexts; the UIDs are what completeness is checked against.
3. The retrieve starts; each instance is prepared in the DIMSE thread (transcoded if the client did
   not accept what the PACS sent, given its file meta, framed as a part, in writes of a few MB) and
   handed over through a bounded stream.
4. The response headers wait for the first part or the final status, so 404, 406, 502 and 504
   stay possible. After that, a failure or an incomplete retrieve aborts the connection: no closing
   boundary and no final chunk, so no client takes the body as complete.
"""

from __future__ import annotations

import logging
import threading
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import anyio
from pydicom.dataset import Dataset
from starlette.requests import Request
from starlette.responses import Response

from gateway.audit import note_instances
from gateway.dimse.errors import DimseError
from gateway.dimse.node import NodeClient
from gateway.dimse.retrieve import RetrieveOutcome, RetrieveRequest, RetrieveDone, RetrieveFailed
from gateway.dimse.ul import StoreRequest
from gateway.middleware import StreamAborted
from gateway.problems import HttpProblem, from_dimse, not_acceptable, not_found

from . import transcode
from .attributes import Level
from .negotiation import Choice, choose_instance_media, web_safe
from .plan import SERIES_UID, SOP_UID, Resource, build_plan, first_value
from .query import parse_query
from .qido import SearchCounters, run_plan
from .streaming import StallGuardedResponse, closing, new_boundary, part_header

log = logging.getLogger("gateway.wado")
SOP_CLASS = 0x00080016
SOP_CLASSES_IN_STUDY = 0x00080062


@dataclass(frozen=True)
class WadoContext:
    node: NodeClient
    base_url: str
    stall_timeout: float
    strict_accept: bool
    fanout_concurrency: int
    fanout_max_parents: int


@dataclass
class Part:
    """A prepared instance: ``payload`` is what goes on the wire for it, in writes of a few MB."""

    sop_instance_uid: str
    payload: list[bytes | memoryview] | None
    problem: str | None = None  # why it could not be produced
    transfer_syntax: str = ""


async def list_instances(ctx: WadoContext, resource: Resource, sop_uid: str | None) -> list[tuple[str, str, str]]:
    """(series UID, SOP Instance UID, SOP Class UID) of every instance the retrieve covers."""
    if resource.series_uid:
        return await list_series(ctx.node, resource.study_uid or "", resource.series_uid, sop_uid)
    query = parse_query("includefield=SOPClassUID" + (f"&SOPInstanceUID={sop_uid}" if sop_uid else ""))
    caps = await ctx.node.capabilities()
    plan = build_plan(resource, query, relational=caps.relational, fuzzy_accepted=False,
                      charset=ctx.node.settings.charset, defaults=False)
    out = []
    async with aclosing(run_plan(ctx.node, plan, concurrency=ctx.fanout_concurrency,
                                 max_parents=ctx.fanout_max_parents, counters=SearchCounters())) as results:
        async for found in results:
            if not found.outcome.keep:
                continue
            ds = found.dataset
            series = first_value(ds, SERIES_UID) or resource.series_uid or ""
            sop = first_value(ds, SOP_UID) or ""
            if sop:
                out.append((series, sop, first_value(ds, SOP_CLASS) or ""))
    return out


async def list_series(node: NodeClient, study: str, series: str, sop_uid: str | None) -> list[tuple[str, str, str]]:
    """(series, SOP Instance UID, SOP Class UID) of a series' instances (or of one of them): one
    IMAGE-level C-FIND (valid in hierarchical mode: both parent UIDs are given), each match reduced
    to its three UIDs in the DIMSE thread, since the listing can be on the path to the first byte."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study
    identifier.SeriesInstanceUID = series
    identifier.SOPInstanceUID = sop_uid or ""
    identifier.SOPClassUID = ""

    def uids(ds: Dataset) -> tuple[str, str, str]:
        return first_value(ds, SERIES_UID) or series, first_value(ds, SOP_UID) or "", first_value(ds, SOP_CLASS) or ""

    out = []
    async with aclosing(node.queries.find(identifier, prepare=uids)) as matches:
        async for match in matches:
            found_series, sop, sop_class = match.prepared
            # a PACS may ignore a key it was given: keep only what was asked for
            if sop and found_series == series and (sop_uid is None or sop == sop_uid):
                out.append((series, sop, sop_class))
    return out


WRITE_SIZE = 4 << 20


def _coalesce(buffers: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """A typical instance becomes one write (each write costs a trip through the server); a large
    one (a multi-frame of hundreds of MB) goes out as the fragments it arrived in, never copied, so
    it is in memory once."""
    if sum(len(b) for b in buffers) > 2 * WRITE_SIZE:
        return list(buffers)
    out: list[bytes | memoryview] = []
    group: list[bytes | memoryview] = []
    size = 0
    for buffer in buffers:
        group.append(buffer)
        size += len(buffer)
        if size >= WRITE_SIZE:
            out.append(b"".join(group))
            group, size = [], 0
    if group:
        out.append(b"".join(group))
    return out


async def study_classes(node: NodeClient, study: str) -> list[str] | None:
    """SOPClassesInStudy from a STUDY-level C-FIND: None when the study is not there, [] when the
    PACS does not say (it is an optional key)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    identifier.add_new(SOP_CLASSES_IN_STUDY, "UI", None)

    def classes(ds: Dataset) -> list[str]:
        if SOP_CLASSES_IN_STUDY not in ds or not ds[SOP_CLASSES_IN_STUDY].value:
            return []
        value = ds[SOP_CLASSES_IN_STUDY].value
        values = [value] if isinstance(value, str) else list(value)  # one value, or a MultiValue
        return [str(v).strip() for v in values if str(v).strip()]

    found: list[str] | None = None
    async with aclosing(node.queries.find(identifier, prepare=classes)) as matches:
        async for match in matches:
            if (first_value(match.identifier, 0x0020000D) or study) == study:
                found = sorted(set(found or []) | set(match.prepared))
    return found


class _Listing:
    """The instance listing, run alongside a retrieve in the pool's task group."""

    def __init__(self, ctx: WadoContext, resource: Resource, sop: str | None) -> None:
        self.ctx, self.resource, self.sop = ctx, resource, sop
        self.done = anyio.Event()
        self.instances: list[tuple[str, str, str]] | None = None

    async def run(self) -> None:
        try:
            self.instances = await list_instances(self.ctx, self.resource, self.sop)
        except DimseError as exc:
            log.warning("instance listing for completeness failed on node %r: %s", self.ctx.node.name, exc.message)
        finally:
            self.done.set()

    async def result(self, timeout: float) -> list[tuple[str, str, str]] | None:
        with anyio.move_on_after(timeout):
            await self.done.wait()
        return self.instances


class _Preparer:
    """Runs in DIMSE threads: transcode if needed, add file meta, frame the part."""

    def __init__(self, choice: Choice, boundary: str | None, base_url: str, study_uid: str,
                 series_of: dict[str, str], default_series: str | None = None) -> None:
        self.default_series = default_series
        self.choice = choice
        self.boundary = boundary
        self.base_url = base_url
        self.study_uid = study_uid
        self.series_of = series_of
        self.received: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, store: StoreRequest) -> Part:
        with self.lock:
            self.received.add(store.sop_instance_uid)
        source = store.transfer_syntax
        accepted = self.choice.transfer_syntaxes
        if source in accepted or ("*" in accepted and web_safe(source)):
            # as received: no transcoding
            return self._part(store, source, store.chunks)
        try:
            converted, target = transcode.convert_to_first(b"".join(store.chunks), source, list(accepted),
                                                           lossy_allowed=self.choice.lossy_allowed)
        except transcode.NotProducible as exc:
            return Part(store.sop_instance_uid, None, str(exc))
        return self._part(store, target, [converted])

    def _part(self, store: StoreRequest, ts: str, chunks: Sequence[bytes | memoryview]) -> Part:
        meta = transcode.file_meta_bytes(store.sop_class_uid, store.sop_instance_uid, ts)
        if self.boundary is None:
            return Part(store.sop_instance_uid, _coalesce([meta, *chunks]), transfer_syntax=ts)
        series = self.series_of.get(store.sop_instance_uid) or self.default_series
        location = (f"{self.base_url}/studies/{self.study_uid}/series/{series}/instances/{store.sop_instance_uid}"
                    if series else None)
        length = len(meta) + sum(len(c) for c in chunks)
        header = part_header(self.boundary, f"application/dicom; transfer-syntax={ts}", length, location)
        return Part(store.sop_instance_uid, _coalesce([header + meta, *chunks, b"\r\n"]), transfer_syntax=ts)


async def retrieve(request: Request, ctx: WadoContext, level: Level, study: str, series: str | None,
                   sop: str | None) -> Response:
    params = [v for k, v in request.query_params.multi_items() if k == "accept"]
    choice = choose_instance_media(request.headers.get("accept"), params, single_instance=level == Level.IMAGE,
                                   strict=ctx.strict_accept)
    resource = Resource(Level.IMAGE, study, series)
    listing: _Listing | None = None
    try:
        classes = await study_classes(ctx.node, study) if series is not None and ctx.node.settings.retrieve == "get" else []
        if classes is None:
            instances = []
        elif classes:
            # The C-GET needs only the SOP classes: it starts now, and the instance listing that
            # completeness is checked against runs alongside it instead of before the first byte.
            instances = [("", "", c) for c in classes]
            listing = _Listing(ctx, resource, sop)
            ctx.node.pool.spawn(listing.run)
        else:
            instances = await list_instances(ctx, resource, sop)
    except DimseError as exc:
        raise from_dimse(exc) from None
    if not instances:
        raise not_found("no such " + {Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "instance"}[level]
                        + " on node " + repr(ctx.node.name))
    boundary = new_boundary() if choice.multipart else None
    preparer = _Preparer(choice, boundary, ctx.base_url, study, {sop_: series_ for series_, sop_, _ in instances},
                         default_series=series)
    dimse_level = {Level.STUDY: "STUDY", Level.SERIES: "SERIES", Level.IMAGE: "IMAGE"}[level]
    retrieve_request = RetrieveRequest(
        dimse_level, study, series, sop, instances=instances,
        transfer_syntaxes=[ts for ts in choice.transfer_syntaxes if ts != "*"]
        + (_stored_forms() if "*" in choice.transfer_syntaxes else []),
    )
    stream, cancel = ctx.node.retriever.start(retrieve_request, preparer, _part_size,
                                              stall_timeout=ctx.stall_timeout)

    first: Any = None
    try:
        first = await stream.receive()
    except anyio.EndOfStream:  # the retrieve ended without a word: only when this request was cancelled
        cancel()
        raise HttpProblem(503, "gateway-busy", "the retrieve was cancelled", headers={"Retry-After": "1"}) from None
    except BaseException:
        cancel()
        stream.close()
        raise
    if isinstance(first, (RetrieveDone, RetrieveFailed)):
        stream.close()
        raise _problem_before_any_part(first, ctx)
    assert isinstance(first, Part)
    if first.payload is None:
        cancel()
        stream.close()
        raise not_acceptable(f"instance cannot be sent in an accepted transfer syntax: {first.problem}")

    expected = {sop_ for _, sop_, _ in instances}

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        outcome: RetrieveOutcome | None = None
        try:
            assert first.payload is not None
            for buffer in first.payload:
                yield buffer
            sent += 1
            note_instances(request, (first.sop_instance_uid,))
            async for item in stream:
                if isinstance(item, Part):
                    if boundary is None:
                        raise _Abort("more than one instance for a single-part response")
                    if item.payload is None:
                        raise _Abort(f"an instance cannot be sent in an accepted transfer syntax ({item.problem})")
                    for buffer in item.payload:
                        yield buffer
                    sent += 1
                    note_instances(request, (item.sop_instance_uid,))
                elif isinstance(item, RetrieveFailed):
                    outcome = item.outcome
                    raise _Abort(f"{type(item.error).__name__}: {item.error.message}")
                elif isinstance(item, RetrieveDone):
                    outcome = item.outcome
                    break
            if outcome is None:
                raise _Abort("the retrieve ended without a final status")
            if listing is not None:
                listed = await listing.result(timeout=ctx.stall_timeout)
                if listed is None:
                    raise _Abort("the instance listing to check completeness against failed")
                expected.clear()
                expected.update(sop_ for _, sop_, _ in listed)
            missing = expected - preparer.received
            if not outcome.complete or outcome.delivered < outcome.completed or missing:
                raise _Abort(f"incomplete: status 0x{(outcome.status or 0):04X}, {outcome.completed} completed, "
                             f"{outcome.failed} failed, {len(missing)} expected instance(s) not received")
            if boundary is not None:
                yield closing(boundary)
        except _Abort as exc:
            log.warning("retrieve on node %r aborted after %d of %d instance(s): %s", ctx.node.name, sent,
                        len(expected), exc)
            raise StreamAborted(str(exc)) from None
        finally:
            cancel()
            stream.close()

    if boundary is not None:
        media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    else:
        media_type = f"application/dicom; transfer-syntax={first.transfer_syntax}"
    return StallGuardedResponse(body(), stall_timeout=ctx.stall_timeout, media_type=media_type)


def _part_size(part: Part) -> int:
    return sum(len(b) for b in part.payload) if part.payload is not None else 0


class _Abort(Exception):
    pass


def _stored_forms() -> list[str]:
    """For ``transfer-syntax=*``: contexts for the common stored forms, so the PACS sends as stored."""
    return list(transcode.PASS_THROUGH_SYNTAXES)


def _problem_before_any_part(item: RetrieveDone | RetrieveFailed, ctx: WadoContext) -> HttpProblem:
    outcome = item.outcome
    if isinstance(item, RetrieveFailed):
        return from_dimse(item.error)
    if outcome.rejected_classes:
        return HttpProblem(502, "pacs-service-not-supported",
                           f"node {ctx.node.name!r} refused the storage contexts for "
                           + ", ".join(outcome.rejected_classes))
    if outcome.failed:
        return HttpProblem(502, "pacs-failure", f"node {ctx.node.name!r} failed to send {outcome.failed} instance(s)")
    if outcome.consumer_gone:
        return HttpProblem(503, "gateway-busy", "the retrieve was cancelled", headers={"Retry-After": "1"})
    if outcome.completed:
        return HttpProblem(502, "pacs-failure",
                           f"node {ctx.node.name!r} reports {outcome.completed} instance(s) sent, but none arrived: "
                           "is the gateway registered at the PACS with the right host and port?")
    return not_found(f"node {ctx.node.name!r} sent no instance for this request")
