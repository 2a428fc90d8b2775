"""``dicomweb-gateway echo``: C-ECHO a node and report what it accepted on a probe association."""

from __future__ import annotations

from typing import Any

from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.config import NodeSettings

from .errors import ConnectionLost
from .node import peer_for
from .pool import open_probe_association

_NAMES = {
    Verification: "Verification",
    StudyRootQueryRetrieveInformationModelFind: "Study Root FIND",
    PatientRootQueryRetrieveInformationModelFind: "Patient Root FIND",
    StudyRootQueryRetrieveInformationModelGet: "Study Root GET",
    StudyRootQueryRetrieveInformationModelMove: "Study Root MOVE",
}


def probe(node: NodeSettings, calling_ae: str) -> dict[str, Any]:
    """Blocking: one association with every query/retrieve context, a C-ECHO, then release."""
    contexts = [build_context(uid) for uid in _NAMES]
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    ext.service_class_application_information = bytes([1, 1, 1, 1])
    assoc = open_probe_association(peer_for(node), calling_ae, contexts, [ext])
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise ConnectionLost(node.name, "no C-ECHO response")
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        info = (assoc.acceptor.sop_class_extended or {}).get(StudyRootQueryRetrieveInformationModelFind, b"") or b""
        flags = list(info) + [0] * 4
        return {
            "node": node.name,
            "peer": f"{node.ae_title}@{node.host}:{node.port}",
            "echo_status": f"0x{int(status.Status):04X}",
            **{_NAMES[uid]: uid in accepted for uid in _NAMES if uid != Verification},
            "relational queries": flags[0] == 1,
            "combined date-time matching": flags[1] == 1,
            "fuzzy person-name matching": flags[2] == 1,
            "timezone adjustment": flags[3] == 1,
            "peer maximum PDU": int(assoc.acceptor.maximum_length or 0),
            "peer implementation": f"{assoc.acceptor.implementation_class_uid} {assoc.acceptor.implementation_version_name or ''}".strip(),
        }
    finally:
        if assoc.is_established:
            assoc.release()
