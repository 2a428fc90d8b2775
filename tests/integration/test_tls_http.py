"""HTTPS: the gateway process serving TLS with certificates made by the test (a CA, a certificate for
127.0.0.1 and localhost, a client certificate, an untrusted CA), real httpx clients and raw TLS
sockets, a demo PACS behind it.

- a client that trusts the CA gets /health and a QIDO search; one that does not fails verification;
- the served context is the gateway's own (TLS 1.2+, forward-secret AEAD suites), not uvicorn's;
- client certificates: ``required`` refuses a client without one or with one of another CA,
  ``optional`` serves a client without one but still refuses a bad one;
- reload: new certificate files are served to new connections without a restart (by the periodic
  check, and by SIGHUP), connections already open keep theirs, and files that cannot be loaded leave
  the previous certificate serving, with a warning and no key material in the log.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.pacs import DemoPACS
from tests.support.certs import Issued, TestPki, make_pki
from tests.support.gatewayproc import GatewayProcess

WAIT = 20.0  # seconds a reload may take to show (the checks run every 0.2 s); a bound, not a measure


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("http-pki"))


@pytest.fixture(scope="module")
def demo(studies: list[Dataset]) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="HTTPS-DEMO", datasets=studies) as pacs:
        yield pacs


def trusting(pki: TestPki, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A client context that trusts the test CA, with a client certificate when given."""
    context = ssl.create_default_context(cafile=pki.ca_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def https_gateway(pki: TestPki, demo: DemoPACS, directory: Path | None = None, **server: object) -> GatewayProcess:
    """A gateway serving HTTPS with the test certificate (copied into ``directory`` when given, so a
    test can replace it)."""
    cert, key = pki.server_cert, pki.server_key
    if directory is not None:
        cert, key = pki.server.write(directory, "served")
    settings = {
        "server": {"tls_cert_file": cert, "tls_key_file": key, **server},
        "limits": {"keepalive_timeout": 60.0},  # a connection kept across a reload stays open
        "nodes": [{"name": "demo", "ae_title": "HTTPS-DEMO", "host": "127.0.0.1", "port": demo.port}],
    }
    client_cert = (pki.client_cert, pki.client_key) if server.get("tls_client_cert") == "required" else None
    return GatewayProcess(settings, tls_client=trusting(pki, client_cert))


@pytest.fixture(scope="module")
def gateway(pki: TestPki, demo: DemoPACS) -> Iterator[GatewayProcess]:
    with https_gateway(pki, demo) as gw:
        yield gw


def served_certificate(gw: GatewayProcess, context: ssl.SSLContext) -> bytes:
    """The certificate a new connection gets (DER)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True) or b""


def connection_of(response: httpx.Response) -> tuple[object, bytes]:
    """The local address of the connection a response came on, and the certificate it carries."""
    stream = response.extensions["network_stream"]
    return stream.get_extra_info("client_addr"), stream.get_extra_info("ssl_object").getpeercert(True)


def replace_served(directory: Path, issued: Issued | None = None, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None) -> None:
    """Swap the served files the way deployment tools do (write aside, then rename)."""
    for name, data in (("served.crt", cert_pem if cert_pem is not None else issued.cert_pem if issued else None),
                       ("served.key", key_pem if key_pem is not None else issued.key_pem if issued else None)):
        if data is not None:
            (directory / f"{name}.new").write_bytes(data)
            os.replace(directory / f"{name}.new", directory / name)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` (bounded in time and count) until it holds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if condition():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return condition()


# ------------------------------------------------------------------------------------------------
# Serving


def test_a_client_that_trusts_the_ca_gets_health_and_a_search(gateway: GatewayProcess, pki: TestPki,
                                                             studies: list[Dataset]) -> None:
    assert gateway.base.startswith("https://")
    with httpx.Client(verify=trusting(pki), timeout=30) as client:
        r = client.get(gateway.base + "/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert connection_of(r)[1] == pki.server.der
        r = client.get(gateway.url(None, "/studies"), params={"includefield": "StudyDescription"})
        assert r.status_code == 200, r.text
        results = r.json()
        assert {s["0020000D"]["Value"][0] for s in results} == {d.StudyInstanceUID for d in studies}
        # the URLs the gateway hands out follow the scheme it is reached by
        assert all(s["00081190"]["Value"][0].startswith(gateway.base + "/dicom-web/studies/") for s in results)


def test_a_client_without_the_ca_fails_verification(gateway: GatewayProcess) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(gateway.base + "/health", verify=ssl.create_default_context(), timeout=10)


def test_plain_http_is_not_served_on_the_https_port(gateway: GatewayProcess) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{gateway.port}/health", timeout=10)


def test_the_served_context_is_the_gateways_own(gateway: GatewayProcess, pki: TestPki) -> None:
    """TLS 1.2+, forward-secret AEAD suites only: a client offering only RSA key exchange with CBC, or
    only TLS 1.0/1.1, is refused; the same client with a modern suite is served."""
    modern = trusting(pki)
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    modern.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    assert served_certificate(gateway, modern) == pki.server.der
    legacy_suite = trusting(pki)
    legacy_suite.maximum_version = ssl.TLSVersion.TLSv1_2
    legacy_suite.set_ciphers("AES128-SHA256")
    with pytest.raises(ssl.SSLError):
        served_certificate(gateway, legacy_suite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1/1_1
        old_protocol = trusting(pki)
        old_protocol.set_ciphers("DEFAULT:@SECLEVEL=0")
        old_protocol.minimum_version = ssl.TLSVersion.TLSv1
        old_protocol.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        served_certificate(gateway, old_protocol)


# ------------------------------------------------------------------------------------------------
# Client certificates


def refused(url: str, context: ssl.SSLContext) -> bool:
    """True when the server ends the connection instead of answering (TLS 1.3 shows a refused client
    certificate on the first read, after the client's side of the handshake completed)."""
    try:
        httpx.get(url, verify=context, timeout=10)
    except httpx.TransportError:
        return True
    return False


def test_required_client_certificates(pki: TestPki, demo: DemoPACS) -> None:
    with https_gateway(pki, demo, tls_client_cert="required", tls_client_ca_file=pki.ca_file) as gw:
        assert refused(gw.base + "/health", trusting(pki))
        assert refused(gw.base + "/health", trusting(pki, (pki.rogue_client_cert, pki.rogue_client_key)))
        with httpx.Client(verify=trusting(pki, (pki.client_cert, pki.client_key)), timeout=30) as client:
            assert client.get(gw.base + "/health").status_code == 200
            r = client.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0001"})
            assert r.status_code == 200 and len(r.json()) >= 1
        log = gw.log_text()
        assert "Traceback" not in log


def test_optional_client_certificates(pki: TestPki, demo: DemoPACS) -> None:
    with https_gateway(pki, demo, tls_client_cert="optional", tls_client_ca_file=pki.ca_file) as gw:
        assert httpx.get(gw.base + "/health", verify=trusting(pki), timeout=10).status_code == 200
        good = trusting(pki, (pki.client_cert, pki.client_key))
        assert httpx.get(gw.base + "/health", verify=good, timeout=10).status_code == 200
        assert refused(gw.base + "/health", trusting(pki, (pki.rogue_client_cert, pki.rogue_client_key)))


# ------------------------------------------------------------------------------------------------
# Reload without a restart


def test_new_certificate_files_reach_new_connections_without_a_restart(
        pki: TestPki, demo: DemoPACS, tmp_path: Path) -> None:
    with https_gateway(pki, demo, tmp_path, tls_reload_interval=0.2) as gw:
        assert gw.proc is not None
        pid = gw.proc.pid
        context = trusting(pki)
        with httpx.Client(verify=context, timeout=30) as kept:
            before = kept.get(gw.base + "/health")
            assert before.status_code == 200
            kept_addr, kept_cert = connection_of(before)
            assert kept_cert == pki.server.der

            renewed = pki.ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",))
            assert renewed.serial != pki.server.serial
            replace_served(tmp_path, renewed)
            assert wait_until(lambda: served_certificate(gw, context) == renewed.der), \
                "new connections never got the new certificate"
            assert gw.proc.pid == pid and gw.proc.poll() is None

            # the connection opened before goes on, with the certificate it started with
            after = kept.get(gw.url(None, "/studies"), params={"PatientID": "DEMO-0001"})
            assert after.status_code == 200
            assert connection_of(after) == (kept_addr, pki.server.der)

        # a certificate whose key is not in the key file: refused, the renewed one goes on serving
        other = pki.ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",))
        replace_served(tmp_path, cert_pem=other.cert_pem)
        assert wait_until(lambda: "cannot be used" in gw.log_text()), "no warning about the bad files"
        assert served_certificate(gw, context) == renewed.der
        # not PEM at all: the same
        replace_served(tmp_path, cert_pem=b"not a certificate\n", key_pem=b"not a key\n")
        assert wait_until(lambda: gw.log_text().count("cannot be used") >= 2)
        assert served_certificate(gw, context) == renewed.der
        assert httpx.get(gw.base + "/health", verify=context, timeout=10).status_code == 200
        # and a good pair again is picked up
        replace_served(tmp_path, other)
        assert wait_until(lambda: served_certificate(gw, context) == other.der)
        assert gw.proc.pid == pid and gw.proc.poll() is None
        log = gw.log_text()
        assert "PRIVATE KEY" not in log
        assert all(key.key_pem.decode().splitlines()[1] not in log for key in (pki.server, renewed, other))


def test_sighup_reloads_the_certificate(pki: TestPki, demo: DemoPACS, tmp_path: Path) -> None:
    """With ``tls_reload_interval = 0`` the files are read only on SIGHUP."""
    with https_gateway(pki, demo, tmp_path, tls_reload_interval=0) as gw:
        assert gw.proc is not None
        pid = gw.proc.pid
        context = trusting(pki)
        renewed = pki.ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",))
        replace_served(tmp_path, renewed)
        assert served_certificate(gw, context) == pki.server.der  # nothing watches the files by time
        os.kill(pid, signal.SIGHUP)
        assert wait_until(lambda: served_certificate(gw, context) == renewed.der), "SIGHUP did not reload"
        assert gw.proc.poll() is None and gw.proc.pid == pid
        assert httpx.get(gw.base + "/health", verify=context, timeout=10).status_code == 200
