"""Helpers for the offline checks of deploy/: paths, the Dockerfile's instructions, environment
variable names against the real settings schema, and settings loaded the way a container loads them.

Nothing here hard-codes a setting's name: the known ``DWG_*`` variables are derived from
``gateway.config.settings_schema()`` and ``env_name_for_node()``, so the checks follow the schema as
settings are added.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import ENV_PREFIX, Settings, env_name_for_node, load_settings, settings_schema
from tests.support.realpacs import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SYSTEMD_UNIT = DEPLOY / "systemd" / "dicomweb-gateway.service"
NGINX_CONF = DEPLOY / "nginx" / "dicomweb-gateway.conf"
EXAMPLE_CONFIG = DEPLOY / "gateway.example.toml"
CONFIG_PATH = "/etc/dicomweb-gateway/gateway.toml"  # where every deployment puts the settings file


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def venv_tool(name: str, what: str) -> str:
    """A console script installed next to this interpreter (the test extra's tools); fails under
    CI=true and skips elsewhere when it is missing, like the real servers."""
    path = str(Path(sys.executable).parent / name)
    require_binary(path, what)
    return path


# ------------------------------------------------------------------------------------ Dockerfile


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 for the first FROM's stage; -1 before any FROM (global ARGs)
    keyword: str  # upper-case
    args: str  # the rest of the instruction, continuation lines joined

    def json_args(self) -> list[str]:
        """The exec form (``["a", "b"]``) as a list; the shell form split like a shell would."""
        text = self.args.strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment between continuation lines
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, args.strip()))
    assert not pending, f"{path}: the last instruction ends in a line continuation"
    return out


def dockerfile_env(instructions: list[Instruction] | None = None) -> dict[str, str]:
    """The ``ENV`` of the final stage (``KEY=value`` pairs; ``$PATH`` left as written)."""
    instructions = instructions if instructions is not None else dockerfile_instructions()
    final = max(i.stage for i in instructions)
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.stage == final and ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {ins.args!r}: use the KEY=value form"
                env[key] = value
    return env


# ------------------------------------------------------------------------- settings and DWG_* names


def setting_for_env(name: str, node_names: list[str]) -> str | None:
    """The setting an environment variable overrides (``nodes[pacs].tls.enabled``), or None."""
    if name == ENV_PREFIX + "NODES":
        return "nodes"
    for section, keys in settings_schema().items():
        for key in keys:
            suffix = key.replace(".", "_").upper()
            if section == "nodes":
                for node in node_names:
                    if name == f"{env_name_for_node(node)}_{suffix}":
                        return f"nodes[{node}].{key}"
            elif name == f"{ENV_PREFIX}{section.upper()}_{suffix}":
                return f"{section}.{key}"
    return None


def unknown_env_names(env: Mapping[str, str], node_names: list[str]) -> list[str]:
    """``DWG_*`` names in ``env`` that override no setting (a typo is silently ignored otherwise)."""
    return sorted(n for n in env if n.startswith(ENV_PREFIX) and setting_for_env(n, node_names) is None)


def toml_node_names(toml_text: str) -> list[str]:
    return [n["name"] for n in tomllib.loads(toml_text).get("nodes", [])]


@contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly ``env``'s ``DWG_*`` variables for the duration (none of the machine's own)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for k in saved:
        del os.environ[k]
    os.environ.update({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[k]
        os.environ.update(saved)


def load_deployed_settings(toml_text: str, env: Mapping[str, str], tmp_path: Path) -> Settings:
    """Settings as the gateway loads them in a deployment: this TOML file, then ``env`` on top."""
    path = tmp_path / "gateway.toml"
    path.write_text(toml_text, encoding="utf-8")
    with environment(env):
        return load_settings(path)


# ------------------------------------------------------------------------------------------- YAML


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every YAML document must be a mapping"
    return docs


def plain_env(env: Any) -> dict[str, str]:
    """A compose ``environment`` (mapping or ``KEY=value`` list) as a dict of strings."""
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in (env or {}).items()}


# ------------------------------------------------------------------------------------------ wheel


def build_wheel(source: Path, out: Path) -> Path:
    """Build the project's wheel from ``source`` with this interpreter's pip, offline: no build
    isolation (the test extra brings setuptools), no dependencies, no cache."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "--disable-pip-version-check", "--no-index", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300, cwd=out,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("dicomweb_gateway-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    return wheels[0]
