"""The auth matrix against a real gateway process: an OpenID provider on loopback (discovery
document and JWKS served by a thread, keys made with ``cryptography``, tokens signed with PyJWT), the
gateway in front of the session's demo PACS (``demo``, read) and an empty demo PACS (``vault``, for
STOW-RS), with authentication on.

The gateway finds the JWKS by OpenID Connect discovery (no ``auth.jwks_url``) and may fetch it again
after 1 s (``auth.jwks_min_refresh``), so the key rotation test waits about a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydicom.dataset import Dataset

from gateway.auth import hash_api_key
from gateway.demo.pacs import DemoPACS
from tests.integration.stow_support import MULTIPART, fresh_copy, multipart_body, p10_bytes
from tests.support.gatewayproc import GatewayProcess, to_toml

AUDIENCE = "dicomweb-gateway"
GATEWAY_AE = "DICOMWEB-GW"
READ_KEY = "ai-pipeline-" + "r" * 40
JSON = {"Accept": "application/dicom+json"}
REFRESH = 1.0  # auth.jwks_min_refresh of the gateway under test


class IdentityProvider:
    """A tiny OpenID provider: ``/.well-known/openid-configuration`` and the JWKS it points to.
    ``publish`` adds a key to the JWKS; every JWKS fetch is counted with its time."""

    def __init__(self) -> None:
        self.private: dict[str, tuple[Any, str]] = {}  # kid -> (private key, alg)
        self.published: list[str] = []
        self.fetches: list[float] = []
        self.issued: list[str] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body: dict[str, Any]
                if self.path == "/realms/test/.well-known/openid-configuration":
                    body = {"issuer": provider.issuer, "jwks_uri": provider.issuer + "/certs"}
                elif self.path == "/realms/test/certs":
                    provider.fetches.append(time.monotonic())
                    body = {"keys": [provider.jwk(kid) for kid in list(provider.published)]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}/realms/test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def make_key(self, kid: str, kind: str = "RSA") -> None:
        if kind == "RSA":
            self.private[kid] = (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
        else:
            self.private[kid] = (ec.generate_private_key(ec.SECP256R1()), "ES256")

    def publish(self, kid: str) -> None:
        self.published.append(kid)

    def jwk(self, kid: str) -> dict[str, Any]:
        key, alg = self.private[kid]
        algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
        return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": alg}

    def token(self, kid: str = "main", **claims: Any) -> str:
        """A token signed with ``kid``'s key; claims given as None are left out."""
        key, alg = self.private[kid]
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": AUDIENCE, "sub": "radiologist-7", "iat": now, "exp": now + 300,
                   "scope": "openid dicomweb.read", "dicomweb_nodes": ["demo"], **claims}
        encoded = jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg,
                             headers={"kid": kid})
        self.issued.append(encoded)
        return encoded

    def __enter__(self) -> "IdentityProvider":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        provider.make_key("main")
        provider.make_key("second", "EC")
        provider.make_key("forger")  # never published
        provider.publish("main")
        provider.publish("second")
        yield provider


@pytest.fixture(scope="module")
def vault() -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="AUTH-VAULT", datasets=[]) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def gw(idp: IdentityProvider, vault: DemoPACS, demo_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    settings = {
        "gateway": {"ae_title": GATEWAY_AE},
        "auth": {
            "issuer": idp.issuer, "audience": [AUDIENCE], "jwks_min_refresh": REFRESH,
            "api_keys": [{"name": "ai-pipeline", "hash": hash_api_key(READ_KEY), "scopes": ["dicomweb.read"],
                          "nodes": ["demo"]}],
            "grants": [{"claim": "groups", "value": "uploaders", "nodes": ["vault"]}],
        },
        "nodes": [
            {"name": "demo", "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": demo_pacs.port, "default": True},
            {"name": "vault", "ae_title": "AUTH-VAULT", "host": "127.0.0.1", "port": vault.port},
        ],
    }
    with GatewayProcess(settings) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def study_count(studies: list[Dataset]) -> int:
    return len({d.StudyInstanceUID for d in studies})


# ------------------------------------------------------------------------------------------------
# 401


def test_no_credentials_is_401_with_a_challenge(gw: GatewayProcess, http: httpx.Client) -> None:
    r = http.get(gw.url(None, "/studies"), headers=JSON)
    assert r.status_code == 401
    assert r.headers.get_list("www-authenticate") == [
        'Bearer realm="dicomweb-gateway"', 'ApiKey realm="dicomweb-gateway", header="X-API-Key"']
    body = r.json()
    assert body["error"] == "unauthorized" and body["requestId"] == r.headers["x-request-id"]


BAD_TOKENS = {
    "malformed": (lambda idp: "not-a-jwt", "not a JWT"),
    "three-parts-of-junk": (lambda idp: "eyJhbGciOiJSUzI1NiIsImtpZCI6Im1haW4ifQ.!!!.c2ln", "not a JWT"),
    "forged-signature": (lambda idp: _forged(idp), "signature does not verify"),
    "key-not-in-jwks": (lambda idp: idp.token("forger"), "not one of the issuer's keys"),
    "wrong-issuer": (lambda idp: idp.token(iss="http://127.0.0.1:1/realms/evil"), "issuer"),
    "wrong-audience": (lambda idp: idp.token(aud="another-app"), "audience"),
    "expired": (lambda idp: idp.token(exp=int(time.time()) - 120, iat=int(time.time()) - 600), "expired"),
    "not-yet-valid": (lambda idp: idp.token(nbf=int(time.time()) + 120), "not valid yet"),
    "no-expiry": (lambda idp: idp.token(exp=None), "no exp claim"),
    "alg-none": (lambda idp: jwt.encode({"iss": idp.issuer, "aud": AUDIENCE, "exp": int(time.time()) + 300}, "",
                                        algorithm="none", headers={"kid": "main"}), "algorithm is not accepted"),
}


def _forged(idp: IdentityProvider) -> str:
    """Signed with a key of the forger's, but naming the provider's kid."""
    key, alg = idp.private["forger"]
    now = int(time.time())
    payload = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "intruder", "iat": now, "exp": now + 300,
               "scope": "dicomweb.read dicomweb.write", "dicomweb_nodes": ["*"]}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": "main"})


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_token_is_401_invalid_token(case: str, gw: GatewayProcess, idp: IdentityProvider,
                                        http: httpx.Client) -> None:
    make, phrase = BAD_TOKENS[case]
    token = make(idp)
    r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(token)})
    assert r.status_code == 401, r.text
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="dicomweb-gateway", error="invalid_token", error_description="')
    assert phrase in r.json()["message"] and phrase in challenge
    assert token not in r.text and token not in challenge


def test_api_key_sent_as_bearer_is_401(gw: GatewayProcess, http: httpx.Client) -> None:
    r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(READ_KEY)})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert "X-API-Key" in r.json()["message"] and READ_KEY not in r.text


def test_wrong_api_key_is_401(gw: GatewayProcess, http: httpx.Client) -> None:
    for key in (READ_KEY[:-1] + "x", "", "short"):
        r = http.get(gw.url(None, "/studies"), headers={**JSON, "X-API-Key": key})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", key


# ------------------------------------------------------------------------------------------------
# 200 and 403


def test_valid_tokens_search_and_retrieve(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client,
                                          studies: list[Dataset]) -> None:
    for kid in ("main", "second"):  # RS256 and ES256
        r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(idp.token(kid))})
        assert r.status_code == 200, r.text
        assert len(r.json()) == study_count(studies)
    ds = studies[0]
    r = http.get(gw.url("demo", f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                                f"{ds.SOPInstanceUID}"),
                 headers={"Accept": "application/dicom", **bearer(idp.token(scope="dicomweb.read"))})
    assert r.status_code == 200 and r.content[128:132] == b"DICM"


def test_missing_scope_is_403(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client) -> None:
    for scope in ("openid profile", None, "dicomweb.write", "dicomweb.reader"):
        r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(idp.token(scope=scope))})
        assert r.status_code == 403, scope
        assert r.json()["error"] == "insufficient-scope" and "'dicomweb.read'" in r.json()["message"]
        assert r.headers["www-authenticate"] == \
            'Bearer realm="dicomweb-gateway", error="insufficient_scope", scope="dicomweb.read"'


def test_scopes_as_a_list_claim(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client) -> None:
    r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(idp.token(scope=["dicomweb.read"]))})
    assert r.status_code == 200


def stow_request(http: httpx.Client, gw: GatewayProcess, token: str, ds: Dataset) -> httpx.Response:
    return http.post(gw.url("vault", "/studies"), content=multipart_body([p10_bytes(ds)]),
                     headers={"Content-Type": MULTIPART, **JSON, **bearer(token)})


def test_read_token_on_stow_is_403_and_nothing_is_stored(gw: GatewayProcess, idp: IdentityProvider,
                                                          http: httpx.Client, vault: DemoPACS,
                                                          studies: list[Dataset]) -> None:
    ds = fresh_copy(studies[0])
    token = idp.token(scope="dicomweb.read", groups=["uploaders"])
    r = stow_request(http, gw, token, ds)
    assert r.status_code == 403 and r.json()["error"] == "insufficient-scope"
    assert r.headers["www-authenticate"] == \
        'Bearer realm="dicomweb-gateway", error="insufficient_scope", scope="dicomweb.write"'
    assert ds.SOPInstanceUID not in {h.SOPInstanceUID for h in vault.headers()}


def test_write_token_on_stow_stores(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client, vault: DemoPACS,
                                    studies: list[Dataset]) -> None:
    ds = fresh_copy(studies[0])
    token = idp.token(scope="dicomweb.write", dicomweb_nodes=None, groups=["staff", "uploaders"])
    r = stow_request(http, gw, token, ds)
    assert r.status_code == 200, r.text
    assert ds.SOPInstanceUID in {h.SOPInstanceUID for h in vault.headers()}
    # the same write token may not read, and the grant gives the vault only
    assert http.get(gw.url("vault", "/studies"), headers={**JSON, **bearer(token)}).status_code == 403
    r = stow_request(http, gw, idp.token(scope="dicomweb.write", dicomweb_nodes=["demo"]), fresh_copy(studies[0]))
    assert r.status_code == 403 and r.json()["error"] == "node-forbidden"


def test_node_not_allowed_is_403(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client) -> None:
    token = idp.token(dicomweb_nodes=["demo"])
    r = http.get(gw.url("vault", "/studies"), headers={**JSON, **bearer(token)})
    assert r.status_code == 403 and r.json()["error"] == "node-forbidden" and "'vault'" in r.json()["message"]
    assert http.get(gw.url("demo", "/studies"), headers={**JSON, **bearer(token)}).status_code == 200
    assert http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(token)}).status_code == 200  # default node
    r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(idp.token(dicomweb_nodes=["vault"]))})
    assert r.status_code == 403, "/dicom-web is the default node, demo"
    everywhere = idp.token(dicomweb_nodes="*")
    assert http.get(gw.url("vault", "/studies"), headers={**JSON, **bearer(everywhere)}).status_code == 200
    assert http.get(gw.url("nowhere", "/studies"), headers={**JSON, **bearer(everywhere)}).status_code == 404


def test_api_key(gw: GatewayProcess, http: httpx.Client, studies: list[Dataset]) -> None:
    r = http.get(gw.url(None, "/studies"), headers={**JSON, "X-API-Key": READ_KEY})
    assert r.status_code == 200 and len(r.json()) == study_count(studies)
    assert http.get(gw.url("vault", "/studies"), headers={**JSON, "X-API-Key": READ_KEY}).status_code == 403
    r = http.post(gw.url("demo", "/studies"), content=b"", headers={"X-API-Key": READ_KEY,
                                                                     "Content-Type": "application/dicom"})
    assert r.status_code == 403 and r.json()["error"] == "insufficient-scope"


def test_key_rotation_is_picked_up(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client) -> None:
    assert http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(idp.token())}).status_code == 200
    idp.make_key("rotated", "EC")
    idp.publish("rotated")
    before = len(idp.fetches)
    time.sleep(max(0.0, idp.fetches[-1] + REFRESH + 0.1 - time.monotonic()))  # past the refresh interval
    r = http.get(gw.url(None, "/studies"), headers={**JSON, **bearer(idp.token("rotated"))})
    assert r.status_code == 200, r.text
    assert len(idp.fetches) == before + 1
    for i in range(20):  # made-up kids right after: at most one more fetch, however many come
        forged = jwt.encode({"iss": idp.issuer}, idp.private["forger"][0], algorithm="RS256", headers={"kid": f"x{i}"})
        assert http.get(gw.url(None, "/studies"), headers=bearer(forged)).status_code == 401
    assert len(idp.fetches) <= before + 2


def test_open_and_closed_routes(gw: GatewayProcess, http: httpx.Client) -> None:
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert http.get(gw.base + path).status_code == 200, path
    assert http.get(gw.base + "/status").status_code == 401
    assert http.get(gw.base + "/status", headers={"X-API-Key": READ_KEY}).status_code in (200, 503)
    preflight = {"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET"}
    assert http.options(gw.url(None, "/studies"), headers=preflight).status_code != 401
    assert http.options(gw.url(None, "/studies")).status_code == 401


def test_the_log_holds_no_credentials(gw: GatewayProcess, idp: IdentityProvider, http: httpx.Client) -> None:
    http.get(gw.url(None, "/studies"), headers=bearer(idp.token(exp=int(time.time()) - 3600)))
    log = gw.log_text()
    assert "401 unauthorized: the token has expired" in log
    assert "403 node-forbidden" in log and "403 insufficient-scope" in log
    assert idp.issued and READ_KEY not in log
    for token in idp.issued:
        assert token not in log and token.split(".")[2] not in log
    assert "radiologist-7" not in log, "who asked belongs to the audit log"


# ------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_serve_refuses_to_start_without_anything_to_authenticate_with(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml({"nodes": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]}))
    result = run_cli("serve", "--config", str(config))  # check-config shares the loading
    assert result.returncode == 2, result.stderr
    assert "invalid configuration: auth:" in result.stderr and "auth.enabled = false" in result.stderr
    assert "Traceback" not in result.stderr


def test_hash_key_command_output_is_accepted_by_a_gateway(tmp_path: Path) -> None:
    key = "service-" + "s" * 40
    result = run_cli("hash-key", stdin=key + "\n")
    assert result.returncode == 0 and result.stdout.strip() == hash_api_key(key) and key not in result.stdout
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml({"auth": {"api_keys": [{"name": "svc", "hash": result.stdout.strip()}]},
                               "nodes": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]}))
    assert run_cli("check-config", "--config", str(config)).returncode == 0  # short keys: tests/unit/test_auth.py
