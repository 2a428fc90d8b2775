"""Authentication and authorization, as a pure ASGI middleware inside the request context.

Credentials, one per request:

- ``Authorization: Bearer <JWT>``: an OAuth2/OIDC access token, verified with PyJWT against the
  issuer's JWKS. The JWKS is fetched with httpx (never blocking the event loop), from
  ``auth.jwks_url`` or, when that is empty, from the ``jwks_uri`` of the issuer's OpenID Connect
  discovery document. It is kept for ``auth.jwks_ttl`` seconds and fetched again early when a token
  names an unknown ``kid`` (a key rotation), but never more often than every
  ``auth.jwks_min_refresh`` seconds, so a flood of made-up kids cannot hammer the identity provider.
  Only asymmetric algorithms are accepted; ``iss``, ``aud`` and ``exp`` are required, ``nbf`` and
  ``iat`` checked when present, all with ``auth.leeway`` seconds of clock skew.
- ``X-API-Key: <key>`` (``auth.api_key_header``): a service account's key. ``Authorization: Bearer``
  belongs to JWTs, so a key sent there fails as a malformed token. The configuration holds only the
  key's SHA-256: keys are long random strings (``hash-key`` refuses short ones), so unlike a password
  there is nothing a slow hash would protect against, and every configured hash is compared in
  constant time.

Authorization: GET, HEAD and OPTIONS on a DICOMweb or WADO-URI route need ``auth.read_scope``; any
other method (STOW-RS) needs ``auth.write_scope``; and the identity must be allowed the route's node
(``/dicom-web`` is the default node). Scopes come from the ``auth.scope_claim`` claim (a
space-separated string or a list); nodes from the ``auth.nodes_claim`` claim, ``auth.token_nodes``
and ``[[auth.grants]]`` for tokens, and from the key's own list for API keys (``*`` means every
node). Other routes (``/status``, unknown paths) need a valid identity and no scope; ``/health``,
``/ready``, ``auth.open_paths`` and CORS preflight requests need nothing.

Answers: 401 with ``WWW-Authenticate`` (RFC 6750) when credentials are missing or wrong, 403 when
the identity lacks the scope or the node, 503 when the issuer's keys cannot be fetched. Tokens and
keys are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import jwt
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import AuthSettings, ConfigError, Settings, _check_fetch_url
from .middleware import request_id_var
from .problems import HttpProblem, problem_response

log = logging.getLogger("gateway.auth")

REALM = "dicomweb-gateway"
ALWAYS_OPEN = ("/health", "/ready")
IDENTITY_KEY = "identity"  # in scope["state"], for the audit log
MIN_API_KEY_LENGTH = 32
MAX_TOKEN_LENGTH = 16384
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 5.0
READ_METHODS = ("GET", "HEAD", "OPTIONS")

_NODE_ROUTE_RE = re.compile(r"^/nodes/([^/]+)/(?:dicom-web|wado)(?:/|$)")
_DEFAULT_ROUTE_RE = re.compile(r"^/(?:dicom-web|wado)(?:/|$)")


def hash_api_key(key: str) -> str:
    """The form an API key takes in the configuration: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def route_path(scope: Scope) -> str:
    """The path the router matches: without the server's root path, as Starlette routes it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def route_node(path: str, default_node: str) -> str | None:
    """The node a DICOMweb or WADO-URI path addresses; None for any other path."""
    match = _NODE_ROUTE_RE.match(path)
    if match:
        return match.group(1)
    return default_node if _DEFAULT_ROUTE_RE.match(path) else None


@dataclass(frozen=True)
class Identity:
    """Who a request is: ``kind`` is ``token``, ``api-key`` or ``off`` (authentication disabled)."""

    kind: str
    name: str
    scopes: frozenset[str]
    nodes: frozenset[str]
    client_id: str | None = None

    def may_use(self, node: str) -> bool:
        return "*" in self.nodes or node in self.nodes


ANONYMOUS = Identity("off", "anonymous", frozenset(), frozenset({"*"}))


class AuthRefused(Exception):
    """A refusal: the JSON problem, and the ``WWW-Authenticate`` challenges that go with it."""

    def __init__(self, problem: HttpProblem, challenges: Sequence[str] = ()) -> None:
        super().__init__(str(problem))
        self.problem = problem
        self.challenges = tuple(challenges)

    def response(self, request_id: str) -> Response:
        response = problem_response(self.problem, request_id)
        for challenge in self.challenges:
            response.raw_headers.append((b"www-authenticate", challenge.encode("latin-1")))
        return response


class KeysUnavailable(Exception):
    """The issuer's JWKS could not be fetched, and no earlier copy is at hand."""


class InvalidToken(Exception):
    """A token that fails verification; the message is safe to send back (it never quotes the token)."""


# ------------------------------------------------------------------------------------------------
# The issuer's keys


@dataclass(frozen=True)
class SigningKey:
    key: Any  # a cryptography public key
    alg: str | None  # the JWK's own "alg", which binds the key to one algorithm


def parse_jwks(data: Any) -> dict[str | None, SigningKey]:
    """The signature keys of a JWK Set, by kid. Symmetric keys and encryption keys are left out."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' list)")
    keys: dict[str | None, SigningKey] = {}
    for jwk_data in data["keys"]:
        if not isinstance(jwk_data, dict) or jwk_data.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if jwk_data.get("use", "sig") != "sig":
            continue
        ops = jwk_data.get("key_ops")
        if isinstance(ops, list) and "verify" not in ops:
            continue
        alg = jwk_data.get("alg")
        try:
            parsed = jwt.PyJWK(jwk_data)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid = jwk_data.get("kid")
        keys[kid if isinstance(kid, str) else None] = SigningKey(parsed.key, alg if isinstance(alg, str) else None)
    if not keys:
        raise ValueError("the JWK Set holds no usable signature key")
    return keys


FetchJson = Callable[[str], Awaitable[Any]]


class JwksCache:
    """The issuer's keys: fetched on first use, kept ``jwks_ttl`` seconds, fetched again early for
    an unknown kid, and never fetched more often than every ``jwks_min_refresh`` seconds (a failed
    fetch included). A failed fetch keeps the keys already known."""

    def __init__(self, settings: AuthSettings, fetch_json: FetchJson | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._fetch_json = fetch_json or self._http_get_json
        self._clock = clock
        self._keys: dict[str | None, SigningKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._jwks_url = settings.jwks_url or None
        self._lock = anyio.Lock()
        self.fetches = 0  # successful fetches of the JWKS (for tests and the log)

    async def key_for(self, kid: str | None) -> SigningKey:
        if self._fetched_at is None or self._clock() - self._fetched_at >= self.settings.jwks_ttl:
            await self._refresh()
        key = self._find(kid)
        if key is None and self._keys:
            await self._refresh()  # a key rotation, unless it is too soon to ask again
            key = self._find(kid)
        if key is None:
            if not self._keys:
                raise KeysUnavailable()
            raise InvalidToken("the token's signing key (kid) is not one of the issuer's keys")
        return key

    def _find(self, kid: str | None) -> SigningKey | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self.settings.jwks_min_refresh:
                return  # asked moments ago (by another request, perhaps): use what that brought
            self._attempted_at = now
            try:
                url = self._jwks_url or await self._discover()
                self._keys = parse_jwks(await self._fetch_json(url))
            except Exception as exc:  # whatever went wrong, the known keys stay in use
                log.warning("could not fetch the identity provider's keys (%s: %s); %d key(s) still in use",
                            type(exc).__name__, exc, len(self._keys))
                return
            self._fetched_at = now
            self.fetches += 1
            log.info("identity provider's keys fetched: %d signature key(s)", len(self._keys))

    async def _discover(self) -> str:
        issuer = self.settings.issuer
        doc = await self._fetch_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if not isinstance(doc, dict) or doc.get("issuer") != issuer:
            raise ValueError("the OpenID Connect discovery document names another issuer")
        url = doc.get("jwks_uri")
        if not isinstance(url, str):
            raise ValueError("the OpenID Connect discovery document has no jwks_uri")
        try:
            _check_fetch_url("jwks_uri", url)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        self._jwks_url = url
        return url

    async def _http_get_json(self, url: str) -> Any:
        verify: ssl.SSLContext | bool = True
        if self.settings.ca_file:
            verify = ssl.create_default_context(cafile=self.settings.ca_file)
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, verify=verify, follow_redirects=False) as client:
            async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"the answer from {url} is larger than {MAX_JWKS_BYTES} bytes")
        return json.loads(body)


# ------------------------------------------------------------------------------------------------
# Credentials -> identity


def claim(payload: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name (``realm_access.roles``) reaches into nested objects."""
    if name in payload:
        return payload[name]
    value: Any = payload
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def claim_values(value: Any, separators: str = r"\s+") -> list[str]:
    """A claim as a list of strings: a list as it is, a string split (scopes are space-separated)."""
    if isinstance(value, str):
        return [v for v in re.split(separators, value) if v]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if isinstance(v, (str, int)) and not isinstance(v, bool)]
    if isinstance(value, (int, bool)):
        return [str(value).lower() if isinstance(value, bool) else str(value)]
    return []


_TOKEN_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidIssuerError, "the token's issuer is not the one this gateway accepts"),
    (jwt.InvalidAudienceError, "the token's audience is not this gateway"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidIssuedAtError, "the token's iat claim is not valid"),
    (jwt.DecodeError, "the token is malformed"),
)


class Authenticator:
    """Credentials from the request headers -> an ``Identity``, or ``AuthRefused``."""

    def __init__(self, settings: AuthSettings, jwks: JwksCache | None = None) -> None:
        self.settings = settings
        self.jwks = jwks if jwks is not None else (JwksCache(settings) if settings.issuer else None)
        self._api_keys = [(bytes.fromhex(k.hash.split(":", 1)[1]), k) for k in settings.api_keys]
        self._api_key_header = settings.api_key_header.lower().encode("latin-1")

    # -- answers

    def challenges(self, error: str | None = None, description: str | None = None,
                   scope: str | None = None) -> list[str]:
        """RFC 6750 challenges: Bearer when tokens are accepted, and one naming the API key header."""
        out = []
        if self.settings.issuer:
            params = [f'realm="{REALM}"']
            if error:
                params.append(f'error="{error}"')
            if description:
                params.append(f'error_description="{_quotable(description)}"')
            if scope:
                params.append(f'scope="{scope}"')
            out.append("Bearer " + ", ".join(params))
        if self._api_keys:
            out.append(f'ApiKey realm="{REALM}", header="{self.settings.api_key_header}"')
        return out

    def unauthorized(self, message: str, token_error: bool = False) -> AuthRefused:
        challenges = self.challenges("invalid_token", message) if token_error else self.challenges()
        return AuthRefused(HttpProblem(401, "unauthorized", message), challenges)

    # -- authentication

    async def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Identity:
        authorization: list[bytes] = []
        api_key: list[bytes] = []
        for name, value in headers:
            if name == b"authorization":
                authorization.append(value)
            elif name == self._api_key_header:
                api_key.append(value)
        if len(authorization) + len(api_key) > 1:
            raise AuthRefused(HttpProblem(400, "bad-request",
                                          "send one credential: a bearer token in Authorization or an API key in "
                                          f"{self.settings.api_key_header}, once"))
        if api_key:
            return self._api_key_identity(api_key[0])
        if authorization:
            return await self._token_identity(authorization[0])
        raise self.unauthorized("authentication is required: " + self._accepted())

    def _accepted(self) -> str:
        ways = []
        if self.settings.issuer:
            ways.append("a bearer token (JWT) in the Authorization header")
        if self._api_keys:
            ways.append(f"an API key in the {self.settings.api_key_header} header")
        return " or ".join(ways)

    def _api_key_identity(self, value: bytes) -> Identity:
        if not self._api_keys:
            raise self.unauthorized("API keys are not accepted here; send " + self._accepted())
        digest = hashlib.sha256(value.strip()).digest()
        found = None
        for expected, key in self._api_keys:  # every hash compared, in constant time
            if hmac.compare_digest(digest, expected):
                found = key
        if found is None:
            raise self.unauthorized("the API key is not valid")
        return Identity("api-key", found.name, frozenset(found.scopes), frozenset(found.nodes))

    async def _token_identity(self, value: bytes) -> Identity:
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer":
            raise self.unauthorized("the Authorization header takes Bearer tokens only; send " + self._accepted())
        if self.jwks is None:
            raise self.unauthorized("bearer tokens are not accepted here (no auth.issuer is configured); send "
                                    + self._accepted())
        token = token.strip()
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise self.unauthorized("the bearer token is empty or too long", token_error=True)
        try:
            payload = await self.verify(token)
        except InvalidToken as exc:
            raise self.unauthorized(str(exc), token_error=True) from None
        except KeysUnavailable:
            retry = str(max(1, math.ceil(self.settings.jwks_min_refresh)))
            raise AuthRefused(HttpProblem(503, "auth-unavailable", "the identity provider's keys cannot be fetched "
                                          "now, so no token can be checked; try again later",
                                          headers={"Retry-After": retry})) from None
        return self._token_to_identity(payload)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, once its signature, issuer, audience and times check out."""
        assert self.jwks is not None
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the bearer token is not a JWT (an API key goes in the "
                               f"{s.api_key_header} header)") from None
        alg = header.get("alg")
        if alg not in s.algorithms:  # before any key look-up: 'none' and HS* end here
            raise InvalidToken("the token's algorithm is not accepted")
        kid = header.get("kid")
        key = await self.jwks.key_for(kid if isinstance(kid, str) else None)
        if key.alg is not None and key.alg != alg:
            raise InvalidToken("the token's algorithm is not the one of its key")
        try:
            return jwt.decode(token, key.key, algorithms=list(s.algorithms), audience=list(s.audience),
                              issuer=s.issuer, leeway=s.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token has no {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            for kind, message in _TOKEN_ERRORS:
                if isinstance(exc, kind):
                    raise InvalidToken(message) from None
            raise InvalidToken("the token is not valid") from None

    def _token_to_identity(self, payload: dict[str, Any]) -> Identity:
        s = self.settings
        scopes = frozenset(claim_values(claim(payload, s.scope_claim)))
        nodes = set(claim_values(claim(payload, s.nodes_claim), r"[\s,]+")) | set(s.token_nodes)
        for grant in s.grants:
            if grant.value in claim_values(claim(payload, grant.claim)):
                nodes |= set(grant.nodes)
        client_id = next((v for v in (payload.get("azp"), payload.get("client_id")) if isinstance(v, str)), None)
        sub = payload.get("sub")
        name = sub if isinstance(sub, str) and sub else (client_id or "-")
        return Identity("token", name, scopes, frozenset(nodes), client_id)

    # -- authorization

    def authorize(self, identity: Identity, node: str, method: str) -> None:
        """403 unless ``identity`` has the method's scope and may use ``node``."""
        needed = self.settings.read_scope if method in READ_METHODS else self.settings.write_scope
        token = identity.kind == "token"
        if needed not in identity.scopes:
            raise AuthRefused(
                HttpProblem(403, "insufficient-scope", f"this request needs the scope {needed!r}, which the "
                                                       f"{'token' if token else 'API key'} does not carry"),
                [f'Bearer realm="{REALM}", error="insufficient_scope", scope="{needed}"'] if token else [])
        if not identity.may_use(node):
            shown = node if len(node) <= 64 else node[:64] + "..."
            raise AuthRefused(
                HttpProblem(403, "node-forbidden", f"this identity may not use node {shown!r}"),
                [f'Bearer realm="{REALM}", error="insufficient_scope"'] if token else [])


def _quotable(text: str) -> str:
    """RFC 6750's error_description characters: printable ASCII without '"' and '\\'."""
    return "".join(c if 0x20 <= ord(c) <= 0x7E and c not in '"\\' else "'" if c == '"' else "" for c in text)


def _is_preflight(scope: Scope) -> bool:
    if scope["method"] != "OPTIONS":
        return False
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


# ------------------------------------------------------------------------------------------------
# The middleware


class AuthMiddleware:
    """Authenticates and authorizes each HTTP request before it reaches a route; puts the
    ``Identity`` into ``scope["state"]`` for the audit log. With ``auth.enabled = false`` every
    request passes as the anonymous identity."""

    def __init__(self, app: ASGIApp, settings: Settings, authenticator: Authenticator | None = None) -> None:
        self.app = app
        self.default_node = settings.default_node.name
        self.open_paths = frozenset((*ALWAYS_OPEN, *settings.auth.open_paths))
        self.authenticator = authenticator
        if authenticator is None and settings.auth.enabled:
            self.authenticator = Authenticator(settings.auth)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.authenticator is None:
            state[IDENTITY_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in self.open_paths or _is_preflight(scope):
            await self.app(scope, receive, send)
            return
        try:
            identity = await self.authenticator.authenticate(scope["headers"])
            state[IDENTITY_KEY] = identity
            node = route_node(path, self.default_node)
            if node is not None:
                self.authenticator.authorize(identity, node, scope["method"])
        except AuthRefused as refused:
            # the reason only: never the credential, and not who it was (that is the audit log's)
            log.info("%s %s: %s", refused.problem.status, refused.problem.error, refused.problem.message)
            await refused.response(request_id_var.get())(scope, receive, send)
            return
        await self.app(scope, receive, send)
