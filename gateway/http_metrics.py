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


def route_template(routes: Sequence[BaseRoute], method: str, path: str, root_path: str = "") -> str:
    """The template of the route Starlette's router would pick for ``method path`` (the first full
    match, else the first partial one, which answers 405), or ``UNMATCHED``."""
    scope: Scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "path_params": {}}
    return _template(routes, scope, "") or UNMATCHED


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
    """One request's metrics, kept by the middleware: ``started`` when the response starts (the
    route is known by then), ``sent`` for each body chunk, ``finished`` at the very end. With no
    ``Metrics`` it records nothing."""

    def __init__(self, metrics: Metrics | None, scope: Scope) -> None:
        self.metrics = metrics
        if metrics is None:
            return
        # taken now: routing rewrites root_path for mounted apps
        self._app = scope.get("app")
        self._method = scope["method"]
        self._path = scope["path"]
        self._root_path = scope.get("root_path", "")
        self._route: str | None = None
        self._bytes: Counter | None = None
        metrics.http_in_progress.inc()

    @property
    def route(self) -> str:
        if self._route is None:
            try:
                routes = getattr(self._app, "routes", ())
                self._route = route_template(routes, self._method, self._path, self._root_path)
            except Exception:  # never let a label fail a request
                log.exception("could not name the route for the metrics")
                self._route = UNMATCHED
        return self._route

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
