"""gateway/auth.py and gateway/audit.py without sockets: the [auth] and [audit] settings, token
verification, the JWKS cache (its fetches counted on a clock the test turns), the middleware driven
in process, and the audit record's pieces (client address, UIDs, RFC 5424 framing)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway import cli
from gateway.audit import AuditLog, AuditMiddleware, TlsSyslogHandler, client_address, note_instances
from gateway.auth import (
    ANONYMOUS,
    IDENTITY_KEY,
    AuthMiddleware,
    Authenticator,
    InvalidToken,
    JwksCache,
    KeysUnavailable,
    claim,
    claim_values,
    hash_api_key,
    parse_jwks,
    route_node,
)
from gateway.config import AuditSettings, AuthSettings, ConfigError, Settings, load_settings
from gateway.middleware import RequestContextMiddleware

ISSUER = "https://idp.example.org/realms/hospital"
AUDIENCE = "dicomweb-gateway"
NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "10.1.2.3", "port": 104}
NODES = [{**NODE, "default": True}, {**NODE, "name": "research"}]
API_KEY = "k" * 40
STUDY, SERIES, INSTANCE = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"




def settings_with(auth: dict[str, Any] | None = None, **sections: Any) -> Settings:
    data: dict[str, Any] = {"nodes": NODES, **sections}
    if auth is not None:
        data["auth"] = auth
    return load_settings(data=data)


def config_error(auth: dict[str, Any] | None = None, **sections: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings_with(auth, **sections)
    return info.value


JWT_AUTH = {"issuer": ISSUER, "audience": [AUDIENCE], "jwks_url": ISSUER + "/certs"}


# ------------------------------------------------------------------------------------------------
# Settings


class TestSettings:
    def test_auth_is_on_by_default_and_refuses_to_start_with_nothing_to_check(self) -> None:
        err = config_error()
        assert err.setting == "auth"
        for hint in ("auth.issuer", "auth.audience", "[[auth.api_keys]]", "hash-key", "auth.enabled = false"):
            assert hint in err.problem, hint

    def test_off_only_when_said(self) -> None:
        assert settings_with({"enabled": False}).auth.enabled is False
        assert settings_with(JWT_AUTH).auth.enabled is True

    def test_defaults(self) -> None:
        a = settings_with(JWT_AUTH).auth
        assert (a.scope_claim, a.read_scope, a.write_scope, a.nodes_claim) == (
            "scope", "dicomweb.read", "dicomweb.write", "dicomweb_nodes")
        assert a.api_key_header == "X-API-Key" and a.leeway == 30.0
        assert set(a.algorithms) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                                     "EdDSA"}
        assert a.open_paths == ("/metrics", "/openapi.json")
        audit = settings_with(JWT_AUTH).audit
        assert (audit.enabled, audit.path, audit.include_query, audit.syslog_port) == (True, "-", True, 6514)

    def test_issuer_needs_an_audience(self) -> None:
        err = config_error({"issuer": ISSUER})
        assert err.setting == "auth.audience" and "any other application" in err.problem

    def test_jwks_url_needs_an_issuer(self) -> None:
        assert config_error({"jwks_url": ISSUER + "/certs", "audience": ["x"]}).setting == "auth.issuer"

    @pytest.mark.parametrize("url", ["http://idp.example.org/certs", "ftp://idp.example.org/certs", "certs"])
    def test_keys_come_over_https(self, url: str) -> None:
        assert config_error({**JWT_AUTH, "jwks_url": url}).setting == "auth.jwks_url"

    def test_http_is_allowed_to_loopback(self) -> None:
        for url in ("http://127.0.0.1:8081/certs", "http://localhost/certs", "http://[::1]:80/certs"):
            assert settings_with({**JWT_AUTH, "jwks_url": url}).auth.jwks_url == url

    def test_discovery_url_is_checked_when_there_is_no_jwks_url(self) -> None:
        err = config_error({"issuer": "http://idp.example.org", "audience": ["x"]})
        assert err.setting == "auth.issuer" and "https" in err.problem

    @pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "rs256"])
    def test_only_asymmetric_algorithms(self, alg: str) -> None:
        err = config_error({**JWT_AUTH, "algorithms": ["RS256", alg]})
        assert err.setting == "auth.algorithms" and alg in err.problem

    @pytest.mark.parametrize("header", ["Authorization", "authorization", "Cookie", "X API Key", ""])
    def test_api_key_header_is_its_own(self, header: str) -> None:
        assert config_error({**JWT_AUTH, "api_key_header": header}).setting == "auth.api_key_header"

    @pytest.mark.parametrize("path", ["/dicom-web", "/dicom-web/studies", "/nodes/pacs/dicom-web/studies", "/wado",
                                      "metrics"])
    def test_patient_data_routes_cannot_be_opened(self, path: str) -> None:
        assert config_error({**JWT_AUTH, "open_paths": [path]}).setting == "auth.open_paths[0]"

    def test_api_keys(self) -> None:
        key = {"name": "ai-pipeline", "hash": hash_api_key(API_KEY), "scopes": ["dicomweb.read"], "nodes": ["pacs"]}
        (k,) = settings_with({"api_keys": [key]}).auth.api_keys
        assert (k.name, k.hash, k.scopes, k.nodes) == ("ai-pipeline", hash_api_key(API_KEY), ("dicomweb.read",),
                                                       ("pacs",))

    @pytest.mark.parametrize(("change", "setting", "phrase"), [
        ({"hash": API_KEY}, "auth.api_keys[0].hash", "never the key itself"),
        ({"hash": "sha256:abc"}, "auth.api_keys[0].hash", "64 hex digits"),
        ({"name": " "}, "auth.api_keys[0].name", "audit log"),
        ({"nodes": ["pacs", "nowhere"]}, "auth.api_keys[0].nodes", "'nowhere'"),
    ])
    def test_api_key_errors(self, change: dict[str, Any], setting: str, phrase: str) -> None:
        key = {"name": "a", "hash": hash_api_key(API_KEY), **change}
        err = config_error({"api_keys": [key]})
        assert err.setting == setting and phrase in err.problem

    def test_api_key_duplicates(self) -> None:
        key = {"name": "a", "hash": hash_api_key(API_KEY)}
        assert config_error({"api_keys": [key, key]}).setting == "auth.api_keys[1].name"
        assert config_error({"api_keys": [key, {**key, "name": "b"}]}).setting == "auth.api_keys[1].hash"

    def test_api_key_without_name_or_hash(self) -> None:
        assert config_error({"api_keys": [{"name": "a"}]}).setting == "auth.api_keys[0].hash"

    def test_api_keys_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        keys = [{"name": "svc", "hash": hash_api_key(API_KEY), "scopes": ["dicomweb.write"], "nodes": ["*"]}]
        monkeypatch.setenv("DWG_AUTH_API_KEYS", json.dumps(keys))
        monkeypatch.setenv("DWG_AUTH_READ_SCOPE", "pacs:read")
        a = settings_with({}).auth
        assert [k.name for k in a.api_keys] == ["svc"] and a.api_keys[0].nodes == ("*",)
        assert a.read_scope == "pacs:read"
        monkeypatch.setenv("DWG_AUTH_API_KEYS", "{not json")
        assert config_error({}).setting == "DWG_AUTH_API_KEYS"

    def test_grants_and_token_nodes_name_configured_nodes(self) -> None:
        s = settings_with({**JWT_AUTH, "token_nodes": ["pacs"],
                           "grants": [{"claim": "groups", "value": "research", "nodes": ["research"]}]})
        assert s.auth.grants[0].nodes == ("research",) and s.auth.token_nodes == ("pacs",)
        assert config_error({**JWT_AUTH, "token_nodes": ["typo"]}).setting == "auth.token_nodes"
        err = config_error({**JWT_AUTH, "grants": [{"claim": "groups", "value": "x", "nodes": ["typo"]}]})
        assert err.setting == "auth.grants[0].nodes"

    def test_timing_settings(self) -> None:
        assert config_error({**JWT_AUTH, "leeway": 301}).setting == "auth.leeway"
        assert config_error({**JWT_AUTH, "jwks_ttl": 0}).setting == "auth.jwks_ttl"
        assert config_error({**JWT_AUTH, "jwks_ttl": 60, "jwks_min_refresh": 61}).setting == "auth.jwks_min_refresh"

    def test_audit_settings(self, tmp_path: Path) -> None:
        s = settings_with({"enabled": False}, audit={"path": str(tmp_path / "audit.jsonl"), "include_query": False})
        assert s.audit.path.endswith("audit.jsonl") and s.audit.include_query is False
        assert config_error({"enabled": False}, audit={"path": "/nonexistent/dir/audit.jsonl"}).setting == "audit.path"
        assert config_error({"enabled": False}, audit={"path": ""}).setting == "audit.path"
        err = config_error({"enabled": False}, audit={"syslog_host": "atna.example.org", "syslog_port": 0})
        assert err.setting == "audit.syslog_port"
        ca = tmp_path / "ca.pem"
        ca.write_text("x")
        err = config_error({"enabled": False}, audit={"syslog_host": "h", "syslog_cert_file": str(ca)})
        assert err.setting == "audit" and "go together" in err.problem


def test_hash_key_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.hash_key(io.StringIO(API_KEY + "\n")) == 0
    out = capsys.readouterr().out.strip()
    assert out == "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest() == hash_api_key(API_KEY)
    assert cli.hash_key(io.StringIO("short-key\n")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "at least 32" in captured.err and "short-key" not in captured.err


# ------------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize(("path", "node"), [
    ("/dicom-web/studies", "pacs"), ("/dicom-web", "pacs"), ("/dicom-web/", "pacs"), ("/wado", "pacs"),
    ("/nodes/research/dicom-web/studies/1.2/series", "research"), ("/nodes/x/wado", "x"),
    ("/dicom-webx", None), ("/health", None), ("/status", None), ("/nodes/research", None), ("//dicom-web", None),
    ("/metrics", None),
])
def test_route_node(path: str, node: str | None) -> None:
    assert route_node(path, "pacs") == node


def test_claims() -> None:
    payload = {"scope": "openid dicomweb.read  dicomweb.write", "scp": ["a", "b"], "realm_access": {"roles": ["r"]},
               "flag": True, "n": 3}
    assert claim_values(claim(payload, "scope")) == ["openid", "dicomweb.read", "dicomweb.write"]
    assert claim_values(claim(payload, "scp")) == ["a", "b"]
    assert claim_values(claim(payload, "realm_access.roles")) == ["r"]
    assert claim_values(claim(payload, "missing")) == [] and claim(payload, "realm_access.nope") is None
    assert claim_values("pacs,research x", r"[\s,]+") == ["pacs", "research", "x"]
    assert claim_values(True) == ["true"] and claim_values(3) == ["3"] and claim_values({"a": 1}) == []


# ------------------------------------------------------------------------------------------------
# Keys and tokens


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    return {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, "use": "sig", **extra}


RSA_KEY = rsa_key()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa_key()


def token(key: Any = RSA_KEY, kid: str | None = "rsa", alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300,
               "scope": "dicomweb.read", **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


class FakeIdP:
    """The identity provider's answers, without a socket: what ``fetch_json`` would read."""

    def __init__(self, *jwks: dict[str, Any]) -> None:
        self.keys = list(jwks)
        self.urls: list[str] = []
        self.fail = False
        self.discovery: dict[str, Any] = {"issuer": ISSUER, "jwks_uri": ISSUER + "/certs"}

    async def fetch(self, url: str) -> Any:
        self.urls.append(url)
        if self.fail:
            raise httpx.ConnectError("refused")
        if url.endswith("/.well-known/openid-configuration"):
            return self.discovery
        return {"keys": self.keys}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def authenticator(idp: FakeIdP, clock: Clock | None = None, **auth: Any) -> Authenticator:
    settings = AuthSettings(**{**JWT_AUTH, "audience": (AUDIENCE,), **auth})
    return Authenticator(settings, JwksCache(settings, idp.fetch, clock or Clock()))


def verify(auth: Authenticator, tok: str) -> dict[str, Any]:
    return anyio.run(auth.verify, tok)


class TestTokens:
    idp = FakeIdP(public_jwk(RSA_KEY, "rsa"), public_jwk(EC_KEY, "ec"))

    def test_valid_rs256_and_es256(self) -> None:
        auth = authenticator(self.idp)
        assert verify(auth, token())["sub"] == "user-1"
        assert verify(auth, token(EC_KEY, "ec", "ES256"))["sub"] == "user-1"

    # times as offsets from the moment the test runs (collection can be minutes earlier)
    @pytest.mark.parametrize(("claims", "message"), [
        ({"exp": ("now", -120)}, "expired"),
        ({"nbf": ("now", 120)}, "not valid yet"),
        ({"iss": "https://evil.example.org"}, "issuer"),
        ({"aud": "another-app"}, "audience"),
        ({"exp": None}, "no exp claim"),
        ({"aud": None}, "no aud claim"),
        ({"iss": None}, "no iss claim"),
    ])
    def test_claims_are_checked(self, claims: dict[str, Any], message: str) -> None:
        claims = {k: int(time.time()) + v[1] if isinstance(v, tuple) else v for k, v in claims.items()}
        with pytest.raises(InvalidToken, match=message):
            verify(authenticator(self.idp), token(**claims))

    def test_leeway_allows_clock_skew(self) -> None:
        assert verify(authenticator(self.idp), token(exp=int(time.time()) - 10))
        with pytest.raises(InvalidToken, match="expired"):
            verify(authenticator(self.idp, leeway=0), token(exp=int(time.time()) - 10))

    def test_forged_signature(self) -> None:
        with pytest.raises(InvalidToken, match="signature"):
            verify(authenticator(self.idp), token(OTHER_KEY, "rsa"))

    def test_alg_none_and_hs256_with_the_public_key_as_secret(self) -> None:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        payload = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300}).encode())
        none = b64(b'{"alg":"none","kid":"rsa"}') + "." + payload + "."
        pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = b64(b'{"alg":"HS256","kid":"rsa","typ":"JWT"}') + "." + payload
        hs256 = signing_input + "." + b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
        idp = FakeIdP(public_jwk(RSA_KEY, "rsa"))
        for forged in (none, hs256):
            with pytest.raises(InvalidToken, match="algorithm is not accepted"):
                verify(authenticator(idp), forged)
        assert idp.urls == [], "a token with a refused algorithm never costs a fetch"

    def test_the_jwk_alg_binds_its_key(self) -> None:
        idp = FakeIdP(public_jwk(RSA_KEY, "rsa", alg="PS256"))
        with pytest.raises(InvalidToken, match="not the one of its key"):
            verify(authenticator(idp), token())
        assert verify(authenticator(idp), token(alg="PS256"))

    @pytest.mark.parametrize("tok", ["abc", "not.a.jwt", API_KEY, "a.b"])
    def test_malformed(self, tok: str) -> None:
        with pytest.raises(InvalidToken) as info:
            verify(authenticator(self.idp), tok)
        assert tok not in str(info.value)

    def test_kidless_token_with_a_single_key(self) -> None:
        assert verify(authenticator(FakeIdP(public_jwk(RSA_KEY, "rsa"))), token(kid=None))
        with pytest.raises(InvalidToken, match="kid"):
            verify(authenticator(self.idp), token(kid=None))


def test_parse_jwks_keeps_signature_keys_only() -> None:
    keys = parse_jwks({"keys": [
        public_jwk(RSA_KEY, "sig"),
        public_jwk(OTHER_KEY, "enc", use="enc"),
        public_jwk(OTHER_KEY, "wrap", use="sig", key_ops=["wrapKey"]),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "RSA", "kid": "broken", "n": "!!"},
        "junk",
    ]})
    assert set(keys) == {"sig"}
    with pytest.raises(ValueError):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    with pytest.raises(ValueError):
        parse_jwks(["not", "a", "set"])


class TestJwksCache:
    def test_fetched_once_then_after_the_ttl(self) -> None:
        idp, clock = FakeIdP(public_jwk(RSA_KEY, "rsa")), Clock()
        auth = authenticator(idp, clock, jwks_ttl=600, jwks_min_refresh=30)
        for _ in range(5):
            verify(auth, token())
        assert len(idp.urls) == 1
        clock.now += 599
        verify(auth, token())
        assert len(idp.urls) == 1
        clock.now += 2
        verify(auth, token())
        assert len(idp.urls) == 2

    def test_unknown_kid_refreshes_once_and_a_flood_is_rate_limited(self) -> None:
        idp, clock = FakeIdP(public_jwk(RSA_KEY, "rsa")), Clock()
        auth = authenticator(idp, clock, jwks_min_refresh=30)
        verify(auth, token())
        clock.now += 31
        idp.keys.append(public_jwk(EC_KEY, "rotated"))
        assert verify(auth, token(EC_KEY, "rotated", "ES256"))  # a key rotation: fetched, accepted
        assert len(idp.urls) == 2
        for i in range(50):  # made-up kids, all within the minimum refresh interval
            with pytest.raises(InvalidToken, match="kid"):
                verify(auth, token(kid=f"made-up-{i}"))
        assert len(idp.urls) == 2
        clock.now += 30
        with pytest.raises(InvalidToken):
            verify(auth, token(kid="made-up-again"))
        assert len(idp.urls) == 3

    def test_concurrent_unknown_kids_fetch_once(self) -> None:
        idp, clock = FakeIdP(public_jwk(RSA_KEY, "rsa")), Clock()
        auth = authenticator(idp, clock, jwks_min_refresh=30)

        async def flood() -> list[BaseException | None]:
            results: list[BaseException | None] = []

            async def one(kid: str) -> None:
                try:
                    await auth.verify(token(kid=kid))
                    results.append(None)
                except InvalidToken as exc:
                    results.append(exc)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, f"kid-{i}")
            return results

        results = anyio.run(flood)
        assert len(results) == 20 and all(isinstance(r, InvalidToken) for r in results)
        assert len(idp.urls) == 1

    def test_a_failed_fetch_keeps_the_known_keys(self) -> None:
        idp, clock = FakeIdP(public_jwk(RSA_KEY, "rsa")), Clock()
        auth = authenticator(idp, clock, jwks_ttl=60, jwks_min_refresh=10)
        verify(auth, token())
        idp.fail = True
        clock.now += 61
        assert verify(auth, token())["sub"] == "user-1"  # stale keys, still verifying
        assert len(idp.urls) == 2

    def test_no_keys_at_all_is_unavailable_and_retried_after_the_interval(self) -> None:
        idp, clock = FakeIdP(public_jwk(RSA_KEY, "rsa")), Clock()
        idp.fail = True
        auth = authenticator(idp, clock, jwks_min_refresh=10)
        for _ in range(3):
            with pytest.raises(KeysUnavailable):
                verify(auth, token())
        assert len(idp.urls) == 1, "an identity provider that is down is not asked again at once"
        idp.fail = False
        clock.now += 10
        assert verify(auth, token())

    def test_discovery(self) -> None:
        idp, clock = FakeIdP(public_jwk(RSA_KEY, "rsa")), Clock()
        auth = authenticator(idp, clock, jwks_url="")
        verify(auth, token())
        assert idp.urls == [ISSUER + "/.well-known/openid-configuration", ISSUER + "/certs"]
        clock.now += 3600
        verify(auth, token())
        assert idp.urls[-1] == ISSUER + "/certs" and len(idp.urls) == 3, "the jwks_uri is remembered"

    @pytest.mark.parametrize("discovery", [
        {"issuer": "https://evil.example.org", "jwks_uri": ISSUER + "/certs"},
        {"issuer": ISSUER, "jwks_uri": "http://idp.example.org/certs"},
        {"issuer": ISSUER},
    ])
    def test_discovery_refusals(self, discovery: dict[str, Any]) -> None:
        idp = FakeIdP(public_jwk(RSA_KEY, "rsa"))
        idp.discovery = discovery
        with pytest.raises(KeysUnavailable):
            verify(authenticator(idp, jwks_url=""), token())
        assert not any(url.endswith("/certs") for url in idp.urls)


# ------------------------------------------------------------------------------------------------
# The middleware, in process


async def echo_identity(request: Request) -> Response:
    identity = request.scope["state"].get(IDENTITY_KEY)
    return JSONResponse({"name": identity.name if identity else None})


def app_with(settings: Settings, idp: FakeIdP, tmp_path: Path) -> Starlette:
    auth = (Authenticator(settings.auth, JwksCache(settings.auth, idp.fetch)) if settings.auth.enabled else None)
    routes: list[BaseRoute] = [Route(p, echo_identity, methods=["GET", "POST", "OPTIONS"])
                               for p in ("/health", "/status", "/metrics")]
    dicomweb = [Route("/studies", echo_identity, methods=["GET", "POST"]),
                Route("/studies/{study}/series/{series}/instances/{instance}", echo_identity, methods=["GET"])]
    routes += [Mount("/dicom-web", routes=dicomweb), Mount("/nodes/{node}/dicom-web", routes=dicomweb)]
    audit = AuditLog(AuditSettings(path=str(tmp_path / "audit.jsonl")))
    return Starlette(routes=routes, middleware=[
        Middleware(RequestContextMiddleware),
        Middleware(AuditMiddleware, settings=settings, sink=audit),
        Middleware(AuthMiddleware, settings=settings, authenticator=auth),
    ])


def call(app: Starlette, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, headers=headers)

    return anyio.run(go)


@pytest.fixture
def app(tmp_path: Path) -> Starlette:
    key = {"name": "svc", "hash": hash_api_key(API_KEY), "scopes": ["dicomweb.read"], "nodes": ["pacs"]}
    settings = settings_with({**JWT_AUTH, "api_keys": [key],
                              "grants": [{"claim": "groups", "value": "research", "nodes": ["research"]}]})
    return app_with(settings, FakeIdP(public_jwk(RSA_KEY, "rsa")), tmp_path)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


class TestMiddleware:
    def test_no_credentials(self, app: Starlette) -> None:
        r = call(app, "GET", "/dicom-web/studies")
        assert r.status_code == 401
        assert r.headers.get_list("www-authenticate") == [
            'Bearer realm="dicomweb-gateway"', 'ApiKey realm="dicomweb-gateway", header="X-API-Key"']
        body = r.json()
        assert body["error"] == "unauthorized" and body["requestId"] == r.headers["x-request-id"]

    def test_invalid_token_challenge(self, app: Starlette) -> None:
        tok = token(exp=int(time.time()) - 3600)
        r = call(app, "GET", "/dicom-web/studies", bearer(tok))
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith(
            'Bearer realm="dicomweb-gateway", error="invalid_token", error_description="the token has expired"')
        assert tok not in r.text and tok.split(".")[1] not in r.text

    def test_read_scope_and_write_scope(self, app: Starlette) -> None:
        assert call(app, "GET", "/dicom-web/studies", bearer(token(dicomweb_nodes="pacs"))).json() == {"name": "user-1"}
        r = call(app, "POST", "/dicom-web/studies", bearer(token(dicomweb_nodes="pacs")))
        assert r.status_code == 403 and r.json()["error"] == "insufficient-scope" and "dicomweb.write" in r.text
        assert r.headers["www-authenticate"] == \
            'Bearer realm="dicomweb-gateway", error="insufficient_scope", scope="dicomweb.write"'
        tok = token(scope="dicomweb.write", dicomweb_nodes=["pacs"])
        assert call(app, "POST", "/dicom-web/studies", bearer(tok)).status_code == 200
        assert call(app, "GET", "/dicom-web/studies", bearer(tok)).status_code == 403

    def test_nodes(self, app: Starlette) -> None:
        assert call(app, "GET", "/dicom-web/studies", bearer(token())).json()["error"] == "node-forbidden"
        r = call(app, "GET", "/nodes/research/dicom-web/studies", bearer(token(dicomweb_nodes="pacs")))
        assert r.status_code == 403 and "'research'" in r.json()["message"]
        assert call(app, "GET", "/nodes/research/dicom-web/studies",
                    bearer(token(groups=["staff", "research"]))).status_code == 200
        assert call(app, "GET", "/nodes/anything/dicom-web/studies", bearer(token(dicomweb_nodes="*"))).status_code == 200

    def test_api_keys(self, app: Starlette) -> None:
        assert call(app, "GET", "/dicom-web/studies", {"X-API-Key": API_KEY}).json() == {"name": "svc"}
        assert call(app, "GET", "/dicom-web/studies", {"x-api-key": API_KEY + "x"}).status_code == 401
        assert call(app, "POST", "/dicom-web/studies", {"X-API-Key": API_KEY}).json()["error"] == "insufficient-scope"
        assert call(app, "GET", "/nodes/research/dicom-web/studies", {"X-API-Key": API_KEY}).status_code == 403
        r = call(app, "GET", "/dicom-web/studies", bearer(API_KEY))
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        assert "X-API-Key header" in r.json()["message"] and API_KEY not in r.text

    def test_one_credential_only(self, app: Starlette) -> None:
        r = call(app, "GET", "/dicom-web/studies", {"X-API-Key": API_KEY, **bearer(token())})
        assert r.status_code == 400 and r.json()["error"] == "bad-request"

    def test_other_schemes(self, app: Starlette) -> None:
        r = call(app, "GET", "/dicom-web/studies", {"Authorization": "Basic dXNlcjpwYXNz"})
        assert r.status_code == 401 and "Bearer tokens only" in r.json()["message"]

    def test_open_and_authenticated_routes(self, app: Starlette) -> None:
        assert call(app, "GET", "/health").status_code == 200
        assert call(app, "GET", "/metrics").status_code == 200
        assert call(app, "GET", "/status").status_code == 401
        assert call(app, "GET", "/status", {"X-API-Key": API_KEY}).status_code == 200  # no scope needed
        assert call(app, "GET", "/no-such-route").status_code == 401
        preflight = {"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET"}
        assert call(app, "OPTIONS", "/status", preflight).status_code == 200
        assert call(app, "OPTIONS", "/status", {"Origin": "https://viewer.example.org"}).status_code == 401

    def test_auth_off_is_anonymous(self, tmp_path: Path) -> None:
        app = app_with(settings_with({"enabled": False}), FakeIdP(), tmp_path)
        assert call(app, "POST", "/nodes/research/dicom-web/studies").json() == {"name": ANONYMOUS.name}

    def test_keys_unavailable_is_503(self, tmp_path: Path) -> None:
        idp = FakeIdP()
        idp.fail = True
        app = app_with(settings_with(JWT_AUTH), idp, tmp_path)
        r = call(app, "GET", "/dicom-web/studies", bearer(token()))
        assert r.status_code == 503 and r.json()["error"] == "auth-unavailable" and r.headers["retry-after"] == "30"

    def test_refusals_and_tokens_stay_out_of_the_application_log(self, app: Starlette,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        forged = token(OTHER_KEY, sub="dr-who")
        call(app, "GET", "/dicom-web/studies", bearer(forged))
        call(app, "GET", "/dicom-web/studies", {"X-API-Key": API_KEY + "!"})
        call(app, "GET", f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}", bearer(token()))
        text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
        assert "signature does not verify" in text
        for secret in (forged, forged.split(".")[2], API_KEY, "dr-who", STUDY, SERIES, INSTANCE):
            assert secret not in text


# ------------------------------------------------------------------------------------------------
# Audit pieces


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_audit_records_of_the_middleware(app: Starlette, tmp_path: Path) -> None:
    tok = token(dicomweb_nodes="pacs", azp="viewer")
    ok = call(app, "GET", f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}?x=1", bearer(tok))
    denied = call(app, "GET", "/nodes/research/dicom-web/studies?PatientID=P1", {"X-API-Key": API_KEY})
    call(app, "GET", "/health")
    audit = next(m for m in app.user_middleware if m.cls is AuditMiddleware).kwargs["sink"]
    assert isinstance(audit, AuditLog)
    audit.close()
    first, second = audit_records(tmp_path / "audit.jsonl")
    assert first["request_id"] == ok.headers["x-request-id"]
    assert (first["identity"], first["auth"], first["client_id"], first["client"]) == ("user-1", "token", "viewer",
                                                                                       "192.0.2.10")
    assert (first["node"], first["method"], first["route"]) == (
        "pacs", "GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}")
    assert (first["study"], first["series"], first["instance"], first["query"]) == (STUDY, SERIES, INSTANCE, "x=1")
    assert (first["status"], first["bytes"], first["outcome"]) == (200, len(ok.content), "ok")
    assert first["time"].endswith("Z") and first["duration_ms"] >= 0
    assert (second["identity"], second["auth"], second["node"], second["status"], second["outcome"]) == (
        "svc", "api-key", "research", 403, "denied")
    assert second["query"] == "PatientID=P1" and second["study"] is None
    assert second["request_id"] == denied.headers["x-request-id"]


def test_note_instances_reaches_the_record(tmp_path: Path) -> None:
    async def store(request: Request) -> Response:
        note_instances(request, ["1.2.3", "1.2.4", "1.2.3", ""], studies=["9.8", "9.8"])
        note_instances(request.scope, ["1.2.5"])
        return Response(b"stored")

    settings = settings_with({"enabled": False}, audit={"path": str(tmp_path / "a.jsonl"), "include_query": False})
    sink = AuditLog(settings.audit)
    app = Starlette(routes=[Route("/dicom-web/studies", store, methods=["POST"])],
                    middleware=[Middleware(AuditMiddleware, settings=settings, sink=sink),
                                Middleware(AuthMiddleware, settings=settings)])
    call(app, "POST", "/dicom-web/studies?secret=1")
    sink.close()
    (record,) = audit_records(tmp_path / "a.jsonl")
    assert record["instances"] == ["1.2.3", "1.2.4", "1.2.5"] and record["studies"] == ["9.8"]
    assert (record["identity"], record["auth"]) == ("anonymous", "off") and "query" not in record
    note_instances({"state": {}}, ["1.2.3"])  # no record: nothing happens


@pytest.mark.parametrize(("peer", "headers", "trusted", "expected"), [
    ("192.0.2.1", [], (), "192.0.2.1"),
    ("192.0.2.1", [(b"x-forwarded-for", b"203.0.113.9")], (), "192.0.2.1"),  # an untrusted peer's word counts not
    ("10.0.0.5", [(b"x-forwarded-for", b"203.0.113.9, 10.0.0.4")], ("10.0.0.0/8",), "203.0.113.9"),
    ("10.0.0.5", [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.9")], ("10.0.0.0/8",), "203.0.113.9"),
    ("10.0.0.5", [(b"forwarded", b'for="[2001:db8::7]:4711";proto=https')], ("10.0.0.0/8",), "2001:db8::7"),
    ("10.0.0.5", [(b"forwarded", b"for=203.0.113.9:80, for=10.0.0.4")], ("10.0.0.0/8",), "203.0.113.9"),
    ("10.0.0.5", [], ("10.0.0.0/8",), "10.0.0.5"),
])
def test_client_address(peer: str, headers: list[tuple[bytes, bytes]], trusted: tuple[str, ...],
                        expected: str) -> None:
    assert client_address({"client": (peer, 1234), "headers": headers}, trusted) == expected


def test_rfc5424_frame() -> None:
    handler = TlsSyslogHandler(AuditSettings(syslog_host="atna.example.org"))
    record = logging.makeLogRecord({"audit": {"time": "2024-05-01T10:00:00.000Z", "outcome": "denied",
                                              "identity": "Müller"}})
    frame = handler.frame(record)
    length, _, message = frame.partition(b" ")
    assert int(length) == len(message)
    head = message.decode("ascii").split(" ", 7)
    assert head[:2] == ["<84>1", "2024-05-01T10:00:00.000Z"]  # facility 10 (authpriv), severity 4 (warning)
    assert head[3:7] == ["dicomweb-gateway", str(os.getpid()), "dicomweb-audit", "-"]
    assert json.loads(head[7])["identity"] == "Müller"
    handler.close()


def test_audit_write_never_blocks_and_counts_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.audit as audit_module

    monkeypatch.setattr(audit_module, "QUEUE_SIZE", 2)
    sink = AuditLog(AuditSettings(path=str(tmp_path / "a.jsonl")))
    sink._running = True  # no listener: the queue fills
    for i in range(5):
        sink.write({"outcome": "ok", "n": i})
    assert sink.dropped == 3
    sink._running = False
