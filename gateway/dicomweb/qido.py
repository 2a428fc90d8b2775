"""QIDO-RS (PS3.18 10.6): the six search resources, answered from C-FIND as the matches arrive.

Response policy:
- With ``limit``: skip ``offset`` matches, read up to ``limit + 1``, then stop (C-CANCEL). The headers
  wait for those matches or the final status, so the status and the "additional results" Warning are
  exact.
- Without ``limit``: the headers go out with the first match (or the final status), and the rest is
  streamed as it arrives. The configured ``max_results`` still applies: a result set that passes it
  mid-stream is cut by aborting the connection, so no client takes it for complete.
- A failure after the body has started aborts the connection for the same reason.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from contextlib import aclosing
from typing import AsyncIterator

import anyio
from pydicom.dataset import Dataset
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.dimse.errors import DimseError
from gateway.dimse.find import STUDY_ROOT
from gateway.dimse.node import NodeClient
from gateway.guards import Refusal, guard_search
from gateway.middleware import StreamAborted
from gateway.problems import HttpProblem, bad_request, from_dimse, not_acceptable

from .attributes import Level, level_of, query_level, vr_of
from .dicomjson import dataset_to_json
from .plan import (
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    RETRIEVE_URL,
    SERIES_UID,
    SOP_UID,
    SPECIFIC_CHARACTER_SET,
    STUDY_UID,
    Plan,
    FilterOutcome,
    Resource,
    build_plan,
    first_value,
    post_filter,
)
from .query import MatchKey, QidoQuery, QueryError, parse_query

log = logging.getLogger("gateway.qido")

JSON_TYPES = ("application/dicom+json", "application/json")
XML_TYPES = ("application/dicom+xml", "multipart/related")


# ------------------------------------------------------------------------------------------------
# Media type


def warning_value(service_url: str, text: str, quoted: bool) -> str:
    """A Warning header value, ``299 <service-url>: <text>`` (PS3.18 8.3.5.1), for searches and
    stores: header-safe ASCII without control characters (texts may quote the client's input),
    ``"`` written as ``'``, quoted when ``qido.warning_quoted`` asks for it."""
    safe = re.sub(r"[\x00-\x1f\x7f]", "?", text.encode("ascii", "backslashreplace").decode("ascii"))
    safe = safe.replace('"', "'")
    return f'299 {service_url}: "{safe}"' if quoted else f"299 {service_url}: {safe}"


def choose_media_type(accept_header: str | None, accept_param: tuple[str, ...], charset: tuple[str, ...], strict: bool) -> str:
    """The response type for a search (8.7.5): the ``accept`` parameter wins over the header."""
    for value in charset:
        if value.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise bad_request(f"charset {value!r} is not supported: DICOM JSON is always UTF-8", "charset")
    ranges = [r for r in accept_param] or [r for r in (accept_header or "").split(",") if r.strip()]
    if not ranges:
        if strict:
            raise not_acceptable("an Accept header is required; this server produces application/dicom+json")
        return JSON_TYPES[0]
    wanted_xml = False
    for media_range in ranges:
        parts = [p.strip() for p in media_range.split(";")]
        media = parts[0].lower()
        params = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in parts[1:])}
        if params.get("q") is not None and _q(params["q"]) == 0:
            continue
        cs = params.get("charset")
        if cs and cs.lower().replace("_", "-") not in ("utf-8", "utf8"):
            continue
        if media in JSON_TYPES or media in ("*/*", "application/*"):
            return JSON_TYPES[0] if media != "application/json" else "application/json"
        if media in XML_TYPES:
            wanted_xml = True
    if wanted_xml:
        raise not_acceptable(
            "application/dicom+xml is not supported by this gateway (see the conformance statement); "
            "ask for application/dicom+json"
        )
    raise not_acceptable("this server produces application/dicom+json for searches")


def _q(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 1.0


# ------------------------------------------------------------------------------------------------
# Running a plan


def _merge(child: Dataset, parent: Dataset | None) -> Dataset:
    """The parent's attributes the child lacks, copied as they are (raw elements stay raw)."""
    if parent is None:
        return child
    for tag in parent.keys():
        if tag not in child and tag not in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET):
            child[tag] = parent.get_item(tag)
    return child


def _step_identifier(plan: Plan, index: int, parent: Dataset | None) -> Dataset:
    ds = copy.deepcopy(plan.steps[index].identifier)  # elements are mutable and shared otherwise
    if parent is not None:
        for tag in (STUDY_UID, SERIES_UID):
            if tag in ds and tag in parent and parent[tag].value:
                ds[tag].value = parent[tag].value
    return ds


def _belongs(child: Dataset, parent: Dataset | None) -> bool:
    """A child must carry its parent's UIDs: some PACSes match a lower-level UID and ignore the
    higher-level one they were given."""
    if parent is None:
        return True
    for tag in (STUDY_UID, SERIES_UID):
        theirs, ours = first_value(child, tag), first_value(parent, tag)
        if theirs and ours and theirs != ours:
            return False
    return True


class SearchCounters:
    def __init__(self) -> None:
        self.ff01 = False
        self.unverified: set[str] = set()


async def _collect(node: NodeClient, identifier: Dataset, limit: int, counters: SearchCounters) -> list[Dataset]:
    out = []
    async with aclosing(node.queries.find(identifier, model=STUDY_ROOT)) as matches:
        async for m in matches:
            counters.ff01 |= m.status == 0xFF01
            if len(out) >= limit:
                raise HttpProblem(
                    413, "too-broad",
                    f"the query matches more than {limit} entities at the {identifier.QueryRetrieveLevel} level, "
                    "which this PACS can only search one by one; add filters",
                )
            out.append(m.identifier)  # raw: filters convert only what they read
    return out


@dataclass(frozen=True)
class Found:
    """One result: merged with its parents, checked against the post-filters, and (when the caller
    gave an encoder) already encoded. Made in the DIMSE worker thread while the next match is on
    its way, which keeps that CPU work off the event loop."""

    dataset: Dataset
    outcome: FilterOutcome
    payload: bytes | None = None


async def run_plan(
    node: NodeClient, plan: Plan, *, concurrency: int, max_parents: int, counters: SearchCounters,
    encode: Callable[[Dataset], bytes] | None = None,
) -> AsyncIterator[Found]:
    """Results in order: one C-FIND, or a fan-out from the first step down."""

    def finish(parent: Dataset | None, child: Dataset) -> Found | None:
        if not _belongs(child, parent):
            return None
        merged = _merge(child, parent)
        outcome = post_filter(merged, plan.post_filters)
        payload = encode(merged) if encode is not None and outcome.keep else None
        return Found(merged, outcome, payload)

    async def level(index: int, parent: Dataset | None) -> AsyncIterator[Found]:
        identifier = _step_identifier(plan, index, parent)
        if index == len(plan.steps) - 1:
            prepare = functools.partial(finish, parent)
            async with aclosing(node.queries.find(identifier, model=STUDY_ROOT, prepare=prepare)) as matches:
                async for m in matches:
                    counters.ff01 |= m.status == 0xFF01
                    if m.prepared is not None:
                        yield m.prepared
            return
        found = await _collect(node, identifier, max_parents, counters)
        parents = [_merge(p, parent) for p in found if _belongs(p, parent)]
        for p in parents:  # convert the UIDs children compare with now, before threads share parents
            first_value(p, STUDY_UID), first_value(p, SERIES_UID)
        # Parents pre-filtered on their own level's keys cut the fan-out short.
        parents = [p for p in parents if post_filter(p, _filters_for_level(plan, index)).keep]
        if index + 1 == len(plan.steps) - 1 and concurrency > 1:
            for start in range(0, len(parents), concurrency):
                window = parents[start : start + concurrency]
                results: list[list[Found]] = [[] for _ in window]

                async def child(i: int, p: Dataset) -> None:
                    async with aclosing(level(index + 1, p)) as items:
                        async for item in items:
                            results[i].append(item)

                async with anyio.create_task_group() as tg:
                    for i, p in enumerate(window):
                        tg.start_soon(child, i, p)
                for batch in results:
                    for item in batch:
                        yield item
        else:
            for p in parents:
                async with aclosing(level(index + 1, p)) as items:
                    async for item in items:
                        yield item

    async with aclosing(level(0, None)) as items:
        async for item in items:
            yield item


def _filters_for_level(plan: Plan, index: int) -> list[MatchKey]:
    lv = plan.steps[index].level
    return [k for k in plan.post_filters if level_of(k.tag) is not None and query_level(level_of(k.tag)) <= lv]


# ------------------------------------------------------------------------------------------------
# Shaping results


def shape(result: Dataset, plan: Plan, base_url: str) -> Dataset:
    out = Dataset()
    for tag, _items in plan.output_tags:
        if tag in result:
            out[tag] = result.get_item(tag)  # raw elements stay raw
        else:
            out.add_new(tag, vr_of(tag), None)
    if SPECIFIC_CHARACTER_SET in result:
        # the PACS's own value: raw text is decoded with it; the JSON says ISO_IR 192 (UTF-8)
        out[SPECIFIC_CHARACTER_SET] = result.get_item(SPECIFIC_CHARACTER_SET)
    for tag in (QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE):
        if tag in out:
            del out[tag]
    study = first_value(result, STUDY_UID) or plan.resource.study_uid
    series = first_value(result, SERIES_UID) or plan.resource.series_uid
    sop = first_value(result, SOP_UID)
    level = plan.resource.level
    url = None
    if study:
        url = f"{base_url}/studies/{study}"
        if level >= Level.SERIES and series:
            url += f"/series/{series}"
            if level == Level.IMAGE and sop:
                url += f"/instances/{sop}"
    if url:
        out.add_new(RETRIEVE_URL, "UR", url)
    return out


# ------------------------------------------------------------------------------------------------
# The endpoint


class SearchContext:
    """What a search needs from the app: the node, settings, and the base URLs."""

    def __init__(self, node: NodeClient, base_url: str, service_url: str, *, max_results: int, empty_status: int,
                 fanout_concurrency: int, fanout_max_parents: int, strict_accept: bool, warning_quoted: bool) -> None:
        self.node = node
        self.base_url = base_url
        self.service_url = service_url
        self.max_results = max_results
        self.empty_status = empty_status
        self.fanout_concurrency = fanout_concurrency
        self.fanout_max_parents = fanout_max_parents
        self.strict_accept = strict_accept
        self.warning_quoted = warning_quoted

    def warning(self, text: str) -> str:
        return warning_value(self.service_url, text, self.warning_quoted)


async def search(request: Request, ctx: SearchContext, resource: Resource) -> Response:
    try:
        raw = request.scope.get("query_string", b"")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise QueryError("query", "the query string is not UTF-8; percent-encode non-ASCII values") from None
        query = parse_query(text)
    except QueryError as exc:
        raise bad_request(exc.message, exc.parameter) from None
    try:
        guard_search(query, resource.study_uid is not None, ctx.node.settings)
    except Refusal as exc:
        raise HttpProblem(400, "query-too-broad", exc.message, exc.parameter) from None
    media_type = choose_media_type(request.headers.get("accept"), query.accept, query.charset, ctx.strict_accept)
    try:
        caps = await ctx.node.capabilities()
        plan = build_plan(resource, query, relational=caps.relational, fuzzy_accepted=caps.fuzzy,
                          charset=ctx.node.settings.charset)
    except QueryError as exc:
        raise bad_request(exc.message, exc.parameter) from None
    except DimseError as exc:
        raise from_dimse(exc) from None
    return await _respond(ctx, plan, query, media_type)


async def _respond(ctx: SearchContext, plan: Plan, query: QidoQuery, media_type: str) -> Response:
    counters = SearchCounters()
    explicit_limit = query.limit is not None
    limit = min(query.limit, ctx.max_results) if query.limit is not None else ctx.max_results
    warnings = list(plan.warnings)
    if query.limit is not None and query.limit > ctx.max_results:
        warnings.append(f"The limit was lowered to the server's maximum of {ctx.max_results} results.")

    def encode(result: Dataset) -> bytes:
        return dataset_to_json(shape(result, plan, ctx.base_url)).encode("utf-8")

    results = run_plan(ctx.node, plan, concurrency=ctx.fanout_concurrency,
                       max_parents=ctx.fanout_max_parents, counters=counters, encode=encode)

    async def filtered() -> AsyncIterator[Found]:
        skipped = 0
        async with aclosing(results) as items:
            async for item in items:
                counters.unverified.update(item.outcome.unverified)
                if not item.outcome.keep:
                    continue
                if skipped < query.offset:
                    skipped += 1
                    continue
                yield item

    stream = filtered()
    held: list[Found] = []
    more = False
    finished = False
    try:
        hold = limit + 1 if explicit_limit else 1
        while len(held) < hold:
            try:
                held.append(await stream.__anext__())
            except StopAsyncIteration:
                finished = True
                break
    except DimseError as exc:
        await stream.aclose()
        raise from_dimse(exc) from None
    except BaseException:
        await stream.aclose()
        raise
    if explicit_limit and len(held) > limit:
        more = True
        held = held[:limit]
        finished = True
        await stream.aclose()

    if finished:
        await stream.aclose()
    warnings += _result_warnings(counters)
    if more:
        warnings.append("There are additional results that can be requested.")
    headers = [("warning", ctx.warning(w)) for w in warnings]

    if finished and not held:
        status = ctx.empty_status
        response = Response(b"" if status == 204 else b"[]", status_code=status,
                            media_type=None if status == 204 else media_type)
        response.raw_headers += [(k.encode(), v.encode()) for k, v in headers]
        return response

    async def body() -> AsyncIterator[bytes]:
        count = len(held)
        try:
            # held is never empty here: a search without matches was answered above
            yield b"[" + b",".join(item.payload or b"" for item in held)
            if not finished:
                async for item in stream:
                    if count >= limit:
                        log.warning("search result passed max_results=%d without a limit; connection aborted", limit)
                        raise StreamAborted("max_results passed")
                    yield b"," + (item.payload or b"")
                    count += 1
            yield b"]"
        except DimseError as exc:
            log.warning("search failed after the response started (%s: %s); connection aborted",
                        type(exc).__name__, exc.message)
            raise StreamAborted(str(exc)) from None
        except HttpProblem as exc:  # e.g. a fan-out found too broad below the first level
            log.warning("search failed after the response started (%s); connection aborted", exc)
            raise StreamAborted(str(exc)) from None
        finally:
            await stream.aclose()

    response = StreamingResponse(body(), status_code=200, media_type=media_type)
    response.raw_headers += [(k.encode(), v.encode()) for k, v in headers]
    return response


def _result_warnings(counters: SearchCounters) -> list[str]:
    out = []
    if counters.unverified:
        out.append(
            "The PACS did not return these attributes, so the gateway could not check the results against them: "
            + ", ".join(sorted(counters.unverified))
        )
    if counters.ff01:
        out.append("The PACS reported that it does not support some of the query keys (status FF01); "
                   "results were filtered by the gateway where the PACS returned the attributes.")
    return out
