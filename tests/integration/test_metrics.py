"""GET /metrics after real traffic: a search, a retrieve, a store and a 404 through a gateway
process in front of a demo PACS of its own (the store must not change the session's PACSes)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.demo.data import generate_studies
from gateway.demo.pacs import DemoPACS
from tests.integration.stow_support import MULTIPART, fresh_copy, multipart_body, p10_bytes, pydicom_file
from tests.support.gatewayproc import GatewayProcess

UID_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")
INSTANCE_ROUTE = "/dicom-web/studies/{study}/series/{series}/instances/{instance}"
Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def studies() -> list[Dataset]:
    return generate_studies()


@pytest.fixture(scope="module")
def metered(studies: list[Dataset]) -> Iterator[GatewayProcess]:
    with DemoPACS(ae_title="METRICS-DEMO", datasets=studies) as pacs:
        settings = {
            "gateway": {"ae_title": "DICOMWEB-GW", "move_port": 0},
            "nodes": [{"name": "demo", "ae_title": "METRICS-DEMO", "host": "127.0.0.1", "port": pacs.port,
                       "default": True, "max_associations": 3}],
        }
        with GatewayProcess(settings) as gw:
            yield gw


def scrape(gw: GatewayProcess) -> tuple[str, Samples]:
    r = httpx.get(gw.base + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return r.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def scrape_until(gw: GatewayProcess, done: Callable[[Samples], bool], timeout: float = 10) -> tuple[str, Samples]:
    """A request is counted once its response has ended, which the client may see a moment before."""
    deadline = time.monotonic() + timeout
    while True:
        text, samples = scrape(gw)
        if done(samples) or time.monotonic() > deadline:
            return text, samples
        time.sleep(0.05)


def test_metrics_after_search_retrieve_store_and_404(metered: GatewayProcess, studies: list[Dataset]) -> None:
    instance = studies[0]
    study, series, sop = instance.StudyInstanceUID, instance.SeriesInstanceUID, instance.SOPInstanceUID
    stored = fresh_copy(pydicom_file("CT_small.dcm"), study=generate_uid(), series=generate_uid())
    searches = 2
    with httpx.Client(timeout=60) as client:
        for _ in range(searches):
            r = client.get(metered.url(None, "/studies"), headers={"Accept": "application/dicom+json"})
            assert r.status_code == 200 and r.json()
        r = client.get(metered.url("demo", "/studies"), params={"StudyInstanceUID": study})
        assert r.status_code == 200 and len(r.json()) == 1
        r = client.get(metered.url(None, f"/studies/{study}/series/{series}/instances/{sop}"),
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200
        retrieved = len(r.content)
        r = client.post(metered.url(None, "/studies"), content=multipart_body([p10_bytes(stored)]),
                        headers={"Content-Type": MULTIPART, "Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text
        r = client.get(metered.base + "/dicom-web/" + study + "/nowhere")
        assert r.status_code == 404

    http = "dicomweb_gateway_http_requests_total"
    text, samples = scrape_until(metered, lambda s: value(s, http, route="other") >= 1
                                 and value(s, http, route="/dicom-web/studies", method="POST") >= 1)

    # HTTP requests, by route template
    assert value(samples, http, route="/dicom-web/studies", method="GET", status="200") == searches
    assert value(samples, http, route="/nodes/{node}/dicom-web/studies", method="GET", status="200") == 1
    assert value(samples, http, route=INSTANCE_ROUTE, method="GET", status="200") == 1
    assert value(samples, http, route="/dicom-web/studies", method="POST", status="200") == 1
    assert value(samples, http, route="other", method="GET", status="404") == 1
    assert value(samples, http, route="/health", method="GET", status="200") >= 1  # the start-up probe
    durations = "dicomweb_gateway_http_request_duration_seconds_count"
    assert value(samples, durations, route="/dicom-web/studies", method="GET", status="200") == searches
    assert value(samples, durations, route=INSTANCE_ROUTE) == 1
    buckets = [(lab["le"], v) for lab, v in samples["dicomweb_gateway_http_request_duration_seconds_bucket"]
               if lab["route"] == INSTANCE_ROUTE]
    assert buckets[0][0] == "0.001" and ("60.0", 1) in buckets and buckets[-1] == ("+Inf", 1)  # 1 ms to 60 s
    assert value(samples, "dicomweb_gateway_bytes_sent_total", route=INSTANCE_ROUTE) == retrieved
    assert value(samples, "dicomweb_gateway_bytes_sent_total", route="/dicom-web/studies") > 0
    assert value(samples, "dicomweb_gateway_http_responses_aborted_total") == 0

    # DIMSE operations, by node, kind and outcome
    ops = "dicomweb_gateway_dimse_operations_total"
    # the three searches, and the retrieve's listing of what it will fetch
    assert value(samples, ops, node="demo", kind="find", status="success") >= searches + 2
    assert value(samples, ops, node="demo", kind="get", status="success") == 1
    assert value(samples, ops, node="demo", kind="store", status="success") == 1
    assert value(samples, ops, node="demo", kind="move") == 0
    finds = value(samples, ops, node="demo", kind="find")
    assert finds == value(samples, ops, node="demo", kind="find", status="success")  # none failed or stopped early
    for kind in ("find", "get", "store"):
        assert value(samples, "dicomweb_gateway_dimse_operation_duration_seconds_count", node="demo", kind=kind) \
            == value(samples, ops, node="demo", kind=kind)
    assert value(samples, "dicomweb_gateway_stow_bytes_received_total", node="demo") > 0

    # associations, read from the pool
    assert [lab for lab, _ in samples["dicomweb_gateway_associations_in_use"]] == [{"node": "demo"}]
    assert [lab for lab, _ in samples["dicomweb_gateway_associations_idle"]] == [{"node": "demo"}]
    assert value(samples, "dicomweb_gateway_associations_max", node="demo") == 3
    assert 0 <= value(samples, "dicomweb_gateway_associations_in_use", node="demo") <= 3
    assert value(samples, "dicomweb_gateway_associations_opened_total", node="demo") >= 3  # query, C-GET, C-STORE

    # no patient data: no UID in any label value, nor anywhere in the text
    labels: list[Any] = [v for series_ in samples.values() for lab, _ in series_ for v in lab.values()]
    assert labels and not [v for v in labels if UID_LIKE.search(v)]
    for uid in (study, series, sop, stored.StudyInstanceUID, stored.SOPInstanceUID):
        assert uid not in text


def test_cache_series_count_hits_misses_and_bytes(metered: GatewayProcess, studies: list[Dataset]) -> None:
    target = next(d for d in studies if int(d.get("NumberOfFrames", 1) or 1) > 1)
    url = metered.url(None, f"/studies/{target.StudyInstanceUID}/series/{target.SeriesInstanceUID}/instances/"
                            f"{target.SOPInstanceUID}/frames/")
    _, before = scrape(metered)
    frames = int(target.NumberOfFrames)
    with httpx.Client(timeout=60) as client:
        for number in range(1, frames + 1):
            assert client.get(url + str(number)).status_code == 200
    _, after = scrape(metered)
    lookups = "dicomweb_gateway_cache_lookups_total"
    hits = value(after, lookups, result="hit") - value(before, lookups, result="hit")
    misses = value(after, lookups, result="miss") - value(before, lookups, result="miss")
    assert misses >= 1 and hits >= frames - 1, (hits, misses)  # the first frame retrieved it, the rest hit
    assert value(after, "dicomweb_gateway_cache_instances") >= 1
    assert value(after, "dicomweb_gateway_cache_bytes") >= len(target.PixelData)
    assert "dicomweb_gateway_cache_evictions_total" in after


def test_associations_go_back_to_idle(metered: GatewayProcess) -> None:
    httpx.get(metered.url(None, "/studies"), headers={"Accept": "application/dicom+json"}, timeout=30)
    _, samples = scrape_until(metered, lambda s: value(s, "dicomweb_gateway_associations_in_use", node="demo") == 0)
    assert value(samples, "dicomweb_gateway_associations_in_use", node="demo") == 0
    assert value(samples, "dicomweb_gateway_associations_idle", node="demo") >= 1
