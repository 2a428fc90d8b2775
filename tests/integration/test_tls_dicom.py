"""DICOM TLS between the gateway and its nodes, against real TLS servers: a demo PACS (pynetdicom)
with TLS, one that requires client certificates, and Orthanc with ``DicomTlsEnabled`` (which always
requires one). Each sits behind gateway nodes with TLS on, and the C-MOVE receiver speaks TLS too.

Certificates are made by the test (tests/support/certs.py): a CA, a certificate for 127.0.0.1 and
localhost that the PACSes and the gateway's receiver serve, a client certificate, and an untrusted
CA. Misconfigurations must give a prompt 502 ``pacs-tls-failure`` (or, where the PACS just drops the
connection, 502 ``pacs-connection-lost`` naming TLS), never a hang, and must not open the breaker.
"""

from __future__ import annotations

import os
import shutil
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.data import instance_bytes
from gateway.demo.pacs import DemoPACS
from tests.support.certs import TestPki, make_pki
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import ORTHANC_BINARY, OrthancDicomTls, OrthancServer, free_port, require_binary

from .test_wado import parts

GATEWAY_AE = "DICOMWEB-GW"
ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# short, so that a failure to fail fast shows as a 504 or an httpx timeout, not as a slow pass
FAST = {"connect": 3.0, "acse": 5.0, "dimse": 20.0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("dicom-pki"))


def server_context(pki: TestPki, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.load_verify_locations(pki.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def move_client_context(pki: TestPki) -> ssl.SSLContext:
    """How the demo PACS reaches the gateway's TLS receiver: verifies it, presents its own certificate."""
    context = ssl.create_default_context(cafile=pki.ca_file)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def demo_tls(pki: TestPki, studies: list[Dataset], move_port: int) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="TLS-DEMO", datasets=studies, ssl_context=server_context(pki),
                  move_destinations={GATEWAY_AE: ("127.0.0.1", move_port)},
                  move_tls=move_client_context(pki)) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def demo_mtls(pki: TestPki, studies: list[Dataset]) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="MTLS-DEMO", datasets=studies[:20],
                  ssl_context=server_context(pki, require_client_cert=True)) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def demo_plain(studies: list[Dataset]) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="PLAIN-DEMO", datasets=studies[:5]) as pacs:
        yield pacs


def needs(node: str) -> None:
    """Tests on the Orthanc nodes need Orthanc (they fail under CI=true without it, skip elsewhere);
    the demo PACS ones run anyway."""
    if node.startswith("orthanc"):
        require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")


@pytest.fixture(scope="module")
def orthanc_tls(pki: TestPki, studies: list[Dataset], move_port: int) -> Iterator[OrthancServer | None]:
    if not os.access(ORTHANC_BINARY, os.X_OK):
        yield None  # no Orthanc nodes; the tests that want them say so through needs()
        return
    tls = OrthancDicomTls(certificate=pki.server_cert, private_key=pki.server_key,
                          trusted_certificates=pki.ca_file, remote_certificate_required=True)
    with OrthancServer(aet="ORTHANC-TLS", modalities={"gateway": (GATEWAY_AE, "127.0.0.1", move_port)},
                       dicom_tls=tls, stop_timeout=0) as server:
        server.load(studies)  # over its REST API, which stays plain HTTP
        yield server


@pytest.fixture(scope="module")
def rotating(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Client certificate files of the ``mtls-rotating`` node: the untrusted CA's at first."""
    directory = tmp_path_factory.mktemp("rotating")
    shutil.copy(pki.rogue_client_cert, directory / "client.crt")
    shutil.copy(pki.rogue_client_key, directory / "client.key")
    return directory


@pytest.fixture(scope="module")
def gateway(pki: TestPki, demo_tls: DemoPACS, demo_mtls: DemoPACS, demo_plain: DemoPACS,
            orthanc_tls: OrthancServer | None, move_port: int, rotating: Path) -> Iterator[GatewayProcess]:
    trusted = {"enabled": True, "ca_file": pki.ca_file}
    mutual = {**trusted, "cert_file": pki.client_cert, "key_file": pki.client_key}

    def node(name: str, ae: str, port: int, tls: dict[str, object] | None = None, **extra: object) -> dict[str, object]:
        out: dict[str, object] = {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port,
                                  "timeouts": FAST, **extra}
        if tls is not None:
            out["tls"] = tls
        return out

    nodes = [
        node("demo-tls", "TLS-DEMO", demo_tls.port, trusted, default=True),
        node("demo-tls-move", "TLS-DEMO", demo_tls.port, trusted, retrieve="move"),
        node("demo-wrong-ca", "TLS-DEMO", demo_tls.port, {"enabled": True, "ca_file": pki.rogue_ca_file},
             breaker_threshold=2),
        node("demo-wrong-name", "TLS-DEMO", demo_tls.port, {**trusted, "server_name": "pacs.example.org"}),
        node("plain-to-tls", "TLS-DEMO", demo_tls.port),
        node("tls-to-plain", "PLAIN-DEMO", demo_plain.port, trusted),
        node("mtls", "MTLS-DEMO", demo_mtls.port, mutual),
        node("mtls-nocert", "MTLS-DEMO", demo_mtls.port, trusted),
        node("mtls-rotating", "MTLS-DEMO", demo_mtls.port,
             {**trusted, "cert_file": str(rotating / "client.crt"), "key_file": str(rotating / "client.key")}),
    ]
    if orthanc_tls is not None:
        port, orthanc = orthanc_tls.dicom_port, {"max_pdu": 131072, "relational": "assume"}
        nodes += [
            node("orthanc-tls", "ORTHANC-TLS", port, mutual, **orthanc),
            node("orthanc-tls-move", "ORTHANC-TLS", port, mutual, retrieve="move", **orthanc),
            node("orthanc-tls-nocert", "ORTHANC-TLS", port, trusted, **orthanc),
            node("orthanc-plain", "ORTHANC-TLS", port, **orthanc),
        ]
    settings = {
        "gateway": {"ae_title": GATEWAY_AE, "move_port": move_port, "move_tls_cert_file": pki.server_cert,
                    "move_tls_key_file": pki.server_key, "move_tls_ca_file": pki.ca_file},
        "nodes": nodes,
    }
    with GatewayProcess(settings) as gw:
        yield gw


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def data_set_bytes(part10: bytes) -> bytes:
    """The data set of a PS3.10 file, after its file meta information (group 0002, whose length
    its first element gives)."""
    assert part10[128:132] == b"DICM"
    group, element, vr = struct.unpack_from("<HH2s", part10, 132)
    assert (group, element, vr) == (0x0002, 0x0000, b"UL")
    (meta_length,) = struct.unpack_from("<I", part10, 140)
    return part10[144 + meta_length:]


def the_series(studies: list[Dataset]) -> list[Dataset]:
    return [d for d in studies if d.get("SeriesDescription") == "AX T1 +C"]


def assert_retrieved_byte_exact(response: httpx.Response, expected: list[Dataset]) -> None:
    """Every instance came back, and its data set is byte for byte the one that was stored."""
    assert response.status_code == 200, response.text
    originals = {d.SOPInstanceUID: data_set_bytes(instance_bytes(d)) for d in expected}
    got = {}
    for headers, payload in parts(response):
        uid = headers["content-location"].rsplit("/", 1)[-1]
        got[uid] = data_set_bytes(payload)
    assert set(got) == set(originals)
    for uid, data in got.items():
        assert data == originals[uid], f"the data set of {uid} differs from the stored one"


def problem(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert body["requestId"]
    return body


# ------------------------------------------------------------------------------------------------
# Working TLS


@pytest.mark.parametrize("node", ["demo-tls", "mtls", "orthanc-tls"])
def test_search_over_tls(gateway: GatewayProcess, client: httpx.Client, studies: list[Dataset], node: str) -> None:
    needs(node)
    held = studies[:20] if node == "mtls" else studies
    r = client.get(gateway.url(node, "/studies"))
    assert r.status_code == 200, r.text
    found = {s["0020000D"]["Value"][0] for s in r.json()}
    assert found == {d.StudyInstanceUID for d in held}


@pytest.mark.parametrize("node", ["demo-tls", "orthanc-tls"])
def test_c_get_over_tls_is_byte_exact(gateway: GatewayProcess, client: httpx.Client, studies: list[Dataset],
                                      node: str) -> None:
    needs(node)
    series = the_series(studies)
    assert len(series) > 1
    url = gateway.url(node, f"/studies/{series[0].StudyInstanceUID}/series/{series[0].SeriesInstanceUID}")
    assert_retrieved_byte_exact(client.get(url, headers={"Accept": ANY_SYNTAX}), series)


@pytest.mark.parametrize("node", ["demo-tls-move", "orthanc-tls-move"])
def test_c_move_over_tls_into_the_tls_receiver_is_byte_exact(gateway: GatewayProcess, client: httpx.Client,
                                                             studies: list[Dataset], node: str) -> None:
    """The PACS connects to the gateway's receiver over TLS, presenting a certificate of the CA
    ``gateway.move_tls_ca_file`` names."""
    needs(node)
    series = the_series(studies)
    url = gateway.url(node, f"/studies/{series[0].StudyInstanceUID}/series/{series[0].SeriesInstanceUID}")
    assert_retrieved_byte_exact(client.get(url, headers={"Accept": ANY_SYNTAX}), series)


def test_a_rotated_client_certificate_is_used_without_a_restart(gateway: GatewayProcess, client: httpx.Client,
                                                                pki: TestPki, rotating: Path) -> None:
    """The node's client certificate starts as one the PACS does not trust; replacing the files is
    enough for the next association."""
    pid = gateway.proc.pid if gateway.proc else None
    r = client.get(gateway.url("mtls-rotating", "/studies"))
    assert r.status_code == 502 and problem(r)["error"] == "pacs-tls-failure", r.text
    for source, name in ((pki.client_cert, "client.crt"), (pki.client_key, "client.key")):
        shutil.copy(source, rotating / f"{name}.new")
        os.replace(rotating / f"{name}.new", rotating / name)
    r = client.get(gateway.url("mtls-rotating", "/studies"))
    assert r.status_code == 200, r.text
    assert gateway.proc is not None and gateway.proc.pid == pid and gateway.proc.poll() is None


# ------------------------------------------------------------------------------------------------
# Misconfigurations: prompt, specific, and no open breaker


def test_an_untrusted_pacs_certificate_is_a_tls_502_that_does_not_open_the_breaker(
        gateway: GatewayProcess, client: httpx.Client) -> None:
    for _ in range(4):  # twice the node's breaker_threshold
        r = client.get(gateway.url("demo-wrong-ca", "/studies"))
        assert r.status_code == 502, r.text
        body = problem(r)
        assert body["error"] == "pacs-tls-failure"
        assert "certificate" in body["message"] and "demo-wrong-ca" in body["message"]
    status = client.get(gateway.base + "/status").json()
    [node] = [n for n in status["nodes"] if n["name"] == "demo-wrong-ca"]
    assert node["breaker"]["state"] == "closed"
    assert "TlsFailure" in node["last_error"]["message"]


def test_a_certificate_for_another_name_is_a_tls_502(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.url("demo-wrong-name", "/studies"))
    assert r.status_code == 502
    body = problem(r)
    assert body["error"] == "pacs-tls-failure"
    assert "pacs.example.org" in body["message"]


def test_a_tls_node_on_a_plain_pacs_fails_promptly(gateway: GatewayProcess, client: httpx.Client) -> None:
    r = client.get(gateway.url("tls-to-plain", "/studies"))
    assert r.status_code in (502, 504), r.text
    body = problem(r)
    assert body["error"] in ("pacs-tls-failure", "pacs-timeout")
    assert "TLS" in body["message"]


@pytest.mark.parametrize("node", ["plain-to-tls", "orthanc-plain"])
def test_a_plain_node_on_a_tls_pacs_fails_promptly(gateway: GatewayProcess, client: httpx.Client, node: str) -> None:
    needs(node)
    r = client.get(gateway.url(node, "/studies"))
    assert r.status_code == 502, r.text
    body = problem(r)
    assert body["error"] in ("pacs-tls-failure", "pacs-connection-lost")
    assert "TLS" in body["message"]


@pytest.mark.parametrize("node", ["mtls-nocert", "orthanc-tls-nocert"])
def test_no_client_certificate_for_a_pacs_that_requires_one_is_a_tls_502(gateway: GatewayProcess,
                                                                        client: httpx.Client, node: str) -> None:
    needs(node)
    r = client.get(gateway.url(node, "/studies"))
    assert r.status_code == 502, r.text
    body = problem(r)
    assert body["error"] == "pacs-tls-failure"
    assert "client certificate" in body["message"]


def test_tls_failures_log_no_key_material(gateway: GatewayProcess, client: httpx.Client, pki: TestPki) -> None:
    assert client.get(gateway.url("demo-wrong-ca", "/studies")).status_code == 502
    text = gateway.log_text()
    assert "TlsFailure: node 'demo-wrong-ca'" in text
    assert "PRIVATE KEY" not in text
    key_line = pki.client.key_pem.decode().splitlines()[1]
    assert key_line not in text
