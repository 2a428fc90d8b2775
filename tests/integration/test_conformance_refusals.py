"""The conformance statement (openapi/conformance.md) is kept true over HTTP, against a real gateway
process in front of the demo PACS.

- Section 8 lists what the gateway does not support. Every item there that names a refusal (an HTTP
  4xx, or says "not supported", "not yet implemented", "refused") has probes below: requests that
  must get the documented status, and for an error the documented ``error`` code in a JSON problem
  body with a request ID; never a 5xx. The items are read from the statement, so a new one without
  probes fails here, and each probe's status must be written in the section the probe names.
- Every route of the statement's resource tables (rows starting with an HTTP method) answers a valid
  request with a 2xx, never 404 or 405: the routes exist on a running gateway, not only in the app's
  route list (tests/unit/test_openapi_conformance.py compares the tables with the app without
  sockets).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.demo.data import instance_bytes
from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "openapi" / "conformance.md"
NODE = "demo"
FLAT_NODE = "flat"  # the same PACS without relational queries: a study listing fans out
FANOUT_MAX_PARENTS = 2  # a study of three series is too broad to list on the flat node
MAX_BODY_MB = 1  # stow.max_body_mb: a larger Content-Length is refused before anything is read
CORS_ORIGIN = "https://viewer.example.org"
BOUNDARY = "refusal-probe-boundary"
# what makes a section 8 item a refusal that needs probes
REFUSAL_WORDS = re.compile(
    r"\b4\d\d\b|not supported|not yet implemented|unsupported|refuse|\bno (?:`|XML\b|video\b|ICC\b)", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# Reading the statement


def conformance_text() -> str:
    return CONFORMANCE.read_text(encoding="utf-8")


def chapter(text: str, heading: str) -> str:
    """A section (``## 8.`` or ``### 4.15``) up to the next heading of its level or above."""
    start = text.index("\n" + heading + " ") + 1
    level = heading.split(" ")[0]
    ends = [text.find("\n" + "#" * n + " ", start + len(heading)) for n in range(2, len(level) + 1)]
    ends = [e for e in ends if e >= 0]
    return text[start:min(ends)] if ends else text[start:]


def section8_items(text: str) -> dict[str, str]:
    """Title (the first bold words) -> text of every item of section 8."""
    body = chapter(text, "## 8.").split("\n", 1)[1]
    items: dict[str, str] = {}
    for raw in re.split(r"\n- ", "\n" + body.strip()):
        item = " ".join(raw.split())
        if not item:
            continue
        match = re.match(r"\*\*(.+?)\*\*", item)
        assert match, f"section 8 item without a bold title: {item[:80]}"
        items[match.group(1)] = item
    return items


def refusal_items(text: str) -> dict[str, str]:
    return {title: item for title, item in section8_items(text).items() if REFUSAL_WORDS.search(item)}


def markdown_rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and not re.fullmatch(r"\|[\s|:-]+\|", line):
            yield [cell.strip() for cell in line[1:-1].split("|")]


def table_routes(text: str) -> list[tuple[str, str]]:
    """(METHOD, path) of every resource table row of the statement, in order, without repeats."""
    routes: list[tuple[str, str]] = []
    for cells in markdown_rows(text):
        if cells and cells[0] in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
            for cell in cells[1:]:
                for path in re.findall(r"`(/[^`\s]*)`", cell):
                    if (cells[0], path) not in routes:
                        routes.append((cells[0], path))
    return routes


# ------------------------------------------------------------------------------------------------
# The probes


@dataclass(frozen=True)
class Probe:
    """One request for an unsupported item, and the answer the statement gives for it."""

    what: str
    method: str
    path: str  # with {study}, {series}, {instance} (a single-frame image), {big_study}, {node}
    status: int
    error: str | None  # the JSON problem's `error`; None for a success or a non-JSON answer
    where: str  # the heading of the section that states this answer; "## 8." is the item itself
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # a key of the `bodies` fixture
    warning: str | None = None  # a text the Warning header must carry
    stated: str | None = None  # for an answer that is not an error: what the section says of it
    check: Callable[[httpx.Response], None] | None = None


INSTANCE = "/dicom-web/studies/{study}/series/{series}/instances/{instance}"
WADO = {"requestType": "WADO", "studyUID": "{study}", "seriesUID": "{series}", "objectUID": "{instance}"}
XML_MULTIPART = 'multipart/related; type="application/dicom+xml"'


def failure_reason_is(code: int) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        failed = r.json()["00081198"]["Value"]
        assert [item["00081197"]["Value"] for item in failed] == [[code]], r.text

    return check


def cors_refused(r: httpx.Response) -> None:
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    assert "access-control-allow-origin" not in r.headers


def allow_lists_get(r: httpx.Response) -> None:
    assert "GET" in r.headers["allow"], r.headers


# Title of a section 8 item -> its probes
PROBES: dict[str, list[Probe]] = {
    "Not yet implemented:": [
        Probe("Retrieve Capabilities, OPTIONS on the service root", "OPTIONS", "/dicom-web/", 404, "not-found",
              "### 3.1"),
        Probe("OPTIONS on a resource", "OPTIONS", "/dicom-web/studies/{study}/series", 405, "method-not-allowed",
              "### 3.1", check=allow_lists_get),
    ],
    "XML not supported:": [
        Probe("XML search response", "GET", "/dicom-web/studies", 406, "not-acceptable", "## 8.",
              headers={"Accept": XML_MULTIPART}),
        Probe("XML STOW-RS request", "POST", "/dicom-web/studies", 415, "unsupported-media-type", "## 8.",
              headers={"Content-Type": f"{XML_MULTIPART}; boundary={BOUNDARY}"}, body="xml"),
        Probe("XML STOW-RS response", "POST", "/dicom-web/studies", 406, "not-acceptable", "## 8.",
              headers={"Content-Type": "application/dicom", "Accept": "application/dicom+xml"}, body="instance"),
    ],
    "Fuzzy matching": [
        Probe("fuzzy matching on a node that did not negotiate it", "GET", "/dicom-web/studies", 200, None, "### 3.7",
              params={"PatientName": "DOE*", "fuzzymatching": "true"},
              warning="The fuzzymatching parameter is not supported. Only literal matching has been performed."),
        Probe("empty value matching", "GET", "/dicom-web/studies", 200, None, "### 3.7",
              params={"emptyvaluematching": "true"},
              warning="The emptyvaluematching parameter is not supported. Empty Value Matching has not been "
                      "performed."),
        Probe("multiple value matching", "GET", "/dicom-web/studies", 200, None, "### 3.7",
              params={"multiplevaluematching": "true"},
              warning="The multiplevaluematching parameter is not supported. Multiple Value Matching has not been "
                      "performed."),
    ],
    "Parameter names are case-sensitive:": [
        Probe("a keyword in the wrong case", "GET", "/dicom-web/studies", 200, None, "### 3.15",
              params={"patientname": "DOE^JOHN"},
              warning="The following parameters are not supported and were ignored: patientname"),
    ],
    "`charset`:": [
        Probe("a charset list with a non-UTF-8 value", "GET", "/dicom-web/studies", 400, "bad-request", "### 3.2",
              params={"charset": "utf-8,iso-8859-1"}),
        Probe("Accept-Charset is ignored", "GET", "/dicom-web/studies", 200, None, "## 8.",
              headers={"Accept-Charset": "iso-8859-1"}, stated="the Accept-Charset header is ignored"),
    ],
    "`limit=0`": [
        Probe("limit=0", "GET", "/dicom-web/studies", 400, "bad-request", "## 8.", params={"limit": "0"}),
    ],
    "Retrieve: a study listing fans out": [
        Probe("a study of more series than qido.fanout_max_parents on a node without relational queries",
              "GET", "/nodes/" + FLAT_NODE + "/dicom-web/studies/{big_study}", 413, "too-broad", "## 8."),
    ],
    "STOW-RS: an error status hides the parts' own failures.": [
        Probe("a Content-Length above stow.max_body_mb", "POST", "/dicom-web/studies", 413, "payload-too-large",
              "### 5.8", headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'},
              body="too-large"),
        Probe("an incomplete DICOM JSON upload", "POST", "/dicom-web/studies", 400, "bad-request", "## 8.",
              headers={"Content-Type": f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'},
              body="json-cut"),
    ],
    "STOW-RS DICOM JSON form:": [
        Probe("PNG pixel data in the DICOM JSON form", "POST", "/dicom-web/studies", 409, None, "### 5.8",
              headers={"Content-Type": f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
                       "Accept": "application/dicom+json"},
              body="json-png", check=failure_reason_is(0xC122)),
    ],
    "Metadata: no XML.": [
        Probe("XML metadata, multipart", "GET", INSTANCE + "/metadata", 406, "not-acceptable", "## 8.",
              headers={"Accept": XML_MULTIPART}),
        Probe("XML metadata, single part", "GET", "/dicom-web/studies/{study}/metadata", 406, "not-acceptable", "## 8.",
              headers={"Accept": "application/dicom+xml"}),
    ],
    "Frames:": [
        Probe("a frame beyond NumberOfFrames", "GET", INSTANCE + "/frames/2", 404, "not-found", "## 8."),
        Probe("a rendered frame beyond NumberOfFrames", "GET", INSTANCE + "/frames/2/rendered", 404, "not-found",
              "## 8."),
        Probe("a thumbnail frame beyond NumberOfFrames", "GET", INSTANCE + "/frames/2/thumbnail", 404, "not-found",
              "## 8."),
        Probe("WADO-URI frameNumber beyond NumberOfFrames", "GET", "/wado", 404, "not-found", "### 4.16",
              params={**WADO, "contentType": "image/jpeg", "frameNumber": "2"}),
    ],
    "Single-part `image/jpeg` and `image/jp2` bulk types": [
        Probe("image/jpeg next to a DICOM type in Accept", "GET", INSTANCE + "/frames/1", 400, "bad-request", "## 8.",
              headers={"Accept": 'image/jpeg, multipart/related; type="application/octet-stream"'}),
        Probe("image/jp2 next to a DICOM type in the accept parameter", "GET", INSTANCE + "/frames/1", 400,
              "bad-request", "## 8.",
              params={"accept": 'image/jp2,multipart/related; type="application/octet-stream"'}),
    ],
    "Rendered:": [
        Probe("text/html", "GET", INSTANCE + "/rendered", 406, "not-acceptable", "### 4.15",
              headers={"Accept": "text/html"}),
        Probe("video", "GET", INSTANCE + "/rendered", 406, "not-acceptable", "### 4.15",
              headers={"Accept": "video/mp4"}),
        Probe("an ICC profile", "GET", INSTANCE + "/rendered", 400, "bad-request", "### 4.15",
              params={"iccprofile": "yes"}),
    ],
    "WADO-URI:": [
        Probe("anonymize", "GET", "/wado", 400, "bad-request", "## 8.", params={**WADO, "anonymize": "yes"}),
        Probe("a presentation state", "GET", "/wado", 400, "bad-request", "## 8.",
              params={**WADO, "presentationUID": "1.2.3"}),
        Probe("a presentation state series", "GET", "/wado", 400, "bad-request", "## 8.",
              params={**WADO, "presentationSeriesUID": "1.2.3"}),
        Probe("text/html", "GET", "/wado", 406, "not-acceptable", "### 4.16",
              params={**WADO, "contentType": "text/html"}),
        Probe("text/plain", "GET", "/wado", 406, "not-acceptable", "### 4.16",
              params={**WADO, "contentType": "text/plain"}),
        Probe("video", "GET", "/wado", 406, "not-acceptable", "### 4.16", params={**WADO, "contentType": "video/mpeg"}),
        Probe("charset is ignored", "GET", "/wado", 200, None, "## 8.",
              params={**WADO, "charset": "iso-8859-1"}, stated="`charset` is ignored"),
    ],
    "CORS:": [
        Probe("a preflight from an origin not listed", "OPTIONS", "/dicom-web/studies", 400, None, "## 8.",
              headers={"Origin": "https://elsewhere.example.org", "Access-Control-Request-Method": "GET"},
              check=cors_refused),
    ],
}

# Items whose words make them look like refusals but that refuse no request a client can send
NOT_REFUSALS: dict[str, str] = {
    "C-FIND warning statuses (Bxxx)": "how PACS statuses map to HTTP (502, not 400); no request provokes them "
                                      "from a PACS that answers",
}


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def refusal_pacs(studies: list[Dataset]) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="REFUSAL-PACS", datasets=studies) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def refusal_gateway(refusal_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    def node(name: str, **extra: object) -> dict[str, object]:
        return {"name": name, "ae_title": "REFUSAL-PACS", "host": "127.0.0.1", "port": refusal_pacs.port, **extra}

    settings = {
        "server": {"cors_origins": [CORS_ORIGIN]},
        "qido": {"fanout_max_parents": FANOUT_MAX_PARENTS},
        "stow": {"max_body_mb": MAX_BODY_MB},
        "nodes": [node(NODE, default=True), node(FLAT_NODE, relational="off")],
    }
    with GatewayProcess(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def image(refusal_pacs: DemoPACS) -> Dataset:
    """A single-frame image in the smallest study with pixel data: cheap to retrieve and render whole."""
    headers = refusal_pacs.headers()
    sizes: dict[str, int] = {}
    for h in headers:
        sizes[str(h.StudyInstanceUID)] = sizes.get(str(h.StudyInstanceUID), 0) + 1
    # the headers stop before the pixel data: an image is what has Rows
    images = [h for h in headers if "Rows" in h and int(h.get("NumberOfFrames", 1) or 1) == 1]
    header = min(images, key=lambda h: (sizes[str(h.StudyInstanceUID)], str(h.SOPInstanceUID)))
    return next(d for d in refusal_pacs.datasets() if d.SOPInstanceUID == header.SOPInstanceUID)


@pytest.fixture(scope="module")
def uids(refusal_pacs: DemoPACS, image: Dataset) -> dict[str, str]:
    series_of: dict[str, set[str]] = {}
    for h in refusal_pacs.headers():
        series_of.setdefault(str(h.StudyInstanceUID), set()).add(str(h.SeriesInstanceUID))
    big = min(s for s, series in series_of.items() if len(series) > FANOUT_MAX_PARENTS)
    return {"study": str(image.StudyInstanceUID), "series": str(image.SeriesInstanceUID),
            "instance": str(image.SOPInstanceUID), "big_study": big, "node": NODE}


@pytest.fixture(scope="module")
def bodies(image: Dataset) -> dict[str, bytes]:
    """The request bodies the probes name."""
    copy = image.copy()
    copy.SOPInstanceUID = generate_uid()
    metadata = copy.to_json_dict(bulk_data_threshold=16,
                                 bulk_data_element_handler=lambda element: "http://client.example/bulk/pixels")
    png = io.BytesIO()
    Image.new("L", (int(image.Columns), int(image.Rows))).save(png, "PNG")
    json_part = (f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
                 + json.dumps([metadata]).encode())
    return {
        "instance": instance_bytes(image),
        "xml": (f"--{BOUNDARY}\r\nContent-Type: application/dicom+xml\r\n\r\n<NativeDicomModel/>\r\n"
                f"--{BOUNDARY}--\r\n").encode(),
        "too-large": b"\0" * (MAX_BODY_MB * 1_000_000 + 1),
        "json-cut": json_part[: len(json_part) // 2],
        "json-png": json_part + b"\r\n" + (f"--{BOUNDARY}\r\nContent-Type: image/png\r\n"
                                          "Content-Location: http://client.example/bulk/pixels\r\n\r\n").encode()
                    + png.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode(),
    }


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def fill(template: str, uids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: uids[m.group(1)], template)


def assert_problem(r: httpx.Response, status: int, error: str) -> None:
    """A JSON problem body with the error code and a request ID (gateway/problems.py)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["error"] == error, body
    assert body["message"] and body["requestId"] == r.headers["x-request-id"], body


# ------------------------------------------------------------------------------------------------
# Section 8: every refusal has probes, and the gateway answers them as stated


def test_refusal_items_are_found() -> None:
    """Guards the reading of section 8: the items this file was written against are there."""
    items = section8_items(conformance_text())
    assert len(items) >= 40, sorted(items)
    refusals = set(refusal_items(conformance_text()))
    assert {"XML not supported:", "WADO-URI:", "Rendered:", "Metadata: no XML."} <= refusals


def test_every_refusal_item_has_probes_and_nothing_else_does() -> None:
    refusals = set(refusal_items(conformance_text()))
    assert not set(PROBES) & set(NOT_REFUSALS)
    missing = sorted(refusals - set(PROBES) - set(NOT_REFUSALS))
    assert missing == [], f"section 8 items that refuse something but have no probe here: {missing}"
    stale = sorted((set(PROBES) | set(NOT_REFUSALS)) - refusals)
    assert stale == [], f"probes for items section 8 no longer lists (or no longer as refusals): {stale}"
    assert len(PROBES) + len(NOT_REFUSALS) == len(refusals)
    assert all(PROBES.values())


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("title", sorted(PROBES))
def test_each_probe_answer_is_the_documented_one(title: str) -> None:
    """What a probe expects is written in the section it names: an error status as a number, the
    error code, and for an item that is accepted but not applied, the Warning text or "ignored"."""
    text = conformance_text()
    for probe in PROBES[title]:
        section = section8_items(text)[title] if probe.where == "## 8." else chapter(text, probe.where)
        if probe.status >= 300:
            assert re.search(rf"\b{probe.status}\b", section), f"{probe.what}: no {probe.status} in {probe.where}"
        else:
            assert probe.warning or probe.stated, f"{probe.what}: a success probe says what the statement states"
        if probe.warning is not None:
            assert squash(probe.warning.split(": ")[0]) in squash(text), f"{probe.what}: Warning text not stated"
        if probe.stated is not None:
            assert squash(probe.stated) in squash(section), f"{probe.what}: {probe.where} does not say so"
        if probe.error is not None:
            assert f"`{probe.error}`" in text, f"{probe.what}: error code {probe.error} not in the statement"


@pytest.mark.parametrize("title", sorted(PROBES))
def test_unsupported_item_is_refused(title: str, refusal_gateway: GatewayProcess, uids: dict[str, str],
                                     bodies: dict[str, bytes], client: httpx.Client) -> None:
    for probe in PROBES[title]:
        r = client.request(
            probe.method, refusal_gateway.base + fill(probe.path, uids),
            params={k: fill(v, uids) for k, v in probe.params.items()}, headers=probe.headers,
            content=bodies[probe.body] if probe.body else None,
        )
        assert r.status_code < 500, (probe.what, r.status_code, r.text[:500])
        if probe.error is not None:
            assert_problem(r, probe.status, probe.error)
        else:
            assert r.status_code == probe.status, (probe.what, r.status_code, r.text[:500])
        if probe.warning is not None:
            assert probe.warning in r.headers.get("warning", ""), (probe.what, r.headers.get("warning"))
        if probe.check is not None:
            probe.check(r)


# ------------------------------------------------------------------------------------------------
# The resource tables: every route answers


ROUTES = table_routes(conformance_text())


def test_resource_tables_are_found() -> None:
    methods = {m for m, _ in ROUTES}
    assert methods == {"GET", "POST"}, methods
    assert len(ROUTES) >= 60, len(ROUTES)
    assert ("GET", "/dicom-web/studies") in ROUTES and ("POST", "/nodes/{node}/dicom-web/studies/{study}") in ROUTES


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_listed_route_answers(method: str, path: str, refusal_gateway: GatewayProcess, uids: dict[str, str],
                                    bodies: dict[str, bytes], client: httpx.Client) -> None:
    values = {**uids, "frames": "1", "path": "7FE00010"}
    params: dict[str, str] = {}
    if path.endswith("/wado"):
        params = {k: fill(v, uids) for k, v in WADO.items()}
    kwargs: dict[str, Any] = {}
    if method == "POST":
        kwargs = {"content": bodies["instance"], "headers": {"Content-Type": "application/dicom"}}
    r = client.request(method, refusal_gateway.base + fill(path, values), params=params, **kwargs)
    assert r.status_code not in (404, 405), (r.status_code, r.text[:300])
    assert 200 <= r.status_code < 300, (r.status_code, r.text[:300])
