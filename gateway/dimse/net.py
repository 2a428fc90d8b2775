"""pynetdicom set up the way the gateway needs it: quiet, TCP_NODELAY, and failures we can tell apart.

- pynetdicom logs identifiers (patient data) and formats a log line per PDU unless told otherwise;
  ``configure_pynetdicom`` turns both off once, process-wide.
- pynetdicom sends a DIMSE command and its data set as separate PDUs, so without TCP_NODELAY every
  request waits for the peer's delayed ACK (about 40 ms). Every socket the gateway opens sets it.
- pynetdicom swallows the OSError of a failed connect; ``GatewayAE.open`` keeps it, so a refused
  connection (502) is told apart from a connect timeout (504).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Sequence

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket, T_CONNECT

from gateway import __version__

from .errors import AssociationRejected, ConnectionLost, DimseTimeout, NodeUnreachable, ServiceNotSupported

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1137.1"
IMPLEMENTATION_VERSION_NAME = ("DWGW_" + __version__.replace(".", ""))[:16]

_configured = False


def configure_pynetdicom() -> None:
    """Keep patient data out of pynetdicom's logs and skip its per-PDU log formatting."""
    global _configured
    if _configured:
        return
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    _config.PASS_CONTEXTVARS = True
    # pynetdicom logs every refused connection or rejection as ERROR lines of its own; the gateway
    # logs each failure once, with the node and the request ID (gateway.dimse).
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    _configured = True


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay_on_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations the gateway accepts (C-MOVE receiver)."""
    set_nodelay(event.assoc.dul.socket.socket)


class _GatewaySocket(AssociationSocket):
    """An AssociationSocket with TCP_NODELAY that remembers why a connect failed."""

    connect_error: OSError | None = None

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        set_nodelay(sock)
        return sock

    def connect(self, primitive: T_CONNECT) -> None:
        # pynetdicom logs and drops the OSError; a thin proxy around the socket keeps it for us.
        real = self.socket
        assert real is not None
        outer = self

        class _Recorder:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def connect(self, address: Any) -> None:
                try:
                    real.connect(address)
                except OSError as exc:
                    outer.connect_error = exc
                    raise

        if not self.tls_args:
            self.socket = _Recorder()  # type: ignore[assignment]
        super().connect(primitive)
        if isinstance(self.socket, _Recorder):
            self.socket = real


class GatewayAE(AE):
    """An AE whose associations use ``_GatewaySocket``."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        sock = _GatewaySocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


@dataclass(frozen=True)
class Peer:
    """Where and how to reach one PACS."""

    name: str
    ae_title: str
    host: str
    port: int
    max_pdu: int
    connect_timeout: float
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    tls: tuple[ssl.SSLContext, str] | None = None


def make_ae(calling_ae: str, peer: Peer) -> GatewayAE:
    configure_pynetdicom()
    ae = GatewayAE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = peer.connect_timeout
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    return ae


def associate(
    ae: GatewayAE,
    peer: Peer,
    contexts: Sequence[PresentationContext],
    ext_neg: Sequence[Any] = (),
) -> Association:
    """Open an association (blocking: call it from a worker thread) or raise a typed DimseError."""
    aborts: list[Any] = []

    def on_acse_recv(event: evt.Event) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            aborts.append(event.primitive)

    started = time.monotonic()
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=list(contexts),
        ae_title=peer.ae_title,
        max_pdu=peer.max_pdu,
        ext_neg=list(ext_neg) or None,
        tls_args=peer.tls,
        evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_recv)],
    )
    if assoc.is_established:
        return assoc
    sock = assoc.dul.socket
    connect_error = getattr(sock, "connect_error", None)
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        transient = getattr(rsp, "result", None) == 0x02
        reason = f"{getattr(rsp, 'result_str', '?')}, {getattr(rsp, 'source_str', '?')}: {getattr(rsp, 'reason_str', '?')}"
        raise AssociationRejected(peer.name, f"the PACS rejected the association ({reason})", transient=transient)
    if connect_error is not None:
        if isinstance(connect_error, (TimeoutError, socket.timeout)):
            raise DimseTimeout(
                peer.name, f"no TCP connection within {peer.connect_timeout:g} s", phase="connect"
            )
        raise NodeUnreachable(peer.name, f"cannot connect to the PACS: {connect_error.strerror or connect_error}")
    if aborts:
        raise ConnectionLost(peer.name, "the PACS aborted the association during negotiation")
    if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        raise ServiceNotSupported(peer.name, "the PACS accepted none of the proposed presentation contexts")
    if time.monotonic() - started >= peer.acse_timeout * 0.95:
        raise DimseTimeout(peer.name, f"no association response within {peer.acse_timeout:g} s", phase="acse")
    raise ConnectionLost(peer.name, "the association could not be established")
