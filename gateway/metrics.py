"""Prometheus metrics, served at ``GET /metrics``.

Every series is named ``dicomweb_gateway_...`` and none carries patient data: HTTP requests are
labelled with the route template (``/dicom-web/studies/{study}``, never the UIDs of the URL), DIMSE
operations with the configured node name.

One registry per application: ``create_app`` makes a ``Metrics`` and keeps it at
``app.state.metrics``, so tests that build several apps in one process do not clash, and nothing is
added to prometheus_client's global default registry. The registry also holds the standard
``process_*`` and ``python_info`` series.

Who records what:

- the HTTP middleware (through ``gateway.http_metrics``): requests, durations, body bytes sent;
- the DIMSE layer, through the ``NodeMetrics`` of the node's ``AssociationPool`` (``pool.metrics``,
  which records nothing until ``Metrics.watch`` binds it when the node pools open): C-ECHO and
  C-FIND (find.py), C-GET and C-MOVE (retrieve.py), C-STORE (store.py);
- association counts are read from the pools when the metrics are collected, not counted.

This module imports nothing from the HTTP side (no starlette), so the DIMSE layer can use it.

The instance cache (gateway/dicomweb/cache.py) is read when collected: its bytes, instances, hits,
misses and evictions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .dimse.errors import DimseStatusError, DimseTimeout, PoolExhausted

if TYPE_CHECKING:
    from .dimse.pool import AssociationPool

PREFIX = "dicomweb_gateway_"

# no ``*_created`` sample next to every counter and histogram (process-wide, in prometheus_client)
disable_created_metrics()

# 1 ms to 60 s; a whole-study retrieve can take longer and lands in +Inf
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DIMSE_BUCKETS = HTTP_BUCKETS + (120.0, 300.0)

KINDS = ("echo", "find", "get", "move", "store")
# Outcome labels of dimse_operations_total
SUCCESS = "success"  # final status 0x0000
WARNING = "warning"  # final status 0xBxxx, or sub-operations that failed within a successful C-GET/C-MOVE
FAILURE = "failure"  # the PACS answered with a failure status, or refused what was needed
CANCEL = "cancel"  # the caller went away or stopped early (C-CANCEL sent), or the PACS answered 0xFE00
TIMEOUT = "timeout"  # a connect, association or DIMSE timeout
BUSY = "busy"  # no association free within the node's acquire timeout
ERROR = "error"  # anything else: node unreachable, connection lost, internal error

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})


def outcome_of(exc: BaseException | None) -> str:
    """The outcome label for an operation that ended with ``exc`` (None: it succeeded)."""
    if exc is None:
        return SUCCESS
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return CANCEL
    if isinstance(exc, DimseTimeout):
        return TIMEOUT
    if isinstance(exc, PoolExhausted):
        return BUSY
    if isinstance(exc, DimseStatusError):
        return CANCEL if exc.status == 0xFE00 else FAILURE
    return ERROR  # node unreachable, connection lost, association rejected, a bug


def outcome_of_status(status: int | None) -> str:
    """The outcome label for a final DIMSE status."""
    if status is None or status == 0x0000:
        return SUCCESS
    if status == 0xFE00:
        return CANCEL
    if 0xB000 <= status <= 0xBFFF:
        return WARNING
    return FAILURE


class Operation:
    """Times one DIMSE operation; a context manager that records it on exit. The outcome is
    ``outcome`` when set, else derived from the exception that ended the block."""

    def __init__(self, node: NodeMetrics, kind: str) -> None:
        self.node = node
        self.kind = kind
        self.outcome: str | None = None
        self.started = time.perf_counter()

    def __enter__(self) -> Operation:
        self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        outcome = outcome_of(exc) if exc is not None else (self.outcome or SUCCESS)
        self.node.observe(self.kind, outcome, time.perf_counter() - self.started)


class NodeMetrics:
    """What the DIMSE side of one node records. ``NodeMetrics(name)`` without a ``Metrics``
    records nothing (a pool outside an application, in tests)."""

    def __init__(self, node: str, metrics: Metrics | None = None) -> None:
        self.node = node
        self._metrics = metrics
        if metrics is not None:
            self._stow_bytes = metrics.stow_bytes_received.labels(node)

    def operation(self, kind: str) -> Operation:
        """``with pool.metrics.operation("find") as op: ...``"""
        return Operation(self, kind)

    def observe(self, kind: str, outcome: str, seconds: float) -> None:
        m = self._metrics
        if m is None:
            return
        m.dimse_operations.labels(self.node, kind, outcome).inc()
        m.dimse_duration.labels(self.node, kind, outcome).observe(seconds)

    def stow_bytes(self, count: int) -> None:
        if self._metrics is not None:
            self._stow_bytes.inc(count)


class _PoolCollector(Collector):
    """Association counts, read from the pools at collection time."""

    def __init__(self) -> None:
        self.pools: list[AssociationPool] = []

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily(PREFIX + "associations_in_use",
                              "Associations to the node held by an operation (query, retrieve or store)",
                              labels=["node"]),
            GaugeMetricFamily(PREFIX + "associations_idle", "Open query associations to the node kept for reuse",
                              labels=["node"]),
            GaugeMetricFamily(PREFIX + "associations_max", "The node's association cap (nodes.max_associations)",
                              labels=["node"]),
            CounterMetricFamily(PREFIX + "associations_opened", "Associations opened to the node", labels=["node"]),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        in_use, idle, cap, opened = self._families()
        for pool in list(self.pools):
            in_use.add_metric([pool.name], pool.in_use)
            idle.add_metric([pool.name], pool.idle_count)
            cap.add_metric([pool.name], pool.max_associations)
            opened.add_metric([pool.name], pool.opened_total)
        return (in_use, idle, cap, opened)


class _CacheCollector(Collector):
    """The instance cache (gateway/dicomweb/cache.py), read when collected."""

    def __init__(self) -> None:
        self.cache: object | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        cache = self.cache
        if cache is None:
            return
        size = GaugeMetricFamily(PREFIX + "cache_bytes", "Bytes of instances held by the instance cache")
        size.add_metric([], getattr(cache, "bytes"))
        count = GaugeMetricFamily(PREFIX + "cache_instances", "Instances held by the instance cache")
        count.add_metric([], len(cache))  # type: ignore[arg-type]
        lookups = CounterMetricFamily(PREFIX + "cache_lookups", "Instance cache lookups, by result",
                                      labels=["result"])
        lookups.add_metric(["hit"], getattr(cache, "hits"))
        lookups.add_metric(["miss"], getattr(cache, "misses"))
        evictions = CounterMetricFamily(PREFIX + "cache_evictions", "Instances evicted to stay under the cap")
        evictions.add_metric([], getattr(cache, "evictions"))
        yield from (size, count, lookups, evictions)


class Metrics:
    """The application's registry and every series in it."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.http_requests = Counter(
            PREFIX + "http_requests_total", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from the request to the end of its response body, by route template, method and status",
            ["route", "method", "status"], buckets=HTTP_BUCKETS, registry=r)
        self.http_aborted = Counter(
            PREFIX + "http_responses_aborted_total",
            "Responses cut off after they started (the connection dropped so no partial result passes for a "
            "complete one), by route template", ["route"], registry=r)
        self.http_in_progress = Gauge(
            PREFIX + "http_requests_in_progress", "HTTP requests being answered", registry=r)
        self.bytes_sent = Counter(
            PREFIX + "bytes_sent_total", "Response body bytes sent, by route template", ["route"], registry=r)
        self.dimse_operations = Counter(
            PREFIX + "dimse_operations_total", "DIMSE operations by node, kind and outcome",
            ["node", "kind", "status"], registry=r)
        self.dimse_duration = Histogram(
            PREFIX + "dimse_operation_duration_seconds",
            "DIMSE operation time, waiting for an association included, by node, kind and outcome",
            ["node", "kind", "status"], buckets=DIMSE_BUCKETS, registry=r)
        self.stow_bytes_received = Counter(
            PREFIX + "stow_bytes_received_total",
            "Data set bytes of STOW-RS instances handed to the node for C-STORE", ["node"], registry=r)
        self._pools = _PoolCollector()
        r.register(self._pools)
        self._cache = _CacheCollector()
        r.register(self._cache)

    # -- HTTP side --------------------------------------------------------------------------------

    def observe_http(self, route: str, method: str, status: int, seconds: float, aborted: bool = False) -> None:
        method = method if method in _METHODS else "other"
        code = str(status) if status else "none"
        self.http_requests.labels(route, method, code).inc()
        self.http_duration.labels(route, method, code).observe(seconds)
        if aborted:
            self.http_aborted.labels(route).inc()

    # -- DIMSE side -------------------------------------------------------------------------------

    def node(self, name: str) -> NodeMetrics:
        return NodeMetrics(name, self)

    def watch(self, pools: Iterable[AssociationPool]) -> None:
        """Bind each pool's ``metrics`` to this registry and report its association counts."""
        for pool in pools:
            pool.metrics = self.node(pool.name)
            self._pools.pools.append(pool)

    def watch_cache(self, cache: object) -> None:
        """Report the instance cache's size, hits, misses and evictions."""
        self._cache.cache = cache

    # -- exposition -------------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

