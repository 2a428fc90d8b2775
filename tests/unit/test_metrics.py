"""gateway/metrics.py and gateway/http_metrics.py: route templates, outcome labels, the series
(no sockets: the app is driven in process and its lifespan never runs)."""

from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount, Route

from gateway.app import create_app
from gateway.config import load_settings
from gateway.dimse.errors import (
    ConnectionLost,
    DimseStatusError,
    DimseTimeout,
    NodeUnreachable,
    PoolExhausted,
)
from gateway.http_metrics import UNMATCHED, route_template
from gateway.metrics import Metrics, NodeMetrics, outcome_of, outcome_of_status

NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "10.1.2.3", "port": 104}


def _app() -> Any:
    return create_app(load_settings(data={"nodes": [NODE], "auth": {"enabled": False}}))


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    body, _ = metrics.exposition()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


# ------------------------------------------------------------------------------------------------
# Route templates


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/dicom-web/studies", "/dicom-web/studies"),
    ("POST", "/dicom-web/studies", "/dicom-web/studies"),
    ("GET", "/dicom-web/studies/1.2.840.113619.2.55.3", "/dicom-web/studies/{study}"),
    ("POST", "/dicom-web/studies/1.2.3", "/dicom-web/studies/{study}"),
    ("HEAD", "/dicom-web/studies/1.2.3/series/4.5", "/dicom-web/studies/{study}/series/{series}"),
    ("GET", "/dicom-web/studies/1.2/series/3.4/instances/5.6",
     "/dicom-web/studies/{study}/series/{series}/instances/{instance}"),
    ("GET", "/dicom-web/studies/1.2/series/3.4/instances", "/dicom-web/studies/{study}/series/{series}/instances"),
    ("GET", "/nodes/pacs/dicom-web/studies/1.2/instances", "/nodes/{node}/dicom-web/studies/{study}/instances"),
    ("GET", "/nodes/nosuchnode/dicom-web/series", "/nodes/{node}/dicom-web/series"),
    ("DELETE", "/dicom-web/studies/1.2.3", "/dicom-web/studies/{study}"),  # 405: the partial match
    ("GET", "/health", "/health"),
    ("GET", "/metrics", "/metrics"),
    ("GET", "/openapi.json", "/openapi.json"),
    ("GET", "/1.2.3.4", UNMATCHED),
    ("GET", "/dicom-web/1.2.3.4/nothing", UNMATCHED),
    ("GET", "/dicom-web/studies/", UNMATCHED),  # Starlette redirects it
    ("GET", "/", UNMATCHED),
])
def test_route_template_of_the_app(method: str, path: str, expected: str) -> None:
    assert route_template(_app().routes, method, path) == expected


def test_route_template_under_a_root_path() -> None:
    routes = _app().routes
    assert route_template(routes, "GET", "/gw/dicom-web/studies/1.2.3", "/gw") == "/dicom-web/studies/{study}"


def test_route_template_drops_convertors_and_nests_mounts() -> None:
    def endpoint() -> None:  # never called
        pass

    routes = [
        Mount("/a/{tenant}", routes=[Mount("/b", routes=[Route("/items/{n:int}", endpoint)])]),
        Route("/items/{n:int}", endpoint, methods=["POST"]),
    ]
    assert route_template(routes, "GET", "/a/x/b/items/12") == "/a/{tenant}/b/items/{n}"
    assert route_template(routes, "GET", "/a/x/b/other") == UNMATCHED
    assert route_template(routes, "GET", "/items/12") == "/items/{n}"  # partial: 405
    assert route_template(routes, "GET", "/items/not-a-number") == UNMATCHED


# ------------------------------------------------------------------------------------------------
# Outcome labels


def test_outcome_labels() -> None:
    assert outcome_of(None) == "success"
    assert outcome_of(DimseTimeout("n", "m", phase="dimse")) == "timeout"
    assert outcome_of(PoolExhausted("n", "m", retry_after=1)) == "busy"
    assert outcome_of(DimseStatusError("n", "m", status=0xA700)) == "failure"
    assert outcome_of(DimseStatusError("n", "m", status=0xFE00)) == "cancel"
    assert outcome_of(NodeUnreachable("n", "m")) == "error"
    assert outcome_of(ConnectionLost("n", "m")) == "error"
    assert outcome_of(asyncio.CancelledError()) == "cancel"
    assert outcome_of(GeneratorExit()) == "cancel"
    assert outcome_of(ValueError()) == "error"
    assert [outcome_of_status(s) for s in (None, 0x0000, 0xB000, 0xFE00, 0xA700, 0xC000, 0x0122)] == [
        "success", "success", "warning", "cancel", "failure", "failure", "failure"]


def test_operation_records_outcome_and_exception() -> None:
    metrics = Metrics()
    node = metrics.node("pacs")
    with node.operation("find") as op:
        op.outcome = "warning"
    with pytest.raises(DimseTimeout), node.operation("find"):
        raise DimseTimeout("pacs", "m", phase="dimse")
    with node.operation("echo"):
        pass
    node.stow_bytes(1234)
    samples = _samples(metrics)
    counts = {(s["kind"], s["status"]): v for s, v in samples["dicomweb_gateway_dimse_operations_total"]}
    assert counts == {("find", "warning"): 1, ("find", "timeout"): 1, ("echo", "success"): 1}
    durations = {(s["kind"], s["status"]): v
                 for s, v in samples["dicomweb_gateway_dimse_operation_duration_seconds_count"]}
    assert durations == counts
    assert samples["dicomweb_gateway_stow_bytes_received_total"] == [({"node": "pacs"}, 1234)]


def test_a_pool_outside_an_app_records_nothing() -> None:
    node = NodeMetrics("pacs")
    with node.operation("find"):
        pass
    node.observe("store", "success", 0.1)
    node.stow_bytes(10)


def test_association_gauges_are_read_from_the_pools() -> None:
    metrics = Metrics()
    pool = SimpleNamespace(name="pacs", in_use=2, idle_count=1, max_associations=4, opened_total=7,
                           metrics=None)
    metrics.watch([pool])  # type: ignore[list-item]
    assert isinstance(pool.metrics, NodeMetrics) and pool.metrics.node == "pacs"
    pool.in_use = 3
    samples = _samples(metrics)
    assert samples["dicomweb_gateway_associations_in_use"] == [({"node": "pacs"}, 3)]
    assert samples["dicomweb_gateway_associations_idle"] == [({"node": "pacs"}, 1)]
    assert samples["dicomweb_gateway_associations_max"] == [({"node": "pacs"}, 4)]
    assert samples["dicomweb_gateway_associations_opened_total"] == [({"node": "pacs"}, 7)]


def test_two_apps_have_registries_of_their_own() -> None:
    a, b = _app(), _app()
    assert a.state.metrics.registry is not b.state.metrics.registry


# ------------------------------------------------------------------------------------------------
# The middleware and GET /metrics


def test_requests_are_counted_by_route_template() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = _app()
    client = TestClient(app)  # no ``with``: the lifespan (node pools) never runs
    assert client.get("/health").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/no/1.2.840.10008.1.2").status_code == 404
    brew = client.request("BREW", "/health")
    assert brew.status_code == 405
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples = _samples(app.state.metrics)
    counts = {(s["route"], s["method"], s["status"]): v for s, v in samples["dicomweb_gateway_http_requests_total"]}
    assert counts == {("/health", "GET", "200"): 2, ("other", "GET", "404"): 1, ("/health", "other", "405"): 1,
                      ("/metrics", "GET", "200"): 1}
    sent = {s["route"]: v for s, v in samples["dicomweb_gateway_bytes_sent_total"]}
    assert sent["/health"] == 2 * len(b'{"status":"ok"}') + len(brew.content) and sent["other"] > 0
    assert samples["dicomweb_gateway_http_requests_in_progress"] == [({}, 0)]
    assert "1.2.840" not in r.text


def test_a_retrieve_with_failed_sub_operations_is_a_warning_outcome() -> None:
    """The metrics label, not the command element of the same name (a shadowed import once made it
    the integer tag 0x00001023)."""
    from types import SimpleNamespace

    from gateway.dimse.retrieve import _Job

    job = SimpleNamespace(_cancelled=False, outcome=SimpleNamespace(
        consumer_gone=False, status=0x0000, failed=1, rejected_classes=[]))
    assert _Job._outcome_label(job, None) == "warning"  # type: ignore[arg-type]
    job.outcome.failed = 0
    assert _Job._outcome_label(job, None) == "success"  # type: ignore[arg-type]
