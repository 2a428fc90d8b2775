"""The OHIF viewer on the gateway, driven in headless Chromium: fixtures and failure reports.

What runs, all on 127.0.0.1:

- an Orthanc holding the synthetic studies (gateway.demo.data);
- the gateway as its own process, with that Orthanc as its only node (C-GET) and the viewer's origin
  as its one allowed CORS origin;
- the viewer's prebuilt files (npm package @ohif/app, installed by ``npm ci`` in this folder)
  served by a thread of the test process on another port, so the viewer is cross-origin to the
  gateway as in a real deployment;
- ``node ohif_driver.mjs``: playwright-core driving Debian's /usr/bin/chromium (never a downloaded
  browser), once per test module; the tests check what it saw.

Chromium, Node.js and the npm packages are real parts: when one is missing the tests fail under
``CI=true`` and are skipped otherwise (``bash deploy/bootstrap.sh test`` installs all three).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from gateway.demo.data import generate_studies
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    OrthancServer,
    free_port,
    missing_part,
    require_binary,
)

from .ohif_site import HERE, OHIF_DIST, PLAYWRIGHT_CORE, StaticSite, render_app_config

CHROMIUM_BINARY = "/usr/bin/chromium"
GATEWAY_AE = "DICOMWEB-GW"
DRIVER = HERE / "ohif_driver.mjs"
#: The longest the viewer may take to show any one thing (a page, a list, an image).
STEP_TIMEOUT_S = 30
#: The whole browser run; it normally takes 15-25 s.
DRIVER_TIMEOUT_S = 90


def node_binary() -> str:
    return shutil.which("node") or "/usr/bin/node"


def require_node(minimum: int = 20) -> None:
    """playwright-core 1.65 needs Node.js 20 or newer (Debian 12's own nodejs is 18)."""
    require_binary(node_binary(), "Node.js (Debian package nodejs)")
    out = subprocess.run([node_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    major = int(out.strip().lstrip("v").split(".")[0] or 0) if out.strip() else 0
    if major < minimum:
        missing_part(f"Node.js {out.strip() or '(unknown version)'} is too old for playwright-core: {minimum}+ needed")


def require_npm_packages() -> None:
    """The npm packages are installed by ``npm ci`` here: missing ones fail under CI, skip elsewhere."""
    missing = [str(p) for p in (OHIF_DIST / "index.html", PLAYWRIGHT_CORE / "package.json") if not p.is_file()]
    if not missing:
        return
    hint = "run `npm ci` in tests/browser (bash deploy/bootstrap.sh test does)"
    if not shutil.which("npm"):
        hint = "install npm (Debian package npm), then " + hint
    missing_part(f"the npm packages of tests/browser are not installed ({', '.join(missing)} missing): {hint}")


@dataclass(repr=False)
class ViewerSetup:
    """Everything one browser run is made of, for the tests and for failure reports."""

    studies: list[Dataset]
    orthanc: OrthancServer
    gateway: GatewayProcess
    site: StaticSite
    out_dir: Path
    plan: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""
    failed: bool = False

    def __repr__(self) -> str:  # short: pytest prints it in every failure's traceback
        return (f"ViewerSetup(site={self.site.origin}, gateway={self.gateway.base}, "
                f"ok={self.result.get('ok')}, failed_step={self.result.get('failedStep')!r})")


@pytest.fixture(scope="module")
def viewer_studies() -> list[Dataset]:
    return generate_studies()


@pytest.fixture(scope="module")
def viewer_setup(viewer_studies: list[Dataset]) -> Iterator[ViewerSetup]:
    require_binary(CHROMIUM_BINARY, "Chromium (Debian package chromium)")
    require_node()
    require_npm_packages()
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    move_port = free_port()
    orthanc = OrthancServer(aet="OHIF-ORTHANC", modalities={"gateway": (GATEWAY_AE, "127.0.0.1", move_port)},
                            stop_timeout=0)
    # The site's port must be known before the gateway starts (its CORS origin), and the gateway's
    # before the site serves its app-config.js: the site binds first, its config comes after.
    with orthanc, StaticSite(app_config="") as site:
        orthanc.load(viewer_studies)
        settings = {
            "server": {"cors_origins": [site.origin]},
            "gateway": {"ae_title": GATEWAY_AE, "move_port": move_port},
            "nodes": [{"name": "orthanc", "ae_title": "OHIF-ORTHANC", "host": "127.0.0.1",
                       "port": orthanc.dicom_port, "max_pdu": 131072, "retrieve": "get", "default": True}],
        }
        with GatewayProcess(settings) as gateway:
            site.app_config = render_app_config(f"{gateway.base}/dicom-web", f"{gateway.base}/wado")
            # Screenshots and the driver's report: kept when a test failed, removed otherwise.
            setup = ViewerSetup(studies=viewer_studies, orthanc=orthanc, gateway=gateway, site=site,
                                out_dir=Path(tempfile.mkdtemp(prefix="ohif-run-")))
            yield setup
            if not setup.failed:
                shutil.rmtree(setup.out_dir, ignore_errors=True)


def run_driver(setup: ViewerSetup, plan: dict[str, Any]) -> None:
    """Run the browser once with ``plan``; its JSON report lands in ``setup.result``."""
    plan = {**plan, "site": setup.site.origin, "record": setup.gateway.base, "outDir": str(setup.out_dir),
            "stepTimeoutMs": STEP_TIMEOUT_S * 1000, "totalTimeoutMs": DRIVER_TIMEOUT_S * 1000}
    setup.plan = plan
    # Its own process group, so that a driver that hangs past its own deadline goes with its browser.
    proc = subprocess.Popen([node_binary(), str(DRIVER), json.dumps(plan)], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "NODE_NO_WARNINGS": "1"})
    try:
        stdout, setup.stderr = proc.communicate(timeout=DRIVER_TIMEOUT_S + 20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, setup.stderr = proc.communicate()
        setup.result = {"ok": False, "error": f"the driver did not end within {DRIVER_TIMEOUT_S + 20} s"}
        return
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        setup.result = {"ok": False, "error": f"the driver printed no report (exit {proc.returncode})"}
        return
    setup.result = json.loads(lines[-1])
    (setup.out_dir / "result.json").write_text(json.dumps(setup.result, indent=1))


def request_summary(requests: list[dict[str, Any]]) -> list[str]:
    """One line per distinct (method, path, Accept): status codes and how often."""
    groups: dict[tuple[str, str, str], dict[str, int]] = {}
    for r in requests:
        key = (r["method"], r["path"], r.get("accept") or "-")
        status = str(r.get("status") or r.get("error") or "?")
        groups.setdefault(key, {})
        groups[key][status] = groups[key].get(status, 0) + 1
    return [f"{m} {p}  Accept: {a}  -> {', '.join(f'{s} x{n}' for s, n in sorted(st.items()))}"
            for (m, p, a), st in sorted(groups.items())]


def failure_report(setup: ViewerSetup) -> str:
    """What a failed run looked like from the browser's side."""
    r = setup.result
    parts = [
        f"driver: ok={r.get('ok')} failed step={r.get('failedStep')!r} time={r.get('ms')} ms "
        f"steps={r.get('steps')} webgl={r.get('webgl')!r}",
        f"error: {r.get('error')}",
        "console errors:\n  " + "\n  ".join(r.get("consoleErrors") or ["(none)"])[:6000],
        "page errors:\n  " + "\n  ".join(r.get("pageErrors") or ["(none)"])[:3000],
        "failed requests:\n  " + "\n  ".join(
            [f"{f['method']} {f['url']}: {f['error']}" for f in r.get("failedRequests") or []] or ["(none)"]),
        "CORS errors:\n  " + "\n  ".join(
            [f"{c['url']}: {c['error']} {c.get('parameter') or ''}" for c in r.get("corsErrors") or []] or ["(none)"]),
        "gateway requests:\n  " + "\n  ".join(request_summary(r.get("requests") or []) or ["(none)"]),
        f"at failure: {json.dumps(r.get('atFailure'))[:3000]}",
        f"screenshots: {r.get('screenshots')}",
        f"driver stderr:\n{setup.stderr[-3000:]}",
    ]
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On a failure, attach the browser's side (console, failed requests, screenshots) and the tails
    of the gateway's and Orthanc's logs: each runs in its own process, and their story is otherwise lost."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    setup = getattr(item, "funcargs", {}).get("ohif_run")
    if isinstance(setup, ViewerSetup):
        if setup.failed:  # the whole story is in the first failure's report already
            report.sections.append(("browser", f"see the first failed browser test; files in {setup.out_dir}"))
            return
        setup.failed = True
        report.sections.append(("browser", failure_report(setup)))
        report.sections.append(("gateway log (tail)", setup.gateway.log_text()[-6000:]))
        report.sections.append(("orthanc log (tail)", setup.orthanc.log_tail(15)))
