"""deploy/systemd/dicomweb-gateway.service, checked by systemd's own tools without running it.

``systemd-analyze verify`` loads the unit the way systemd would and must have nothing to say about
it; it needs ExecStart's program to exist, so it checks a copy whose ExecStart names this
environment's real ``dicomweb-gateway`` script (nothing else changes). ``systemd-analyze security
--offline`` rates the hardening. The settings file the unit serves is the example in deploy/, which
must load.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.deploy.support import CONFIG_PATH, EXAMPLE_CONFIG, SYSTEMD_UNIT, load_deployed_settings
from tests.support.realpacs import require_binary

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
# Exposure, 0-100 (systemd-analyze prints it /10): the unit rates 1.2 ("OK") today; past 2.0 fails.
MAX_EXPOSURE = 20
REQUIRED = {
    "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service", "MemoryDenyWriteExecute": "yes",
}


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, by key, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart's program replaced by the real script of this environment."""
    text = text if text is not None else SYSTEMD_UNIT.read_text()
    script = Path(sys.executable).parent / "dicomweb-gateway"
    assert script.is_file(), f"{script}: the console script of the installed gateway"
    [exec_start] = directives(text)["ExecStart"]
    program = shlex.split(exec_start)[0]
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(text.replace(f"ExecStart={program} ", f"ExecStart={script} "))
    assert str(script) in unit.read_text()
    return unit


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    require_binary(SYSTEMD_ANALYZE, "systemd-analyze (Debian package systemd)")
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    unit = local_copy(tmp_path)
    proc = analyze("verify", str(unit), cwd=tmp_path)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_verify_catches_a_mistake(tmp_path: Path) -> None:
    """The check is real: a misspelt hardening option is reported (systemd would ignore it)."""
    text = SYSTEMD_UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes")
    proc = analyze("verify", str(local_copy(tmp_path, text)), cwd=tmp_path)
    assert "ProtectHomes" in proc.stderr


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    found = directives(SYSTEMD_UNIT.read_text())
    for key, value in REQUIRED.items():
        assert value in found.get(key, []), f"{key}={value} is missing"
    assert found.get("MemoryMax"), "a memory cap"
    unit = local_copy(tmp_path)
    proc = analyze("security", "--offline=yes", "--json=short", f"--threshold={MAX_EXPOSURE}", str(unit),
                   cwd=tmp_path)
    report = {item["name"]: item for item in json.loads(proc.stdout)}
    failing = sorted(name for name, item in report.items() if item.get("set") is False and item.get("exposure"))
    assert proc.returncode == 0, f"exposure over {MAX_EXPOSURE / 10}; still open: {failing}"
    for name in ("User=/DynamicUser=", "NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=",
                 "SystemCallFilter=~@privileged"):
        assert report[name]["set"] is True, f"systemd does not count {name} as set"


def test_it_serves_the_example_settings(tmp_path: Path) -> None:
    [exec_start] = directives(SYSTEMD_UNIT.read_text())["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[1:] == ["serve", "--config", CONFIG_PATH]
    settings = load_deployed_settings(EXAMPLE_CONFIG.read_text(), {}, tmp_path)
    assert settings.server.host in ("127.0.0.1", "::1"), "behind the proxy on the same host"
    assert settings.server.trusted_proxies, "the proxy's headers are honoured"
    for port in (settings.server.port, settings.gateway.move_port):
        assert port >= 1024, "no capability: unprivileged ports only"
    assert re.search(r"^TimeoutStopSec=\d+", SYSTEMD_UNIT.read_text(), re.M)
