"""The audit log of a real gateway process: one JSON record per DICOMweb request, in its own file and
as RFC 5424 syslog over TLS to a receiver the test runs on loopback (its CA and certificate made with
``cryptography``), while the application log stays free of UIDs and patient names.

The gateway runs with authentication on (two API keys: ``reader`` on the session's demo PACS,
``writer`` on an empty demo PACS for STOW-RS) and trusts 127.0.0.1 as a proxy, so the client address
comes from ``X-Forwarded-For`` when the test sends one.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.auth import hash_api_key
from gateway.demo.pacs import DemoPACS
from tests.integration.stow_support import MULTIPART, fresh_copy, multipart_body, p10_bytes
from tests.support.certs import CertificateAuthority
from tests.support.gatewayproc import GatewayProcess

READER = "reader-" + "r" * 40
WRITER = "writer-" + "w" * 40
RFC5424 = re.compile(r"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)$", re.S)
WAIT = 15.0  # the most a test waits for a record to be written (it is written after the response)


# ------------------------------------------------------------------------------------------------
# A TLS syslog receiver (RFC 5425) with a CA of its own


def make_ca_and_server_cert(directory: Path) -> tuple[str, str, str]:
    """(CA file, server certificate file, server key file) for a server at 127.0.0.1."""
    ca = CertificateAuthority("audit test CA")
    cert_file, key_file = ca.issue("127.0.0.1", ips=("127.0.0.1",), client=False).write(directory, "server")
    return ca.write(directory, "ca"), cert_file, key_file


class SyslogReceiver:
    """Accepts TLS connections on 127.0.0.1 and splits what arrives into octet-counted frames."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(60)
                buffer = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while b" " in buffer:
                        length, _, rest = buffer.partition(b" ")
                        if not length.isdigit():
                            self.errors.append(f"bad frame length {length[:20]!r}")
                            return
                        if len(rest) < int(length):
                            break
                        self.messages.append(rest[:int(length)].decode("utf-8"))
                        buffer = rest[int(length):]
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> "SyslogReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def syslog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SyslogReceiver, str]]:
    ca_file, cert_file, key_file = make_ca_and_server_cert(tmp_path_factory.mktemp("syslog-tls"))
    with SyslogReceiver(cert_file, key_file) as receiver:
        yield receiver, ca_file


@pytest.fixture(scope="module")
def vault() -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="AUDIT-VAULT", datasets=[]) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def gw(syslog: tuple[SyslogReceiver, str], vault: DemoPACS, demo_pacs: DemoPACS) -> Iterator[GatewayProcess]:
    receiver, ca_file = syslog
    settings = {
        "server": {"trusted_proxies": ["127.0.0.1"]},
        "gateway": {"ae_title": "DICOMWEB-GW"},
        "auth": {"api_keys": [
            {"name": "reader", "hash": hash_api_key(READER), "scopes": ["dicomweb.read"], "nodes": ["demo"]},
            {"name": "writer", "hash": hash_api_key(WRITER), "scopes": ["dicomweb.write"], "nodes": ["vault"]},
        ]},
        "audit": {"syslog_host": "127.0.0.1", "syslog_port": receiver.port, "syslog_ca_file": ca_file},
        "nodes": [
            {"name": "demo", "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": demo_pacs.port, "default": True},
            {"name": "vault", "ae_title": "AUDIT-VAULT", "host": "127.0.0.1", "port": vault.port},
        ],
    }
    with GatewayProcess(settings) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


def audit_record(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    """The record of one request, waiting (boundedly) for the writer thread to get to it."""
    deadline = time.monotonic() + WAIT
    while True:
        if gw.audit_path.exists():
            for line in gw.audit_path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record["request_id"] == request_id:
                    return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit record for request {request_id} within {WAIT:g} s")
        time.sleep(0.05)


def reader(**extra: str) -> dict[str, str]:
    return {"X-API-Key": READER, **extra}


def retrieve_cases(studies: list[Dataset]) -> list[tuple[str, dict[str, str | None], set[str]]]:
    """(path, UIDs in the path, SOP Instance UIDs the retrieve sends) at the three levels."""
    ds = next(d for d in studies if d.Modality == "CT")
    in_study = {d.SOPInstanceUID for d in studies if d.StudyInstanceUID == ds.StudyInstanceUID}
    in_series = {d.SOPInstanceUID for d in studies if d.SeriesInstanceUID == ds.SeriesInstanceUID}
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    return [
        (f"/studies/{study}", {"study": study, "series": None, "instance": None}, in_study),
        (f"/studies/{study}/series/{series}", {"study": study, "series": series, "instance": None}, in_series),
        (f"/studies/{study}/series/{series}/instances/{sop}", {"study": study, "series": series, "instance": sop},
         {sop}),
    ]


# ------------------------------------------------------------------------------------------------
# Tests


def test_every_retrieve_leaves_a_record(gw: GatewayProcess, http: httpx.Client, studies: list[Dataset]) -> None:
    for path, uids, sent in retrieve_cases(studies):
        for node in (None, "demo"):
            r = http.get(gw.url(node, path), headers=reader(Accept='multipart/related; type="application/dicom"'))
            assert r.status_code == 200, r.text
            record = audit_record(gw, r.headers["x-request-id"])
            assert (record["identity"], record["auth"], record["node"], record["method"]) == (
                "reader", "api-key", "demo", "GET")
            template = re.sub(r"/(studies|series|instances)/[0-9.]+", lambda m: "/" + m.group(1) + "/{" + {
                "studies": "study", "series": "series", "instances": "instance"}[m.group(1)] + "}", path)
            prefix = "/dicom-web" if node is None else "/nodes/{node}/dicom-web"
            assert record["route"] == prefix + template
            assert {k: record[k] for k in uids} == uids
            assert set(record["instances"]) == sent and len(record["instances"]) == len(sent)
            assert (record["status"], record["bytes"], record["outcome"]) == (200, len(r.content), "ok")
            assert record["client"] == "127.0.0.1" and record["duration_ms"] > 0
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])


def test_stow_leaves_a_record(gw: GatewayProcess, http: httpx.Client, vault: DemoPACS,
                              studies: list[Dataset]) -> None:
    first = fresh_copy(studies[0])
    second = fresh_copy(studies[0])
    body = multipart_body([p10_bytes(first), p10_bytes(second)])
    r = http.post(gw.url("vault", "/studies"), content=body,
                  headers={"X-API-Key": WRITER, "Content-Type": MULTIPART, "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    record = audit_record(gw, r.headers["x-request-id"])
    assert (record["identity"], record["node"], record["method"], record["route"]) == (
        "writer", "vault", "POST", "/nodes/{node}/dicom-web/studies")
    assert sorted(record["instances"]) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert record["studies"] == [studies[0].StudyInstanceUID]
    assert (record["status"], record["bytes"], record["bytes_received"]) == (200, len(r.content), len(body))
    assert {first.SOPInstanceUID, second.SOPInstanceUID} <= {h.SOPInstanceUID for h in vault.headers()}


def test_searches_and_refusals_are_recorded(gw: GatewayProcess, http: httpx.Client, studies: list[Dataset]) -> None:
    patient = studies[0].PatientID
    r = http.get(gw.url(None, "/studies"), params={"PatientID": patient},
                 headers=reader(**{"X-Forwarded-For": "203.0.113.7"}))
    assert r.status_code == 200 and r.json()
    record = audit_record(gw, r.headers["x-request-id"])
    assert record["query"] == f"PatientID={patient}" and record["client"] == "203.0.113.7"
    assert record["route"] == "/dicom-web/studies" and record["study"] is None and "instances" not in record

    r = http.get(gw.url("vault", "/studies"), params={"PatientID": patient})
    assert r.status_code == 401
    record = audit_record(gw, r.headers["x-request-id"])
    assert (record["identity"], record["auth"], record["status"], record["outcome"], record["node"]) == (
        None, "none", 401, "denied", "vault")

    r = http.get(gw.url("vault", f"/studies/{studies[0].StudyInstanceUID}"), headers=reader())
    assert r.status_code == 403
    record = audit_record(gw, r.headers["x-request-id"])
    assert (record["identity"], record["status"], record["outcome"], record["study"]) == (
        "reader", 403, "denied", studies[0].StudyInstanceUID)

    r = http.get(gw.base + "/health")
    health = r.headers["x-request-id"]
    last = http.get(gw.url(None, "/studies"), headers=reader())
    audit_record(gw, last.headers["x-request-id"])  # written after the /health request ended
    assert health not in gw.audit_path.read_text(encoding="utf-8"), "only patient data routes are audited"


def test_syslog_gets_the_same_records(gw: GatewayProcess, http: httpx.Client, syslog: tuple[SyslogReceiver, str],
                                      studies: list[Dataset]) -> None:
    receiver, _ = syslog
    ok = http.get(gw.url(None, retrieve_cases(studies)[2][0]), headers=reader(Accept="application/dicom"))
    denied = http.get(gw.url(None, "/studies"), headers={"X-API-Key": "not-a-key"})
    assert (ok.status_code, denied.status_code) == (200, 401)
    wanted = {ok.headers["x-request-id"]: 85, denied.headers["x-request-id"]: 84}  # authpriv.notice / .warning
    found: dict[str, tuple[int, dict[str, Any], tuple[str, ...]]] = {}
    deadline = time.monotonic() + WAIT
    while set(found) != set(wanted) and time.monotonic() < deadline:
        for message in list(receiver.messages):
            match = RFC5424.match(message)
            assert match, f"not RFC 5424: {message[:200]!r}"
            record = json.loads(match.group(8))
            if record["request_id"] in wanted:
                found[record["request_id"]] = (int(match.group(1)), record, match.groups()[1:7])
        time.sleep(0.05)
    assert set(found) == set(wanted), f"syslog messages missing; receiver errors: {receiver.errors}"
    for request_id, (pri, record, header) in found.items():
        assert pri == wanted[request_id]
        timestamp, _host, app, procid, msgid, structured = header
        assert (timestamp, app, msgid, structured) == (record["time"], "dicomweb-gateway", "dicomweb-audit", "-")
        assert procid.isdigit()
        assert record == audit_record(gw, request_id), "the file and syslog carry the same record"


def test_the_application_log_holds_no_patient_data(gw: GatewayProcess, http: httpx.Client,
                                                   studies: list[Dataset]) -> None:
    ds = studies[0]
    http.get(gw.url(None, "/studies"), params={"PatientName": str(ds.PatientName)}, headers=reader())
    http.get(gw.url(None, "/studies"), params={"PatientID": ds.PatientID}, headers=reader())
    for path, _uids, _sent in retrieve_cases(studies):
        http.get(gw.url(None, path), headers=reader(Accept='multipart/related; type="application/dicom"'))
    last = http.get(gw.url(None, f"/studies/{ds.StudyInstanceUID}/series"), headers=reader())
    audit_record(gw, last.headers["x-request-id"])
    log = gw.log_text()
    audit = gw.audit_path.read_text(encoding="utf-8")
    assert "gateway.access" in log and "/dicom-web/studies/{uid}" in log
    used = {ds.StudyInstanceUID, ds.PatientID}
    for _path, uids, sent in retrieve_cases(studies):
        used |= {u for u in uids.values() if u} | sent
    missing = sorted(value for value in used if value not in audit)
    assert not missing, f"the audit log should hold them: {missing}"
    forbidden = used | {d.StudyInstanceUID for d in studies} | {str(d.PatientName) for d in studies} | {
        d.PatientID for d in studies} | {"reader", "writer", READER, WRITER}
    leaks = sorted(value for value in forbidden if value and value in log)
    assert not leaks, f"patient data or identities in the application log: {leaks}"


def test_a_syslog_server_that_is_down_does_not_hold_up_the_file(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from gateway.audit import AuditLog
    from gateway.config import AuditSettings
    from tests.support.realpacs import free_port

    sink = AuditLog(AuditSettings(path=str(tmp_path / "audit.jsonl"), syslog_host="127.0.0.1",
                                  syslog_port=free_port()))  # nobody listens there
    secret = "1.2.826.0.1.3680043.10.1137.99"
    with caplog.at_level(logging.INFO, logger="gateway"):
        for i in range(3):
            sink.write({"time": "2025-01-01T00:00:00.000Z", "outcome": "ok", "study": secret, "n": i})
        sink.close()
    lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["n"] for line in lines] == [0, 1, 2]
    syslog_handler = sink.handlers[1]
    assert getattr(syslog_handler, "dropped") == 3
    assert "not delivered to syslog at 127.0.0.1" in caplog.text and secret not in caplog.text
