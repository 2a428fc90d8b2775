"""gateway/tls.py and the TLS parts of the upper layer, in process: the contexts and their policy,
the HTTPS reload logic, the hand-over to uvicorn, the DICOM client context's reload, settings
validation, and TLS on an Association over a socket pair (no PACS, no gateway process)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway import cli
from gateway.config import ConfigError, ServerSettings, TlsSettings, load_settings
from gateway.dimse.errors import TlsFailure
from gateway.dimse.ul import Association, Negotiated, _read_raw_pdu
from gateway.tls import (
    CIPHERS,
    DicomTls,
    ServerTls,
    check_files,
    dicom_client_context,
    dicom_server_context,
    http_server_context,
    https_options,
)
from tests.support.certs import TestPki, make_pki

NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "127.0.0.1", "port": 104}




@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("unit-pki"))


def server_settings(pki: TestPki, cert: str | None = None, key: str | None = None, **extra: Any) -> ServerSettings:
    return ServerSettings(tls_cert_file=cert or pki.server_cert, tls_key_file=key or pki.server_key, **extra)


def settings_with(**data: Any) -> Any:
    return load_settings(data={"auth": {"enabled": False}, "nodes": [NODE], **data})


# ------------------------------------------------------------------------------------------------
# Policy of every context


@pytest.mark.parametrize("make", ["http", "dicom-client", "dicom-server"])
def test_every_context_is_tls_1_2_or_later_with_forward_secret_aead_suites(pki: TestPki, make: str) -> None:
    context = {
        "http": lambda: http_server_context(server_settings(pki)),
        "dicom-client": lambda: dicom_client_context(TlsSettings(enabled=True, ca_file=pki.ca_file)),
        "dicom-server": lambda: dicom_server_context(pki.server_cert, pki.server_key),
    }[make]()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suite at all"
    for cipher in tls12:
        assert cipher["aead"], cipher["name"]
        assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]
        assert cipher["name"] in CIPHERS.split(":")
    assert context.options & ssl.OP_NO_COMPRESSION


def test_client_certificate_modes(pki: TestPki) -> None:
    assert http_server_context(server_settings(pki)).verify_mode == ssl.CERT_NONE
    optional = http_server_context(server_settings(pki, tls_client_cert="optional", tls_client_ca_file=pki.ca_file))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = http_server_context(server_settings(pki, tls_client_cert="required", tls_client_ca_file=pki.ca_file))
    assert required.verify_mode == ssl.CERT_REQUIRED
    assert len(required.get_ca_certs()) == 1


def test_the_dicom_client_context_verifies_the_pacs() -> None:
    context = dicom_client_context(TlsSettings(enabled=True))  # the system's CAs
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_dicom_tls_verifies_the_node_host_unless_server_name_says_otherwise(pki: TestPki) -> None:
    node = settings_with(nodes=[{**NODE, "tls": {"enabled": True, "ca_file": pki.ca_file}}]).nodes[0]
    assert DicomTls(node).server_name == "127.0.0.1"
    node = settings_with(nodes=[{**NODE, "tls": {"enabled": True, "ca_file": pki.ca_file,
                                                 "server_name": "pacs.example.org"}}]).nodes[0]
    assert DicomTls(node).server_name == "pacs.example.org"


# ------------------------------------------------------------------------------------------------
# HTTPS: the hand-over to uvicorn, and the reload


async def _app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    raise AssertionError


def test_uvicorn_serves_with_the_gateways_context(pki: TestPki) -> None:
    """Pins the uvicorn contract (>= 0.47): ``ssl_context_factory`` is what ``Config.load`` serves with."""
    tls = ServerTls(server_settings(pki))
    config = uvicorn.Config(_app, ssl_context_factory=tls.uvicorn_factory(), lifespan="off", log_config=None)
    config.load()
    assert config.ssl is tls.base
    assert config.ssl.sni_callback is not None


def test_without_a_certificate_uvicorn_gets_no_tls_options() -> None:
    assert https_options(ServerSettings()) == {}


def test_reload_swaps_in_a_new_context_only_for_files_that_load(pki: TestPki, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    cert, key = pki.server.write(tmp_path, "served")
    tls = ServerTls(server_settings(pki, cert, key))
    assert tls.current is tls.base
    assert tls.check() is False  # unchanged

    renewed = pki.ca.issue("localhost", ips=("127.0.0.1",))
    Path(cert).write_bytes(renewed.cert_pem)
    Path(key).write_bytes(renewed.key_pem)
    assert tls.check() is True
    first = tls.current
    assert first is not tls.base and tls.reloads == 1

    caplog.set_level(logging.WARNING, "gateway.tls")
    Path(cert).write_bytes(pki.server.cert_pem)  # a certificate without its key
    assert tls.check() is False
    assert tls.current is first
    assert tls.check() is False  # the same content again: no second warning
    assert len(caplog.records) == 1 and "cannot be used" in caplog.records[0].getMessage()
    assert "PRIVATE" not in caplog.text

    Path(cert).unlink()  # mid-replacement
    assert tls.check() is False and tls.current is first
    assert "cannot read" in caplog.records[-1].getMessage()
    Path(cert).write_bytes(renewed.cert_pem)  # back: loaded again, as after any change
    assert tls.check() is True and tls.current is not first


def test_the_sni_callback_moves_new_handshakes_to_the_current_context(pki: TestPki, tmp_path: Path) -> None:
    cert, key = pki.server.write(tmp_path, "served")
    tls = ServerTls(server_settings(pki, cert, key))
    renewed = pki.ca.issue("localhost", ips=("127.0.0.1",))
    Path(cert).write_bytes(renewed.cert_pem)
    Path(key).write_bytes(renewed.key_pem)
    assert tls.check()
    client = ssl.create_default_context(cafile=pki.ca_file)
    server_side, client_side = handshake(tls.base, client)
    try:
        assert client_side.getpeercert(True) == renewed.der
    finally:
        server_side.close()
        client_side.close()


def test_the_watch_reloads_on_its_own(pki: TestPki, tmp_path: Path) -> None:
    cert, key = pki.server.write(tmp_path, "served")
    tls = ServerTls(server_settings(pki, cert, key, tls_reload_interval=0.05))
    tls.start(install_sighup=False)
    try:
        renewed = pki.ca.issue("localhost", ips=("127.0.0.1",))
        Path(key).write_bytes(renewed.key_pem)
        Path(cert).write_bytes(renewed.cert_pem)
        for _ in range(2000):  # bounded in count (and so in time: 20 s at most); ends at the reload
            if tls.reloads:
                break
            threading.Event().wait(0.01)
        assert tls.reloads >= 1
    finally:
        tls.stop()


# ------------------------------------------------------------------------------------------------
# DICOM TLS: the client context follows its files


def test_dicom_client_context_is_rebuilt_when_its_files_change(pki: TestPki, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    cert, key = pki.client.write(tmp_path, "client")
    node = settings_with(nodes=[{**NODE, "tls": {"enabled": True, "ca_file": pki.ca_file,
                                                 "cert_file": cert, "key_file": key}}]).nodes[0]
    tls = DicomTls(node)
    first = tls.context()
    assert tls.context() is first  # nothing changed
    Path(cert + ".new").write_bytes(b"garbage\n")
    os.replace(cert + ".new", cert)
    caplog.set_level(logging.WARNING, "gateway.tls")
    assert tls.context() is first  # cannot be loaded: the previous one goes on
    assert "cannot be used" in caplog.text
    renewed = pki.ca.issue("DICOMWEB-GW", server=False)
    Path(key).write_bytes(renewed.key_pem)
    Path(cert + ".new").write_bytes(renewed.cert_pem)
    os.replace(cert + ".new", cert)
    assert tls.context() is not first


# ------------------------------------------------------------------------------------------------
# Settings and start-up


@pytest.mark.parametrize("server, setting", [
    ({"tls_cert_file": "CERT"}, "server.tls_key_file"),
    ({"tls_key_file": "KEY"}, "server.tls_key_file"),
    ({"tls_cert_file": "/nonexistent.crt", "tls_key_file": "KEY"}, "server.tls_cert_file"),
    ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_client_cert": "maybe"}, "server.tls_client_cert"),
    ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_client_cert": "required"}, "server.tls_client_cert"),
    ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_client_ca_file": "CA"}, "server.tls_client_ca_file"),
    ({"tls_cert_file": "CERT", "tls_key_file": "KEY", "tls_reload_interval": -1}, "server.tls_reload_interval"),
])
def test_server_tls_settings_are_validated(pki: TestPki, server: dict[str, Any], setting: str) -> None:
    files = {"CERT": pki.server_cert, "KEY": pki.server_key, "CA": pki.ca_file}
    server = {k: files.get(v, v) if isinstance(v, str) else v for k, v in server.items()}
    with pytest.raises(ConfigError) as info:
        settings_with(server=server)
    assert info.value.setting == setting


@pytest.mark.parametrize("gateway, setting", [
    ({"move_tls_cert_file": "CERT"}, "gateway.move_tls_key_file"),
    ({"move_tls_ca_file": "CA"}, "gateway.move_tls_ca_file"),
    ({"move_tls_cert_file": "CERT", "move_tls_key_file": "/nonexistent.key"}, "gateway.move_tls_key_file"),
])
def test_receiver_tls_settings_are_validated(pki: TestPki, gateway: dict[str, Any], setting: str) -> None:
    files = {"CERT": pki.server_cert, "CA": pki.ca_file}
    with pytest.raises(ConfigError) as info:
        settings_with(gateway={k: files.get(v, v) for k, v in gateway.items()})
    assert info.value.setting == setting


def test_every_tls_setting_has_its_default_and_environment_variable(monkeypatch: pytest.MonkeyPatch,
                                                                    pki: TestPki) -> None:
    s = settings_with()
    assert (s.server.tls_cert_file, s.server.tls_key_file, s.server.tls_client_ca_file) == ("", "", "")
    assert (s.server.tls_client_cert, s.server.tls_reload_interval) == ("none", 60.0)
    assert (s.gateway.move_tls_cert_file, s.gateway.move_tls_key_file, s.gateway.move_tls_ca_file) == ("", "", "")
    monkeypatch.setenv("DWG_SERVER_TLS_CERT_FILE", pki.server_cert)
    monkeypatch.setenv("DWG_SERVER_TLS_KEY_FILE", pki.server_key)
    monkeypatch.setenv("DWG_SERVER_TLS_RELOAD_INTERVAL", "0")
    s = settings_with()
    assert (s.server.tls_cert_file, s.server.tls_reload_interval) == (pki.server_cert, 0.0)


def garbage_file(tmp_path: Path) -> str:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return str(garbage)


@pytest.mark.parametrize("case, setting", [
    ("garbage certificate", "server.tls_cert_file"),
    ("key of another certificate", "server.tls_cert_file"),
    ("garbage client CA", "server.tls_client_ca_file"),
    ("garbage node CA", "nodes[0].tls.ca_file"),
    ("node key of another certificate", "nodes[0].tls.cert_file"),
    ("garbage receiver certificate", "gateway.move_tls_cert_file"),
])
def test_files_that_do_not_load_stop_start_up_naming_the_setting(pki: TestPki, tmp_path: Path, case: str,
                                                                 setting: str) -> None:
    garbage = garbage_file(tmp_path)
    server = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    data: dict[str, Any] = {
        "garbage certificate": {"server": {**server, "tls_cert_file": garbage}},
        "key of another certificate": {"server": {**server, "tls_key_file": pki.client_key}},
        "garbage client CA": {"server": {**server, "tls_client_cert": "required", "tls_client_ca_file": garbage}},
        "garbage node CA": {"nodes": [{**NODE, "tls": {"enabled": True, "ca_file": garbage}}]},
        "node key of another certificate": {"nodes": [{**NODE, "tls": {
            "enabled": True, "cert_file": pki.client_cert, "key_file": pki.server_key}}]},
        "garbage receiver certificate": {"gateway": {"move_tls_cert_file": garbage,
                                                     "move_tls_key_file": pki.server_key}},
    }[case]
    with pytest.raises(ConfigError) as info:
        check_files(settings_with(**data))
    assert info.value.setting == setting
    assert "BEGIN" not in str(info.value)  # names files, never quotes them


def test_check_config_reports_a_bad_certificate_and_exits_2(pki: TestPki, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[auth]\nenabled = false\n[server]\ntls_cert_file = "{pki.server_cert}"\n'
                      f'tls_key_file = "{pki.client_key}"\n'
                      f'[[nodes]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n')
    with pytest.raises(SystemExit) as info:
        cli.main(["check-config", "--config", str(config)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid configuration: server.tls_cert_file: cannot load the certificate" in err
    assert "PRIVATE" not in err


# ------------------------------------------------------------------------------------------------
# The upper layer over TLS


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
              server_name: str = "127.0.0.1") -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A connected pair of TLS sockets (a socket pair, handshakes done in two threads)."""
    ours, theirs = socket.socketpair()
    server = server_context.wrap_socket(theirs, server_side=True, do_handshake_on_connect=False)
    client = client_context.wrap_socket(ours, server_hostname=server_name, do_handshake_on_connect=False)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.do_handshake()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    client.settimeout(5)
    client.do_handshake()
    thread.join(5)
    assert not errors, errors
    return server, client


@pytest.fixture
def tls_pair(pki: TestPki) -> Iterator[tuple[Association, ssl.SSLSocket]]:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki.server_cert, pki.server_key)
    server, client = handshake(server_context, ssl.create_default_context(cafile=pki.ca_file))
    assoc = Association(client, "test", Negotiated([], [], 16384), max_pdu=65536, dimse_timeout=5, acse_timeout=5)
    yield assoc, server
    assoc.abort()
    server.close()


def test_a_send_from_another_thread_goes_through_while_a_read_waits(
        tls_pair: tuple[Association, ssl.SSLSocket]) -> None:
    """OpenSSL allows one thread at a time on a TLS connection: a read holds the association's lock
    only while it reads, not while it waits, so a C-CANCEL or A-ABORT from another thread is sent
    while the reading thread waits (here the peer answers only once it has that send)."""
    assoc, peer = tls_pair
    got: list[tuple[int, bytes]] = []

    def reader() -> None:
        pdu_type, body = assoc._read_pdu(20.0)
        got.append((pdu_type, bytes(body)))

    thread = threading.Thread(target=reader)
    thread.start()
    threading.Event().wait(0.1)  # let the reader block first (the test holds without it too)
    assoc._send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # from this thread, while the reader waits
    peer.settimeout(5)
    assert peer.recv(10) == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    peer.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    thread.join(20)
    assert got == [(0x06, b"\x00\x00\x00\x00")]


def test_a_tls_record_on_a_plain_association_is_a_tls_failure() -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"\x15\x03\x03\x00\x02\x02\x46")  # a TLS alert (protocol version)
        ours.settimeout(2)
        with pytest.raises(TlsFailure, match="speaks TLS"):
            _read_raw_pdu(ours, "pacs", 2.0, requestor=True)
    finally:
        ours.close()
        theirs.close()


def test_a_reset_plain_association_hints_at_tls() -> None:
    from gateway.dimse.errors import ConnectionLost

    ours, theirs = socket.socketpair()
    theirs.close()
    ours.settimeout(2)
    try:
        with pytest.raises(ConnectionLost, match="expects DICOM TLS"):
            _read_raw_pdu(ours, "pacs", 2.0, requestor=True)
    finally:
        ours.close()

