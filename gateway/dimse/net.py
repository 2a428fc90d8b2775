"""Process-wide pynetdicom settings, socket options, and how to reach a PACS.

The gateway's own outgoing associations use ``ul.py``; pynetdicom still runs the associations the
gateway accepts (the C-MOVE receiver, the demo PACS), so it is configured here once:
- no identifiers (patient data) in its logs, and no per-PDU log formatting;
- TCP_NODELAY on every accepted socket: pynetdicom sends a command and its data set as separate
  PDUs, and without it each waits for the peer's delayed ACK (about 40 ms).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass

from pynetdicom import _config, evt

from gateway import __version__

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1137.1"
IMPLEMENTATION_VERSION_NAME = ("DWGW_" + __version__.replace(".", ""))[:16]

_configured = False


def configure_pynetdicom() -> None:
    global _configured
    if _configured:
        return
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    _config.PASS_CONTEXTVARS = True
    # the gateway logs each failure once, with the node and the request ID (gateway.dimse)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    _configured = True


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay_on_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations the gateway accepts."""
    set_nodelay(event.assoc.dul.socket.socket)


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
    calling_ae: str = "DICOMWEB-GW"
    tls: tuple[ssl.SSLContext, str] | None = None
