"""The ASGI application: routes, error handling, and the lifespan that owns the node pools.

URL map:
- the default node at ``/dicom-web``; every node at ``/nodes/{node}/dicom-web``;
- ``/health``, ``/ready`` and ``/status`` (gateway/status.py), ``/metrics``, ``/openapi.json`` at the root.
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from .admission import AdmissionController, AdmissionMiddleware
from .audit import AuditMiddleware
from .auth import AuthMiddleware
from .config import Settings
from .dicomweb.attributes import Level
from .dicomweb.plan import Resource
from .dicomweb.qido import SearchContext, search
from .dicomweb.stow import StowContext, store_instances
from .dicomweb.wado import WadoContext, retrieve
from .dicomweb import rendered, viewer
from .dicomweb.cache import Fetcher, InstanceCache
from .dicomweb.urls import origin_and_prefix
from .dimse.node import NodeClient, Nodes, open_nodes
from .metrics import Metrics
from .middleware import RequestContextMiddleware, request_id_var
from .problems import HttpProblem, bad_request, not_found, problem_response
from .status import ready_endpoint, status_endpoint

log = logging.getLogger("gateway")
CORS_REQUEST_HEADERS = ["Authorization", "Accept", "Accept-Encoding", "Content-Type", "Range", "If-None-Match",
                        "If-Range", "X-Request-ID", "X-API-Key"]
CORS_EXPOSED_HEADERS = ["ETag", "Content-Location", "Content-Range", "Accept-Ranges", "Warning", "X-Request-ID",
                        "Retry-After", "Location", "WWW-Authenticate"]
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Package data, so an installed wheel serves it too; in the source tree a symbolic link to
# openapi/openapi.json, the one copy that is edited.
OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.json"


def _uid_param(request: Request, name: str) -> str | None:
    value = request.path_params.get(name)
    if value is None:
        return None
    if len(value) > 64 or not _UID_RE.match(value):
        raise bad_request(f"{value!r} is not a UID (digits and dots, at most 64 characters)", name)
    return value


def _node(request: Request) -> NodeClient:
    nodes: Nodes = request.app.state.nodes
    name = request.path_params.get("node")
    if name is None:
        return nodes.default
    node = nodes.get(name)
    if node is None:
        raise not_found(f"no node named {name!r} is configured")
    return node


def _base_url(request: Request, settings: Settings, node: NodeClient) -> str:
    origin = origin_and_prefix(request, settings.server.public_url, settings.server.trusted_proxies)
    return origin + ("/dicom-web" if "node" not in request.path_params else f"/nodes/{node.name}/dicom-web")


def _search_endpoint(level: Level) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        node = _node(request)
        base = _base_url(request, settings, node)
        q = settings.qido
        ctx = SearchContext(
            node, base, base,
            max_results=q.max_results, empty_status=q.empty_status, fanout_concurrency=q.fanout_concurrency,
            fanout_max_parents=q.fanout_max_parents, strict_accept=q.strict_accept, warning_quoted=q.warning_quoted,
        )
        resource = Resource(level, _uid_param(request, "study"), _uid_param(request, "series"))
        return await search(request, ctx, resource)

    return endpoint


def _retrieve_endpoint(level: Level) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        node = _node(request)
        study = _uid_param(request, "study")
        assert study is not None
        ctx = WadoContext(
            node, _base_url(request, settings, node), stall_timeout=settings.wado.stall_timeout,
            strict_accept=settings.qido.strict_accept, fanout_concurrency=settings.qido.fanout_concurrency,
            fanout_max_parents=settings.qido.fanout_max_parents,
        )
        return await retrieve(request, ctx, level, study, _uid_param(request, "series"), _uid_param(request, "instance"))

    return endpoint


def _store_endpoint(with_study: bool) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        node = _node(request)
        base = _base_url(request, settings, node)
        s = settings.stow
        ctx = StowContext(
            node, base, base, max_body=int(s.max_body_mb * 1_000_000), max_part=int(s.max_part_mb * 1_000_000),
            lanes=s.lanes, read_timeout=s.read_timeout, warning_quoted=settings.qido.warning_quoted,
        )
        study = _uid_param(request, "study") if with_study else None
        return await store_instances(request, ctx, study)

    return endpoint


def _viewer_context(request: Request) -> viewer.ViewerContext:
    settings: Settings = request.app.state.settings
    node = _node(request)
    return viewer.ViewerContext(
        node, request.app.state.fetchers[node.name], _base_url(request, settings, node),
        strict_accept=settings.qido.strict_accept, bulk_threshold=settings.wado.bulk_threshold,
        max_age=settings.wado.max_age, stall_timeout=settings.wado.stall_timeout,
        fanout_concurrency=settings.qido.fanout_concurrency, fanout_max_parents=settings.qido.fanout_max_parents,
        scope=request.scope, warning_quoted=settings.qido.warning_quoted,
    )


def _uids(request: Request) -> tuple[str, str | None, str | None]:
    study = _uid_param(request, "study")
    assert study is not None
    return study, _uid_param(request, "series"), _uid_param(request, "instance")


def _metadata_endpoint(level: Level) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        study, series, sop = _uids(request)
        return await viewer.metadata(request, _viewer_context(request), level, study, series, sop)

    return endpoint


def _pixeldata_endpoint(level: Level) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        study, series, sop = _uids(request)
        return await viewer.pixeldata(request, _viewer_context(request), level, study, series, sop)

    return endpoint


def _all_bulkdata_endpoint(level: Level) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        study, series, sop = _uids(request)
        return await viewer.all_bulkdata(request, _viewer_context(request), level, study, series, sop)

    return endpoint


async def _frames_endpoint(request: Request) -> Response:
    study, series, sop = _uids(request)
    assert series is not None and sop is not None
    return await viewer.frames(request, _viewer_context(request), study, series, sop, request.path_params["frames"])


def _rendered_endpoint(level: Level, thumbnail: bool) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        study, series, sop = _uids(request)
        return await rendered.rendered(request, _viewer_context(request), level, study, series, sop,
                                       request.path_params.get("frames"), thumbnail=thumbnail)

    return endpoint


async def _wado_uri_endpoint(request: Request) -> Response:
    return await rendered.wado_uri(request, _viewer_context(request))


async def _bulkdata_endpoint(request: Request) -> Response:
    study, series, sop = _uids(request)
    assert series is not None and sop is not None
    return await viewer.bulkdata(request, _viewer_context(request), study, series, sop, request.path_params["path"])


def viewer_routes() -> list[Route]:
    instance = "/studies/{study}/series/{series}/instances/{instance}"
    return [
        Route("/studies/{study}/metadata", _metadata_endpoint(Level.STUDY), methods=["GET"]),
        Route("/studies/{study}/series/{series}/metadata", _metadata_endpoint(Level.SERIES), methods=["GET"]),
        Route(instance + "/metadata", _metadata_endpoint(Level.IMAGE), methods=["GET"]),
        Route(instance + "/frames/{frames}", _frames_endpoint, methods=["GET"]),
        Route("/studies/{study}/pixeldata", _pixeldata_endpoint(Level.STUDY), methods=["GET"]),
        Route("/studies/{study}/series/{series}/pixeldata", _pixeldata_endpoint(Level.SERIES), methods=["GET"]),
        Route(instance + "/pixeldata", _pixeldata_endpoint(Level.IMAGE), methods=["GET"]),
        Route("/studies/{study}/bulkdata", _all_bulkdata_endpoint(Level.STUDY), methods=["GET"]),
        Route("/studies/{study}/series/{series}/bulkdata", _all_bulkdata_endpoint(Level.SERIES), methods=["GET"]),
        Route(instance + "/bulkdata", _all_bulkdata_endpoint(Level.IMAGE), methods=["GET"]),
        Route(instance + "/bulkdata/{path:path}", _bulkdata_endpoint, methods=["GET"]),
    ] + [
        Route(prefix + "/" + kind, _rendered_endpoint(level, kind == "thumbnail"), methods=["GET"])
        for kind in ("rendered", "thumbnail")
        for prefix, level in (("/studies/{study}", Level.STUDY), ("/studies/{study}/series/{series}", Level.SERIES),
                              (instance, Level.IMAGE), (instance + "/frames/{frames}", Level.IMAGE))
    ]


def _by_method(get: Callable[[Request], Awaitable[Response]],
               post: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """One route for a path that answers GET and POST, so that a 405 lists both in Allow
    (Starlette's 405 names only the methods of the first route matching the path)."""
    async def endpoint(request: Request) -> Response:
        return await (post if request.method == "POST" else get)(request)

    return endpoint


def dicomweb_routes() -> list[Route]:
    return viewer_routes() + [
        Route("/studies", _by_method(_search_endpoint(Level.STUDY), _store_endpoint(False)), methods=["GET", "POST"]),
        Route("/studies/{study}", _by_method(_retrieve_endpoint(Level.STUDY), _store_endpoint(True)),
              methods=["GET", "POST"]),
        Route("/studies/{study}/series/{series}", _retrieve_endpoint(Level.SERIES), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{instance}", _retrieve_endpoint(Level.IMAGE),
              methods=["GET"]),
        Route("/series", _search_endpoint(Level.SERIES), methods=["GET"]),
        Route("/instances", _search_endpoint(Level.IMAGE), methods=["GET"]),
        Route("/studies/{study}/series", _search_endpoint(Level.SERIES), methods=["GET"]),
        Route("/studies/{study}/instances", _search_endpoint(Level.IMAGE), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", _search_endpoint(Level.IMAGE), methods=["GET"]),
    ]


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


async def openapi(request: Request) -> Response:
    if not OPENAPI_PATH.is_file():  # a copy of the package that left its data files behind
        raise not_found("the OpenAPI document is not installed with this copy of the gateway")
    return Response(OPENAPI_PATH.read_bytes(), media_type="application/json")


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpProblem)
    return problem_response(exc, request_id_var.get())


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    problem = HttpProblem(exc.status_code, error, str(exc.detail), headers=dict(exc.headers or {}))
    return problem_response(problem, request_id_var.get())


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_nodes(settings) as nodes:
            app.state.nodes = nodes
            cache = InstanceCache(int(settings.cache.max_mb * 1_000_000), settings.cache.ttl)
            app.state.cache = cache
            app.state.fetchers = {
                name: Fetcher(node, cache, prefetch=node.settings.prefetch, stall_timeout=settings.wado.stall_timeout)
                for name, node in nodes.by_name.items()
            }
            app.state.metrics.watch_cache(cache)
            nodes.default.pool.spawn(cache.expire_forever)
            app.state.metrics.watch(node.pool for node in nodes.by_name.values())
            log.info("gateway ready: %d node(s), default %r", len(nodes.by_name), nodes.default.name)
            yield

    app_metrics = Metrics()
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready_endpoint, methods=["GET"]),
        Route("/status", status_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/wado", _wado_uri_endpoint, methods=["GET"]),
        Route("/nodes/{node}/wado", _wado_uri_endpoint, methods=["GET"]),
        Mount("/dicom-web", routes=dicomweb_routes()),
        Mount("/nodes/{node}/dicom-web", routes=dicomweb_routes()),
    ]
    admission = AdmissionController(settings)
    # outermost first: the request ID, then the audit record (which sees refusals), then auth
    middleware = [Middleware(RequestContextMiddleware, metrics=app_metrics),
                  Middleware(AuditMiddleware, settings=settings), Middleware(AuthMiddleware, settings=settings),
                  # budgets, rate limit, shutdown drain: inside auth, which names the client
                  Middleware(AdmissionMiddleware, controller=admission)]
    if settings.server.cors_origins:
        # outermost: preflights are answered before auth, and every answer (a 401 too) carries the
        # CORS headers a viewer on another origin needs to read it
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(settings.server.cors_origins), allow_methods=["GET", "HEAD", "POST"],
            allow_headers=[*CORS_REQUEST_HEADERS, settings.auth.api_key_header], expose_headers=CORS_EXPOSED_HEADERS, max_age=600,
            allow_credentials=False))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HttpProblem: _problem, HTTPException: _http_exception},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    app.state.admission = admission
    return app
