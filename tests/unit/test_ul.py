"""The upper layer's framing and command coding, over a socket pair (no PACS)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_FIND_RSP as PynetdicomFindRsp

from gateway.dimse.errors import ConnectionLost, DimseTimeout
from gateway.dimse.ul import (
    AFFECTED_SOP_CLASS,
    COMMAND_FIELD,
    DATASET_TYPE,
    MESSAGE_ID,
    NO_DATASET,
    STATUS,
    Accepted,
    Association,
    Negotiated,
    decode_command,
    encode_command,
)

FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def pair(peer_max_pdu: int = 16384) -> tuple[Association, socket.socket]:
    ours, theirs = socket.socketpair()
    negotiated = Negotiated([Accepted(1, FIND, "1.2.840.10008.1.2.1")], [], peer_max_pdu)
    return Association(ours, "test", negotiated, max_pdu=65536, dimse_timeout=2, acse_timeout=2), theirs


def read_pdus(sock: socket.socket, payload: int) -> list[tuple[int, bytes]]:
    """Read PDUs until ``payload`` bytes of PDV payload arrived."""
    data = b""
    sock.settimeout(2)
    while len(data) < payload or _payload(data) < payload:
        data += sock.recv(65536)
    out = []
    pos = 0
    while pos < len(data):
        kind, _, length = struct.unpack_from(">BBI", data, pos)
        out.append((kind, data[pos + 6 : pos + 6 + length]))
        pos += 6 + length
    return out


def _payload(data: bytes) -> int:
    pos = total = 0
    while pos + 6 <= len(data):
        length = struct.unpack_from(">I", data, pos + 2)[0]
        total += length - 6
        pos += 6 + length
    return total if pos == len(data) else -1


def pdv(context: int, control: int, payload: bytes) -> bytes:
    return struct.pack(">IBB", len(payload) + 2, context, control) + payload


def pdu(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def test_command_round_trip_and_agreement_with_pynetdicom() -> None:
    raw = encode_command({AFFECTED_SOP_CLASS: FIND, COMMAND_FIELD: 0x8020, 0x00000120: 7, DATASET_TYPE: NO_DATASET,
                          STATUS: 0xFF00})
    assert decode_command(raw) == {0: len(raw) - 12, AFFECTED_SOP_CLASS: FIND, COMMAND_FIELD: 0x8020,
                                   0x00000120: 7, DATASET_TYPE: NO_DATASET, STATUS: 0xFF00}
    # pynetdicom reads what we write
    msg = PynetdicomFindRsp()
    from io import BytesIO

    from pydicom.filereader import read_dataset

    msg.command_set = read_dataset(BytesIO(raw), True, True)
    assert msg.command_set.CommandField == 0x8020
    assert msg.command_set.AffectedSOPClassUID == FIND
    assert msg.command_set.MessageIDBeingRespondedTo == 7


def test_messages_are_split_to_the_peers_maximum_pdu() -> None:
    assoc, peer = pair(peer_max_pdu=4096)
    command = encode_command({AFFECTED_SOP_CLASS: FIND, COMMAND_FIELD: 0x0020, MESSAGE_ID: 1, DATASET_TYPE: 0})
    data = bytes(range(256)) * 40  # 10240 bytes
    assoc.send_message(1, command, data)
    pdus = read_pdus(peer, len(command) + len(data))
    assert all(len(body) <= 4096 for _, body in pdus)
    commands = b"".join(body[6:] for _, body in pdus if body[5] & 1)
    payload = b"".join(body[6:] for _, body in pdus if not body[5] & 1)
    assert commands == command and payload == data
    assert pdus[-1][1][5] == 0x02  # the last data fragment says so


def test_a_message_assembled_from_fragments_across_pdus() -> None:
    assoc, peer = pair()
    command = encode_command({COMMAND_FIELD: 0x8020, 0x00000120: 1, DATASET_TYPE: 0, STATUS: 0xFF00})
    ds = Dataset()
    ds.PatientID = "X"
    data = b"\x10\x00\x20\x00\x02\x00\x00\x00X "
    peer.sendall(pdu(pdv(1, 0x01, command[:10])) + pdu(pdv(1, 0x03, command[10:]), pdv(1, 0x00, data[:4])))
    peer.sendall(pdu(pdv(1, 0x02, data[4:])))
    message = next(assoc.receive_messages())
    assert message.field == 0x8020 and message.command[STATUS] == 0xFF00
    assert message.data_bytes() == data


def test_peer_abort_and_close_are_connection_lost() -> None:
    assoc, peer = pair()
    peer.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
    with pytest.raises(ConnectionLost):
        next(assoc.receive_messages())
    assert not assoc.established
    assoc, peer = pair()
    peer.close()
    with pytest.raises(ConnectionLost):
        next(assoc.receive_messages())


def test_silence_is_a_timeout_and_aborts() -> None:
    assoc, peer = pair()
    with pytest.raises(DimseTimeout):
        next(assoc.receive_messages(timeout=0.2))
    assert not assoc.established
    assert peer.recv(16)[:1] == b"\x07"  # A-ABORT sent


def test_release_waits_for_the_reply() -> None:
    assoc, peer = pair()

    def acceptor() -> None:
        assert peer.recv(10)[:1] == b"\x05"
        peer.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")

    t = threading.Thread(target=acceptor)
    t.start()
    assoc.release()
    t.join()
    assert not assoc.established


def test_idle_health_notices_a_peer_that_went_away() -> None:
    assoc, peer = pair()
    assert assoc.idle_and_healthy()
    peer.close()
    assert not assoc.idle_and_healthy()


def test_an_association_pdu_announcing_gigabytes_is_refused_before_allocating() -> None:
    from gateway.dimse.ul import MAX_NEGOTIATION_PDU, _read_raw_pdu

    ours, peer = socket.socketpair()
    with ours, peer:
        ours.settimeout(2)
        peer.sendall(b"\x02\x00" + struct.pack(">I", 0xFFFFFFF0))
        with pytest.raises(ConnectionLost, match="association PDU"):
            _read_raw_pdu(ours, "node", 2.0, requestor=True)
        peer.sendall(b"\x02\x00" + struct.pack(">I", 4) + b"abcd")
        assert _read_raw_pdu(ours, "node", 2.0, requestor=True) == (2, bytearray(b"\x02\x00\x00\x00\x00\x04abcd"))
    assert MAX_NEGOTIATION_PDU >= 64 * 1024
