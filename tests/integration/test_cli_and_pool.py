"""The command line (serve, echo, check-config, demo) and the association pool, seen from the PACS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess, to_toml
from tests.support.realpacs import OrthancServer, free_port

from .test_qido_failures import wait_for


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_invalid_configuration_stops_start_up_naming_the_setting(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[nodes]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 70000\n')
    result = cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "nodes[0].port" in result.stderr and "70000" in result.stderr
    assert "Traceback" not in result.stderr
    bad.write_text('[server]\nprot = 8080\n[[nodes]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n')
    result = cli("check-config", "--config", str(bad))
    assert result.returncode == 2 and "server.prot" in result.stderr and "unknown setting" in result.stderr


def _config(tmp_path, nodes: list[dict]) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml({"gateway": {"ae_title": "DICOMWEB-GW"}, "auth": {"enabled": False}, "nodes": nodes}))
    return str(path)


def test_echo_reports_what_each_node_accepts(tmp_path, demo_pacs: DemoPACS, demo_hier: DemoPACS, orthanc: OrthancServer) -> None:
    config = _config(tmp_path, [
        {"name": "demo", "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": demo_pacs.port, "default": True},
        {"name": "hier", "ae_title": "DEMO-HIER", "host": "127.0.0.1", "port": demo_hier.port},
        {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
        {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
    ])
    reports = {}
    for node in ("demo", "hier", "orthanc"):
        result = cli("echo", node, "--config", config, "--json")
        assert result.returncode == 0, result.stderr
        reports[node] = json.loads(result.stdout)
    assert reports["demo"]["echo_status"] == "0x0000"
    assert reports["demo"]["relational queries"] is True
    assert reports["hier"]["relational queries"] is False
    assert reports["demo"]["Study Root GET"] is True and reports["demo"]["Study Root FIND"] is True
    assert reports["orthanc"]["Study Root FIND"] is True
    assert reports["orthanc"]["peer maximum PDU"] > 0
    text = cli("echo", "demo", "--config", config)
    assert "relational queries" in text.stdout
    down = cli("echo", "down", "--config", config)
    assert down.returncode == 1 and "NodeUnreachable" in down.stderr
    unknown = cli("echo", "nope", "--config", config)
    assert unknown.returncode == 2 and "nope" in unknown.stderr


def test_demo_command_serves_the_demo_pacs(studies: list[Dataset]) -> None:
    port, pacs_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--port", str(port), "--pacs-port", str(pacs_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: _healthy(port), timeout=30), "demo did not come up"
        r = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=30)
        assert r.status_code == 200
        assert len(r.json()) == len({d.StudyInstanceUID for d in studies})
        r = httpx.get(f"http://127.0.0.1:{port}/nodes/demo/dicom-web/series", params={"Modality": "MR"}, timeout=30)
        assert len(r.json()) == len({d.SeriesInstanceUID for d in studies if d.Modality == "MR"})
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/dicom-web/studies" in out  # it printed URLs to try


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_concurrent_requests_queue_for_the_capped_associations(gateway: GatewayProcess, demo_pacs: DemoPACS) -> None:
    """32 clients on a node capped at 4 associations: no error, never more than 4 at the PACS."""
    demo_pacs.reset_counters()
    statuses: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            for _ in range(3):
                code = c.get(gateway.url("demo", "/studies"), params={"PatientID": "DEMO-0001"}).status_code
                with lock:
                    statuses.append(code)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 96
    assert 1 <= demo_pacs.associations_peak <= 4
    assert demo_pacs.associations_total <= 8, "associations were not reused"


def test_sequential_queries_reuse_one_association(gateway: GatewayProcess, demo_hier: DemoPACS) -> None:
    time.sleep(0.2)
    demo_hier.reset_counters()
    for _ in range(10):
        assert httpx.get(gateway.url("demo-hier", "/studies"), params={"PatientID": "DEMO-0003"}, timeout=30).status_code == 200
    assert demo_hier.find_requests == 10
    assert demo_hier.associations_total <= 2  # one, or one more if the idle one expired meanwhile


def test_a_dead_pooled_association_is_replaced(gateway: GatewayProcess, studies: list[Dataset]) -> None:
    """The PACS restarts between two queries: the pooled association is dead; the next query
    notices, opens a new one and answers as if nothing happened."""
    first = DemoPACS(ae_title="VICTIM", port=gateway.victim_port, datasets=studies)
    first.start()
    try:
        r = httpx.get(gateway.url("victim", "/studies"), params={"PatientID": "DEMO-0001"}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 3
    finally:
        first.stop()
    second = DemoPACS(ae_title="VICTIM", port=gateway.victim_port, datasets=studies)
    second.start()
    try:
        r = httpx.get(gateway.url("victim", "/studies"), params={"PatientID": "DEMO-0002"}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 2
        assert second.associations_total >= 1
    finally:
        second.stop()


@pytest.mark.parametrize("flip", ["unsupported", "silent"])
def test_ignored_keys_are_post_filtered_or_reported(gateway: GatewayProcess, chaos: DemoPACS, studies: list[Dataset], flip: str) -> None:
    """A PACS that ignores a key still returning it gets post-filtered; one that ignores and omits it
    gets the unfiltered answer plus a Warning; FF01 is reported too."""
    if flip == "unsupported":
        chaos.unsupported_keys = {"StudyDescription"}
    else:
        chaos.silently_ignored_keys = {"StudyDescription"}
    r = httpx.get(gateway.url("chaos", "/studies"), params={"StudyDescription": "MR*"}, timeout=30)
    assert r.status_code == 200
    warnings = " ".join(r.headers.get_list("warning"))
    assert "StudyDescription" in warnings
    if flip == "unsupported":
        assert "FF01" in warnings
    assert len(r.json()) == len({d.StudyInstanceUID for d in studies})  # the PACS could not filter; nor could we


def test_fuzzy_matching_not_accepted_gives_the_standard_warning(gateway: GatewayProcess) -> None:
    r = httpx.get(gateway.url("demo", "/studies"), params={"PatientName": "DOE*", "fuzzymatching": "true"}, timeout=30)
    assert r.status_code == 200
    assert any("The fuzzymatching parameter is not supported. Only literal matching has been performed." in w
               for w in r.headers.get_list("warning"))
