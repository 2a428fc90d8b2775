"""TLS on both sides of the gateway: HTTPS for its clients, DICOM TLS to the nodes and into the
C-MOVE receiver.

Every context here has the same floor: TLS 1.2 or 1.3, and for TLS 1.2 only forward-secret AEAD
suites (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305: what BCP 195 recommends, and what DICOM's BCP 195
TLS profiles build on). A PACS that offers only the older DICOM profiles (TLS_RSA_WITH_AES_128_CBC_SHA,
3DES) is refused.

**HTTPS and its certificate reload.** uvicorn serves with ``ServerTls.base``, handed over through
uvicorn's ``ssl_context_factory``. That context's SNI callback, which OpenSSL runs on every
ClientHello (with or without a server name), moves each new connection onto the newest context
built from the files: a reload builds a complete new ``SSLContext`` (certificate, key, client CA)
and swaps one reference. No live context is ever modified, so there is no race with handshakes in
progress, existing connections keep the certificate they started with, and a file that cannot be
loaded (half written, key and certificate that do not match) leaves the previous context serving.
The files are checked every ``server.tls_reload_interval`` seconds (a hash of their content) and on
SIGHUP, by one daemon thread.

**DICOM TLS to a node.** ``DicomTls`` holds the client context for one node and rebuilds it when one
of its files changes (checked by modification time, size and inode each time an association is
opened, which costs at most three ``stat`` calls), so a rotated client certificate or CA bundle is used without a
restart. The upper layer (gateway/dimse/ul.py) wraps the socket and maps handshake failures to
``TlsFailure`` (502 ``pacs-tls-failure``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, NodeSettings, ServerSettings, Settings, TlsSettings

log = logging.getLogger("gateway.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.2 suites (OpenSSL's TLS 1.3 suites are all AEAD and forward secret, and stay as they are).
CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))
CLIENT_CERT_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _reason(exc: BaseException) -> str:
    """An ssl/OS error as one short line: OpenSSL's reason, never file contents."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _load_chain(context: ssl.SSLContext, setting: str, cert_file: str, key_file: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError:
        raise ConfigError(setting, f"file not found: {cert_file} or {key_file}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(setting, f"cannot load the certificate {cert_file} with the key {key_file} (PEM, "
                                   f"unencrypted key, the key of that certificate): {_reason(exc)}") from None


def _load_ca(context: ssl.SSLContext, setting: str, ca_file: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(setting, f"cannot load CA certificates (PEM) from {ca_file}: {_reason(exc)}") from None


# ------------------------------------------------------------------------------------------------
# Contexts


def http_server_context(server: ServerSettings) -> ssl.SSLContext:
    """The HTTPS context for ``[server]``: its certificate and key, and client certificates as
    ``tls_client_cert`` says, verified against ``tls_client_ca_file``. Raises ConfigError."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, "server.tls_cert_file", server.tls_cert_file, server.tls_key_file)
    mode = CLIENT_CERT_MODES[server.tls_client_cert]
    if mode != ssl.CERT_NONE:
        _load_ca(context, "server.tls_client_ca_file", server.tls_client_ca_file)
        context.verify_mode = mode
    return context


def dicom_client_context(tls: TlsSettings, where: str = "nodes.tls") -> ssl.SSLContext:
    """The context for associations to a node: the PACS's certificate verified against ``ca_file``
    (or the system's CAs) and the name checked; ``cert_file``/``key_file`` presented when given.
    Raises ConfigError."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED, check_hostname
    if tls.ca_file:
        _load_ca(context, f"{where}.ca_file", tls.ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file:
        _load_chain(context, f"{where}.cert_file", tls.cert_file, tls.key_file)
    return context


def dicom_server_context(cert_file: str, key_file: str, ca_file: str = "", where: str = "gateway") -> ssl.SSLContext:
    """The context of the C-MOVE receiver: its certificate and key; with ``ca_file``, the PACS must
    present a certificate that CA issued. Raises ConfigError."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, f"{where}.move_tls_cert_file", cert_file, key_file)
    if ca_file:
        _load_ca(context, f"{where}.move_tls_ca_file", ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def receiver_context(settings: Settings) -> ssl.SSLContext | None:
    """The C-MOVE receiver's context, or None when it speaks plain DICOM."""
    g = settings.gateway
    if not g.move_tls_cert_file:
        return None
    return dicom_server_context(g.move_tls_cert_file, g.move_tls_key_file, g.move_tls_ca_file)


def check_files(settings: Settings) -> None:
    """Load every certificate, key and CA file the settings name, once, so that a bad file stops
    start-up with a ConfigError that names the setting (not a failure on the first request)."""
    if settings.server.tls_cert_file:
        http_server_context(settings.server)
    receiver_context(settings)
    for i, node in enumerate(settings.nodes):
        if node.tls.enabled:
            dicom_client_context(node.tls, f"nodes[{i}].tls")


# ------------------------------------------------------------------------------------------------
# DICOM TLS to a node


class DicomTls:
    """TLS to one node: the client context, rebuilt when one of its files changes, and the name the
    PACS's certificate must carry."""

    def __init__(self, node: NodeSettings) -> None:
        self.node = node.name
        self.settings = node.tls
        self.server_name = node.tls.server_name or node.host
        self._files = [p for p in (node.tls.ca_file, node.tls.cert_file, node.tls.key_file) if p]
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._context = dicom_client_context(node.tls)

    def _file_stamp(self) -> tuple[Any, ...]:
        stamp = []
        for path in self._files:
            try:
                st = os.stat(path)
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def context(self) -> ssl.SSLContext:
        """The context for a new association (called from worker threads)."""
        stamp = self._file_stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._context = dicom_client_context(self.settings)
                        log.info("node %r: TLS files changed; new associations use them", self.node)
                    except ConfigError as exc:
                        log.warning("node %r: TLS files changed but cannot be used (%s); new associations keep "
                                    "the previous ones", self.node, exc)
        return self._context


def tls_for_node(node: NodeSettings) -> DicomTls | None:
    return DicomTls(node) if node.tls.enabled else None


# ------------------------------------------------------------------------------------------------
# HTTPS: the context uvicorn serves with, and its reload


def _fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate in a PEM file (for the log: public, no secret)."""
    text = cert_pem.decode("ascii", "replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        return "?"
    der = ssl.PEM_cert_to_DER_cert(text[start:end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()[:16]


class ServerTls:
    """The HTTPS contexts: ``base`` (what uvicorn holds) and ``current`` (built from the files as
    they are now), with the watch that rebuilds ``current`` when the files change."""

    def __init__(self, server: ServerSettings) -> None:
        self.settings = server
        self._files = [p for p in (server.tls_cert_file, server.tls_key_file, server.tls_client_ca_file) if p]
        self._digest, cert_pem = self._read()
        self.base = http_server_context(server)
        self.current = self.base
        self.base.sni_callback = self._select
        self.reloads = 0
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        log.info("HTTPS: serving the certificate %s (SHA-256 %s)", server.tls_cert_file, _fingerprint(cert_pem))

    def _select(self, sslobj: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        """SNI callback, on every ClientHello: the handshake goes on with the newest context."""
        current = self.current
        if current is not context:
            sslobj.context = current

    def _read(self) -> tuple[str | None, bytes]:
        """A digest of the files' content (None when one cannot be read), and the certificate's PEM."""
        digest = hashlib.sha256()
        cert_pem = b""
        try:
            for i, path in enumerate(self._files):
                data = Path(path).read_bytes()
                if i == 0:
                    cert_pem = data
                digest.update(len(data).to_bytes(8, "big") + data)
        except OSError:
            return None, b""
        return digest.hexdigest(), cert_pem

    def check(self) -> bool:
        """Rebuild ``current`` when the files changed; True when new handshakes now get new files.
        A change that cannot be loaded is logged once and the previous context goes on serving."""
        digest, cert_pem = self._read()
        if digest is None:
            if self._digest is not None:
                log.warning("HTTPS: cannot read %s; still serving the previous certificate",
                            " or ".join(self._files))
            self._digest = None
            return False
        if digest == self._digest:
            return False
        self._digest = digest  # this content was tried, whatever comes of it: one warning, not one a minute
        try:
            context = http_server_context(self.settings)
        except ConfigError as exc:
            log.warning("HTTPS: the changed certificate files cannot be used (%s); still serving the previous "
                        "certificate", exc)
            return False
        self.current = context
        self.reloads += 1
        log.info("HTTPS: certificate reloaded from %s (SHA-256 %s); new connections get it",
                 self.settings.tls_cert_file, _fingerprint(cert_pem))
        return True

    # -- the watch ----------------------------------------------------------------------------

    def start(self, install_sighup: bool = True) -> None:
        """Check the files every ``tls_reload_interval`` seconds (0: never by time) and on SIGHUP."""
        if install_sighup and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGHUP, lambda signum, frame: self._wake.set())
        self._thread = threading.Thread(target=self._watch, name="tls-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _watch(self) -> None:
        interval = self.settings.tls_reload_interval or None
        while not self._stopped.is_set():
            woken = self._wake.wait(interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            if woken:
                log.info("HTTPS: SIGHUP, checking the certificate files")
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watch must outlive a surprise
                log.warning("HTTPS: certificate check failed: %s: %s", type(exc).__name__, exc)

    def uvicorn_factory(self) -> Callable[[Any, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
        """For ``uvicorn.Config(ssl_context_factory=...)``: serve with ``base``, not uvicorn's own."""
        return lambda _config, _default: self.base


def https_options(server: ServerSettings) -> dict[str, Any]:
    """uvicorn.Config keywords that make it serve HTTPS with the gateway's context, and start the
    certificate watch; {} without ``server.tls_cert_file`` (plain HTTP). Raises ConfigError."""
    if not server.tls_cert_file:
        return {}
    tls = ServerTls(server)
    tls.start()
    # uvicorn >= 0.47 (pyproject.toml); an older one refuses the keyword rather than serve plain HTTP
    return {"ssl_context_factory": tls.uvicorn_factory()}
