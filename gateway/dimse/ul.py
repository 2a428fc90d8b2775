"""The requestor side of the DICOM upper layer (PS3.8) and the DIMSE exchanges the gateway needs.

pynetdicom runs each association in two threads that poll every millisecond: an idle pooled
association costs a few percent of a core, every message waits for the next poll, and its receive
path copies each byte several times. For the associations the gateway opens itself, this module
owns the socket instead and works in the calling (worker) thread:

- blocking I/O with socket timeouts, so an idle association costs nothing;
- each PDU read with ``recv_into`` into one buffer; P-DATA fragments kept as memoryviews and
  joined once per message;
- commands encoded and decoded here (implicit VR little endian, PS3.7 Annex E), data sets with
  pydicom; association PDUs encoded and decoded with pynetdicom's PDU classes, and presentation
  contexts negotiated with pynetdicom's ``negotiate_as_requestor``.

An ``Association`` is used by one thread at a time, except ``cancel`` and ``abort``, which may be
called from any thread while an operation runs (sends are serialized by a lock).

DICOM TLS (gateway/tls.py): the socket is wrapped right after the TCP connect, the handshake bounded
by the ACSE timeout. OpenSSL does not allow one TLS connection to be used by two threads at once, so
over TLS every read runs non-blocking under the send lock, and the wait for data outside it.
Handshake failures, and a TLS session the PACS ends while the association is being negotiated,
raise ``TlsFailure``; so does a plain association answered with TLS.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.dsutils import encode as encode_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor, negotiate_as_requestor

from .errors import AssociationRejected, ConnectionLost, DimseTimeout, NodeUnreachable, ServiceNotSupported, TlsFailure

if TYPE_CHECKING:
    from gateway.tls import DicomTls

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
NO_DATASET = 0x0101
MAX_ACCEPTED_PDU = 1 << 28  # a guard against garbage lengths, far above any real maximum PDU

# Command Field values (PS3.7 Table E.1-1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF

# Command elements: tag -> VR (PS3.7 Annex E)
_COMMAND_VR = {
    0x00000000: "UL", 0x00000002: "UI", 0x00000003: "UI", 0x00000100: "US", 0x00000110: "US",
    0x00000120: "US", 0x00000600: "AE", 0x00000700: "US", 0x00000800: "US", 0x00000900: "US",
    0x00000901: "AT", 0x00000902: "LO", 0x00000903: "US", 0x00001000: "UI", 0x00001001: "UI",
    0x00001020: "US", 0x00001021: "US", 0x00001022: "US", 0x00001023: "US", 0x00001030: "AE",
    0x00001031: "US",
}
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
RESPONDED_TO = 0x00000120
MOVE_DESTINATION = 0x00000600
PRIORITY = 0x00000700
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000
REMAINING, COMPLETED, FAILED, WARNING = 0x00001020, 0x00001021, 0x00001022, 0x00001023
MOVE_ORIGINATOR_AE, MOVE_ORIGINATOR_ID = 0x00001030, 0x00001031


def encode_command(elements: dict[int, Any]) -> bytes:
    """A command set in implicit VR little endian, with its group length first."""
    body = bytearray()
    for tag in sorted(elements):
        value = elements[tag]
        vr = _COMMAND_VR[tag]
        if vr == "US":
            raw = struct.pack("<H", value)
        elif vr == "UL":
            raw = struct.pack("<I", value)
        else:
            raw = value.encode("ascii") if isinstance(value, str) else bytes(value)
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        body += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw
    return struct.pack("<HHII", 0, 0, 4, len(body)) + bytes(body)


def decode_command(data: bytes | bytearray | memoryview) -> dict[int, Any]:
    out: dict[int, Any] = {}
    view = memoryview(data)
    pos = 0
    while pos + 8 <= len(view):
        group, element, length = struct.unpack_from("<HHI", view, pos)
        pos += 8
        raw = bytes(view[pos : pos + length])
        pos += length
        tag = (group << 16) | element
        vr = _COMMAND_VR.get(tag)
        if vr == "US":
            out[tag] = struct.unpack("<H", raw[:2])[0] if len(raw) >= 2 else 0
        elif vr == "UL":
            out[tag] = struct.unpack("<I", raw[:4])[0] if len(raw) >= 4 else 0
        elif vr in ("UI", "AE", "LO"):
            out[tag] = raw.decode("ascii", "replace").rstrip("\x00 ")
        else:
            out[tag] = raw
    return out


@dataclass(frozen=True)
class Accepted:
    """One accepted presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass
class Negotiated:
    """What the acceptor answered."""

    contexts: list[Accepted]
    rejected: list[tuple[str, int]]  # (abstract syntax, result)
    peer_max_pdu: int
    extended: dict[str, bytes] = field(default_factory=dict)
    implementation_class_uid: str = ""
    implementation_version_name: str = ""


@dataclass
class Message:
    """A received DIMSE message: its command, and its data set as received (chunks, not joined)."""

    context_id: int
    command: dict[int, Any]
    data: list[memoryview] | None

    @property
    def field(self) -> int:
        return int(self.command.get(COMMAND_FIELD, 0))

    def data_bytes(self) -> bytes:
        return b"".join(self.data or ())


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE sub-operation of a C-GET: the data set bytes as received, in ``transfer_syntax``."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    chunks: list[memoryview]
    move_originator_id: int | None = None


class Association:
    """An established association, requestor side. Create it with ``open_association``."""

    def __init__(self, sock: socket.socket, node: str, negotiated: Negotiated, *, max_pdu: int,
                 dimse_timeout: float, acse_timeout: float) -> None:
        self.sock = sock
        self.node = node
        self.negotiated = negotiated
        self.max_pdu = max_pdu
        self.dimse_timeout = dimse_timeout
        self.acse_timeout = acse_timeout
        self.established = True
        self.aborted = False
        self._send_lock = threading.Lock()
        self._tls = isinstance(sock, ssl.SSLSocket)
        if self._tls:
            sock.settimeout(0)  # non-blocking between calls: see _tls_recv_into
        # the most bytes one P-DATA-TF may carry to the peer (0 = no limit announced)
        self._send_limit = negotiated.peer_max_pdu or 1 << 24
        self._header = bytearray(6)

    # -- state --------------------------------------------------------------------------------

    @property
    def accepted(self) -> list[Accepted]:
        return self.negotiated.contexts

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> Accepted | None:
        for cx in self.negotiated.contexts:
            if cx.abstract_syntax == abstract_syntax and (transfer_syntax is None or cx.transfer_syntax == transfer_syntax):
                return cx
        return None

    def context_by_id(self, context_id: int) -> Accepted | None:
        return next((cx for cx in self.negotiated.contexts if cx.context_id == context_id), None)

    def idle_and_healthy(self) -> bool:
        """True if nothing arrived while idle: a peer that released, aborted or closed shows as readable."""
        if not self.established:
            return False
        if self._tls and self.sock.pending():  # already decrypted, so the socket itself may look quiet
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    # -- sending --------------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """``sendall``; the caller holds ``_send_lock``. Over TLS the write runs blocking (DIMSE
        timeout) and the socket goes back to non-blocking after it."""
        if not self._tls:
            self.sock.sendall(data)
            return
        self.sock.settimeout(self.dimse_timeout)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.settimeout(0)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_lock:
            try:
                self._write(data)
            except OSError as exc:
                self._lost()
                raise ConnectionLost(self.node, f"sending to the PACS failed: {exc}") from None

    def send_message(self, context_id: int, command: bytes, data: bytes | memoryview | None = None) -> None:
        """Send one DIMSE message: command PDVs, then data PDVs, split to the peer's maximum PDU."""
        chunk = self._send_limit - 6  # PDV item header: 4-byte length, context ID, control header
        out = bytearray()
        for payload, kind in ((command, 0x01), (data, 0x00)):
            if payload is None:
                continue
            view = memoryview(payload)
            pos = 0
            while True:
                piece = view[pos : pos + chunk]
                pos += len(piece)
                last = pos >= len(view)
                control = kind | (0x02 if last else 0x00)
                out += struct.pack(">BBIIBB", 0x04, 0, len(piece) + 6, len(piece) + 2, context_id, control)
                out += piece
                if len(out) > 1 << 20 or last:
                    self._send(out)
                    out = bytearray()
                if last:
                    break

    # -- receiving ------------------------------------------------------------------------------

    def _tls_recv_into(self, view: memoryview, timeout: float) -> int:
        """One read from the TLS socket under the send lock, so that it never overlaps a send from
        another thread (``cancel``, ``abort``); the wait for data happens outside the lock.
        Raises TimeoutError after ``timeout`` seconds without data."""
        deadline = time.monotonic() + timeout
        while True:
            with self._send_lock:
                try:
                    return self.sock.recv_into(view)
                except ssl.SSLWantReadError:
                    want_write = False
                except ssl.SSLWantWriteError:
                    want_write = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                select.select([self.sock], [self.sock] if want_write else [], [], remaining)
            except ValueError:  # closed by another thread (abort)
                raise OSError("the connection was closed") from None

    def _recv_into(self, view: memoryview, timeout: float, on_idle: Callable[[], bool] | None = None) -> None:
        if not self._tls:
            self.sock.settimeout(timeout)
        got = 0
        while got < len(view):
            try:
                n = self._tls_recv_into(view[got:], timeout) if self._tls else self.sock.recv_into(view[got:])
            except (TimeoutError, socket.timeout):
                if on_idle is not None and got == 0 and on_idle():
                    continue  # the caller sees progress elsewhere: keep waiting
                self._lost(abort=True)
                raise DimseTimeout(self.node, f"no answer from the PACS within {timeout:g} s", phase="dimse") from None
            except OSError as exc:
                self._lost()
                raise ConnectionLost(self.node, f"the connection to the PACS failed: {exc}") from None
            if n == 0:
                self._lost()
                raise ConnectionLost(self.node, "the PACS closed the connection")
            got += n

    def _read_pdu(self, timeout: float, on_idle: Callable[[], bool] | None = None) -> tuple[int, bytearray]:
        self._recv_into(memoryview(self._header), timeout, on_idle)
        pdu_type = self._header[0]
        (length,) = struct.unpack_from(">I", self._header, 2)
        if length > MAX_ACCEPTED_PDU:
            self.abort()
            raise ConnectionLost(self.node, f"the PACS sent a {length}-byte PDU; that is not DICOM")
        body = bytearray(length)
        self._recv_into(memoryview(body), timeout)
        return pdu_type, body

    def receive_messages(self, timeout: float | None = None,
                         on_idle: Callable[[], bool] | None = None) -> Iterator[Message]:
        """Yield DIMSE messages as they complete. Raises ConnectionLost on release/abort by the peer.
        ``on_idle`` is asked after each ``timeout`` of silence between PDUs: True keeps waiting."""
        timeout = self.dimse_timeout if timeout is None else timeout
        command: bytearray | None = None
        data: list[memoryview] = []
        current: dict[int, Any] | None = None
        context_id = 0
        while True:
            pdu_type, body = self._read_pdu(timeout, on_idle)
            if pdu_type == 0x07:
                self._lost()
                raise ConnectionLost(self.node, "the PACS aborted the association")
            if pdu_type == 0x05:
                self._reply_release()
                raise ConnectionLost(self.node, "the PACS released the association during an operation")
            if pdu_type != 0x04:
                self.abort()
                raise ConnectionLost(self.node, f"unexpected PDU type 0x{pdu_type:02X} from the PACS")
            view = memoryview(body)
            pos = 0
            while pos + 6 <= len(view):
                (item_length,) = struct.unpack_from(">I", view, pos)
                context_id = view[pos + 4]
                control = view[pos + 5]
                fragment = view[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if control & 0x01:  # command fragment
                    if command is None:
                        command = bytearray()
                    command += fragment
                    if control & 0x02:
                        current = decode_command(command)
                        command = None
                        if current.get(DATASET_TYPE, NO_DATASET) == NO_DATASET:
                            yield Message(context_id, current, None)
                            current = None
                else:
                    data.append(fragment)
                    if control & 0x02:
                        if current is None:
                            self.abort()
                            raise ConnectionLost(self.node, "the PACS sent a data set without a command")
                        message = Message(context_id, current, data)
                        current, data = None, []
                        yield message

    # -- ending ---------------------------------------------------------------------------------

    def _lost(self, abort: bool = False) -> None:
        if abort and self.established:
            try:
                with self._send_lock:
                    self._write(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            except OSError:
                pass
        self.established = False
        self.aborted = True
        self._close()

    def _reply_release(self) -> None:
        try:
            with self._send_lock:
                self._write(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        except OSError:
            pass
        self.established = False
        self._close()

    def _close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """A-ABORT and close; safe from any thread, any number of times."""
        if self.established:
            self._lost(abort=True)
        else:
            self._close()

    def release(self) -> None:
        """A-RELEASE, waiting at most the ACSE timeout for the reply; aborts if it does not come."""
        if not self.established:
            self._close()
            return
        try:
            self._send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            deadline = time.monotonic() + self.acse_timeout
            while time.monotonic() < deadline:
                pdu_type, _ = self._read_pdu(max(0.01, deadline - time.monotonic()))
                if pdu_type in (0x06, 0x07):
                    break
                if pdu_type == 0x05:  # release collision: answer it
                    self._send(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    break
        except (ConnectionLost, DimseTimeout):
            pass
        self.established = False
        self._close()

    # -- DIMSE services -------------------------------------------------------------------------

    def _context(self, abstract_syntax: str) -> Accepted:
        cx = self.context_for(abstract_syntax)
        if cx is None:
            raise ServiceNotSupported(self.node, f"the PACS did not accept {UID(abstract_syntax).name}")
        return cx

    def echo(self, msg_id: int) -> int:
        cx = self._context(VERIFICATION)
        self.send_message(cx.context_id, encode_command({
            AFFECTED_SOP_CLASS: VERIFICATION, COMMAND_FIELD: C_ECHO_RQ, MESSAGE_ID: msg_id, DATASET_TYPE: NO_DATASET,
        }))
        for message in self.receive_messages():
            if message.field == C_ECHO_RSP:
                return int(message.command.get(STATUS, 0xFFFF))
        raise AssertionError("unreachable")

    def find(self, identifier: Dataset, model: str, msg_id: int) -> Iterator[tuple[int, Dataset | None]]:
        """Send C-FIND-RQ; yield (status, identifier) per pending response, then (final status, None)."""
        cx = self._context(model)
        ts = UID(cx.transfer_syntax)
        payload = encode_dataset(identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        if payload is None:
            raise ValueError("the identifier cannot be encoded")
        self.send_message(cx.context_id, encode_command({
            AFFECTED_SOP_CLASS: model, COMMAND_FIELD: C_FIND_RQ, MESSAGE_ID: msg_id, PRIORITY: 0,
            DATASET_TYPE: 0x0000,
        }), payload)
        for message in self.receive_messages():
            if message.field != C_FIND_RSP:
                continue
            status = int(message.command.get(STATUS, 0xFFFF))
            found = None
            if message.data is not None:
                found = decode_dataset(BytesIO(message.data_bytes()), ts.is_implicit_VR, ts.is_little_endian,
                                       ts.is_deflated)
            yield status, found
            if status not in (0xFF00, 0xFF01):
                return

    def get(self, identifier: Dataset, model: str, msg_id: int,
            on_store: Callable[[StoreRequest], int]) -> Iterator[dict[int, Any]]:
        """Send C-GET-RQ; answer each C-STORE sub-operation with ``on_store``'s status, in this thread,
        as it arrives. Yield each C-GET-RSP command (pending ones carry the counts; the last one is
        final). The final response's data set, if any, is decoded into key ``"failed_uids"``."""
        yield from self._retrieve(C_GET_RQ, C_GET_RSP, identifier, model, msg_id, on_store, {})

    def move(self, identifier: Dataset, model: str, msg_id: int, destination: str,
             on_idle: Callable[[], bool] | None = None) -> Iterator[dict[int, Any]]:
        """Send C-MOVE-RQ to ``destination``; yield each C-MOVE-RSP command as for ``get``."""
        yield from self._retrieve(C_MOVE_RQ, C_MOVE_RSP, identifier, model, msg_id, None,
                                  {MOVE_DESTINATION: destination}, on_idle)

    def _retrieve(self, request: int, response: int, identifier: Dataset, model: str, msg_id: int,
                  on_store: Callable[[StoreRequest], int] | None, extra: dict[int, Any],
                  on_idle: Callable[[], bool] | None = None) -> Iterator[dict[int, Any]]:
        cx = self._context(model)
        ts = UID(cx.transfer_syntax)
        payload = encode_dataset(identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        if payload is None:
            raise ValueError("the identifier cannot be encoded")
        self.send_message(cx.context_id, encode_command({
            AFFECTED_SOP_CLASS: model, COMMAND_FIELD: request, MESSAGE_ID: msg_id, PRIORITY: 0,
            DATASET_TYPE: 0x0000, **extra,
        }), payload)
        for message in self.receive_messages(on_idle=on_idle):
            if message.field == C_STORE_RQ and on_store is not None:
                self._answer_store(message, on_store)
            elif message.field == response:
                command = dict(message.command)
                if message.data is not None:
                    failed = decode_dataset(BytesIO(message.data_bytes()), ts.is_implicit_VR, ts.is_little_endian,
                                            ts.is_deflated)
                    uids = failed.get("FailedSOPInstanceUIDList", []) if failed is not None else []
                    command["failed_uids"] = [uids] if isinstance(uids, str) else list(uids or [])
                yield command
                if int(command.get(STATUS, 0xFFFF)) not in (0xFF00, 0xFF01):
                    return

    def _answer_store(self, message: Message, on_store: Callable[[StoreRequest], int]) -> None:
        command = message.command
        cx = self.context_by_id(message.context_id)
        request = StoreRequest(
            sop_class_uid=str(command.get(AFFECTED_SOP_CLASS, "")),
            sop_instance_uid=str(command.get(AFFECTED_SOP_INSTANCE, "")),
            transfer_syntax=cx.transfer_syntax if cx else "",
            chunks=message.data or [],
            move_originator_id=command.get(MOVE_ORIGINATOR_ID),
        )
        status = on_store(request) if cx is not None else 0x0122
        self.send_message(message.context_id, encode_command({
            AFFECTED_SOP_CLASS: request.sop_class_uid, COMMAND_FIELD: C_STORE_RSP,
            RESPONDED_TO: int(command.get(MESSAGE_ID, 0)), DATASET_TYPE: NO_DATASET, STATUS: status,
            AFFECTED_SOP_INSTANCE: request.sop_instance_uid,
        }))

    def serve_stores(self, on_store: Callable[[StoreRequest], int], idle_timeout: float) -> None:
        """Acceptor side: answer C-STORE and C-ECHO requests until the peer releases or aborts."""
        try:
            for message in self.receive_messages(timeout=idle_timeout):
                if message.field == C_STORE_RQ:
                    self._answer_store(message, on_store)
                elif message.field == C_ECHO_RQ:
                    self.send_message(message.context_id, encode_command({
                        AFFECTED_SOP_CLASS: VERIFICATION, COMMAND_FIELD: C_ECHO_RSP,
                        RESPONDED_TO: int(message.command.get(MESSAGE_ID, 0)), DATASET_TYPE: NO_DATASET,
                        STATUS: 0x0000,
                    }))
                else:  # not a storage request: "unrecognized operation"
                    self.send_message(message.context_id, encode_command({
                        COMMAND_FIELD: message.field | 0x8000, RESPONDED_TO: int(message.command.get(MESSAGE_ID, 0)),
                        DATASET_TYPE: NO_DATASET, STATUS: 0x0211,
                    }))
        except (ConnectionLost, DimseTimeout):
            pass  # released, aborted, or idle too long: the association is over either way
        finally:
            self._close()

    def store(self, context_id: int, sop_class: str, sop_instance: str, msg_id: int,
              data: bytes | bytearray | memoryview, priority: int = 0) -> tuple[int, str]:
        """C-STORE-RQ with ``data`` (the encoded data set, sent as it is, in the context's transfer
        syntax); returns the response's (status, error comment)."""
        self.send_message(context_id, encode_command({
            AFFECTED_SOP_CLASS: sop_class, COMMAND_FIELD: C_STORE_RQ, MESSAGE_ID: msg_id, PRIORITY: priority,
            DATASET_TYPE: 0x0000, AFFECTED_SOP_INSTANCE: sop_instance,
        }), data)
        for message in self.receive_messages():
            if message.field == C_STORE_RSP and int(message.command.get(RESPONDED_TO, -1)) == msg_id:
                return int(message.command.get(STATUS, 0xFFFF)), str(message.command.get(ERROR_COMMENT, "") or "")
        raise AssertionError("unreachable")

    def cancel(self, model: str, msg_id: int) -> None:
        """C-CANCEL-RQ for ``msg_id``; no response comes (PS3.7 9.3.2.3). Safe from another thread."""
        cx = self.context_for(model)
        if cx is None or not self.established:
            return
        self.send_message(cx.context_id, encode_command({
            COMMAND_FIELD: C_CANCEL_RQ, RESPONDED_TO: msg_id, DATASET_TYPE: NO_DATASET,
        }))


# ------------------------------------------------------------------------------------------------
# Opening an association


@dataclass(frozen=True)
class Proposal:
    """What to propose: contexts (abstract syntax, transfer syntaxes), SCP roles, extended negotiation."""

    contexts: Sequence[tuple[str, Sequence[str]]]
    scp_roles: Sequence[str] = ()
    extended: dict[str, bytes] = field(default_factory=dict)


_NOT_TLS_HINT = "does the PACS speak TLS on this port?"
_CLIENT_CERT_HINT = "does the PACS want a client certificate (nodes.tls.cert_file, key_file), or one it trusts?"


def _tls_reason(exc: ssl.SSLError, after_handshake: bool = False) -> str:
    """OpenSSL's reason for a TLS failure, in words, with a hint at the usual cause."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the PACS's certificate was not accepted: {exc.verify_message or exc.reason} "
                "(nodes.tls.ca_file, nodes.tls.server_name)")
    reason = exc.reason or type(exc).__name__
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        # TLS 1.3: a server that refuses the client's certificate (or its absence) may just hang up
        return (f"the PACS ended the TLS session right after the handshake ({reason}): {_CLIENT_CERT_HINT}"
                if after_handshake else f"the PACS ended the connection during the TLS handshake: {_NOT_TLS_HINT}")
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
        return f"TLS handshake failed ({reason}): {_NOT_TLS_HINT}"
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason or "HANDSHAKE_FAILURE" in reason:
        return f"the PACS refused the TLS handshake ({reason}): {_CLIENT_CERT_HINT}"
    return f"TLS failed ({reason})"


def _connect(host: str, port: int, timeout: float, node: str, tls: DicomTls | None,
             handshake_timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (TimeoutError, socket.timeout):
        raise DimseTimeout(node, f"no TCP connection within {timeout:g} s", phase="connect") from None
    except OSError as exc:
        raise NodeUnreachable(node, f"cannot connect to the PACS: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock.settimeout(handshake_timeout)
        try:
            sock = tls.context().wrap_socket(sock, server_hostname=tls.server_name)
        except (TimeoutError, socket.timeout):
            sock.close()
            raise DimseTimeout(node, f"no TLS handshake within {handshake_timeout:g} s: {_NOT_TLS_HINT}",
                               phase="acse") from None
        except ssl.SSLError as exc:
            sock.close()
            raise TlsFailure(node, _tls_reason(exc)) from None
        except OSError as exc:
            sock.close()
            raise TlsFailure(node, f"the connection ended during the TLS handshake ({exc.strerror or exc}): "
                                   f"{_NOT_TLS_HINT}") from None
    return sock


def open_association(
    *, node: str, host: str, port: int, calling_ae: str, called_ae: str, proposal: Proposal, max_pdu: int,
    connect_timeout: float, acse_timeout: float, dimse_timeout: float, implementation_class_uid: str,
    implementation_version_name: str, tls: DicomTls | None = None,
) -> Association:
    """Connect (with ``tls``: and the TLS handshake, within the ACSE timeout) and negotiate
    (blocking). Raises a typed DimseError when it cannot."""
    sock = _connect(host, port, connect_timeout, node, tls, acse_timeout)
    try:
        rq_contexts = []
        for i, (abstract, syntaxes) in enumerate(proposal.contexts):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = list(syntaxes)
            rq_contexts.append(cx)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT)
        primitive.calling_ae_title = calling_ae
        primitive.called_ae_title = called_ae
        primitive.presentation_context_definition_list = rq_contexts
        items: list[Any] = []
        length = MaximumLengthNotification()
        length.maximum_length_received = max_pdu
        items.append(length)
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = UID(implementation_class_uid)
        items.append(impl)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = implementation_version_name
        items.append(version)
        for uid in proposal.scp_roles:
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = uid
            role.scu_role = False
            role.scp_role = True
            items.append(role)
        for uid, info in proposal.extended.items():
            ext = SOPClassExtendedNegotiation()
            ext.sop_class_uid = uid
            ext.service_class_application_information = info
            items.append(ext)
        primitive.user_information = items
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        sock.settimeout(acse_timeout)
        try:
            sock.sendall(pdu.encode())
        except ssl.SSLError as exc:
            raise TlsFailure(node, _tls_reason(exc, after_handshake=True)) from None
        except OSError as exc:
            raise ConnectionLost(node, f"sending the association request failed: {exc.strerror or exc}") from None
        pdu_type, body = _read_raw_pdu(sock, node, acse_timeout, requestor=True)
        if pdu_type == 0x02:
            ac = A_ASSOCIATE_AC()
            ac.decode(bytes(body))
            answer = ac.to_primitive()
            negotiated = _negotiated(rq_contexts, answer, proposal)
            if not negotiated.contexts:
                sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                raise ServiceNotSupported(node, "the PACS accepted none of the proposed presentation contexts",
                                          rejected=negotiated.rejected)
            return Association(sock, node, negotiated, max_pdu=max_pdu, dimse_timeout=dimse_timeout,
                               acse_timeout=acse_timeout)
        if pdu_type == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(bytes(body))
            reason = f"{rj.result_str}, {rj.source_str}: {rj.reason_str}"
            raise AssociationRejected(node, f"the PACS rejected the association ({reason})", transient=rj.result == 0x02)
        if pdu_type == 0x07:
            raise ConnectionLost(node, "the PACS aborted the association during negotiation")
        raise ConnectionLost(node, f"unexpected PDU type 0x{pdu_type:02X} during negotiation")
    except BaseException:
        sock.close()
        raise


def _wait_for_close(sock: socket.socket, timeout: float) -> None:
    """After A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2); closing first could
    reset it before the rejection is read."""
    try:
        sock.settimeout(min(timeout, 2.0))
        while sock.recv(4096):
            pass
    except OSError:
        pass


# Association PDUs (A-ASSOCIATE-RQ/AC/RJ, release, abort) hold presentation contexts and user
# information: 128 contexts of a few dozen transfer syntaxes stay far below this.
MAX_NEGOTIATION_PDU = 1 << 20


def _read_raw_pdu(sock: socket.socket, node: str, timeout: float, requestor: bool = False) -> tuple[int, bytearray]:
    header = bytearray(6)
    # a PACS that expects TLS drops a plain association request without a word
    hint = " (a PACS that expects DICOM TLS does this: nodes.tls.enabled?)" if (
        requestor and not isinstance(sock, ssl.SSLSocket)) else ""
    for buf in (header, None):
        if buf is None:
            length = struct.unpack_from(">I", header, 2)[0]
            if length > MAX_NEGOTIATION_PDU:  # a peer's word is no reason to allocate gigabytes
                raise ConnectionLost(node, f"the peer announced a {length}-byte association PDU "
                                           f"(at most {MAX_NEGOTIATION_PDU} taken)")
            buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < len(view):
            try:
                n = sock.recv_into(view[got:])
            except (TimeoutError, socket.timeout):
                raise DimseTimeout(node, f"no association response within {timeout:g} s", phase="acse") from None
            except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows on the first read
                reason = _tls_reason(exc, after_handshake=True) if requestor else f"TLS failed ({exc.reason or exc})"
                raise TlsFailure(node, reason) from None
            except OSError as exc:
                raise ConnectionLost(node, f"the connection failed during negotiation: {exc}"
                                           f"{hint if buf is header and got == 0 else ''}") from None
            if n == 0:
                raise ConnectionLost(node, "the PACS closed the connection during negotiation"
                                           f"{hint if buf is header and got == 0 else ''}")
            got += n
        if buf is header and header[0] in (0x15, 0x16) and header[1] == 0x03 and not isinstance(sock, ssl.SSLSocket):
            # a TLS record (alert, handshake), not a PDU: the peer speaks TLS on a plain association
            raise TlsFailure(node, "the peer speaks TLS on a plain DICOM connection: enable TLS on the gateway's "
                                   "side (nodes.tls.enabled, or gateway.move_tls_* for the C-MOVE receiver)")
        if buf is not header:
            return header[0], header + buf  # pynetdicom's PDU classes decode the whole PDU
    raise AssertionError("unreachable")


def _negotiated(rq_contexts: list[PresentationContext], answer: A_ASSOCIATE, proposal: Proposal) -> Negotiated:
    roles: dict[str, tuple[bool, bool]] = {}
    extended: dict[str, bytes] = {}
    peer_max = 0
    impl_uid = impl_version = ""
    for item in answer.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
        elif isinstance(item, SOPClassExtendedNegotiation):
            extended[str(item.sop_class_uid)] = bytes(item.service_class_application_information or b"")
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = str(item.implementation_version_name or "")
    for cx in rq_contexts:
        if cx.abstract_syntax in proposal.scp_roles:
            cx.scu_role, cx.scp_role = False, True
    results = negotiate_as_requestor(rq_contexts, answer.presentation_context_definition_results_list, roles or None)
    accepted = [
        Accepted(int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0]), cx.as_scu, cx.as_scp)
        for cx in results if cx.result == 0x00
    ]
    rejected = [(str(cx.abstract_syntax), int(cx.result)) for cx in results if cx.result != 0x00]
    return Negotiated(accepted, rejected, peer_max, extended, impl_uid, impl_version)



# ------------------------------------------------------------------------------------------------
# Accepting an association (the C-MOVE destination)


class Rejected(Exception):
    """An association request that was answered with A-ASSOCIATE-RJ."""


def accept_association(
    sock: socket.socket, *, node: str, ae_title: str, supported: Sequence[PresentationContext], max_pdu: int,
    acse_timeout: float, dimse_timeout: float, implementation_class_uid: str, implementation_version_name: str,
    busy: bool = False, allowed_calling: Collection[str] | None = None,
) -> Association:
    """Negotiate as acceptor on a connected socket (blocking). Raises Rejected after answering with
    A-ASSOCIATE-RJ (wrong called AE title, or ``busy``), or a DimseError when the peer misbehaves."""
    pdu_type, raw = _read_raw_pdu(sock, node, acse_timeout)
    if pdu_type != 0x01:
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        raise ConnectionLost(node, f"expected an association request, got PDU type 0x{pdu_type:02X}")
    rq = A_ASSOCIATE_RQ()
    rq.decode(bytes(raw))
    request = rq.to_primitive()
    calling = str(request.calling_ae_title).strip()
    reason = None
    if busy:  # transient, by the service provider: local limit exceeded
        reason, code = "busy", (0x02, 0x03, 0x02)
    elif str(request.called_ae_title).strip() != ae_title.strip():  # permanent: called AE title not recognised
        reason, code = "called AE title not recognised", (0x01, 0x01, 0x07)
    elif allowed_calling is not None and calling not in allowed_calling:  # permanent: calling AE not recognised
        reason, code = f"calling AE title {calling!r} is not a configured node", (0x01, 0x01, 0x03)
    if reason is not None:
        rj = A_ASSOCIATE()
        rj.result, rj.result_source, rj.diagnostic = code
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        sock.sendall(pdu.encode())
        _wait_for_close(sock, acse_timeout)
        raise Rejected(reason)
    roles: dict[str, tuple[bool, bool]] = {}
    peer_max = 0
    for item in request.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
    results, role_items = negotiate_as_acceptor(request.presentation_context_definition_list, list(supported),
                                                roles or None)
    answer = A_ASSOCIATE()
    answer.application_context_name = UID(APPLICATION_CONTEXT)
    answer.calling_ae_title = request.calling_ae_title
    answer.called_ae_title = request.called_ae_title
    answer.result = 0x00
    answer.presentation_context_definition_results_list = results
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version_name
    answer.user_information = [length, impl, version, *role_items]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(answer)
    sock.sendall(pdu.encode())
    accepted = [Accepted(int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00]
    negotiated = Negotiated(accepted, [], peer_max)
    return Association(sock, node, negotiated, max_pdu=max_pdu, dimse_timeout=dimse_timeout, acse_timeout=acse_timeout)
