"""Query guards per node, and the limits on the request head, against a real gateway process in
front of the demo PACS: every refusal is a clean JSON answer, never a 500 or a hang, and a guarded
search never reaches the PACS."""

from __future__ import annotations

import json
import socket
from typing import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

MAX_URL = 2048
MAX_HEADERS = 4096


@pytest.fixture(scope="module")
def gw(demo_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    def node(name: str, **extra: object) -> dict[str, object]:
        return {"name": name, "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": demo_pacs.port, **extra}

    settings = {
        "limits": {"max_url_bytes": MAX_URL, "max_header_bytes": MAX_HEADERS, "header_timeout": 1.0},
        "nodes": [
            node("guarded", default=True, required_keys=["PatientID|StudyDate|AccessionNumber"], min_wildcard_chars=3),
            node("open"),
        ],
    }
    with GatewayProcess(settings) as gateway:
        yield gateway


def exchange(port: int, data: bytes, read_timeout: float = 30.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the gateway closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while len(received) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


def assert_problem(r: httpx.Response, status: int, error: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == error and body["requestId"] == r.headers["x-request-id"]
    return body


# ------------------------------------------------------------------------------------------------
# Query guards


def test_broad_searches_are_refused_before_any_c_find(gw: GatewayProcess, demo_pacs: DemoPACS) -> None:
    before = demo_pacs.find_requests
    with httpx.Client(timeout=30) as client:
        body = assert_problem(client.get(gw.url(None, "/studies")), 400, "query-too-broad")
        assert "nodes.required_keys" in body["message"] and "PatientID, StudyDate, AccessionNumber" in body["message"]
        body = assert_problem(client.get(gw.url("guarded", "/series"), params={"Modality": "CT"}), 400,
                              "query-too-broad")
        assert "nodes.required_keys" in body["message"]
        assert_problem(client.get(gw.url(None, "/studies"), params={"PatientID": "*"}), 400, "query-too-broad")
        body = assert_problem(client.get(gw.url(None, "/studies"), params={"PatientID": "D*"}), 400,
                              "query-too-broad")
        assert "nodes.min_wildcard_chars" in body["message"] and body["parameter"] == "PatientID"
        body = assert_problem(
            client.get(gw.url(None, "/studies"), params={"StudyDate": "20150314", "PatientName": "*ller"}), 400,
            "query-too-broad")
        assert body["parameter"] == "PatientName"
    assert demo_pacs.find_requests == before, "a refused search reached the PACS"


def test_narrow_searches_pass_the_guards(gw: GatewayProcess, studies: list[Dataset]) -> None:
    patient = "DEMO-0001"
    mine = [d for d in studies if d.PatientID == patient]
    study = mine[0].StudyInstanceUID
    with httpx.Client(timeout=30) as client:
        r = client.get(gw.url(None, "/studies"), params={"PatientID": patient})
        assert r.status_code == 200 and len(r.json()) == len({d.StudyInstanceUID for d in mine})
        r = client.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-000*", "PatientName": "*"})
        assert r.status_code == 200 and len(r.json()) == len({d.StudyInstanceUID for d in studies})
        r = client.get(gw.url(None, f"/studies/{study}/series"))  # scoped to a study by the URL
        assert r.status_code == 200 and len(r.json()) == len({d.SeriesInstanceUID for d in mine
                                                              if d.StudyInstanceUID == study})
        r = client.get(gw.url(None, "/series"), params={"StudyInstanceUID": study})  # a unique key
        assert r.status_code == 200 and r.json()


def test_a_node_without_guards_takes_any_search(gw: GatewayProcess, studies: list[Dataset]) -> None:
    with httpx.Client(timeout=30) as client:
        r = client.get(gw.url("open", "/studies"))
        assert r.status_code == 200 and len(r.json()) == len({d.StudyInstanceUID for d in studies})
        r = client.get(gw.url("open", "/studies"), params={"PatientName": "M*"})
        assert r.status_code == 200


# ------------------------------------------------------------------------------------------------
# The request head


def test_an_overlong_request_target_gets_414(gw: GatewayProcess) -> None:
    with httpx.Client(timeout=30) as client:
        fits = client.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0001", "x": "a" * (MAX_URL - 200)})
        assert fits.status_code == 200  # an unknown parameter is ignored with a Warning
        r = client.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0001", "x": "a" * MAX_URL})
        body = assert_problem(r, 414, "uri-too-long")
        assert "limits.max_url_bytes" in body["message"] and r.headers["connection"] == "close"
        r = client.get(gw.base + "/dicom-web/studies/" + "1." * MAX_URL)
        assert_problem(r, 414, "uri-too-long")


def test_oversized_header_fields_get_431(gw: GatewayProcess) -> None:
    with httpx.Client(timeout=30) as client:
        fits = client.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0001"},
                          headers={"X-Padding": "p" * (MAX_HEADERS - 500)})
        assert fits.status_code == 200
        one = client.get(gw.url(None, "/studies"), headers={"X-Padding": "p" * MAX_HEADERS})
        body = assert_problem(one, 431, "header-fields-too-large")
        assert "limits.max_header_bytes" in body["message"] and one.headers["connection"] == "close"
        many = client.get(gw.url(None, "/studies"), headers={f"X-Field-{i}": "v" * 40 for i in range(200)})
        assert_problem(many, 431, "header-fields-too-large")
    # a header that never ends: refused as it arrives, the client still gets the answer
    raw = b"GET /dicom-web/studies HTTP/1.1\r\nHost: gw\r\nX-Endless: " + b"e" * (4 << 20)
    status, headers, body = parse_answer(exchange(gw.port, raw))
    assert status == 431 and body["error"] == "header-fields-too-large"
    assert headers["x-request-id"] == body["requestId"]


def test_a_slow_request_head_gets_408_and_a_silent_connection_is_closed(gw: GatewayProcess) -> None:
    status, headers, body = parse_answer(exchange(gw.port, b"GET /dicom-web/studies HTTP/1.1\r\nHost: gw\r\n"))
    assert status == 408 and body["error"] == "request-timeout" and "limits.header_timeout" in body["message"]
    assert headers["connection"] == "close"
    assert exchange(gw.port, b"") == b""  # nothing sent: closed, without an answer


def test_a_request_that_is_not_http_gets_a_json_400(gw: GatewayProcess) -> None:
    status, headers, body = parse_answer(exchange(gw.port, b"\x16\x03\x01\x02\x00 not HTTP at all\r\n\r\n"))
    assert status == 400 and body["error"] == "bad-request" and headers["x-request-id"] == body["requestId"]


def test_refusals_leave_the_gateway_serving_and_logged_without_errors(gw: GatewayProcess) -> None:
    for _ in range(3):
        exchange(gw.port, b"GET /dicom-web/studies HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"b" * (MAX_HEADERS * 2) + b"\r\n\r\n")
    with httpx.Client(timeout=30) as client:
        assert client.get(gw.base + "/health").status_code == 200
        r = client.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0002"})
        assert r.status_code == 200 and r.json()
    log = gw.log_text()
    assert "request refused before routing: 431" in log and "request refused before routing: 414" in log
    assert "Traceback" not in log and '" 500 ' not in log and "internal-error" not in log
