"""``dicomweb-gateway echo``: C-ECHO a node and report what it accepted on a probe association."""

from __future__ import annotations

from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.config import NodeSettings

from .node import peer_for
from .pool import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, connect
from .ul import VERIFICATION, Proposal

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
_NAMES = {
    STUDY_ROOT_FIND: "Study Root FIND",
    PATIENT_ROOT_FIND: "Patient Root FIND",
    STUDY_ROOT_GET: "Study Root GET",
    STUDY_ROOT_MOVE: "Study Root MOVE",
}


def probe(node: NodeSettings, calling_ae: str) -> dict[str, Any]:
    """Blocking: one association with every query/retrieve context, a C-ECHO, then release."""
    syntaxes = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    proposal = Proposal(
        contexts=[(uid, syntaxes) for uid in (VERIFICATION, *_NAMES)],
        extended={STUDY_ROOT_FIND: bytes([1, 1, 1, 1])},
    )
    assoc = connect(peer_for(node, calling_ae), proposal)
    try:
        status = assoc.echo(1)
        negotiated = assoc.negotiated
        flags = list(negotiated.extended.get(STUDY_ROOT_FIND, b"")) + [0] * 4
        return {
            "node": node.name,
            "peer": f"{node.ae_title}@{node.host}:{node.port}",
            "echo_status": f"0x{status:04X}",
            **{name: assoc.context_for(uid) is not None for uid, name in _NAMES.items()},
            "relational queries": flags[0] == 1,
            "combined date-time matching": flags[1] == 1,
            "fuzzy person-name matching": flags[2] == 1,
            "timezone adjustment": flags[3] == 1,
            "peer maximum PDU": negotiated.peer_max_pdu,
            "peer implementation": f"{negotiated.implementation_class_uid} {negotiated.implementation_version_name}".strip(),
        }
    finally:
        assoc.release()
