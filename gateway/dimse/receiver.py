"""The C-MOVE destination: a storage SCP inside the gateway, started and stopped with the app.

Sub-operations of a C-MOVE arrive on associations the PACS opens to us, possibly reused across moves
and in parallel. Each C-STORE is matched to the C-MOVE that asked for it:
- by Move Originator Message ID (unique among the moves in flight from this gateway), checked
  against the instances that move expects when those are known;
- for a PACS that omits the Move Originator fields, by the SOP Instance UID: the first move in flight
  that expects that instance and has not received it yet.
An instance nobody asked for is refused (0x0124), so concurrent retrieves never receive each
other's instances.

With ``ssl_context`` (``gateway.move_tls_*``, gateway/tls.py) the receiver speaks DICOM TLS: each
connection's handshake runs in its own thread, within the ACSE timeout.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import socket
import ssl
import threading
from collections.abc import Callable

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

from .errors import DimseError
from .net import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from .ul import VERIFICATION, Rejected, StoreRequest, accept_association

log = logging.getLogger("gateway.dimse")

# The acceptor picks the first of its own transfer syntaxes that the PACS offers, for every move
# alike: Explicit VR Little Endian first (what web clients get by default, no transcoding), then the
# compressed syntaxes (kept as the PACS sends them), then the ones that need converting.
RECEIVE_SYNTAXES = (
    ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, RLELossless, JPEGBaseline8Bit,
    JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
MAX_INBOUND = 64
IDLE_TIMEOUT = 60.0
ACSE_TIMEOUT = 10.0  # for the TLS handshake, then again for the association request

REFUSED = 0x0124  # Refused: not authorized (no retrieve asked for this instance)
OUT_OF_RESOURCES = 0xA700  # what a move whose client has gone answers

StoreSink = Callable[[StoreRequest], int]


class _Move:
    def __init__(self, msg_id: int, sink: StoreSink, expected: set[str] | None) -> None:
        self.msg_id = msg_id
        self.sink = sink
        self.expected = expected
        self.received: set[str] = set()
        self.lock = threading.Lock()
        # the registering request's context (its request ID), for what the sink logs on our threads
        self.context = contextvars.copy_context()

    def claims(self, sop_instance_uid: str) -> bool:
        with self.lock:
            return sop_instance_uid not in self.received and (
                self.expected is None or sop_instance_uid in self.expected
            )


class MoveReceiver:
    """Owns the storage SCP (on the gateway's own upper layer) and the table of moves in flight."""

    def __init__(self, ae_title: str, host: str, port: int, max_pdu: int = 1 << 20,
                 allowed_calling: set[str] | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """``allowed_calling``: the AE titles that may send (the configured nodes); None admits any.
        ``ssl_context``: DICOM TLS (a server context), or None for plain DICOM."""
        self.ae_title = ae_title
        self.ssl_context = ssl_context
        self.allowed_calling = allowed_calling
        self.host = host
        self.port = port
        self.max_pdu = max_pdu
        self._supported = [build_context(cx.abstract_syntax, list(RECEIVE_SYNTAXES))
                           for cx in AllStoragePresentationContexts]
        self._supported.append(build_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._moves: dict[int, _Move] = {}
        self._lock = threading.Lock()
        self._ids = itertools.cycle(range(1, 65536))
        self.refused = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=64)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="move-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def running(self) -> bool:
        """Bound and accepting: the listening socket is open and its accept loop alive."""
        return self._listener is not None and self._thread is not None and self._thread.is_alive()

    def _accept_loop(self) -> None:
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                busy = len(self._connections) >= MAX_INBOUND
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn, busy), name="move-receiver-association",
                             daemon=True).start()

    def _tls(self, conn: socket.socket) -> socket.socket | None:
        """The connection with the TLS handshake done, or None (logged) when it failed."""
        assert self.ssl_context is not None
        try:
            wrapped = self.ssl_context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (exc.strerror or str(exc))
            log.warning("move receiver: TLS handshake with a PACS failed (%s)", reason)
            return None
        with self._lock:  # stop() shuts down what the set holds
            self._connections.discard(conn)
            self._connections.add(wrapped)
        return wrapped

    def _serve(self, conn: socket.socket, busy: bool) -> None:
        try:
            conn.settimeout(ACSE_TIMEOUT)  # the handshake and the association request come within it
            if self.ssl_context is not None:
                wrapped = self._tls(conn)
                if wrapped is None:
                    return
                conn = wrapped
            assoc = accept_association(
                conn, node="move-receiver", ae_title=self.ae_title, supported=self._supported, max_pdu=self.max_pdu,
                acse_timeout=ACSE_TIMEOUT, dimse_timeout=IDLE_TIMEOUT,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=IMPLEMENTATION_VERSION_NAME, busy=busy,
                allowed_calling=self.allowed_calling,
            )
            assoc.serve_stores(self._on_store, IDLE_TIMEOUT)
        except Rejected as exc:
            log.warning("move receiver rejected an association: %s", exc)
        except (DimseError, OSError) as exc:
            log.info("move receiver association ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

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

    def _candidates(self, originator_id: int | None, sop_instance_uid: str) -> list[_Move]:
        """The moves that may take this instance, newest first."""
        with self._lock:
            if originator_id is not None:
                move = self._moves.get(originator_id)
                return [move] if move is not None and move.claims(sop_instance_uid) else []
            return [m for m in reversed(self._moves.values()) if m.expected is not None and m.claims(sop_instance_uid)]

    def _on_store(self, store: StoreRequest) -> int:
        candidates = self._candidates(store.move_originator_id, store.sop_instance_uid)
        if not candidates:
            self.refused += 1
            log.warning("refused a C-STORE that no retrieve in flight asked for")
            return REFUSED
        status = REFUSED
        for move in candidates:
            with move.lock:
                if store.sop_instance_uid in move.received:
                    continue  # another thread gave it to this move meanwhile
                move.received.add(store.sop_instance_uid)
            status = move.context.copy().run(move.sink, store)
            if status != OUT_OF_RESOURCES:
                return status
            # that move's client has gone: matched by UID only, the instance may be another's too
        return status
