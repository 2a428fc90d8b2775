"""Process-wide pynetdicom settings, socket options, and how to reach a PACS.

The gateway's own associations, outgoing and into its C-MOVE receiver, run on ``ul.py``; pynetdicom
still runs in the same process for the embedded demo PACS and the benchmarks' direct clients, so
it is configured here once: no identifiers (patient data) in its logs, and no per-PDU log formatting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom import _config

from gateway import __version__

if TYPE_CHECKING:
    from gateway.tls import DicomTls

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
    tls: DicomTls | None = None  # DICOM TLS to this PACS (gateway/tls.py)
