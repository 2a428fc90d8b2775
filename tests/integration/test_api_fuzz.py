"""API fuzzing: schemathesis, driven by the OpenAPI document the gateway serves, against a real gateway
process in front of the demo PACS.

``schemathesis run`` (its CLI, in a subprocess with a hard time limit) loads ``/openapi.json`` from the
running gateway and exercises every operation in three phases: the document's examples, coverage
(boundary and out-of-schema values, one parameter at a time) and fuzzing (generated requests, valid and
invalid). Every response must pass ``FUZZ_CHECKS``: no 5xx, a documented status, Content-Type and
headers, and a body that matches the documented schema. The run's JSON report is then checked: every
operation tested, nothing skipped, no failure, no error. (schemathesis leaves out the operation that
serves the document itself, ``GET /openapi.json``; the test reads it first.)

Random UIDs only reach 400s and 404s, so before the document is used the UID parameters get named
examples of real instances of the demo PACS (a CT slice, a multi-frame US, an RGB US, an SR without
pixel data); equally named examples go into one request, so the examples phase retrieves real studies,
series and instances, and every operation must have answered some request with a 2xx. The STOW-RS
bodies stay small: a generated value as one part (hypothesis draws kilobytes, not megabytes), or a real
instance of the demo PACS (about 10-25 kB) where an example names one.

Bounds: ``MAX_EXAMPLES`` generated requests per operation in the fuzzing phase (the examples and
coverage phases are finite by construction), deterministic generation (the same requests on every
run), ``REQUEST_TIMEOUT`` per request, ``WALL_TIME_LIMIT`` for the whole run.
The coverage phase runs on the default node's operations only: the ``/nodes/{node}/...`` operations
are the same handlers mounted a second time, and they still get the examples and fuzzing phases (which
also try node names that do not exist).

This file is also the run's hooks module (``SCHEMATHESIS_HOOKS``): schemathesis imports it for the
serializers of the STOW-RS media types and the hooks that add the examples. The hooks read what the
test prepared from the directory in ``FUZZ_DIR_ENV``; in the pytest process they are registered too,
and unused.

Every failure the fuzzer found is kept below as a focused regression test with httpx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from pydicom.dataset import Dataset

from gateway.demo.data import instance_bytes
from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
FUZZ_NODE = "demo"
FUZZ_CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_headers_conformance", "response_schema_conformance")
PHASES = ("examples", "coverage", "fuzzing")
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
MAX_EXAMPLES = 10  # generated requests per operation in the fuzzing phase
WORKERS = 2
REQUEST_TIMEOUT = 30  # seconds; a request that takes longer is reported as a failure
WALL_TIME_LIMIT = 300  # seconds for the whole run (about 75 s here); past it the run is killed and the test fails
SERVES_THE_DOCUMENT = "GET /openapi.json"  # schemathesis does not test the operation it loaded the document from
FUZZ_DIR_ENV = "GATEWAY_FUZZ_DIR"  # examples.json and instances/<SOP Instance UID>.dcm, for the hooks
STOW_BOUNDARY = "dwgw-fuzz-5c1d0e7a"
INSTANCE_MARKER = "demo-instance:"  # a body example naming a demo instance by its SOP Instance UID
# The request-head limits (414, 431; conformance statement, section 9) answer before any route, so the
# document's operations do not list them; raised to their maximum here so that the long URLs and headers
# the fuzzer makes reach the handlers instead of the guard (tests/integration/test_guards_limits.py
# covers the guard itself).
HEAD_LIMITS = {"max_url_bytes": 1048576, "max_header_bytes": 1048576}
# schemathesis settings beyond the command line: no coverage phase on the second mount of the same handlers
SCHEMATHESIS_TOML = """\
[[operations]]
include-path-regex = "^/nodes/"
phases.coverage.enabled = false
"""

# UIDs such as 0830.65 fit the documented pattern, so the gateway queries the PACS with them, and
# pydicom in the demo PACS (this process) warns that a component starts with a zero
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


# ------------------------------------------------------------------------------------------------
# Hooks of the schemathesis run (this file is its hooks module)


def _fuzz_dir() -> Path:
    return Path(os.environ[FUZZ_DIR_ENV])


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    """Add the examples the test wrote (real UIDs) to the document loaded from the gateway."""
    if FUZZ_DIR_ENV in os.environ:
        add_examples(raw_schema, json.loads((_fuzz_dir() / "examples.json").read_text()))


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """A multipart body needs its boundary in the Content-Type (the serializer below uses this one)."""
    if (case.media_type or "").startswith("multipart/related"):
        case.headers = {**(case.headers or {}), "Content-Type": f"{case.media_type}; boundary={STOW_BOUNDARY}"}


def stow_payload(value: Any) -> bytes:
    """The bytes of one part: a demo instance for a marker example, else the generated value."""
    if isinstance(value, str) and value.startswith(INSTANCE_MARKER):
        return (_fuzz_dir() / "instances" / (value[len(INSTANCE_MARKER):] + ".dcm")).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if hasattr(value, "data"):  # schemathesis' wrapper of generated `format: binary` strings
        return bytes(value.data)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


@schemathesis.serializer("application/dicom")
def _single_part(ctx: Any, value: Any) -> bytes:
    return stow_payload(value)


@schemathesis.serializer('multipart/related; type="application/dicom"',
                         'multipart/related; type="application/dicom+json"')
def _multipart(ctx: Any, value: Any) -> bytes:
    part_type = "application/dicom+json" if "dicom+json" in (ctx.case.media_type or "") else "application/dicom"
    return (f"--{STOW_BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + stow_payload(value)
            + f"\r\n--{STOW_BOUNDARY}--\r\n".encode())


# ------------------------------------------------------------------------------------------------
# Examples from the demo PACS


UID_PARAMETERS = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID",
                  "studyUID": "StudyInstanceUID", "seriesUID": "SeriesInstanceUID", "objectUID": "SOPInstanceUID"}


def sample_instances(headers: list[Dataset]) -> dict[str, Dataset]:
    """One instance of each kind the viewer resources treat differently, by example name. The
    headers stop before the pixel data: an image is what has Rows."""
    def first(pred: Any) -> Dataset:
        return min((h for h in headers if pred(h)), key=lambda h: str(h.SOPInstanceUID))

    def frames(h: Dataset) -> int:
        return int(h.get("NumberOfFrames", 1) or 1)

    return {
        "ct": first(lambda h: h.Modality == "CT" and frames(h) == 1),
        "cine": first(lambda h: frames(h) > 1),
        "rgb": first(lambda h: int(h.get("SamplesPerPixel", 1)) == 3 and frames(h) == 1),
        "sr": first(lambda h: h.Modality == "SR" and "Rows" not in h),
    }


def example_values(samples: dict[str, Dataset]) -> dict[str, Any]:
    """What ``add_examples`` puts into the document, as JSON."""
    return {
        "parameters": {name: {kind: str(ds[keyword].value) for kind, ds in samples.items()}
                       for name, keyword in UID_PARAMETERS.items()},
        "node": FUZZ_NODE,
        "bodies": {kind: INSTANCE_MARKER + str(ds.SOPInstanceUID) for kind, ds in samples.items()},
    }


def add_examples(doc: dict[str, Any], values: dict[str, Any]) -> None:
    """Named examples for the UID parameters (shared names line up in one request), the node name,
    and for the STOW-RS bodies a marker the serializers replace by the instance."""
    params = doc["components"]["parameters"]
    for name, examples in values["parameters"].items():
        params[name].pop("example", None)
        params[name]["examples"] = {kind: {"value": value} for kind, value in examples.items()}
    params["node"].pop("examples", None)
    params["node"]["example"] = values["node"]
    for media in doc["components"]["requestBodies"]["StoreInstances"]["content"].values():
        media.pop("example", None)
        media["examples"] = {kind: {"value": value} for kind, value in values["bodies"].items()}


# ------------------------------------------------------------------------------------------------
# Fixtures: the demo PACS, the gateway in front of it


@pytest.fixture(scope="module")
def fuzz_pacs(studies: list[Dataset]) -> Iterator[DemoPACS]:
    """A demo PACS of this module's own: the fuzzer stores into it."""
    with DemoPACS(ae_title="FUZZ-PACS", datasets=studies) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def fuzz_gateway(fuzz_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    settings = {
        "limits": HEAD_LIMITS,
        "nodes": [{"name": FUZZ_NODE, "ae_title": "FUZZ-PACS", "host": "127.0.0.1", "port": fuzz_pacs.port,
                   "default": True}],
    }
    with GatewayProcess(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def fuzz_samples(fuzz_pacs: DemoPACS) -> dict[str, Dataset]:
    return sample_instances(fuzz_pacs.headers())


@pytest.fixture(scope="module")
def fuzz_dir(fuzz_pacs: DemoPACS, fuzz_samples: dict[str, Dataset]) -> Iterator[Path]:
    """The schemathesis configuration, and the examples and instances the hooks read."""
    path = Path(tempfile.mkdtemp(prefix="gw-fuzz-"))
    (path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    (path / "examples.json").write_text(json.dumps(example_values(fuzz_samples)))
    (path / "instances").mkdir()
    wanted = {str(ds.SOPInstanceUID) for ds in fuzz_samples.values()}
    for ds in fuzz_pacs.datasets():
        if str(ds.SOPInstanceUID) in wanted:
            (path / "instances" / f"{ds.SOPInstanceUID}.dcm").write_bytes(instance_bytes(ds))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


# ------------------------------------------------------------------------------------------------
# The fuzz run


def run_schemathesis(gw: GatewayProcess, work: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = work / "report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(work / "schemathesis.toml"),
        "run", gw.base + "/openapi.json",
        "--checks", ",".join(FUZZ_CHECKS), "--phases", ",".join(PHASES),
        "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
        "--request-timeout", str(REQUEST_TIMEOUT), "--workers", str(WORKERS),
        "--report", "json", "--report-json-path", str(report), "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).resolve()), FUZZ_DIR_ENV: str(work),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=WALL_TIME_LIMIT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"schemathesis ran past {WALL_TIME_LIMIT} s and was killed:\n{out[-6000:]}")
    assert report.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(report.read_text())


def run_summary(proc: subprocess.CompletedProcess[str]) -> str:
    """What schemathesis printed from its failures and errors on, each line cut short (a reproducing
    curl command can hold a URL of hundreds of kilobytes)."""
    text = proc.stdout
    start = min((i for i in (text.find("= FAILURES ="), text.find("= ERRORS ="), text.find("= WARNINGS =")) if i >= 0),
                default=max(0, len(text) - 6000))
    lines = [line if len(line) <= 400 else line[:400] + " ..." for line in text[start:].splitlines()]
    return f"schemathesis (exit {proc.returncode}):\n" + "\n".join(lines)[:20000] + "\n" + proc.stderr[-2000:]


def test_fuzz_the_whole_api(fuzz_gateway: GatewayProcess, fuzz_dir: Path) -> None:
    served = httpx.get(fuzz_gateway.base + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    operations = {f"{method.upper()} {path}" for path, item in served.json()["paths"].items() for method in item
                  if method in HTTP_METHODS}
    assert SERVES_THE_DOCUMENT in operations
    fuzzed = operations - {SERVES_THE_DOCUMENT}
    started = time.monotonic()
    proc, report = run_schemathesis(fuzz_gateway, fuzz_dir)
    output = run_summary(proc) + "\ngateway log (tail):\n" + fuzz_gateway.log_text()[-4000:]
    print(f"schemathesis: {time.monotonic() - started:.0f} s, {report['test_cases']['generated']} requests")
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    assert report["stop_reason"] == "completed" and report["complete"], output
    ops = report["operations"]
    assert ops["total"] == ops["selected"] == ops["tested"] == len(fuzzed), (ops, output)
    assert ops["errored"] == 0 and ops["skipped"] == 0, (ops, output)
    for phase in PHASES:
        assert report["phases"][phase]["status"] == "success", (phase, report["phases"][phase], output)
    assert report["test_cases"]["with_failures"] == 0 and report["test_cases"]["errored"] == 0, output
    assert proc.returncode == 0, output
    # real data was reached: every operation answered some request with a 2xx (or a documented 3xx),
    # and every operation that takes UIDs did so in the examples phase, where the real UIDs come in
    rates = report["valid_rates"]
    assert sorted(op for op in fuzzed if not any(r["accepted"] for r in rates.get(op, {}).values())) == []
    with_uids = {op for op in fuzzed if "{study}" in op or op.endswith("/wado") or op.startswith("POST ")}
    assert len(with_uids) > 40, with_uids
    assert sorted(op for op in with_uids if not rates.get(op, {}).get("examples", {}).get("accepted")) == []


# ------------------------------------------------------------------------------------------------
# What the fuzzer found, kept


@pytest.mark.parametrize("prefix", ["", "/nodes/" + FUZZ_NODE])
def test_wado_uri_region_of_an_instance_without_pixels_is_422(
    prefix: str, fuzz_gateway: GatewayProcess, fuzz_samples: dict[str, Dataset], client: httpx.Client,
) -> None:
    """Found by the examples phase: a WADO-URI image with ``region`` of an SR (no Rows, no Columns)
    was a 500 (AttributeError in the region's arithmetic); it is the 422 any rendering of it gets."""
    sr = fuzz_samples["sr"]
    r = client.get(fuzz_gateway.base + prefix + "/wado", params={
        "requestType": "WADO", "studyUID": str(sr.StudyInstanceUID), "seriesUID": str(sr.SeriesInstanceUID),
        "objectUID": str(sr.SOPInstanceUID), "contentType": "image/png", "region": "0.25,0.25,0.75,0.75"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "not-renderable" and r.json()["requestId"] == r.headers["x-request-id"]
