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


@dataclass(frozen=True)
class GatewaySettings:
    ae_title: str = "DICOMWEB-GW"
    move_host: str = "127.0.0.1"
    move_port: int = 11113


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


@dataclass(frozen=True)
class StowSettings:
    max_body_mb: float = 4096.0
    max_part_mb: float = 1024.0
    lanes: int = 2
    read_timeout: float = 60.0


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
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    qido: QidoSettings = field(default_factory=QidoSettings)
    wado: WadoSettings = field(default_factory=WadoSettings)
    stow: StowSettings = field(default_factory=StowSettings)
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
                "stow": StowSettings}
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
    _check_ae("gateway.ae_title", s.gateway.ae_title)
    _check_port("gateway.move_port", s.gateway.move_port, allow_zero=True)
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
    _check_positive("stow.max_body_mb", s.stow.max_body_mb)
    _check_positive("stow.max_part_mb", s.stow.max_part_mb)
    _check_positive("stow.read_timeout", s.stow.read_timeout)
    if not 1 <= s.stow.lanes <= 16:
        raise ConfigError("stow.lanes", f"must be between 1 and 16 (got {s.stow.lanes})")
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
        if n.breaker_cooldown > 3600:
            raise ConfigError(f"{w}.breaker_cooldown", f"must be at most 3600 seconds (got {n.breaker_cooldown:g})")
        for key in ("acquire_timeout", "idle_timeout"):
            _check_positive(f"{w}.{key}", getattr(n, key))
        for key in ("connect", "acse", "dimse"):
            _check_positive(f"{w}.timeouts.{key}", getattr(n.timeouts, key))
        if n.tls.enabled:
            for key in ("ca_file", "cert_file", "key_file"):
                path = getattr(n.tls, key)
                if path and not Path(path).is_file():
                    raise ConfigError(f"{w}.tls.{key}", f"file not found: {path}")
            if bool(n.tls.cert_file) != bool(n.tls.key_file):
                raise ConfigError(f"{w}.tls", "cert_file and key_file go together")
    defaults = [n.name for n in s.nodes if n.default]
    if len(defaults) > 1:
        raise ConfigError("nodes", f"only one node may have default = true (got {', '.join(defaults)})")
    if not defaults:
        if len(s.nodes) == 1:
            object.__setattr__(s, "nodes", (replace(s.nodes[0], default=True),))
        else:
            raise ConfigError("nodes", "one node must have default = true")


def settings_schema() -> dict[str, list[str]]:
    """Every setting's dotted name, by section: used to keep the README's table complete."""

    def names(cls: type, prefix: str) -> list[str]:
        out = []
        for f in fields(cls):
            if isinstance(f.type, str) and f.type in ("Timeouts", "TlsSettings"):
                out += names(Timeouts if f.type == "Timeouts" else TlsSettings, f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)
        return out

    return {
        "server": names(ServerSettings, ""),
        "gateway": names(GatewaySettings, ""),
        "qido": names(QidoSettings, ""),
        "wado": names(WadoSettings, ""),
        "stow": names(StowSettings, ""),
        "nodes": names(NodeSettings, ""),
    }

