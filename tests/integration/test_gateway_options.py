"""Settings that change answers: public URL, trusted proxies, empty status, maximum results."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess


def _node(pacs: DemoPACS) -> dict[str, object]:
    return {"name": "demo", "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": pacs.port}


@pytest.fixture(scope="module")
def proxied(demo_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    settings = {"server": {"trusted_proxies": ["127.0.0.0/8"]}, "qido": {"empty_status": 204, "max_results": 5},
                "nodes": [_node(demo_pacs)]}
    with GatewayProcess(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def published(demo_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    settings = {"server": {"public_url": "https://images.example.org/pacs-gw"}, "nodes": [_node(demo_pacs)]}
    with GatewayProcess(settings) as gw:
        yield gw


def _retrieve_urls(r: httpx.Response) -> list[str]:
    return [item["00081190"]["Value"][0] for item in r.json()]


def test_forwarded_headers_from_a_trusted_proxy_shape_retrieve_urls(proxied: GatewayProcess) -> None:
    r = httpx.get(proxied.url(None, "/studies"), params={"PatientID": "DEMO-0004"},
                  headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.org", "X-Forwarded-Prefix": "/dw"})
    assert r.status_code == 200
    assert all(u.startswith("https://gw.example.org/dw/dicom-web/studies/") for u in _retrieve_urls(r))
    r = httpx.get(proxied.url("demo", "/studies"), params={"PatientID": "DEMO-0004"},
                  headers={"Forwarded": 'for=10.0.0.1;proto=https;host="viewer.example.org:8443"'})
    assert all(u.startswith("https://viewer.example.org:8443/nodes/demo/dicom-web/studies/") for u in _retrieve_urls(r))


def test_forwarded_headers_from_anyone_else_are_ignored(gateway: GatewayProcess) -> None:
    r = httpx.get(gateway.url(None, "/studies"), params={"PatientID": "DEMO-0004"},
                  headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example.org"})
    assert all(u.startswith(gateway.base + "/dicom-web/studies/") for u in _retrieve_urls(r))


def test_public_url_wins(published: GatewayProcess) -> None:
    r = httpx.get(published.url(None, "/studies"), params={"PatientID": "DEMO-0004"})
    assert all(u.startswith("https://images.example.org/pacs-gw/dicom-web/studies/") for u in _retrieve_urls(r))


def test_no_match_is_200_with_an_empty_list_by_default(gateway: GatewayProcess) -> None:
    r = httpx.get(gateway.url("demo", "/studies"), params={"PatientID": "NOBODY"})
    assert r.status_code == 200 and r.json() == []


def test_no_match_is_204_when_configured(proxied: GatewayProcess) -> None:
    r = httpx.get(proxied.url(None, "/studies"), params={"PatientID": "NOBODY"})
    assert r.status_code == 204 and r.content == b""


def test_a_limit_over_max_results_is_lowered_with_a_warning(proxied: GatewayProcess) -> None:
    r = httpx.get(proxied.url(None, "/studies"), params={"limit": "50"})
    assert r.status_code == 200 and len(r.json()) == 5
    warnings = r.headers.get_list("warning")
    assert any("lowered" in w for w in warnings) and any("additional results" in w for w in warnings)


def test_without_limit_passing_max_results_aborts_the_response(proxied: GatewayProcess, studies: list[Dataset]) -> None:
    """No client may take a cut result set for a whole one: past max_results the connection drops."""
    assert len({d.StudyInstanceUID for d in studies}) > 5
    with pytest.raises(httpx.HTTPError):
        httpx.get(proxied.url(None, "/studies")).json()
    r = httpx.get(proxied.url(None, "/studies"), params={"PatientID": "DEMO-0001"})
    assert r.status_code == 200 and len(r.json()) == 3  # under the maximum: complete
    assert "connection aborted" in proxied.log_text()
