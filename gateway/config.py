"""Settings: a TOML file, overridden by environment variables, validated with readable errors.

Every scalar setting has an environment variable named after its place in the file:
``[server] port`` is ``DWG_SERVER_PORT``; a node's ``port`` is ``DWG_NODE_<NAME>_PORT`` and its
``[nodes.timeouts] dimse`` is ``DWG_NODE_<NAME>_TIMEOUTS_DIMSE`` (NAME upper-cased, every character
that is not a letter or digit turned into ``_``). ``DWG_NODES`` holds the whole node list as JSON and
replaces the file's ``[[nodes]]``. Names are derived from the schema below, never parsed, so keys that
contain underscores are unambiguous.
"""

from __future__ import annotations

import ipaddress
import math
import json
import os
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

ENV_PREFIX = "DWG_"
RETRIEVE_MODES = ("get", "move", "get-then-move")
PREFETCH_MODES = ("series", "off")
RELATIONAL_MODES = ("negotiate", "assume", "off")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHARSETS = ("ISO_IR 192", "ISO_IR 100", "ISO_IR 6")


class ConfigError(ValueError):
    """An invalid setting: ``setting`` names it, ``problem`` says what is wrong."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "info"
    log_json: bool = False
    cors_origins: tuple[str, ...] = ()
    # HTTPS (gateway/tls.py): on when tls_cert_file is set
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_client_cert: str = "none"
    tls_reload_interval: float = 60.0


@dataclass(frozen=True)
class GatewaySettings:
    ae_title: str = "DICOMWEB-GW"
    move_host: str = "127.0.0.1"
    move_port: int = 11113
    # DICOM TLS on the C-MOVE receiver (gateway/tls.py): on when move_tls_cert_file is set
    move_tls_cert_file: str = ""
    move_tls_key_file: str = ""
    move_tls_ca_file: str = ""


@dataclass(frozen=True)
class QidoSettings:
    max_results: int = 1000
    empty_status: int = 200
    fanout_concurrency: int = 4
    fanout_max_parents: int = 1000
    strict_accept: bool = False
    warning_quoted: bool = False


@dataclass(frozen=True)
class WadoSettings:
    stall_timeout: float = 20.0
    bulk_threshold: int = 1024
    max_age: int = 86400


@dataclass(frozen=True)
class CacheSettings:
    max_mb: float = 512.0
    ttl: float = 300.0


@dataclass(frozen=True)
class StowSettings:
    max_body_mb: float = 4096.0
    max_part_mb: float = 1024.0
    lanes: int = 2
    read_timeout: float = 60.0


@dataclass(frozen=True)
class LimitsSettings:
    """Admission control and request limits (gateway/admission.py); a budget of 0 is no limit."""

    max_inflight_retrieves: int = 64
    max_inflight_searches: int = 256
    max_buffer_mb: float = 4096.0
    max_threads: int = 256
    rate_limit_per_client: float = 0.0
    rate_limit_burst: int = 0
    max_url_bytes: int = 16384
    max_header_bytes: int = 32768
    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class ApiKeySettings:
    """A service account's key, stored as ``sha256:<hex>`` (``dicomweb-gateway hash-key``)."""

    name: str
    hash: str
    scopes: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeGrantSettings:
    """Tokens whose ``claim`` is (or contains) ``value`` may use ``nodes``."""

    claim: str
    value: str
    nodes: tuple[str, ...] = ()


# Asymmetric JWS algorithms only: a JWKS holds public keys, and HS* would turn one into a shared secret.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class AuthSettings:
    """On unless ``enabled = false`` says otherwise (gateway/auth.py)."""

    enabled: bool = True
    issuer: str = ""
    audience: tuple[str, ...] = ()
    jwks_url: str = ""
    ca_file: str = ""
    algorithms: tuple[str, ...] = JWT_ALGORITHMS
    leeway: float = 30.0
    jwks_ttl: float = 600.0
    jwks_min_refresh: float = 30.0
    scope_claim: str = "scope"
    read_scope: str = "dicomweb.read"
    write_scope: str = "dicomweb.write"
    nodes_claim: str = "dicomweb_nodes"
    token_nodes: tuple[str, ...] = ()
    api_key_header: str = "X-API-Key"
    open_paths: tuple[str, ...] = ("/metrics", "/openapi.json")
    api_keys: tuple[ApiKeySettings, ...] = ()
    grants: tuple[NodeGrantSettings, ...] = ()


@dataclass(frozen=True)
class AuditSettings:
    """The audit log (gateway/audit.py): JSON lines to ``path`` ("-" is stdout), optionally syslog."""

    enabled: bool = True
    path: str = "-"
    include_query: bool = True
    syslog_host: str = ""
    syslog_port: int = 6514
    syslog_ca_file: str = ""
    syslog_cert_file: str = ""
    syslog_key_file: str = ""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    acse: float = 10.0
    dimse: float = 30.0


@dataclass(frozen=True)
class TlsSettings:
    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""


@dataclass(frozen=True)
class NodeSettings:
    name: str
    ae_title: str
    host: str
    port: int
    default: bool = False
    retrieve: str = "get"
    prefetch: str = "series"
    max_associations: int = 4
    acquire_timeout: float = 5.0
    idle_timeout: float = 20.0
    max_pdu: int = 1048576
    charset: str = "ISO_IR 192"
    relational: str = "negotiate"
    fuzzy: bool = False
    retries: int = 2
    breaker_threshold: int = 5
    breaker_cooldown: float = 10.0
    required_keys: tuple[str, ...] = ()
    min_wildcard_chars: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    qido: QidoSettings = field(default_factory=QidoSettings)
    wado: WadoSettings = field(default_factory=WadoSettings)
    stow: StowSettings = field(default_factory=StowSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    nodes: tuple[NodeSettings, ...] = ()

    @property
    def default_node(self) -> NodeSettings:
        return next(n for n in self.nodes if n.default)

    def node(self, name: str) -> NodeSettings | None:
        return next((n for n in self.nodes if n.name == name), None)


# ---------------------------------------------------------------------------------------------
# Building settings from mappings


def _convert(setting: str, value: Any, annotation: str) -> Any:
    """Convert ``value`` (from TOML, JSON or an environment string) to the field's type."""
    from_env = isinstance(value, str) and annotation not in ("str",)
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        if from_env and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(setting, f"must be true or false (got {value!r})")
    if annotation == "int":
        if isinstance(value, bool):
            raise ConfigError(setting, f"must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        if from_env and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ConfigError(setting, f"must be an integer (got {value!r})")
    if annotation == "float":
        if isinstance(value, bool):
            raise ConfigError(setting, f"must be a number of seconds (got {value!r})")
        if isinstance(value, (int, float)):
            return float(value)
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(setting, f"must be a number of seconds (got {value!r})")
    if annotation == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(setting, f"must be a string (got {value!r})")
    if annotation == "tuple[str, ...]":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(setting, f"must be a list of strings (got {value!r})")
    raise AssertionError(f"unhandled field type {annotation}")  # a schema bug, not bad input


def _build(cls: type, data: Mapping[str, Any], where: str, env_name: str | None) -> Any:
    """Build dataclass ``cls`` from ``data``, then apply environment overrides under ``env_name``."""
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"must be a table (got {data!r})")
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown setting (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in fields(cls):
        setting = f"{where}.{f.name}"
        sub_env = f"{env_name}_{f.name.upper()}" if env_name else None
        if isinstance(f.type, str) and f.type in ("Timeouts", "TlsSettings"):
            sub_cls = Timeouts if f.type == "Timeouts" else TlsSettings
            values[f.name] = _build(sub_cls, data.get(f.name, {}), setting, sub_env)
            continue
        if isinstance(f.type, str) and f.type in _TABLE_LISTS:
            values[f.name] = _build_list(_TABLE_LISTS[f.type], data.get(f.name, []), setting, sub_env)
            continue
        raw = data.get(f.name, _MISSING)
        if sub_env and sub_env in os.environ:
            raw = os.environ[sub_env]
        if raw is _MISSING:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(setting, "is required")
            continue
        values[f.name] = _convert(setting, raw, str(f.type))
    return cls(**values)


_MISSING = object()
# lists of tables inside a section ([[auth.api_keys]]); the environment variable holds the list as JSON
_TABLE_LISTS: dict[str, type] = {"tuple[ApiKeySettings, ...]": ApiKeySettings,
                                 "tuple[NodeGrantSettings, ...]": NodeGrantSettings}


def _build_list(cls: type, data: Any, where: str, env_name: str | None) -> tuple[Any, ...]:
    if env_name and env_name in os.environ:
        try:
            data = json.loads(os.environ[env_name])
        except json.JSONDecodeError as exc:
            raise ConfigError(env_name, f"not valid JSON: {exc}") from None
        where = env_name
    if not isinstance(data, list):
        raise ConfigError(where, f"must be a list of tables (got {type(data).__name__})")
    return tuple(_build(cls, item, f"{where}[{i}]", None) for i, item in enumerate(data))


def env_name_for_node(name: str) -> str:
    return ENV_PREFIX + "NODE_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def load_settings(path: str | os.PathLike[str] | None = None, *, data: Mapping[str, Any] | None = None) -> Settings:
    """Read settings from a TOML file (or an already parsed mapping), the environment, and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    if data is not None:
        raw = {**raw, **data}
    sections = {"server": ServerSettings, "gateway": GatewaySettings, "qido": QidoSettings, "wado": WadoSettings,
                "stow": StowSettings, "limits": LimitsSettings, "cache": CacheSettings, "auth": AuthSettings, "audit": AuditSettings}
    for key in raw:
        if key not in (*sections, "nodes"):
            raise ConfigError(key, f"unknown section (known: {', '.join([*sections, 'nodes'])})")
    built = {
        key: _build(cls, raw.get(key, {}), key, ENV_PREFIX + key.upper()) for key, cls in sections.items()
    }
    nodes_raw: Any = raw.get("nodes", [])
    if ENV_PREFIX + "NODES" in os.environ:
        try:
            nodes_raw = json.loads(os.environ[ENV_PREFIX + "NODES"])
        except json.JSONDecodeError as exc:
            raise ConfigError(ENV_PREFIX + "NODES", f"not valid JSON: {exc}") from None
    if not isinstance(nodes_raw, list):
        where = ENV_PREFIX + "NODES" if ENV_PREFIX + "NODES" in os.environ else "nodes"
        raise ConfigError(where, "must be a list of node tables")
    nodes = []
    for i, node in enumerate(nodes_raw):
        name = node.get("name") if isinstance(node, Mapping) else None
        env = env_name_for_node(name) if isinstance(name, str) else None
        nodes.append(_build(NodeSettings, node, f"nodes[{i}]", env))
    settings = Settings(nodes=tuple(nodes), **built)
    validate(settings)
    return settings


# ---------------------------------------------------------------------------------------------
# Validation


def _check_port(setting: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(setting, f"must be a TCP port between {low} and 65535 (got {port})")


def _check_ae(setting: str, ae: str) -> None:
    if not _AE_RE.match(ae) or not ae.strip():
        raise ConfigError(setting, f"must be 1 to 16 printable ASCII characters without a backslash (got {ae!r})")


def _check_positive(setting: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(setting, f"must be a finite number greater than 0 (got {value})")


def validate(s: Settings) -> None:
    _check_port("server.port", s.server.port, allow_zero=True)
    if s.server.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("server.log_level", "must be one of debug, info, warning, error")
    if s.server.public_url:
        parts = urlsplit(s.server.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                "server.public_url", f"must be an absolute http(s) URL without query (got {s.server.public_url!r})"
            )
    for i, proxy in enumerate(s.server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{i}]", f"not an IP address or network: {proxy!r}") from None
    _validate_server_tls(s.server)
    _check_ae("gateway.ae_title", s.gateway.ae_title)
    _check_port("gateway.move_port", s.gateway.move_port, allow_zero=True)
    _validate_move_tls(s.gateway)
    q = s.qido
    if q.max_results < 1:
        raise ConfigError("qido.max_results", f"must be at least 1 (got {q.max_results})")
    if q.empty_status not in (200, 204):
        raise ConfigError("qido.empty_status", f"must be 200 or 204 (got {q.empty_status})")
    if q.fanout_concurrency < 1:
        raise ConfigError("qido.fanout_concurrency", f"must be at least 1 (got {q.fanout_concurrency})")
    if q.fanout_max_parents < 1:
        raise ConfigError("qido.fanout_max_parents", f"must be at least 1 (got {q.fanout_max_parents})")
    _check_positive("wado.stall_timeout", s.wado.stall_timeout)
    if not 0 <= s.wado.bulk_threshold <= 1 << 20:
        raise ConfigError("wado.bulk_threshold", f"must be between 0 and 1048576 bytes (got {s.wado.bulk_threshold})")
    if s.wado.max_age < 0:
        raise ConfigError("wado.max_age", f"must be 0 or more seconds (got {s.wado.max_age})")
    if s.cache.max_mb < 0:
        raise ConfigError("cache.max_mb", f"must be 0 (off) or more (got {s.cache.max_mb:g})")
    if s.cache.ttl < 0:
        raise ConfigError("cache.ttl", f"must be 0 (off) or more seconds (got {s.cache.ttl:g})")
    for i, origin in enumerate(s.server.cors_origins):
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path
                              or parts.query or parts.fragment):
            raise ConfigError(f"server.cors_origins[{i}]",
                              f"must be an origin like https://viewer.example.org, or * (got {origin!r})")
    _check_positive("stow.max_body_mb", s.stow.max_body_mb)
    _check_positive("stow.max_part_mb", s.stow.max_part_mb)
    _check_positive("stow.read_timeout", s.stow.read_timeout)
    if not 1 <= s.stow.lanes <= 16:
        raise ConfigError("stow.lanes", f"must be between 1 and 16 (got {s.stow.lanes})")
    _validate_limits(s.limits)
    if not s.nodes:
        raise ConfigError("nodes", "at least one [[nodes]] entry is required")
    seen: set[str] = set()
    env_names: dict[str, str] = {}
    for i, n in enumerate(s.nodes):
        w = f"nodes[{i}]"
        if not _NODE_NAME_RE.match(n.name):
            raise ConfigError(f"{w}.name", f"must be 1-64 letters, digits, '.', '_' or '-' (got {n.name!r})")
        if n.name in seen:
            raise ConfigError(f"{w}.name", f"duplicate node name {n.name!r}")
        seen.add(n.name)
        env = env_name_for_node(n.name)
        if env in env_names:
            raise ConfigError(
                f"{w}.name", f"{n.name!r} and {env_names[env]!r} share the environment prefix {env}_; rename one"
            )
        env_names[env] = n.name
        _check_ae(f"{w}.ae_title", n.ae_title)
        if not n.host:
            raise ConfigError(f"{w}.host", "is required")
        _check_port(f"{w}.port", n.port)
        if n.retrieve not in RETRIEVE_MODES:
            raise ConfigError(f"{w}.retrieve", f"must be one of {', '.join(RETRIEVE_MODES)} (got {n.retrieve!r})")
        if n.prefetch not in PREFETCH_MODES:
            raise ConfigError(f"{w}.prefetch", f"must be one of {', '.join(PREFETCH_MODES)} (got {n.prefetch!r})")
        if not 1 <= n.max_associations <= 256:
            raise ConfigError(f"{w}.max_associations", f"must be between 1 and 256 (got {n.max_associations})")
        if n.max_pdu != 0 and not 4096 <= n.max_pdu <= 0xFFFFFFFF:
            raise ConfigError(f"{w}.max_pdu", f"must be 0 (unlimited) or between 4096 and 4294967295 (got {n.max_pdu})")
        if n.relational not in RELATIONAL_MODES:
            raise ConfigError(
                f"{w}.relational", f"must be one of {', '.join(RELATIONAL_MODES)} (got {n.relational!r})"
            )
        if n.charset not in CHARSETS:
            raise ConfigError(f"{w}.charset", f"must be one of {', '.join(CHARSETS)} (got {n.charset!r})")
        if not 0 <= n.retries <= 5:
            raise ConfigError(f"{w}.retries", f"must be between 0 and 5 (got {n.retries})")
        if not 0 <= n.breaker_threshold <= 1000:
            raise ConfigError(f"{w}.breaker_threshold",
                              f"must be between 0 (disabled) and 1000 (got {n.breaker_threshold})")
        _check_positive(f"{w}.breaker_cooldown", n.breaker_cooldown)
        _validate_guards(w, n)
        if n.breaker_cooldown > 3600:
            raise ConfigError(f"{w}.breaker_cooldown", f"must be at most 3600 seconds (got {n.breaker_cooldown:g})")
        for key in ("acquire_timeout", "idle_timeout"):
            _check_positive(f"{w}.{key}", getattr(n, key))
        for key in ("connect", "acse", "dimse"):
            _check_positive(f"{w}.timeouts.{key}", getattr(n.timeouts, key))
        if n.tls.enabled:
            _check_files(f"{w}.tls", n.tls, ("ca_file", "cert_file", "key_file"))
            if bool(n.tls.cert_file) != bool(n.tls.key_file):
                raise ConfigError(f"{w}.tls", "cert_file and key_file go together")
    _validate_auth(s.auth, {n.name for n in s.nodes})
    _validate_audit(s.audit)
    defaults = [n.name for n in s.nodes if n.default]
    if len(defaults) > 1:
        raise ConfigError("nodes", f"only one node may have default = true (got {', '.join(defaults)})")
    if not defaults:
        if len(s.nodes) == 1:
            object.__setattr__(s, "nodes", (replace(s.nodes[0], default=True),))
        else:
            raise ConfigError("nodes", "one node must have default = true")


_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_KEY_HASH_RE = re.compile(r"^sha256:[0-9a-fA-F]{64}$")
_PATIENT_DATA_PATH_RE = re.compile(r"^/(dicom-web|wado|nodes)(/|$)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_fetch_url(setting: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ConfigError(setting, f"must be an absolute https URL (got {url!r})")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(setting, "must be https: keys fetched over plain http could be swapped on the way "
                                   f"(http is allowed to a loopback address only; got {url!r})")


def _check_node_list(setting: str, names: tuple[str, ...], known: set[str]) -> None:
    for name in names:
        if name != "*" and name not in known:
            raise ConfigError(setting, f"no node named {name!r} is configured "
                                       f"(known: {', '.join(sorted(known))}; '*' means every node)")


def _validate_auth(a: AuthSettings, known_nodes: set[str]) -> None:
    if a.issuer:
        if not a.audience:
            raise ConfigError("auth.audience", "is required with auth.issuer: without it, a token the identity "
                                               "provider issued for any other application would be accepted")
        if not a.jwks_url:  # OpenID Connect discovery from the issuer
            _check_fetch_url("auth.issuer", a.issuer)
    if a.jwks_url:
        if not a.issuer:
            raise ConfigError("auth.issuer", "is required with auth.jwks_url: every token's iss is checked against it")
        _check_fetch_url("auth.jwks_url", a.jwks_url)
    if a.enabled and not a.issuer and not a.api_keys:
        raise ConfigError(
            "auth", "authentication is on (the default), but there is nothing to check credentials against: "
                    "set auth.issuer and auth.audience for OAuth2/OIDC bearer tokens, and/or add [[auth.api_keys]] "
                    "(hashes from `dicomweb-gateway hash-key`); to serve without authentication, set "
                    "auth.enabled = false explicitly")
    _check_files("auth", a, ("ca_file",))
    if not a.algorithms:
        raise ConfigError("auth.algorithms", "must name at least one algorithm")
    for alg in a.algorithms:
        if alg not in JWT_ALGORITHMS:
            raise ConfigError("auth.algorithms", f"{alg!r} is not accepted: only asymmetric algorithms "
                                                 f"({', '.join(JWT_ALGORITHMS)}); never 'none' or HS*")
    if not math.isfinite(a.leeway) or not 0 <= a.leeway <= 300:
        raise ConfigError("auth.leeway", f"must be between 0 and 300 seconds (got {a.leeway:g})")
    _check_positive("auth.jwks_ttl", a.jwks_ttl)
    if not math.isfinite(a.jwks_min_refresh) or not 0 <= a.jwks_min_refresh <= a.jwks_ttl:
        raise ConfigError("auth.jwks_min_refresh",
                          f"must be between 0 and auth.jwks_ttl ({a.jwks_ttl:g}) seconds (got {a.jwks_min_refresh:g})")
    for key in ("scope_claim", "read_scope", "write_scope", "nodes_claim"):
        value = getattr(a, key)
        if not value or any(c.isspace() for c in value):
            raise ConfigError(f"auth.{key}", f"must be a non-empty name without spaces (got {value!r})")
    if not _HEADER_NAME_RE.match(a.api_key_header) or a.api_key_header.lower() in ("authorization", "cookie", "host"):
        raise ConfigError("auth.api_key_header", f"must be an HTTP header name of its own (got {a.api_key_header!r})")
    for i, path in enumerate(a.open_paths):
        if not path.startswith("/"):
            raise ConfigError(f"auth.open_paths[{i}]", f"must be a path starting with '/' (got {path!r})")
        if _PATIENT_DATA_PATH_RE.match(path):
            raise ConfigError(f"auth.open_paths[{i}]", "DICOMweb and WADO-URI routes cannot be opened one by one; "
                                                       "auth.enabled = false opens everything")
    _check_node_list("auth.token_nodes", a.token_nodes, known_nodes)
    names: set[str] = set()
    hashes: set[str] = set()
    for i, api_key in enumerate(a.api_keys):
        w = f"auth.api_keys[{i}]"
        if not api_key.name.strip():
            raise ConfigError(f"{w}.name", "is required: it names the service account in the audit log")
        if api_key.name in names:
            raise ConfigError(f"{w}.name", f"duplicate API key name {api_key.name!r}")
        names.add(api_key.name)
        if not _KEY_HASH_RE.match(api_key.hash):
            raise ConfigError(f"{w}.hash", "must be 'sha256:' and 64 hex digits, as `dicomweb-gateway hash-key` "
                                           "prints it (the hash, never the key itself)")
        if api_key.hash.lower() in hashes:
            raise ConfigError(f"{w}.hash", "the same key hash is configured twice")
        hashes.add(api_key.hash.lower())
        _check_node_list(f"{w}.nodes", api_key.nodes, known_nodes)
    for i, grant in enumerate(a.grants):
        w = f"auth.grants[{i}]"
        if not grant.claim or not grant.value:
            raise ConfigError(w, "claim and value are required")
        _check_node_list(f"{w}.nodes", grant.nodes, known_nodes)


def _check_files(section: str, settings: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        path = getattr(settings, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{section}.{key}", f"file not found: {path}")


def _validate_server_tls(s: ServerSettings) -> None:
    """Structure and existence only; gateway/tls.py loads the files (``check_files``)."""
    _check_files("server", s, ("tls_cert_file", "tls_key_file", "tls_client_ca_file"))
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        raise ConfigError("server.tls_key_file", "tls_cert_file and tls_key_file go together")
    if s.tls_client_cert not in ("none", "optional", "required"):
        raise ConfigError("server.tls_client_cert",
                          f"must be one of none, optional, required (got {s.tls_client_cert!r})")
    if s.tls_client_cert != "none" and not (s.tls_cert_file and s.tls_client_ca_file):
        raise ConfigError("server.tls_client_cert",
                          f"{s.tls_client_cert!r} needs tls_cert_file, tls_key_file and tls_client_ca_file")
    if s.tls_client_ca_file and s.tls_client_cert == "none":
        raise ConfigError("server.tls_client_ca_file",
                          "is set but tls_client_cert is 'none': set it to 'optional' or 'required', or remove the CA")
    if not math.isfinite(s.tls_reload_interval) or s.tls_reload_interval < 0:
        raise ConfigError("server.tls_reload_interval",
                          f"must be 0 (only on SIGHUP) or more seconds (got {s.tls_reload_interval:g})")


def _validate_move_tls(g: GatewaySettings) -> None:
    _check_files("gateway", g, ("move_tls_cert_file", "move_tls_key_file", "move_tls_ca_file"))
    if bool(g.move_tls_cert_file) != bool(g.move_tls_key_file):
        raise ConfigError("gateway.move_tls_key_file", "move_tls_cert_file and move_tls_key_file go together")
    if g.move_tls_ca_file and not g.move_tls_cert_file:
        raise ConfigError("gateway.move_tls_ca_file", "needs move_tls_cert_file and move_tls_key_file")


def _validate_audit(a: AuditSettings) -> None:
    if not a.path:
        raise ConfigError("audit.path", "must be a file path, or '-' for standard output")
    if a.path != "-" and not Path(a.path).parent.is_dir():
        raise ConfigError("audit.path", f"directory not found: {Path(a.path).parent}")
    if a.syslog_host:
        _check_port("audit.syslog_port", a.syslog_port)
        _check_files("audit", a, ("syslog_ca_file", "syslog_cert_file", "syslog_key_file"))
        if bool(a.syslog_cert_file) != bool(a.syslog_key_file):
            raise ConfigError("audit", "syslog_cert_file and syslog_key_file go together")


def _validate_limits(lim: LimitsSettings) -> None:
    for key in ("max_inflight_retrieves", "max_inflight_searches", "max_threads", "rate_limit_burst"):
        if getattr(lim, key) < 0:
            raise ConfigError(f"limits.{key}", f"must be 0 (no limit) or more (got {getattr(lim, key)})")
    for key in ("max_buffer_mb", "rate_limit_per_client", "shutdown_grace"):
        value = getattr(lim, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"limits.{key}", f"must be a finite number, 0 or more (got {value:g})")
    for key in ("max_url_bytes", "max_header_bytes"):
        if not 1024 <= getattr(lim, key) <= 1 << 20:
            raise ConfigError(f"limits.{key}", f"must be between 1024 and 1048576 bytes (got {getattr(lim, key)})")
    _check_positive("limits.header_timeout", lim.header_timeout)
    _check_positive("limits.keepalive_timeout", lim.keepalive_timeout)


def _validate_guards(where: str, n: NodeSettings) -> None:
    from .guards import parse_required_keys  # pydicom's dictionary, loaded only when needed

    try:
        parse_required_keys(n.required_keys)
    except ValueError as exc:
        raise ConfigError(f"{where}.required_keys", str(exc)) from None
    if not 0 <= n.min_wildcard_chars <= 64:
        raise ConfigError(f"{where}.min_wildcard_chars", f"must be between 0 (off) and 64 (got {n.min_wildcard_chars})")


def settings_schema() -> dict[str, list[str]]:
    """Every setting's dotted name, by section: used to keep the README's table complete."""

    def names(cls: type, prefix: str) -> list[str]:
        out = []
        for f in fields(cls):
            if isinstance(f.type, str) and f.type in ("Timeouts", "TlsSettings"):
                out += names(Timeouts if f.type == "Timeouts" else TlsSettings, f"{prefix}{f.name}.")
            elif isinstance(f.type, str) and f.type in _TABLE_LISTS:
                out += names(_TABLE_LISTS[f.type], f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)
        return out

    return {
        "server": names(ServerSettings, ""),
        "gateway": names(GatewaySettings, ""),
        "qido": names(QidoSettings, ""),
        "wado": names(WadoSettings, ""),
        "stow": names(StowSettings, ""),
        "cache": names(CacheSettings, ""),
        "limits": names(LimitsSettings, ""),
        "auth": names(AuthSettings, ""),
        "audit": names(AuditSettings, ""),
        "nodes": names(NodeSettings, ""),
    }

