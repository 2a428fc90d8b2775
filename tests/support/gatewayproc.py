"""Run the gateway as a real process (``python -m gateway.cli serve``) on a free loopback port."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .realpacs import free_port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. in [auth] api_keys = [{name = ..., hash = ...}]
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(settings: dict[str, Any]) -> str:
    lines: list[str] = []
    for section in (k for k in settings if k != "nodes"):
        if section in settings:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in settings[section].items()]
    for node in settings.get("nodes", []):
        lines.append("[[nodes]]")
        tables = {k: v for k, v in node.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in node.items() if not isinstance(v, dict)]
        for name, table in tables.items():
            lines.append(f"[nodes.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """The gateway under test. ``base`` is its root URL; ``log_text()`` what it logged.

    With ``server.tls_cert_file`` in the settings it serves HTTPS (``base`` is https://...) and
    ``tls_client`` is the client context ``start()`` checks ``/health`` with: one that trusts the
    gateway's CA, with a client certificate when the gateway requires one."""

    def __init__(self, settings: dict[str, Any], env: dict[str, str] | None = None,
                 tls_client: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        settings = {**settings, "server": {"host": "127.0.0.1", "port": self.port, **settings.get("server", {})}}
        self.dir = Path(tempfile.mkdtemp(prefix="gw-test-"))
        # kept until the test run ends (a failing test's report reads the log), then removed
        atexit.register(shutil.rmtree, self.dir, True)
        # Tests of other features run without authentication unless their settings carry an [auth]
        # section; audit records go to their own file, so the process log stays the application log.
        settings = {"auth": {"enabled": False}, **settings,
                    "audit": {"path": str(self.dir / "audit.jsonl"), **settings.get("audit", {})}}
        self.audit_path = Path(settings["audit"]["path"])
        self.config_path = self.dir / "gateway.toml"
        self.config_path.write_text(to_toml(settings))
        self.log_path = self.dir / "gateway.log"
        self.base = f"{'https' if settings['server'].get('tls_cert_file') else 'http'}://127.0.0.1:{self.port}"
        self.tls_client = tls_client
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.victim_port = 0  # set by fixtures that reserve a port for a PACS they start and stop

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                verify: ssl.SSLContext | bool = self.tls_client if self.tls_client is not None else True
                if httpx.get(self.base + "/health", timeout=1, verify=verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not become healthy:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def url(self, node: str | None, path: str) -> str:
        prefix = "/dicom-web" if node is None else f"/nodes/{node}/dicom-web"
        return self.base + prefix + path

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
