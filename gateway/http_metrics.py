"""The HTTP side of the metrics (gateway/metrics.py): route templates and one request's meter.

Requests are labelled with the template of the route that answered them, Mount prefixes included
(``/nodes/{node}/dicom-web/studies/{study}``), never with the concrete path: its UIDs are patient
data. A path that no route matches is ``other``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import Counter
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Scope

from .metrics import Metrics

log = logging.getLogger("gateway")

UNMATCHED = "other"
ROUTE_KEY = "route_template"  # in scope["state"]


def route_template(routes: Sequence[BaseRoute], method: str, path: str, root_path: str = "") -> str:
    """The template of the route Starlette's router would pick for ``method path`` (the first full
    match, else the first partial one, which answers 405), or ``UNMATCHED``."""
    scope: Scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "path_params": {}}
    return _template(routes, scope, "") or UNMATCHED


def request_route(scope: Scope) -> str:
    """``route_template`` of this request, worked out once and kept in ``scope["state"]`` for the
    metrics and the audit log. Call it before routing, which rewrites ``root_path`` for mounted apps."""
    state = scope.setdefault("state", {})
    route: str | None = state.get(ROUTE_KEY)
    if route is None:
        routes = getattr(scope.get("app"), "routes", ())
        route = state[ROUTE_KEY] = route_template(routes, scope["method"], scope["path"], scope.get("root_path", ""))
    return route


def _template(routes: Sequence[BaseRoute], scope: Scope, prefix: str) -> str | None:
    partial: str | None = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):  # a full match: the mount answers, 404 when nothing inside matches
            return _template(route.routes, {**scope, **child}, prefix + route.path_format.removesuffix("/{path}"))
        if not isinstance(route, Route):
            continue
        if match is Match.FULL:
            return prefix + route.path_format
        partial = partial or prefix + route.path_format
    return partial


class RequestMeter:
    """One request's metrics, kept by the middleware: the route when it is made, ``started`` when
    the response starts, ``sent`` for each body chunk, ``finished`` at the very end. With no
    ``Metrics`` it records nothing."""

    def __init__(self, metrics: Metrics | None, scope: Scope) -> None:
        self.metrics = metrics
        if metrics is None:
            return
        self._method = scope["method"]
        try:
            self.route = request_route(scope)  # now: routing rewrites root_path for mounted apps
        except Exception:  # never let a label fail a request
            log.exception("could not name the route for the metrics")
            self.route = UNMATCHED
        self._bytes: Counter | None = None
        metrics.http_in_progress.inc()

    def started(self) -> None:
        if self.metrics is not None and self._bytes is None:
            self._bytes = self.metrics.bytes_sent.labels(self.route)

    def sent(self, count: int) -> None:
        if self.metrics is not None and count:
            if self._bytes is None:
                self.started()
            assert self._bytes is not None
            self._bytes.inc(count)

    def finished(self, status: int, seconds: float, aborted: bool) -> None:
        if self.metrics is None:
            return
        self.metrics.http_in_progress.dec()
        self.metrics.observe_http(self.route, self._method, status, seconds, aborted)
