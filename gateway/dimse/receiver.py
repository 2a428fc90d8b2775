"""The C-MOVE destination: a storage SCP inside the gateway, started and stopped with the app.

Sub-operations of a C-MOVE arrive on associations the PACS opens to us, possibly reused across moves
and in parallel. Each C-STORE is matched to the C-MOVE that asked for it:
- by Move Originator Message ID (unique among the moves in flight from this gateway), checked
  against the instances that move expects when those are known;
- for a PACS that omits the Move Originator fields, by the SOP Instance UID: the first move in flight
  that expects that instance and has not received it yet.
An instance nobody asked for is refused (0x0124), so concurrent retrieves never receive each
other's instances.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from .net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, configure_pynetdicom, nodelay_on_open
from .ul import StoreRequest

log = logging.getLogger("gateway.dimse")

# The acceptor picks the first of its own transfer syntaxes that the PACS offers, for every move
# alike: Explicit VR Little Endian first (what web clients get by default, no transcoding), then the
# compressed syntaxes (kept as the PACS sends them), then the ones that need converting.
RECEIVE_SYNTAXES = (
    ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, RLELossless, JPEGBaseline8Bit,
    JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

REFUSED = 0x0124  # Refused: not authorized (no retrieve asked for this instance)

StoreSink = Callable[[StoreRequest], int]


class _Move:
    def __init__(self, msg_id: int, sink: StoreSink, expected: set[str] | None) -> None:
        self.msg_id = msg_id
        self.sink = sink
        self.expected = expected
        self.received: set[str] = set()
        self.lock = threading.Lock()

    def claims(self, sop_instance_uid: str) -> bool:
        with self.lock:
            return sop_instance_uid not in self.received and (
                self.expected is None or sop_instance_uid in self.expected
            )


class MoveReceiver:
    """Owns the storage SCP and the table of moves in flight."""

    def __init__(self, ae_title: str, host: str, port: int, max_pdu: int = 1 << 20) -> None:
        configure_pynetdicom()
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self._ae = AE(ae_title=ae_title)
        self._ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self._ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self._ae.maximum_pdu_size = max_pdu
        self._ae.maximum_associations = 64
        self._ae.require_called_aet = True
        self._ae.supported_contexts = [build_context(cx.abstract_syntax, list(RECEIVE_SYNTAXES))
                                       for cx in AllStoragePresentationContexts]
        self._server: Any = None
        self._moves: dict[int, _Move] = {}
        self._lock = threading.Lock()
        self._ids = itertools.cycle(range(1, 65536))
        self.refused = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._server = self._ae.start_server(
            (self.host, self.port), block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, nodelay_on_open), (evt.EVT_C_STORE, self._on_store)],
        )
        self.port = self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for assoc in self._ae.active_associations:
            assoc.abort()

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- the moves in flight --------------------------------------------------------------------

    def register(self, sink: StoreSink, expected: set[str] | None) -> int:
        """A Move Originator Message ID for a new move, unique among the moves in flight."""
        with self._lock:
            for _ in range(65535):
                msg_id = next(self._ids)
                if msg_id not in self._moves:
                    self._moves[msg_id] = _Move(msg_id, sink, expected)
                    return msg_id
        raise RuntimeError("65535 moves in flight")

    def unregister(self, msg_id: int) -> set[str]:
        """Forget a move; returns the SOP Instance UIDs it received."""
        with self._lock:
            move = self._moves.pop(msg_id, None)
        return move.received if move else set()

    def _match(self, originator_id: int | None, sop_instance_uid: str) -> _Move | None:
        with self._lock:
            if originator_id is not None:
                move = self._moves.get(originator_id)
                return move if move is not None and move.claims(sop_instance_uid) else None
            return next((m for m in self._moves.values() if m.expected is not None and m.claims(sop_instance_uid)), None)

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        uid = str(request.AffectedSOPInstanceUID)
        move = self._match(request.MoveOriginatorMessageID, uid)
        if move is None:
            self.refused += 1
            log.warning("refused a C-STORE that no retrieve in flight asked for")
            return REFUSED
        with move.lock:
            move.received.add(uid)
        data = request.DataSet.getvalue() if request.DataSet is not None else b""
        store = StoreRequest(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=uid,
            transfer_syntax=str(event.context.transfer_syntax),
            chunks=[memoryview(data)],
            move_originator_id=request.MoveOriginatorMessageID,
        )
        return move.sink(store)
