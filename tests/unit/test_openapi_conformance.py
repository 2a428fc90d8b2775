"""openapi/openapi.json, openapi/conformance.md and README.md agree with the code (no sockets).

The app is built but its lifespan never runs, so no node pool and no C-MOVE receiver is opened.
Texts and numbers the code emits (Warning texts, error codes, statuses, the receiver's limits) are
read from the source with ``ast``, so a new one that is not documented fails here.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import tag_for_keyword
from starlette.routing import BaseRoute, Mount, Route

import gateway
from gateway import app as app_module
from gateway import config as config_module
from gateway.app import create_app
from gateway.config import (
    CacheSettings,
    GatewaySettings,
    NodeSettings,
    QidoSettings,
    Timeouts,
    WadoSettings,
    load_settings,
    settings_schema,
)
from gateway.dicomweb import attributes, negotiation, render, rendered, transcode, viewer
from gateway.dicomweb.qido import SearchContext
from gateway.dicomweb.query import RESERVED
from gateway.dimse import receiver, retrieve
from gateway.dimse.net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.dimse.storage_classes import CURATED_STORAGE_CLASSES
from gateway.problems import HttpProblem, internal_error_response, problem_response

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gateway"
OPENAPI = ROOT / "openapi" / "openapi.json"
CONFORMANCE = ROOT / "openapi" / "conformance.md"
README = ROOT / "README.md"

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "10.1.2.3", "port": 104}




@pytest.fixture
def app_routes() -> set[tuple[str, str]]:
    app = create_app(load_settings(data={"nodes": [NODE], "auth": {"enabled": False}}))  # no lifespan: no pools
    return set(_walk(app.routes, ""))


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(OPENAPI.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def conformance() -> str:
    return CONFORMANCE.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Helpers


def normalize(path: str) -> str:
    """``/studies/{study}`` and ``/studies/{StudyInstanceUID}`` (or ``{study:str}``) compare equal."""
    return re.sub(r"\{[^}/]+\}", "{}", path)


def _walk(routes: list[BaseRoute], prefix: str) -> Iterator[tuple[str, str]]:
    """(normalized path, METHOD) for every route, Mount children included. HEAD is implied by GET
    (Starlette adds it to every GET route) and is not listed separately."""
    for route in routes:
        if isinstance(route, Mount):
            yield from _walk(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            methods = set(route.methods or ())
            if "GET" in methods:
                methods.discard("HEAD")
            for method in methods:
                yield normalize(prefix + route.path), method
        else:  # a WebSocketRoute or Host would need documenting in its own way
            pytest.fail(f"unexpected route type {type(route).__name__}")


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method, item, item[method]


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` chain to the object it names."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are used: {ref}"
        node = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
            node = node[part]
        seen += 1
        assert seen < 20, f"$ref cycle at {ref}"
    return node


def _refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _refs(value, f"{where}/{i}")


def _tagged_operations(doc: dict[str, Any], tag: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(p, item, op) for p, m, item, op in _operations(doc)
            if "/dicom-web/" in p and m == "get" and tag in op.get("tags", ())]


def _search_operations(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return _tagged_operations(doc, "QIDO-RS")


def _retrieve_operations(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The WADO-RS Instance resources: a study, a series or an instance as PS3.10 files."""
    return [(p, item, op) for p, item, op in _tagged_operations(doc, "WADO-RS")
            if normalize(p).endswith(RETRIEVE_SUFFIXES)]


def _viewer_operations(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The other WADO-RS resources: metadata, frames, pixel data, bulk data, rendered, thumbnail."""
    return [(p, item, op) for p, item, op in _tagged_operations(doc, "WADO-RS")
            if not normalize(p).endswith(RETRIEVE_SUFFIXES)]


def _wado_uri_operations(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(p, item, op) for p, m, item, op in _operations(doc) if m == "get" and "WADO-URI" in op.get("tags", ())]


RETRIEVE_SUFFIXES = ("/studies/{}", "/studies/{}/series/{}", "/studies/{}/series/{}/instances/{}")
_INSTANCE = "/studies/{}/series/{}/instances/{}"
# written out here rather than read from app.viewer_routes(), so that a route lost there fails below
VIEWER_SUFFIXES = (
    "/studies/{}/metadata", "/studies/{}/series/{}/metadata", _INSTANCE + "/metadata", _INSTANCE + "/frames/{}",
    "/studies/{}/pixeldata", "/studies/{}/series/{}/pixeldata", _INSTANCE + "/pixeldata",
    "/studies/{}/bulkdata", "/studies/{}/series/{}/bulkdata", _INSTANCE + "/bulkdata", _INSTANCE + "/bulkdata/{}",
    "/studies/{}/rendered", "/studies/{}/series/{}/rendered", _INSTANCE + "/rendered", _INSTANCE + "/frames/{}/rendered",
    "/studies/{}/thumbnail", "/studies/{}/series/{}/thumbnail", _INSTANCE + "/thumbnail",
    _INSTANCE + "/frames/{}/thumbnail",
)


def _viewer_kind(path: str) -> str:
    """``metadata``, ``frames``, ``pixeldata``, ``bulkdata`` (one value, by its tag path),
    ``bulkdata-all`` (every value of a study, series or instance: no path), ``rendered`` or ``thumbnail``."""
    if normalize(path).endswith("/bulkdata"):
        return "bulkdata-all"
    last = [part for part in normalize(path).split("/") if part != "{}"]
    return last[-1]


def _viewer_level(path: str) -> str:
    """``instance`` (an instance or frame resource), ``series`` or ``study``."""
    rel = normalize(path).split("/dicom-web", 1)[1]
    if rel.startswith(_INSTANCE):
        return "instance"
    return "series" if rel.startswith("/studies/{}/series/{}") else "study"


def assert_every_response_names_its_request(doc: dict[str, Any], path: str, responses: dict[str, Any]) -> None:
    """503 carries Retry-After; every response an X-Request-ID; every 4xx and 5xx the Error body."""
    assert "Retry-After" in _resolve(doc, responses["503"])["headers"], path
    for status, response in responses.items():
        response = _resolve(doc, response)
        assert "X-Request-ID" in response.get("headers", {}), f"{path}: X-Request-ID on {status}"
        if status.startswith(("4", "5")):
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, f"{path}: {status}"


def _parameters(doc: dict[str, Any], item: dict[str, Any], op: dict[str, Any]) -> list[dict[str, Any]]:
    return [_resolve(doc, p) for p in [*item.get("parameters", []), *op.get("parameters", [])]]


def squash(text: str) -> str:
    return " ".join(text.split())


def _markdown_rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and not re.fullmatch(r"\|[\s|:-]+\|", line):
            yield [cell.strip() for cell in line[1:-1].split("|")]


def _section(text: str, heading_start: str) -> str:
    start = text.index(heading_start)
    end = text.find("\n#", start + len(heading_start))
    return text[start:] if end < 0 else text[start:end]


def _chapter(text: str, heading_start: str) -> str:
    """A ``## `` section with its subsections."""
    start = text.index(heading_start)
    end = text.find("\n## ", start + len(heading_start))
    return text[start:] if end < 0 else text[start:end]


def _keywords(cell: str) -> set[str]:
    return {w for w in re.findall(r"\b[A-Z][A-Za-z]+\b", cell) if tag_for_keyword(w) is not None}


def _tree(relative: str) -> ast.Module:
    return ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# Routes: app <-> openapi.json <-> conformance.md


def test_every_app_route_is_in_openapi_and_back(app_routes: set[tuple[str, str]], doc: dict[str, Any]) -> None:
    documented = {(normalize(p), m.upper()) for p, m, _item, _op in _operations(doc)}
    assert app_routes, "no routes found in the app"
    assert sorted(app_routes - documented) == [], "routes missing from openapi.json"
    assert sorted(documented - app_routes) == [], "openapi.json documents routes the app does not have"


def test_the_app_has_the_routes_this_document_describes(app_routes: set[tuple[str, str]]) -> None:
    # guards the normalization above: both mounts with all six QIDO resources, the three WADO-RS
    # instance resources, the nineteen viewer resources and the two STOW-RS resources, WADO-URI on
    # both, plus the five others
    for mount in ("/dicom-web", "/nodes/{}/dicom-web"):
        for rel in ("/studies", "/series", "/instances", "/studies/{}/series", "/studies/{}/instances",
                    "/studies/{}/series/{}/instances", *RETRIEVE_SUFFIXES, *VIEWER_SUFFIXES):
            assert (mount + rel, "GET") in app_routes
        for rel in ("/studies", "/studies/{}"):
            assert (mount + rel, "POST") in app_routes
    assert ("/wado", "GET") in app_routes and ("/nodes/{}/wado", "GET") in app_routes
    assert ("/health", "GET") in app_routes and ("/openapi.json", "GET") in app_routes
    assert ("/metrics", "GET") in app_routes
    assert ("/ready", "GET") in app_routes and ("/status", "GET") in app_routes
    assert len(VIEWER_SUFFIXES) == 19
    assert len(app_routes) == 27 + 2 * 19 + 2


def test_every_dicomweb_operation_is_a_search_or_a_retrieve(doc: dict[str, Any]) -> None:
    searches = {p for p, _item, _op in _search_operations(doc)}
    retrieves = {p for p, _item, _op in _retrieve_operations(doc)}
    viewers = {p for p, _item, _op in _viewer_operations(doc)}
    assert len(searches) == 12 and len(retrieves) == 6 and not searches & (retrieves | viewers)
    for path, _method, _item, _op in _operations(doc):
        if "/dicom-web/" in path:
            assert path in searches | retrieves | viewers, f"{path} is tagged neither QIDO-RS nor WADO-RS"
    for mount in ("/dicom-web", "/nodes/{}/dicom-web"):
        assert {normalize(p) for p in retrieves if normalize(p).startswith(mount + "/")} == {
            mount + s for s in RETRIEVE_SUFFIXES}, mount
        assert {normalize(p) for p in viewers if normalize(p).startswith(mount + "/")} == {
            mount + s for s in VIEWER_SUFFIXES}, mount
    assert len(viewers) == 2 * len(VIEWER_SUFFIXES)
    assert {normalize(p) for p, _item, _op in _wado_uri_operations(doc)} == {"/wado", "/nodes/{}/wado"}


def test_conformance_resource_tables_match_the_app(app_routes: set[tuple[str, str]], conformance: str) -> None:
    listed: set[tuple[str, str]] = set()
    for cells in _markdown_rows(conformance):
        if cells and cells[0] in {m.upper() for m in HTTP_METHODS}:
            for cell in cells[1:]:
                for path in re.findall(r"`(/[^`\s]*)`", cell):
                    listed.add((normalize(path), cells[0]))
    assert listed, "conformance.md has no resource table (rows starting with an HTTP method)"
    assert sorted(listed - app_routes) == [], "conformance.md lists routes the app does not have"
    assert sorted(app_routes - listed) == [], "app routes missing from conformance.md's resource tables"


def test_path_templates_declare_their_parameters(doc: dict[str, Any]) -> None:
    for path, _method, item, op in _operations(doc):
        names = set(re.findall(r"\{([^}/]+)\}", path))
        declared = {p["name"]: p for p in _parameters(doc, item, op) if p["in"] == "path"}
        assert set(declared) == names, path
        assert all(p.get("required") is True for p in declared.values()), path


def test_path_parameter_patterns_are_the_codes(doc: dict[str, Any]) -> None:
    params = doc["components"]["parameters"]
    assert params["node"]["schema"]["pattern"] == config_module._NODE_NAME_RE.pattern
    assert params["node"]["schema"]["maxLength"] == 64
    for name in ("study", "series", "instance"):
        assert params[name]["schema"]["pattern"] == app_module._UID_RE.pattern
        assert params[name]["schema"]["maxLength"] == 64
        assert re.fullmatch(params[name]["schema"]["pattern"], "1.2.840.10008.1.2.1")


def test_every_query_parameter_the_code_accepts_is_documented(doc: dict[str, Any]) -> None:
    searches = _search_operations(doc)
    assert len(searches) == 12
    for path, item, op in searches:
        query = [p for p in _parameters(doc, item, op) if p["in"] == "query"]
        named = {p["name"] for p in query if p["schema"].get("type") != "object"}
        assert named == set(RESERVED), path
        free_form = [p for p in query if p["schema"].get("type") == "object"]
        assert len(free_form) == 1, f"{path}: one free-form attribute parameter"
        attrs = free_form[0]
        assert attrs.get("style") == "form" and attrs.get("explode") is True, path
        assert attrs["schema"].get("patternProperties"), path
        for keyword in attrs["schema"].get("properties", {}):
            for part in keyword.split("."):
                assert tag_for_keyword(part) is not None, f"{path}: {keyword} is not a DICOM keyword"


def test_search_responses(doc: dict[str, Any]) -> None:
    for path, _item, op in _search_operations(doc):
        responses = op["responses"]
        for status in ("200", "204", "400", "403", "406", "500", "502", "503", "504"):
            assert status in responses, f"{path}: {status}"
        if path.startswith("/nodes/"):
            assert "404" in responses, path
        ok = _resolve(doc, responses["200"])
        assert set(ok["content"]) == {"application/dicom+json", "application/json"}, path
        assert _resolve(doc, ok["content"]["application/dicom+json"]["schema"])["type"] == "array"
        for status in ("200", "204"):
            assert "Warning" in _resolve(doc, responses[status])["headers"], f"{path}: Warning on {status}"
        assert_every_response_names_its_request(doc, path, responses)


def _retrieve_query_parameter_names() -> set[str]:
    """The query parameter names ``wado.retrieve`` compares against (``k == "accept"``)."""
    names: set[str] = set()
    for func in ast.walk(_tree("dicomweb/wado.py")):
        if isinstance(func, ast.AsyncFunctionDef) and func.name == "retrieve":
            for node in ast.walk(func):
                if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "k":
                    names |= {c.value for c in node.comparators
                              if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return names


def test_retrieve_parameters(doc: dict[str, Any]) -> None:
    assert _retrieve_query_parameter_names() == {"accept"}
    for path, item, op in _retrieve_operations(doc):
        params = _parameters(doc, item, op)
        query = {p["name"] for p in params if p["in"] == "query"}
        assert query == _retrieve_query_parameter_names(), path
        headers = {p["name"]: p for p in params if p["in"] == "header"}
        assert "Accept" in headers and "X-Request-ID" in headers, path
        accept = squash(headers["Accept"]["description"])
        for phrase in ('multipart/related; type="application/dicom"', "transfer-syntax", "application/dicom",
                       negotiation.EXPLICIT_VR_LE, "`*`"):
            assert phrase in accept, f"{path}: Accept description lacks {phrase}"


def test_retrieve_responses(doc: dict[str, Any]) -> None:
    for path, _item, op in _retrieve_operations(doc):
        responses = op["responses"]
        assert set(responses) == {"200", "400", "401", "403", "404", "406", "413", "500", "502", "503", "504"}, path
        ok = _resolve(doc, responses["200"])
        single = normalize(path).endswith("/instances/{}")
        expected = {"multipart/related", "application/dicom"} if single else {"multipart/related"}
        assert set(ok["content"]) == expected, path
        for media in ok["content"].values():
            assert media["schema"] == {"type": "string", "format": "binary"}, path
        assert "Warning" not in ok.get("headers", {}), f"{path}: retrieve sends no Warning"
        assert_every_response_names_its_request(doc, path, responses)


# ------------------------------------------------------------------------------------------------
# The OpenAPI document's own structure (a minimal check: no validator is a dependency)


def test_openapi_structure(doc: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"] == gateway.__version__
    assert doc["paths"]
    operation_ids = []
    for path, method, _item, op in _operations(doc):
        assert path.startswith("/"), path
        assert op.get("responses"), f"{method.upper()} {path} has no responses"
        for status, response in op["responses"].items():
            assert re.fullmatch(r"[1-5]\d\d|[1-5]XX|default", status), f"{path}: {status}"
            assert _resolve(doc, response).get("description"), f"{path}: {status} needs a description"
        operation_ids.append(op.get("operationId"))
    assert None not in operation_ids
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    for _path, _method, item, op in _operations(doc):
        seen = set()
        for p in _parameters(doc, item, op):
            assert p["in"] in ("query", "header", "path", "cookie") and p["name"], p
            assert "schema" in p or "content" in p, p["name"]
            assert (p["in"], p["name"]) not in seen, f"duplicate parameter {p['name']}"
            seen.add((p["in"], p["name"]))


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs = list(_refs(doc))
    assert refs
    for where, ref in refs:
        assert ref.startswith("#/"), f"{where}: non-local $ref {ref}"
        _resolve(doc, {"$ref": ref})


def test_error_schema_is_the_body_the_code_writes(doc: dict[str, Any]) -> None:
    schema = doc["components"]["schemas"]["Error"]
    bodies = [
        json.loads(bytes(problem_response(HttpProblem(400, "bad-request", "m", "limit"), "rid").body)),
        json.loads(bytes(problem_response(HttpProblem(503, "pacs-busy", "m"), "rid").body)),
        json.loads(bytes(internal_error_response("rid").body)),
    ]
    for body in bodies:
        assert set(schema["required"]) <= set(body) <= set(schema["properties"]), body
        assert body["error"] in schema["properties"]["error"]["enum"]


# ------------------------------------------------------------------------------------------------
# Texts the code emits


def _constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _phrases(node: ast.AST, constants: dict[str, str]) -> list[str]:
    """The literal parts of a string expression (f-string pieces, concatenations, constants)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and node.id in constants:
        return [constants[node.id]]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _phrases(node.left, constants) + _phrases(node.right, constants)
    return []


def warning_texts() -> list[str]:
    """Every Warning text (literal parts) appended in plan.py and qido.py."""
    found: list[str] = []
    for relative in ("dicomweb/plan.py", "dicomweb/qido.py"):
        tree = _tree(relative)
        constants = _constants(tree)
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            collecting_all = func.name == "_result_warnings"
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "append"
                    and isinstance(node.func.value, ast.Name)
                    and (node.func.value.id == "warnings" or collecting_all)
                ):
                    for arg in node.args:
                        found += _phrases(arg, constants)
    return sorted({p.strip() for p in found if len(p.strip()) >= 12})


def test_warning_texts_are_found_in_the_code() -> None:
    texts = warning_texts()
    assert len(texts) >= 9, texts  # if this drops, the extraction above needs to follow the code
    joined = " ".join(texts)
    for phrase in ("fuzzymatching parameter is not supported", "additional results", "emptyvaluematching",
                   "multiplevaluematching", "did not return these attributes", "FF01"):
        assert phrase in joined, phrase


@pytest.mark.parametrize("text", warning_texts())
def test_every_warning_text_is_in_the_conformance_statement(text: str, conformance: str) -> None:
    assert squash(text) in squash(conformance)


def test_warning_header_form_is_the_documented_one(conformance: str, doc: dict[str, Any]) -> None:
    def ctx(quoted: bool) -> SearchContext:
        return SearchContext(
            None, "https://gw.example.org/dicom-web", "https://gw.example.org/dicom-web",  # type: ignore[arg-type]
            max_results=10, empty_status=200, fanout_concurrency=1, fanout_max_parents=10,
            strict_accept=False, warning_quoted=quoted,
        )

    assert ctx(False).warning("Some text.") == "299 https://gw.example.org/dicom-web: Some text."
    assert ctx(True).warning('Some "text".') == "299 https://gw.example.org/dicom-web: \"Some 'text'.\""
    assert "`Warning: 299 <service-url>: <text>`" in conformance
    assert '`299 <service-url>: "<text>"`' in conformance
    for example in doc["components"]["headers"]["Warning"]["examples"].values():
        assert re.fullmatch(r"299 https?://\S+: \S.*", example["value"]), example


def _modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))


def error_codes() -> set[str]:
    """Every ``error`` value the code can put in a JSON error body (every module of the package)."""
    codes: set[str] = set()
    for relative in _modules():
        tree = _tree(relative)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "HttpProblem":
                args = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "error")]
                codes |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "error" and isinstance(value, ast.Constant):
                        codes.add(str(value.value))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "_http_exception":
                codes |= {
                    c.value for c in ast.walk(node)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and re.fullmatch(r"[a-z]+(-[a-z]+)+", c.value)
                }
    return codes


def test_every_error_code_is_documented(doc: dict[str, Any], conformance: str) -> None:
    codes = error_codes()
    assert {"bad-request", "pacs-busy", "internal-error", "http-error", "too-broad", "gateway-busy",
            "pacs-service-not-supported", "pacs-failure"} <= codes, codes
    assert sorted(codes - set(doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"])) == []
    for code in codes:
        assert f"`{code}`" in conformance, code


def _helper_statuses() -> dict[str, int]:
    """problems.py's helpers that return one fixed status: ``bad_request`` -> 400, ..."""
    out = {}
    for func in _tree("problems.py").body:
        if isinstance(func, ast.FunctionDef):
            returned = [n.value for n in ast.walk(func) if isinstance(n, ast.Return)]
            call = returned[0] if len(returned) == 1 else None
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "HttpProblem":
                first = call.args[0] if call.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, int):
                    out[func.name] = first.value
    return out


def statuses_set_in(*relatives: str) -> tuple[set[int], set[int]]:
    """(statuses, statuses sent with Retry-After) of the HttpProblems built, directly or through a
    fixed-status helper of problems.py, in these modules."""
    helpers = _helper_statuses()
    statuses: set[int] = set()
    retry_after: set[int] = set()
    for relative in relatives:
        for node in ast.walk(_tree(relative)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id in helpers:
                statuses.add(helpers[node.func.id])
            elif node.func.id == "HttpProblem":
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, int):
                    statuses.add(first.value)
                    for k in node.keywords:
                        if k.arg == "headers" and isinstance(k.value, ast.Dict) and any(
                            isinstance(x, ast.Constant) and x.value == "Retry-After" for x in k.value.keys
                        ):
                            retry_after.add(first.value)
    return statuses, retry_after


def test_every_status_the_code_sets_is_a_search_response(doc: dict[str, Any]) -> None:
    statuses, retry_after = statuses_set_in("problems.py", "dicomweb/qido.py")
    assert {400, 502, 503, 504} <= statuses and retry_after == {503}
    documented: set[str] = set()
    for _path, _item, op in _search_operations(doc):
        documented |= set(op["responses"])
    assert sorted(str(s) for s in statuses if str(s) not in documented) == []


def test_every_status_the_code_sets_is_a_retrieve_response(doc: dict[str, Any]) -> None:
    # the retrieve lists its instances with qido.run_plan, so the fan-out's 413 is one of its statuses
    wado_source = (PACKAGE / "dicomweb/wado.py").read_text(encoding="utf-8")
    assert "run_plan" in wado_source
    statuses, retry_after = statuses_set_in("problems.py", "app.py", "dicomweb/qido.py", "dicomweb/wado.py",
                                            "dicomweb/negotiation.py")
    assert {400, 403, 404, 406, 413, 502, 503, 504} <= statuses and retry_after == {503}
    for path, _item, op in _retrieve_operations(doc):
        missing = sorted(str(s) for s in statuses if str(s) not in op["responses"])
        assert missing == [], path


# ------------------------------------------------------------------------------------------------
# Viewer resources (metadata, frames, pixel data, bulk data, rendered, thumbnail) and WADO-URI


def _compared_names(relative: str, functions: set[str]) -> set[str]:
    """Query parameter names these functions compare ``k`` against (``k == "charset"``)."""
    names: set[str] = set()
    for func in ast.walk(_tree(relative)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and func.name in functions:
            for node in ast.walk(func):
                if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "k":
                    names |= {c.value for c in node.comparators
                              if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return names


def _callers_of(relative: str, callee: str) -> set[str]:
    """The functions of a module that call ``callee`` by name, directly or through other functions
    of the module (the entry points that can reach a Range helper, say)."""
    calls = {
        func.name: {n.func.id for n in ast.walk(func) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        for func in ast.walk(_tree(relative)) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    found: set[str] = set()
    targets = {callee}
    while targets:
        new = {name for name, called in calls.items() if called & targets} - found
        found |= new
        targets = new
    return found


def _render_parameter_names() -> set[str]:
    """The names ``render.parse_render_params`` reads: ``_single(values, "quality")``,
    ``values.get("accept", [])`` and ``"annotation" in values``."""
    names: set[str] = set()
    for func in ast.walk(_tree("dicomweb/render.py")):
        if isinstance(func, ast.FunctionDef) and func.name == "parse_render_params":
            for node in ast.walk(func):
                if isinstance(node, ast.Call):
                    callee = node.func
                    single = isinstance(callee, ast.Name) and callee.id == "_single"
                    get = (isinstance(callee, ast.Attribute) and callee.attr == "get"
                           and isinstance(callee.value, ast.Name) and callee.value.id == "values")
                    if single or get:
                        names |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
                elif (isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In)
                      and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str)):
                    names.add(node.left.value)
    return names


def _wado_uri_content_types() -> set[str]:
    """The media types ``rendered._wado_content_type`` produces (the tuple it matches against)."""
    for func in ast.walk(_tree("dicomweb/rendered.py")):
        if isinstance(func, ast.FunctionDef) and func.name == "_wado_content_type":
            for node in ast.walk(func):
                if isinstance(node, ast.Tuple) and any(isinstance(e, ast.Constant) and e.value == "application/dicom"
                                                       for e in node.elts):
                    return {e.value for e in node.elts if isinstance(e, ast.Constant)}
    raise AssertionError("rendered._wado_content_type no longer lists its media types in a tuple")


def test_viewer_query_parameters_are_the_codes(doc: dict[str, Any]) -> None:
    metadata = _compared_names("dicomweb/viewer.py", {"_metadata_media", "accept_params"})
    bulk = _compared_names("dicomweb/viewer.py", {"accept_params"})
    rendering = _render_parameter_names()
    assert metadata == {"accept", "charset"} and bulk == {"accept"}, "the extraction needs to follow the code"
    assert {"quality", "viewport", "window", "annotation", "iccprofile", "accept"} <= rendering
    # charset: a mandatory parameter of the rendered resources (PS3.18 8.3.5.1), accepted and ignored
    expected = {"metadata": metadata, "frames": bulk, "pixeldata": bulk, "bulkdata": bulk, "bulkdata-all": bulk,
                "rendered": rendering | {"charset"}, "thumbnail": rendering | {"charset"}}
    for path, item, op in _viewer_operations(doc):
        query = {p["name"] for p in _parameters(doc, item, op) if p["in"] == "query"}
        assert query == expected[_viewer_kind(path)], path


def test_viewer_headers_and_path_parameters(doc: dict[str, Any]) -> None:
    for path, item, op in _viewer_operations(doc):
        kind = _viewer_kind(path)
        params = _parameters(doc, item, op)
        headers = {p["name"]: p for p in params if p["in"] == "header"}
        assert {"Accept", "If-None-Match", "X-Request-ID"} <= set(headers), path
        # Range and If-Range on the Bulkdata resource of one value, and on nothing else
        ranged = {"Range", "If-Range"}
        assert (ranged <= set(headers)) if kind == "bulkdata" else not ranged & set(headers), path
        assert ("Accept-Encoding" in headers) == (kind == "metadata"), path
        accept = squash(headers["Accept"]["description"])
        if kind == "metadata":
            phrases = ["application/dicom+json", "application/json", "application/dicom+xml", "406"]
        elif kind in ("rendered", "thumbnail"):
            phrases = [f"`{t}`" for t in render.RENDERED_MEDIA_TYPES] + ["400", "406"]
        else:
            phrases = ['type="application/octet-stream"', negotiation.EXPLICIT_VR_LE, "`*`"]
            phrases += [f"`{t}` (default {syntaxes[0]}" for t, syntaxes in negotiation.PART_TYPE_SYNTAXES.items()]
        for phrase in phrases:
            assert phrase in accept, f"{path}: Accept description lacks {phrase}"
        frames = {p["name"]: p for p in params if p["in"] == "path"}.get("frames")
        if kind == "frames":
            assert frames is not None and frames["schema"]["pattern"] == viewer._FRAME_LIST.pattern, path
        elif frames is not None:  # the rendered and thumbnail frame resources take one frame
            assert re.fullmatch(frames["schema"]["pattern"], "7") and not re.fullmatch(frames["schema"]["pattern"], "1,2")
            assert viewer._FRAME_LIST.pattern in frames["description"], path


def test_bulk_data_path_pattern_agrees_with_the_parser(doc: dict[str, Any]) -> None:
    pattern = doc["components"]["parameters"]["bulkdataPath"]["schema"]["pattern"]
    for good in ("7FE00010", "7fe00010", "00540016/0/00181072", "00540016/12/00400275/0/00081150"):
        assert re.fullmatch(pattern, good), good
        assert viewer.format_tag_path(viewer.parse_tag_path(good)) == good.upper()
    for bad in ("7FE0001", "00540016/0", "00540016/01/00181072", "00540016/x/00181072", "7FE00010/"):
        assert not re.fullmatch(pattern, bad), bad
        if not bad.endswith("/"):  # the parser forgives a trailing slash; the documented form has none
            with pytest.raises(HttpProblem):
                viewer.parse_tag_path(bad)


def test_viewer_responses(doc: dict[str, Any]) -> None:
    bulk_media = {"multipart/related", negotiation.OCTET_STREAM, *negotiation.PART_TYPE_SYNTAXES}
    images = set(render.RENDERED_MEDIA_TYPES)
    ops = _viewer_operations(doc)
    assert len(ops) == 2 * len(VIEWER_SUFFIXES)
    for path, _item, op in ops:
        kind, level = _viewer_kind(path), _viewer_level(path)
        responses = op["responses"]
        one_instance = level == "instance"
        expected = {"200", "400", "403", "404", "406", "500", "502", "503", "504"}
        if one_instance or kind == "metadata":
            expected.add("304")
        if kind == "bulkdata":
            expected |= {"206", "416"}
        if kind in ("rendered", "thumbnail"):
            expected.add("422")
        if kind == "metadata" and level == "study":
            expected.add("413")  # the revalidation lists the study's instances, which may fan out
        assert expected <= set(responses), f"{path}: {sorted(expected - set(responses))}"
        # and not where the code cannot send them
        assert ("206" in responses) == ("416" in responses) == (kind == "bulkdata"), path
        assert ("422" in responses) == (kind in ("rendered", "thumbnail")), path
        assert ("304" in responses) == ("304" in expected), path
        ok = _resolve(doc, responses["200"])
        media = {
            "metadata": {"application/dicom+json", "application/json"}, "frames": bulk_media,
            "bulkdata": bulk_media, "pixeldata": {"multipart/related"}, "bulkdata-all": {"multipart/related"},
            "thumbnail": images, "rendered": images if one_instance else {"multipart/related"},
        }[kind]
        assert set(ok["content"]) == media, path
        headers = set(ok.get("headers", {}))
        assert "Cache-Control" in headers, path
        if one_instance or (kind == "metadata" and level == "series"):
            assert {"ETag", "Vary"} <= headers, path
        elif kind in ("pixeldata", "bulkdata-all"):  # streamed, `private, no-cache`
            assert "ETag" not in headers, path
        if kind == "bulkdata-all":  # multipart only, no Range: the parts carry the Content-Location
            assert not {"Accept-Ranges", "Content-Location"} & headers, path
            assert "BulkDataURI" in ok["description"] and "Content-Location" in ok["description"], path
        if kind == "metadata":
            assert "Content-Encoding" in headers, path
        if kind == "bulkdata":
            assert {"Accept-Ranges", "Content-Location"} <= headers, path
            assert "Content-Range" in _resolve(doc, responses["206"])["headers"], path
            assert "Content-Range" in _resolve(doc, responses["416"])["headers"], path
        if kind == "rendered" and one_instance:
            assert "Warning" in headers, f"{path}: the annotation Warning"
        if "304" in responses:
            not_modified = _resolve(doc, responses["304"])
            assert "content" not in not_modified and "ETag" in not_modified["headers"], path
        assert_every_response_names_its_request(doc, path, responses)


def test_every_status_the_code_sets_is_a_viewer_response(doc: dict[str, Any]) -> None:
    statuses, retry_after = statuses_set_in("problems.py", "app.py", "dicomweb/viewer.py", "dicomweb/rendered.py",
                                            "dicomweb/negotiation.py", "dicomweb/qido.py")
    assert {400, 404, 406, 416, 422, 502, 503, 504} <= statuses and 503 in retry_after
    documented: set[str] = set()
    for _path, _item, op in _viewer_operations(doc) + _wado_uri_operations(doc):
        documented |= set(op["responses"])
    assert sorted(str(s) for s in statuses if str(s) not in documented) == []
    # the statuses only one module sets are on the operations that module answers
    viewer_only, _ = statuses_set_in("dicomweb/viewer.py")
    rendered_only, _ = statuses_set_in("dicomweb/rendered.py")
    ranged = {416}  # only the Bulkdata resource of one value reads Range (``_byte_range``)
    reaching = _callers_of("dicomweb/viewer.py", "_byte_range")
    assert ranged <= viewer_only and "bulkdata" in reaching and not {"pixeldata", "all_bulkdata"} & reaching
    for path, _item, op in _viewer_operations(doc):
        kind = _viewer_kind(path)
        if kind == "bulkdata":
            assert {str(s) for s in viewer_only} <= set(op["responses"]), path
        if kind in ("pixeldata", "bulkdata-all"):
            assert {str(s) for s in viewer_only - ranged} <= set(op["responses"]), path
            assert not {str(s) for s in ranged} & set(op["responses"]), path
        if kind in ("rendered", "thumbnail"):
            assert {str(s) for s in rendered_only} <= set(op["responses"]), path


def test_wado_uri_operations(doc: dict[str, Any]) -> None:
    ops = _wado_uri_operations(doc)
    assert len(ops) == 2
    content_types = _wado_uri_content_types()
    assert {"application/dicom", "image/jpeg"} <= content_types
    for path, item, op in ops:
        params = {p["name"]: p for p in _parameters(doc, item, op) if p["in"] == "query"}
        assert set(params) == set(rendered._WADO_URI_KNOWN), path
        for name in ("studyUID", "seriesUID", "objectUID"):
            assert params[name]["schema"]["pattern"] == rendered._UID.pattern, name
            assert params[name]["description"].startswith("Required"), name
        assert params["requestType"]["schema"]["enum"] == ["WADO"]
        responses = op["responses"]
        for status in ("200", "304", "400", "403", "404", "406", "422", "500", "502", "503", "504"):
            assert status in responses, f"{path}: {status}"
        ok = _resolve(doc, responses["200"])
        assert set(ok["content"]) == content_types, path
        assert {"ETag", "Cache-Control"} <= set(ok["headers"]), path


def _warning_literals(relative: str) -> list[str]:
    """The literal texts passed to ``warning_value`` in a module."""
    tree = _tree(relative)
    constants = _constants(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "warning_value":
            if len(node.args) > 1:
                found += _phrases(node.args[1], constants)
    return [p.strip() for p in found if p.strip()]


def test_viewer_facts_in_the_conformance_statement(conformance: str) -> None:
    text = squash(conformance)
    w, c = WadoSettings(), CacheSettings()
    node = NodeSettings(name="n", ae_title="A", host="h", port=104)
    for phrase in (
        f"`wado.bulk_threshold` (default {w.bulk_threshold} bytes",
        f"`wado.max_age` defaults to {w.max_age} s",
        f"`cache.max_mb` (default {c.max_mb:g}, MB",
        f"`cache.ttl` (default {c.ttl:g} s)",
        f'`nodes.prefetch = "{node.prefetch}"` (the default)',
        f"at most {viewer.MAX_FRAMES_PER_REQUEST} per request",
        f"`{viewer._FRAME_LIST.pattern}`",
        f"**{render.THUMBNAIL_SIZE} x {render.THUMBNAIL_SIZE}**",
        f"{render.DEFAULT_QUALITY} when absent",
        f"to fit `vw` x `vh` (1-{render.MAX_VIEWPORT})",
        "`transcode.PASS_THROUGH_SYNTAXES`",
    ):
        assert phrase in text, phrase
    for mode in config_module.PREFETCH_MODES:
        assert f'`nodes.prefetch = "{mode}"`' in text, mode
    section = squash(_section(conformance, "### 4.12"))
    for part_type, syntaxes in negotiation.PART_TYPE_SYNTAXES.items():
        assert f'type="{part_type}"` (`{syntaxes[0]}` by default' in section, part_type
    # the Cache-Control values the code sends
    ctx = viewer.ViewerContext(None, None, "", False, w.bulk_threshold, 12345, 1.0)  # type: ignore[arg-type]
    assert viewer.cache_headers(ctx, '"e"')["Cache-Control"] == "private, max-age=12345, immutable"
    assert "`private, max-age=<wado.max_age>, immutable`" in text
    revalidated = viewer.cache_headers(ctx, '"e"', immutable=False)["Cache-Control"]
    assert revalidated == "private, no-cache" and f"`{revalidated}`" in text
    # the Warning texts of the rendered resources and WADO-URI
    annotation = render.annotation_warning(render.RenderParams(ignored_annotation=("XYZ",)))
    assert annotation is not None and f"`{annotation.replace('XYZ', '<values>')}`" in text
    literals = _warning_literals("dicomweb/rendered.py")
    assert literals, "the extraction needs to follow the code"
    for literal in literals:
        assert f"`{literal}" in text, literal
    # CORS: what the code allows and exposes
    cors = _section(conformance, "### 4.18")
    for header in (*app_module.CORS_REQUEST_HEADERS, *app_module.CORS_EXPOSED_HEADERS):
        assert f"`{header}`" in cors, header
    assert "`auth.api_key_header`" in cors and "`Access-Control-Max-Age: 600`" in cors
    assert "max_age=600" in (PACKAGE / "app.py").read_text(encoding="utf-8")


def test_readme_shows_a_viewer_on_another_origin() -> None:
    readme = README.read_text(encoding="utf-8")
    section = _chapter(readme, "## Viewer resources")
    assert 'cors_origins = ["https://viewer.example.org"]' in section
    assert config_module.ENV_PREFIX + "SERVER_CORS_ORIGINS=" in section
    settings = load_settings(data={"nodes": [NODE], "auth": {"enabled": False},
                                   "server": {"cors_origins": ["https://viewer.example.org"]}})
    assert settings.server.cors_origins == ("https://viewer.example.org",)
    for name in ("cache.max_mb", "cache.ttl", "nodes.prefetch", "wado.max_age", "wado.bulk_threshold"):
        assert f"`{name}" in section, name


# ------------------------------------------------------------------------------------------------
# Facts in the conformance statement


def test_implementation_identity(conformance: str) -> None:
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in conformance
    assert f"`{IMPLEMENTATION_VERSION_NAME}`" in conformance
    assert f"| Version | {gateway.__version__} |" in conformance


def test_defaults_stated_in_the_conformance_statement(conformance: str) -> None:
    node = NodeSettings(name="n", ae_title="A", host="h", port=104)
    t, q = Timeouts(), QidoSettings()
    text = squash(conformance)
    for phrase in (
        f"`nodes.timeouts.connect` | {t.connect:g} s",
        f"`nodes.timeouts.acse` | {t.acse:g} s",
        f"`nodes.timeouts.dimse` | {t.dimse:g} s",
        f"`nodes.acquire_timeout` | {node.acquire_timeout:g} s",
        f"`nodes.max_associations` (1-256, default {node.max_associations})",
        f"`nodes.idle_timeout` (default {node.idle_timeout:g} s",
        f"`nodes.max_pdu` (default {node.max_pdu}",
        f"`nodes.retries` times (0-5, default {node.retries})",
        f"`nodes.breaker_threshold` (0-1000, default {node.breaker_threshold}; 0 disables it)",
        f"After `nodes.breaker_cooldown` (default {node.breaker_cooldown:g} s)",
        f"`qido.max_results`, default {q.max_results}",
        f"`qido.fanout_max_parents` (default {q.fanout_max_parents})",
        f"`qido.fanout_concurrency` (default {q.fanout_concurrency})",
    ):
        assert phrase in text, phrase
    assert q.empty_status == 200 and "`qido.empty_status = 204`" in text


def _row(section: str, first_cell: str) -> list[str]:
    rows = [cells for cells in _markdown_rows(section) if cells[0] == first_cell]
    assert len(rows) == 1, f"one row {first_cell!r} expected"
    return rows[0]


def test_level_table_is_the_codes(conformance: str) -> None:
    section = _section(conformance, "### 3.3")
    kw = attributes.keyword_of
    for label, tags in (("Patient", attributes.PATIENT_KEYS), ("Study", attributes.STUDY_KEYS),
                        ("Series", attributes.SERIES_KEYS), ("any level", attributes.ANY_LEVEL_KEYS)):
        assert _keywords(_row(section, label)[1]) == {kw(t) for t in tags}, label


def test_default_and_includefield_all_attributes_are_the_codes(conformance: str) -> None:
    section = _section(conformance, "### 3.8")
    kw = attributes.keyword_of
    Level = attributes.Level
    for label, level in (("Study", Level.STUDY), ("Series", Level.SERIES), ("Instance", Level.IMAGE)):
        cells = _row(section, label)
        defaults = {kw(t) for t in attributes.DEFAULTS[level]} | {"RetrieveURL"}
        for tag in attributes.DEFAULTS[level]:
            defaults |= {kw(t) for t in attributes.SEQUENCE_DEFAULT_ITEMS.get(tag, ())}
        assert _keywords(cells[1]) == defaults, label
        assert _keywords(cells[2]) == {kw(t) for t in attributes.ALL_EXTRA[level]}, label


def _uids(text: str) -> list[str]:
    return re.findall(r"`(\d+(?:\.\d+)+)`", text)


def _listed(values: Any) -> str:
    return ", ".join(f"`{v}`" for v in values)


def test_wado_defaults_stated_in_the_conformance_statement(conformance: str) -> None:
    text = squash(conformance)
    g = GatewaySettings()
    assert f"`wado.stall_timeout` (default {WadoSettings().stall_timeout:g} s)" in text
    assert f"`gateway.move_host`:`gateway.move_port` (default {g.move_host}:{g.move_port}" in text
    for uid in (retrieve.STUDY_ROOT_GET, retrieve.STUDY_ROOT_MOVE):
        assert uid in _chapter(conformance, "## 2. DIMSE networking") and uid in _chapter(conformance, "## 4. WADO-RS")


def test_transfer_syntax_table_is_the_codes(conformance: str) -> None:
    section = _section(conformance, "### 4.3")
    rows = {}
    for cells in _markdown_rows(section):
        uids = _uids(cells[1]) if len(cells) == 5 else []
        if uids:
            rows[uids[0]] = cells
    expected = set(negotiation.SUPPORTED_TRANSFER_SYNTAXES) | set(transcode.PRODUCIBLE)
    assert set(rows) == expected
    for uid, (_name, _uid, named, produced, read) in rows.items():
        assert named.startswith("yes") == (uid in negotiation.SUPPORTED_TRANSFER_SYNTAXES), uid
        row = transcode.PRODUCIBLE.get(uid)
        assert produced.startswith("yes") == (row is not None and row.encoder != ""), uid
        assert read.startswith("yes") == (row is not None and row.decoder != ""), uid
        if row is not None and row.lossy == "always":
            assert "always lossy" in produced, uid
        if row is not None and row.lossy == "if allowed":
            assert "when lossy is allowed" in produced and "otherwise" in produced, uid
    for uid in negotiation.NEVER_ON_THE_WEB:
        assert rows[uid][2].startswith("no (ignored") and rows[uid][3].startswith("no, never sent"), uid
    assert negotiation.EXPLICIT_VR_LE in rows and "(the default)" in rows[negotiation.EXPLICIT_VR_LE][2]
    text = squash(section)
    assert _listed(transcode.PASS_THROUGH_SYNTAXES) in text, "the stored forms proposed for transfer-syntax=*"
    assert f"NEAR={transcode.JPEG_LS_NEAR}" in text and f"{transcode.JPEG_2000_RATIO:g}:1" in text
    assert f"quality {transcode.JPEG_BASELINE_QUALITY}" in text
    assert "even when the client ranked it below another syntax" in text
    assert "The SOP Instance UID is kept" in squash(conformance)


def test_storage_contexts_are_the_codes(conformance: str) -> None:
    section = _section(conformance, "### 4.5")
    listed = [u for cells in _markdown_rows(section) if len(cells) == 2 for u in _uids(cells[1])]
    assert sorted(listed) == sorted(CURATED_STORAGE_CLASSES) and len(set(listed)) == len(listed)
    text = squash(section)
    assert f"{len(CURATED_STORAGE_CLASSES)} classes" in text
    assert f"PS3.8 allows {retrieve.MAX_CONTEXTS} per association" in text
    assert f"do not fit in {retrieve.MAX_CONTEXTS - 1} contexts" in text
    assert f"More than {retrieve.MAX_CONTEXTS - 1} storage classes" in text
    assert "SCU role no, SCP role yes" in text


def _receiver_limits() -> dict[str, Any]:
    """The receiver's fixed limits (read without building it)."""
    return {
        "max_pdu": inspect.signature(receiver.MoveReceiver).parameters["max_pdu"].default,
        "maximum_associations": receiver.MAX_INBOUND,
    }


def test_move_receiver_is_the_codes(conformance: str) -> None:
    section = squash(_section(conformance, "### 4.6"))
    limits = _receiver_limits()
    assert f"At most **{limits['maximum_associations']}** associations in at once" in section
    assert f"Maximum PDU received: **{limits['max_pdu']}** bytes" in section
    assert f"at most {limits['maximum_associations']} at once" in squash(_chapter(conformance, "## 2. DIMSE"))
    assert _listed(receiver.RECEIVE_SYNTAXES) in section, "the receiver's transfer syntaxes, in order"
    assert f"refused with `{receiver.REFUSED:04X}`" in section
    assert "Move Originator Message ID" in section


# ------------------------------------------------------------------------------------------------
# README


def test_every_setting_is_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    missing = [
        f"{section}.{key}"
        for section, keys in settings_schema().items()
        for key in keys
        if f"`{section}.{key}`" not in readme
    ]
    assert missing == [], f"settings missing from README.md's table: {missing}"
