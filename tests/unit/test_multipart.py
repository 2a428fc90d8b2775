"""The multipart/related push parser used by STOW-RS (RFC 2046 5.1, RFC 2387)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import pytest

from gateway.dicomweb.multipart import (
    MAX_TRANSPORT_PADDING,
    Event,
    MultipartError,
    PartData,
    PartEnd,
    PartStart,
    RelatedParser,
    parse_content_type,
)

B = "dwgw-0123456789abcdef"
DELIM = b"\r\n--" + B.encode()

Part = tuple[dict[str, str], bytes]


# ------------------------------------------------------------------------------------------------
# Helpers


def build(
    parts: Sequence[tuple[bytes, bytes]],
    boundary: str = B,
    *,
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """A body from (raw header block, data) pairs; the header block includes its line endings."""
    dash = b"--" + boundary.encode()
    out = [preamble + (b"\r\n" if preamble else b"")]
    for headers, data in parts:
        out += [dash, b"\r\n", headers, b"\r\n", data, b"\r\n"]
    out += [dash, b"--", epilogue]
    return b"".join(out)


def normalize(events: Iterable[Event]) -> list[tuple]:
    """Events with consecutive PartData joined, so that different chunkings compare equal."""
    out: list[tuple] = []
    for event in events:
        if isinstance(event, PartData):
            assert len(event.data) > 0, "PartData must never be empty"
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + bytes(event.data))
            else:
                out.append(("data", bytes(event.data)))
        elif isinstance(event, PartStart):
            out.append(("start", event.index, event.headers))
        else:
            assert isinstance(event, PartEnd)
            out.append(("end", event.index))
    return out


def feed_all(chunks: Iterable[bytes], boundary: str = B, **kwargs: int) -> list[Event]:
    parser = RelatedParser(boundary, **kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    parser.close()
    assert parser.finished
    assert not parser.in_part
    return events


def parse(body: bytes, boundary: str = B, **kwargs: int) -> list[tuple]:
    return normalize(feed_all([body], boundary, **kwargs))


def parts_of(events: Iterable[Event]) -> list[Part]:
    """(headers, data) per part, checking that starts, data and ends come in a valid order."""
    parts: list[Part] = []
    current: tuple[int, dict[str, str], list[bytes]] | None = None
    for event in events:
        if isinstance(event, PartStart):
            assert current is None
            assert event.index == len(parts)
            current = (event.index, event.headers, [])
        elif isinstance(event, PartData):
            assert current is not None
            assert len(event.data) > 0
            current[2].append(bytes(event.data))
        else:
            assert current is not None and event.index == current[0]
            parts.append((current[1], b"".join(current[2])))
            current = None
    assert current is None
    return parts


def split_at(body: bytes, points: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(points), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]


def random_chunks(body: bytes, rng: random.Random, largest: int) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(body):
        size = rng.randint(1, largest)
        chunks.append(body[pos:pos + size])
        pos += size
    return chunks


def must_fail(chunks: Iterable[bytes], match: str, boundary: str = B, **kwargs: int) -> MultipartError:
    """Feeding then closing must raise MultipartError, and the parser must keep failing afterwards."""
    parser = RelatedParser(boundary, **kwargs)
    with pytest.raises(MultipartError, match=match) as info:
        for chunk in chunks:
            parser.feed(chunk)
        parser.close()
    with pytest.raises(MultipartError, match=match):
        parser.feed(b"more")
    with pytest.raises(MultipartError, match=match):
        parser.close()
    return info.value


DICOM_HEADERS = b"Content-Type: application/dicom\r\n"

# Body data that must come through unchanged: near misses of a delimiter.
TRICKY_DATA = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\r", id="cr"),
    pytest.param(b"\n", id="lf"),
    pytest.param(b"\r\n", id="crlf"),
    pytest.param(b"\r\n\r\n", id="two-crlf"),
    pytest.param(b"--", id="dashes"),
    pytest.param(b"\r\n--", id="crlf-dashes"),
    pytest.param(b"a\r\n--b\r\nc", id="other-boundary"),
    pytest.param(b"\0--" + B.encode() + b"--\r\n", id="boundary-without-crlf"),
    pytest.param(b"x--" + B.encode() + b"\r\n", id="boundary-inside-a-line"),
    pytest.param(b"x\n--" + B.encode() + b"\r\n", id="boundary-after-bare-lf"),
    pytest.param(b"x\r--" + B.encode() + b"\r\n", id="boundary-after-bare-cr"),
    pytest.param(b"x\r\n-" + B.encode() + b"\r\n", id="one-dash"),
    pytest.param(DELIM + b"X\r\n", id="longer-boundary"),
    pytest.param(DELIM + b"-extended\r\n", id="boundary-dash-suffix"),
    pytest.param(DELIM + b"-", id="boundary-single-dash-at-end"),
    pytest.param(DELIM + b" x\r\n", id="padding-then-text"),
    pytest.param(DELIM + b"\t \tx", id="padding-then-text-no-crlf"),
    pytest.param(DELIM + b"\n", id="boundary-lf-only"),
    pytest.param(DELIM + b"\r", id="boundary-cr-at-end"),
    pytest.param(DELIM + b"\rx", id="boundary-cr-not-lf"),
    pytest.param(DELIM + b"\r\r\n", id="boundary-cr-cr-lf"),
    pytest.param(DELIM + b" \r", id="padding-cr-at-end"),
    pytest.param(DELIM[:-1] + b"\r\n", id="boundary-minus-last-char"),
    pytest.param(DELIM[:-1], id="partial-delimiter-at-end"),
    pytest.param(DELIM + b"x" + DELIM[:-1] + b"Z\r\n", id="two-near-misses"),
    pytest.param(b"\r\n--" + B.upper().encode() + b"\r\n", id="boundary-other-case"),
    pytest.param(DELIM + b" " * (MAX_TRANSPORT_PADDING + 1) + b"\r\n", id="padding-too-long"),
    pytest.param(bytes(range(256)) * 4, id="all-byte-values"),
]


# ------------------------------------------------------------------------------------------------
# Bodies that parse


def test_single_part() -> None:
    body = build([(DICOM_HEADERS, b"DICM-data")])
    assert parse(body) == [
        ("start", 0, {"content-type": "application/dicom"}),
        ("data", b"DICM-data"),
        ("end", 0),
    ]


def test_several_parts_with_their_headers() -> None:
    body = build([
        (b"Content-Type: application/dicom\r\nContent-Location: /a/1\r\n", b"first"),
        (b"content-type: Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1\r\n", b"second"),
        (b"X-Other: x\r\n", b"third"),
    ])
    events = feed_all([body])
    starts = [e for e in events if isinstance(e, PartStart)]
    assert [s.index for s in starts] == [0, 1, 2]
    assert [s.content_type for s in starts] == ["application/dicom", "application/dicom", None]
    assert [s.content_location for s in starts] == ["/a/1", None, None]
    assert starts[1].headers == {"content-type": "Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1"}
    assert [data for _, data in parts_of(events)] == [b"first", b"second", b"third"]


def test_event_order_and_properties_while_feeding() -> None:
    parser = RelatedParser(B)
    assert not parser.finished and not parser.in_part
    assert parser.feed(b"--" + B.encode() + b"\r\nContent-Type: application/dicom\r\n") == []
    assert not parser.in_part  # the headers are not complete yet
    events = parser.feed(b"\r\nabc")
    assert events[0] == PartStart(0, {"content-type": "application/dicom"})
    assert normalize(events[1:]) == [("data", b"abc")]
    assert parser.in_part and not parser.finished
    events = parser.feed(DELIM + b"\r\n\r\nxyz")
    assert normalize(events) == [("end", 0), ("start", 1, {}), ("data", b"xyz")]
    assert parser.in_part
    assert normalize(parser.feed(DELIM + b"--\r\n")) == [("end", 1)]
    assert parser.finished and not parser.in_part
    parser.close()
    assert parser.finished


@pytest.mark.parametrize("data", TRICKY_DATA)
def test_near_misses_of_a_delimiter_are_data(data: bytes) -> None:
    body = build([(DICOM_HEADERS, b"<" + data), (DICOM_HEADERS, data), (b"", data + b">")])
    assert [d for _, d in parts_of(feed_all([body]))] == [b"<" + data, data, data + b">"]


@pytest.mark.parametrize("data", TRICKY_DATA)
def test_near_misses_are_data_at_every_split_point(data: bytes) -> None:
    body = build([(b"", data), (DICOM_HEADERS, b"x" + data + b"y")])
    expected = parse(body)
    assert expected[1] == ("data", data) or data == b""
    for point in range(len(body) + 1):
        assert normalize(feed_all(split_at(body, [point]))) == expected, point


def test_boundary_that_is_a_prefix_of_a_nested_multipart_boundary() -> None:
    nested = (
        b"--" + B.encode() + b"-inner\r\nContent-Type: text/plain\r\n\r\nin\r\n--" + B.encode() + b"-inner--"
    )
    body = build([(b"Content-Type: multipart/mixed; boundary=" + B.encode() + b"-inner\r\n", nested)])
    assert [d for _, d in parts_of(feed_all([body]))] == [nested]


def test_every_split_point_gives_the_same_events() -> None:
    body = build(
        [
            (DICOM_HEADERS + b"Content-Location: x\r\n  y\r\n", b"one\r\ntwo\r\n--"),
            (b"", b""),
            (b"A: 1\nB: 2\n", DELIM + b"X" + b"\r\r\n\n"),
        ],
        preamble=b"preamble " + DELIM + b"Z",
        epilogue=b"\r\nepilogue" + DELIM,
    )
    expected = parse(body)
    assert len(expected) == 8
    for point in range(len(body) + 1):
        assert normalize(feed_all(split_at(body, [point]))) == expected, point
    for first in range(0, len(body) + 1, 7):
        for second in range(first, len(body) + 1, 3):
            assert normalize(feed_all(split_at(body, [first, second]))) == expected, (first, second)
    assert normalize(feed_all(body[i:i + 1] for i in range(len(body)))) == expected


def test_random_chunk_sizes_give_the_same_events() -> None:
    rng = random.Random(20240611)
    for _ in range(20):
        parts = []
        for _ in range(rng.randint(0, 5)):
            data = rng.randbytes(rng.randint(0, 3000))
            # sprinkle near misses and line breaks into the binary data
            pieces = [data[i:i + 200] for i in range(0, len(data), 200)]
            tricks = [b"\r\n", b"\r\n--", DELIM + b"x", DELIM[:-3], b"--" + B.encode()]
            data = b"".join(piece + rng.choice(tricks) for piece in pieces)
            parts.append((DICOM_HEADERS if rng.random() < 0.7 else b"", data))
        body = build(parts, preamble=rng.randbytes(rng.randint(0, 100)).replace(b"\r", b""))
        expected = parse(body)
        assert [d for _, d in parts_of(feed_all([body]))] == [d for _, d in parts]
        for largest in (1, 2, 5, 80, 1000, 70000):
            chunks = random_chunks(body, rng, largest)
            assert normalize(feed_all(chunks)) == expected, largest


def test_delimiter_straddling_chunks_at_every_offset() -> None:
    data = b"payload-" * 10
    body = build([(DICOM_HEADERS, data), (DICOM_HEADERS, data)])
    second_delimiter = body.index(DELIM + b"\r\n")
    for offset in range(len(DELIM) + 3):
        parser = RelatedParser(B)
        events = parser.feed(body[:second_delimiter + offset])
        # everything before the delimiter's CR is handed out at once
        assert normalize(events)[1] == ("data", data)
        events += parser.feed(body[second_delimiter + offset:])
        parser.close()
        assert [d for _, d in parts_of(events)] == [data, data]


def test_data_is_handed_out_without_waiting_for_more() -> None:
    parser = RelatedParser(B)
    parser.feed(build([(DICOM_HEADERS, b"")])[: -len(DELIM) - 2])  # up to the end of the headers
    big = bytes(range(10, 256)) * 4096  # no CR anywhere: nothing can begin a delimiter
    events = parser.feed(big)
    assert len(events) == 1 and bytes(events[0].data) == big  # type: ignore[union-attr]
    tail = parser.feed(big + b"\r\n--")
    assert len(tail) == 1 and bytes(tail[0].data) == big  # type: ignore[union-attr]
    assert normalize(parser.feed(b"x")) == [("data", b"\r\n--x")]


def test_preamble_and_epilogue_are_ignored() -> None:
    dash = b"--" + B.encode()
    preamble = b"This is a preamble.\r\n" + dash + b"X\r\n" + b"x" + dash + b"\r\n" + DELIM[:-1]
    epilogue = b"\r\nepilogue\r\n" + dash + b"\r\nA: 1\r\n\r\nignored" + DELIM + b"--\r\n"
    body = build([(DICOM_HEADERS, b"data")], preamble=preamble, epilogue=epilogue)
    assert parse(body) == [
        ("start", 0, {"content-type": "application/dicom"}),
        ("data", b"data"),
        ("end", 0),
    ]


def test_first_delimiter_after_a_crlf_only_preamble() -> None:
    body = b"\r\n" + build([(b"", b"x")])
    assert parse(body) == [("start", 0, {}), ("data", b"x"), ("end", 0)]


def test_data_after_the_close_delimiter_is_ignored() -> None:
    parser = RelatedParser(B)
    events = parser.feed(build([(b"", b"data")]) + b"\r\n" + build([(b"", b"more")]))
    assert parts_of(events) == [({}, b"data")]
    assert parser.finished
    assert parser.feed(b"\r\n--" + B.encode() + b"\r\n\r\nlater") == []
    assert parser.feed(b"garbage without any structure") == []
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed(b"after close")


def test_close_delimiter_split_before_its_dashes() -> None:
    parser = RelatedParser(B)
    events = parser.feed(build([(b"", b"data")])[:-2])
    assert not parser.finished and parser.in_part
    events += parser.feed(b"-")
    assert not parser.finished
    events += parser.feed(b"-")
    assert parser.finished
    assert parts_of(events) == [({}, b"data")]


@pytest.mark.parametrize("padding", [b" ", b"\t", b" \t  \t", b" " * MAX_TRANSPORT_PADDING])
def test_transport_padding_after_the_boundary(padding: bytes) -> None:
    dash = b"--" + B.encode()
    body = (
        dash + padding + b"\r\nA: 1\r\n\r\nfirst"
        + DELIM + padding + b"\r\n\r\nsecond"
        + DELIM + b"--" + padding + b"\r\n"
    )
    expected = [({"a": "1"}, b"first"), ({}, b"second")]
    assert parts_of(feed_all([body])) == expected
    for point in range(0, len(body) + 1, 5):
        assert parts_of(feed_all(split_at(body, [point]))) == expected


def test_too_much_padding_makes_a_line_data() -> None:
    too_much = DELIM + b" " * (MAX_TRANSPORT_PADDING + 1) + b"\r\n"
    body = build([(b"", b"a" + too_much + b"b")])
    assert parts_of(feed_all([body])) == [({}, b"a" + too_much + b"b")]
    assert parts_of(feed_all(body[i:i + 1] for i in range(len(body)))) == [({}, b"a" + too_much + b"b")]


def test_body_without_parts() -> None:
    parser = RelatedParser(B)
    assert parser.feed(b"--" + B.encode() + b"--") == []
    assert parser.finished and not parser.in_part
    parser.close()
    assert parse(b"preamble\r\n--" + B.encode() + b"--\r\nepilogue") == []


def test_empty_parts() -> None:
    # A part with no headers and no data, then a part with headers and no data.
    body = build([(b"", b""), (DICOM_HEADERS, b""), (b"", b"x")])
    assert parse(body) == [
        ("start", 0, {}),
        ("end", 0),
        ("start", 1, {"content-type": "application/dicom"}),
        ("end", 1),
        ("start", 2, {}),
        ("data", b"x"),
        ("end", 2),
    ]


def test_part_without_a_body_shares_the_crlf_with_the_next_delimiter() -> None:
    # RFC 2046: body-part := MIME-part-headers [CRLF *OCTET]; the CRLF after the headers may be
    # the one that begins the next delimiter.
    dash = b"--" + B.encode()
    body = dash + b"\r\nA: 1\r\n" + DELIM + b"\r\n\r\n" + DELIM + b"\r\nB: 2\r\n\r\nb" + DELIM + b"--"
    expected = [({"a": "1"}, b""), ({}, b""), ({"b": "2"}, b"b")]
    assert parts_of(feed_all([body])) == expected
    for point in range(len(body) + 1):
        assert parts_of(feed_all(split_at(body, [point]))) == expected, point


def test_data_starting_with_crlf_is_kept() -> None:
    body = build([(b"", b"\r\n"), (b"", b"\r\n--x"), (b"", b"\r\n" + DELIM + b"X")])
    assert [d for _, d in parts_of(feed_all([body]))] == [b"\r\n", b"\r\n--x", b"\r\n" + DELIM + b"X"]


def test_empty_chunks_are_harmless() -> None:
    body = build([(DICOM_HEADERS, b"abc\r\ndef"), (b"", b"")])
    expected = parse(body)
    parser = RelatedParser(B)
    events: list[Event] = []
    for chunk in split_at(body, [3, 10, 40, 41]):
        for empty in (b"", bytearray(), memoryview(b"")):
            assert parser.feed(empty) == []
        events += parser.feed(chunk)
    assert parser.feed(b"") == []
    parser.close()
    assert normalize(events) == expected


def test_bytearray_and_memoryview_chunks_are_copied() -> None:
    body = build([(b"", b"0123456789" * 10)])
    buffer = bytearray(body)
    parser = RelatedParser(B)
    events = parser.feed(memoryview(buffer)[:60])
    events += parser.feed(buffer[60:])  # a bytearray copy
    buffer[:] = b"\0" * len(buffer)  # the caller reuses its buffer
    parser.close()
    assert parts_of(events) == [({}, b"0123456789" * 10)]


def test_part_data_stays_valid_after_later_feeds() -> None:
    parser = RelatedParser(B)
    first = parser.feed(b"--" + B.encode() + b"\r\n\r\nAAAA")
    kept = [e.data for e in first if isinstance(e, PartData)]
    parser.feed(b"BBBB" + DELIM + b"\r\n\r\nCCCC")
    parser.feed(DELIM + b"--")
    parser.close()
    assert b"".join(bytes(d) for d in kept) == b"AAAA"


def test_binary_payload_with_every_byte_value() -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(5000) + DELIM + b"!" + bytes(range(256)) for _ in range(3)]
    body = build([(DICOM_HEADERS, p) for p in payloads])
    for largest in (3, 64, 4096):
        events = feed_all(random_chunks(body, rng, largest))
        assert [d for _, d in parts_of(events)] == payloads


# ------------------------------------------------------------------------------------------------
# Part headers


def test_folded_headers() -> None:
    headers = b"Content-Type: multipart/related;\r\n type=application/dicom;\r\n\t  boundary=x \r\nB: 1\r\n"
    assert parts_of(feed_all([build([(headers, b"")])]))[0][0] == {
        "content-type": "multipart/related; type=application/dicom; boundary=x",
        "b": "1",
    }


def test_folded_line_without_a_header_before_it() -> None:
    must_fail([build([(b" continued: x\r\n", b"")])], "continuation")


def test_repeated_headers_are_joined() -> None:
    headers = b"X-A: 1\r\nx-a: 2\r\nOther: o\r\nX-A:3\r\n"
    assert parts_of(feed_all([build([(headers, b"")])]))[0][0] == {"x-a": "1, 2, 3", "other": "o"}


def test_header_names_lower_cased_and_values_stripped() -> None:
    headers = b"CONTENT-Location:   /studies/1.2.3 \t\r\nEmpty:\r\n"
    event = feed_all([build([(headers, b"")])])[0]
    assert isinstance(event, PartStart)
    assert event.headers == {"content-location": "/studies/1.2.3", "empty": ""}
    assert event.content_location == "/studies/1.2.3"
    assert event.content_type is None


def test_value_with_colons() -> None:
    headers = b"Content-Location: http://host:8042/dicom-web/studies\r\n"
    assert parts_of(feed_all([build([(headers, b"")])]))[0][0] == {
        "content-location": "http://host:8042/dicom-web/studies"
    }


def test_header_values_in_utf8_or_latin1() -> None:
    headers = "X-Name: Müller\r\n".encode("utf-8") + "X-Other: Gödel\r\n".encode("latin-1")
    assert parts_of(feed_all([build([(headers, b"")])]))[0][0] == {"x-name": "Müller", "x-other": "Gödel"}


def test_lf_only_header_lines() -> None:
    dash = b"--" + B.encode()
    body = (
        dash + b"\r\nContent-Type: application/dicom\nContent-Location: a\n\nfirst\r\n"
        + dash + b"\r\nA: 1\r\nB: 2\n\r\nsecond\r\n"
        + dash + b"\r\nC: 3\r\n\nthird\r\n"
        + dash + b"--"
    )
    expected = [
        ({"content-type": "application/dicom", "content-location": "a"}, b"first"),
        ({"a": "1", "b": "2"}, b"second"),
        ({"c": "3"}, b"third"),
    ]
    assert parts_of(feed_all([body])) == expected
    for point in range(len(body) + 1):
        assert parts_of(feed_all(split_at(body, [point]))) == expected, point


def test_lf_after_headers_does_not_join_a_delimiter() -> None:
    # After an LF-only empty line the body starts; "--boundary" there is data, as it has no CRLF.
    dash = b"--" + B.encode()
    body = dash + b"\r\nA: 1\n\n" + dash + b"\r\nB: 2\r\n\r\n" + DELIM + b"--"
    assert parts_of(feed_all([body])) == [({"a": "1"}, dash + b"\r\nB: 2\r\n\r\n")]


def test_header_line_without_colon() -> None:
    error = must_fail([build([(b"Content-Type application/dicom\r\n", b"")])], "no colon")
    assert str(error) == "malformed part header line: no colon"


@pytest.mark.parametrize("line", [b": empty name", b"Bad Name: x", b"Bad\x00: x", b"Name : x"])
def test_malformed_header_name(line: bytes) -> None:
    must_fail([build([(line + b"\r\n", b"")])], "malformed part header name")


def test_missing_empty_line_runs_into_the_next_delimiter() -> None:
    dash = b"--" + B.encode()
    must_fail([dash + b"\r\nA: 1\r\n" + dash + b"--\r\n"], "no colon")


def test_header_block_size_limit() -> None:
    prefix = b"--" + B.encode() + b"\r\n"
    line = b"X: " + b"v" * 95 + b"\r\n"  # 100 bytes
    exactly = prefix + line * 9 + b"X: " + b"v" * 93 + b"\r\n" + b"\r\n" + b"data" + DELIM + b"--"
    assert parts_of(feed_all([exactly], max_header_bytes=1000))[0][1] == b"data"
    over = exactly.replace(b"X: v", b"X: vv", 1)
    must_fail([over], "part headers too large", max_header_bytes=1000)
    for point in range(0, len(over) + 1, 37):
        must_fail(split_at(over, [point]), "part headers too large", max_header_bytes=1000)


def test_endless_header_line_fails_without_waiting_for_its_end() -> None:
    parser = RelatedParser(B, max_header_bytes=1024)
    parser.feed(b"--" + B.encode() + b"\r\nX: ")
    for _ in range(1020 // 17):
        parser.feed(b"v" * 17)
    with pytest.raises(MultipartError, match="part headers too large"):
        parser.feed(b"v" * 17)


def test_header_size_limit_counts_each_part_separately() -> None:
    headers = b"X: " + b"v" * 200 + b"\r\n"
    body = build([(headers, b"a"), (headers, b"b"), (headers, b"c")])
    assert [d for _, d in parts_of(feed_all([body], max_header_bytes=300))] == [b"a", b"b", b"c"]


def test_too_many_headers() -> None:
    three = b"A: 1\r\nB: 2\r\n  folded\r\nC: 3\r\n"  # continuation lines do not count
    assert parts_of(feed_all([build([(three, b"")])], max_headers=3))[0][0] == {"a": "1", "b": "2 folded", "c": "3"}
    must_fail([build([(three + b"D: 4\r\n", b"")])], "part headers too large", max_headers=3)
    must_fail([build([(three + b"A: again\r\n", b"")])], "part headers too large", max_headers=3)
    assert len(parts_of(feed_all([build([(b"H: x\r\n" * 64, b"")])]))[0][0]) == 1  # the default is 64
    must_fail([build([(b"H: x\r\n" * 65, b"")])], "part headers too large")


def test_default_header_size_limit() -> None:
    assert parts_of(feed_all([build([(b"X: " + b"v" * 16000 + b"\r\n", b"")])]))[0][0]["x"] == "v" * 16000
    must_fail([build([(b"X: " + b"v" * 16400 + b"\r\n", b"")])], "part headers too large")


# ------------------------------------------------------------------------------------------------
# Truncated and broken bodies


def test_close_delimiter_missing() -> None:
    body = build([(DICOM_HEADERS, b"data")])
    for cut in (len(DELIM) + 2, len(DELIM) + 1, 2, 1):
        error = must_fail([body[:-cut]], "closing boundary")
        assert str(error) == "the body ends before the closing boundary"
    must_fail([body[:-2] + b"\r\n"], "headers")  # a delimiter, then the body ends


def test_truncated_in_headers() -> None:
    body = build([(DICOM_HEADERS, b"data")])
    end_of_headers = body.index(b"\r\n\r\n")
    for cut in range(len(B) + 4, end_of_headers + 4):
        must_fail([body[:cut]], "the body ends inside the headers of a part")


def test_truncated_in_body_keeps_the_events_so_far() -> None:
    parser = RelatedParser(B)
    body = build([(DICOM_HEADERS, b"first"), (DICOM_HEADERS, b"second half")])
    events = parser.feed(body[:body.index(b" half")])
    assert normalize(events)[-2:] == [("start", 1, {"content-type": "application/dicom"}), ("data", b"second")]
    assert parser.in_part
    with pytest.raises(MultipartError, match="closing boundary"):
        parser.close()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"just some text", id="text"),
        pytest.param(b"--" + B.encode(), id="boundary-only"),
        pytest.param(b"--" + B.encode() + b"\nA: 1\n\nx\n--" + B.encode() + b"--\n", id="lf-delimiters"),
        pytest.param(b"--" + B.encode() + b"X\r\n\r\nx" + DELIM + b"X--", id="longer-boundary"),
        pytest.param(b"--other\r\n\r\nx\r\n--other--", id="other-boundary"),
        pytest.param(b"x--" + B.encode() + b"\r\n\r\nx", id="not-at-line-start"),
    ],
)
def test_no_boundary_found(body: bytes) -> None:
    error = must_fail([body], "no multipart boundary found")
    assert str(error) == "no multipart boundary found in the body"


def test_parts_before_a_malformed_one_are_all_returned_first() -> None:
    body = build([(DICOM_HEADERS, b"one"), (DICOM_HEADERS, b"two"), (b"broken\r\n", b"three")])
    for point in range(len(body) + 1):
        parser = RelatedParser(B)
        events: list[Event] = []
        with pytest.raises(MultipartError, match="no colon"):
            for chunk in split_at(body, [point]):
                events += parser.feed(chunk)
            parser.close()
        assert parts_of(events) == [
            ({"content-type": "application/dicom"}, b"one"),
            ({"content-type": "application/dicom"}, b"two"),
        ], point


def test_error_after_completed_events_is_raised_by_the_next_call() -> None:
    body = build([(b"", b"one"), (b"X" * 100 + b"\r\n", b"")])
    parser = RelatedParser(B, max_header_bytes=50)
    events = parser.feed(body)
    assert parts_of(events) == [({}, b"one")]
    with pytest.raises(MultipartError, match="part headers too large"):
        parser.feed(b"")
    with pytest.raises(MultipartError, match="part headers too large"):
        parser.close()
    parser = RelatedParser(B, max_header_bytes=50)
    parser.feed(body)
    with pytest.raises(MultipartError, match="part headers too large"):
        parser.close()


def test_feed_after_close_is_an_error() -> None:
    parser = RelatedParser(B)
    parser.feed(build([]))
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


# ------------------------------------------------------------------------------------------------
# Boundaries


@pytest.mark.parametrize(
    "boundary",
    [
        "a",
        "x" * 70,
        "0123456789",
        "simple boundary",
        "'()+_,-./:=?",
        "----=_Part_0_123.456",
        "gc0pJq0M:08jU534c0p",
    ],
)
def test_valid_boundaries(boundary: str) -> None:
    body = build([(b"", b"data")], boundary)
    assert parts_of(feed_all([body], boundary)) == [({}, b"data")]


@pytest.mark.parametrize(
    "boundary",
    ["", "x" * 71, "ends with space ", " ", "semi;colon", 'quote"', "at@sign", "cr\r", "lf\n", "tab\t", "ümlaut"],
)
def test_invalid_boundaries(boundary: str) -> None:
    with pytest.raises(MultipartError, match="boundary"):
        RelatedParser(boundary)


def test_boundary_with_regex_characters_is_matched_literally() -> None:
    boundary = "a.b+c?(d)"
    data = b"x\r\n--aXb+c?(d)\r\ny"
    body = build([(b"", data)], boundary)
    assert parts_of(feed_all([body], boundary)) == [({}, data)]


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        RelatedParser(B, max_header_bytes=0)
    with pytest.raises(ValueError):
        RelatedParser(B, max_headers=-1)


# ------------------------------------------------------------------------------------------------
# Content-Type


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=XYZ',
            ("multipart/related", {"type": "application/dicom", "boundary": "XYZ"}),
        ),
        (
            "Multipart/Related;Type=application/dicom;BOUNDARY=AbC",
            ("multipart/related", {"type": "application/dicom", "boundary": "AbC"}),
        ),
        (
            'multipart/related; boundary="simple boundary"; type="application/dicom+xml"',
            ("multipart/related", {"boundary": "simple boundary", "type": "application/dicom+xml"}),
        ),
        ('multipart/related; boundary="a\\"b\\\\c\\d"', ("multipart/related", {"boundary": 'a"b\\cd'})),
        ('multipart/related; boundary="with;semicolon"', ("multipart/related", {"boundary": "with;semicolon"})),
        ('multipart/related; boundary=""', ("multipart/related", {"boundary": ""})),
        ("multipart/related; boundary=----=_Part_1:2", ("multipart/related", {"boundary": "----=_Part_1:2"})),
        ("  multipart/related  ;  boundary = x  ;  ", ("multipart/related", {"boundary": "x"})),
        ("multipart/related;;boundary=x;", ("multipart/related", {"boundary": "x"})),
        ("application/dicom", ("application/dicom", {})),
        ('multipart/related; start="<1@x>"; start-info=x', ("multipart/related", {"start": "<1@x>", "start-info": "x"})),
    ],
)
def test_parse_content_type(value: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_content_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "multipart",
        "multipart/",
        "/related",
        "multipart related",
        "multipart/related boundary=x",
        "multipart/related; boundary",
        "multipart/related; boundary=",
        "multipart/related; =x",
        'multipart/related; boundary="unterminated',
        'multipart/related; boundary="a"b',
        "multipart/related; boundary=a b",
        "multipart/related; boundary=a; boundary=b",
        "multipart/related; Boundary=a; BOUNDARY=b",
        "multipart/related; bad name=x",
        "multipart/related; boundary=é",
        "multipart/related, text/plain",
        "multipart/related; type=application/dicom\r\n",
    ],
)
def test_parse_content_type_rejects_garbage(value: str) -> None:
    with pytest.raises(MultipartError):
        parse_content_type(value)


def test_content_type_property_without_parameters() -> None:
    assert PartStart(0, {"content-type": " Application/DICOM ; transfer-syntax=1.2"}).content_type == "application/dicom"
    assert PartStart(0, {"content-type": ""}).content_type is None
    assert PartStart(0, {}).content_type is None


def test_parsed_boundary_feeds_the_parser() -> None:
    media_type, params = parse_content_type('multipart/related; type="application/dicom"; boundary="b:1 2"')
    assert media_type == "multipart/related"
    body = build([(DICOM_HEADERS, b"x")], params["boundary"])
    assert parts_of(feed_all([body], params["boundary"])) == [({"content-type": "application/dicom"}, b"x")]


# ------------------------------------------------------------------------------------------------
# Size


def test_64_mb_body_in_64_kb_chunks() -> None:
    rng = random.Random(64)
    sizes = [24 << 20, 1, 0, 16 << 20, (24 << 20) - 12345]
    payloads = [rng.randbytes(size) for size in sizes]
    # near misses right where the chunks would split them
    payloads[0] = payloads[0][:65530] + DELIM + b"X" + payloads[0][65530 + len(DELIM) + 1:]
    payloads[3] = payloads[3][:-3] + b"\r\n-"
    body = build([(DICOM_HEADERS + b"Content-Location: /i/%d\r\n" % i, p) for i, p in enumerate(payloads)])
    assert len(body) > 64_000_000

    chunk_size = 64 << 10
    view = memoryview(body)
    parser = RelatedParser(B)
    starts: list[PartStart] = []
    pieces: list[list[bytes | memoryview]] = []
    ends: list[int] = []
    data_events = 0
    for offset in range(0, len(body), chunk_size):
        for event in parser.feed(view[offset:offset + chunk_size]):
            if isinstance(event, PartStart):
                starts.append(event)
                pieces.append([])
            elif isinstance(event, PartData):
                assert len(event.data) > 0
                pieces[-1].append(event.data)
                data_events += 1
            else:
                ends.append(event.index)
    parser.close()

    assert parser.finished
    assert [s.content_location for s in starts] == [f"/i/{i}" for i in range(len(sizes))]
    assert ends == list(range(len(sizes)))
    assert [sum(len(p) for p in part) for part in pieces] == sizes
    assert [b"".join(part) == payload for part, payload in zip(pieces, payloads)] == [True] * len(sizes)
    # large pieces: about one per chunk and part, not many small ones
    assert data_events <= len(body) // chunk_size + 2 * len(sizes) + 2
