"""A push parser for ``multipart/related`` request bodies (RFC 2046 5.1, RFC 2387), for STOW-RS.

A STOW-RS upload can be hundreds of megabytes, so it is parsed as it arrives instead of being read
into memory first. The parser does no I/O: the endpoint feeds it each chunk of the body and gets
back events (``PartStart`` with the part's headers, ``PartData`` pieces of its body, ``PartEnd``),
then calls ``close()`` at the end of the body to learn whether the body was complete.

How it reads a body:

- The delimiter is CRLF, ``--`` and the boundary. The body may start with the first one without
  the CRLF; anything before it (the preamble) is skipped. After the boundary comes either ``--``
  (the close delimiter; the epilogue after it is ignored, and so is anything fed later) or
  optional transport padding (spaces and tabs, at most ``MAX_TRANSPORT_PADDING``) and CRLF.
  Anything else there means the bytes were not a delimiter but part of a body, such as a longer
  boundary of a nested multipart or binary data that happens to hold the boundary string.
- Delimiter lines must end in CRLF, as RFC 2046 requires: a delimiter line ending in a bare LF is
  body data, so binary payloads are never cut at a lone LF. Header lines may end in CRLF or bare
  LF, because some clients write them that way and nothing is ambiguous there.
- A part's body is exactly the bytes between the line ending of the empty line that ends its
  headers and the CRLF that begins the next delimiter. If the empty line ends in CRLF and the next
  delimiter follows it at once, that CRLF is the delimiter's and the part has no body (RFC 2046
  lets ``[CRLF *OCTET]`` be left out of a body part).
- Header lines are ``Name: value`` up to an empty line; a line starting with a space or tab
  continues the previous header (the fold becomes one space). Names are lower-cased, values
  stripped, and repeated headers joined with ``", "``. Values are decoded as UTF-8, or as
  ISO-8859-1 if they are not valid UTF-8. A part without headers is allowed.

Speed: the body is searched with ``bytes.find``, never byte by byte, and bytes known to be body
data are not looked at again. When a chunk ends, only what could be the start of a delimiter (at
most ``len(delimiter) + MAX_TRANSPORT_PADDING + 2`` bytes, and usually nothing) is kept back for the
next chunk; the rest of the chunk is handed out at once, as one ``PartData`` per part and chunk,
without copying it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "MAX_TRANSPORT_PADDING",
    "Event",
    "MultipartError",
    "PartData",
    "PartEnd",
    "PartStart",
    "RelatedParser",
    "parse_content_type",
]

MAX_TRANSPORT_PADDING = 256
"""Spaces and tabs allowed between a boundary and its CRLF; with more, the line is body data.

RFC 2046 sets no limit, but without one a run of spaces after a boundary would have to be held
back in memory until it ends."""


class MultipartError(ValueError):
    """A malformed ``multipart/related`` body or ``Content-Type``.

    ``str(exc)`` is a short reason fit for the client, such as "the body ends before the closing
    boundary".
    """


# ------------------------------------------------------------------------------------------------
# Content-Type (RFC 2045 5.1, RFC 9110 8.3.1)

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# Unquoted values: any visible ASCII character but '"', ';' and '\'. That is more than the RFC 2045
# token, because clients send type=application/dicom and boundaries holding '=' or ':' unquoted.
_BARE_VALUE = r"[\x21\x23-\x3a\x3c-\x5b\x5d-\x7e]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})[ \t]*")
_PARAMETER = re.compile(
    rf'[ \t]*;[ \t]*(?:({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|({_BARE_VALUE})))?[ \t]*',
    re.DOTALL,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_WSP = " \t"


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """The media type and parameters of a ``Content-Type`` value.

    ``'multipart/related; type="application/dicom"; boundary=XYZ'`` gives
    ``('multipart/related', {'type': 'application/dicom', 'boundary': 'XYZ'})``. The media type
    and the parameter names are lower-cased; values are unquoted (a quoted string, whose
    backslash escapes are undone, or a bare value) and keep their case. Empty parameters
    (``a/b;;c=d``, a trailing ``;``) are allowed. Raises ``MultipartError`` for anything else:
    no media type, a parameter without a value, an unterminated quote, text after a value, or a
    parameter given twice.
    """
    media = _MEDIA_TYPE.match(value)
    if media is None:
        raise MultipartError("the Content-Type is not a media type")
    params: dict[str, str] = {}
    pos = media.end()
    while pos < len(value):
        param = _PARAMETER.match(value, pos)
        if param is None:
            raise MultipartError("the Content-Type has malformed parameters")
        pos = param.end()
        name, quoted, bare = param.groups()
        if name is None:
            continue
        name = name.lower()
        if name in params:
            raise MultipartError(f"the Content-Type has the {name} parameter twice")
        params[name] = bare if bare is not None else _QUOTED_PAIR.sub(r"\1", quoted)
    return f"{media.group(1)}/{media.group(2)}".lower(), params


# ------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class PartStart:
    """The headers of a new part are complete; its body follows as ``PartData`` events.

    ``index`` counts the parts from 0. ``headers`` has lower-cased names and stripped values;
    repeated headers are joined with ``", "``.
    """

    index: int
    headers: dict[str, str]

    @property
    def content_type(self) -> str | None:
        """The media type of the ``Content-Type`` header, lower-cased, without parameters."""
        value = self.headers.get("content-type")
        if value is None:
            return None
        media_type = value.split(";", 1)[0].strip(_WSP).lower()
        return media_type or None

    @property
    def content_location(self) -> str | None:
        return self.headers.get("content-location")


@dataclass(frozen=True)
class PartData:
    """A piece of the current part's body, never empty.

    ``data`` is a read-only ``memoryview`` of an immutable ``bytes`` object that the parser does
    not reuse, so the consumer need not copy it before the next ``feed()``: it stays valid for as
    long as it is kept (and keeps that chunk in memory meanwhile). Use ``bytes(data)`` where a
    ``bytes`` object is needed.
    """

    data: bytes | memoryview

    def __repr__(self) -> str:
        head = bytes(self.data[:32])
        return f"PartData({len(self.data)} bytes: {head!r}{'...' if len(self.data) > 32 else ''})"


@dataclass(frozen=True)
class PartEnd:
    """The body of part ``index`` is complete."""

    index: int


Event = PartStart | PartData | PartEnd


# ------------------------------------------------------------------------------------------------
# The parser

# bcharsnospace (RFC 2046 5.1.1), and the space, which a boundary may hold but not end with
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PADDING = re.compile(rb"[ \t]{0,%d}" % (MAX_TRANSPORT_PADDING + 1))
_CR, _LF, _DASH = 13, 10, 45


class _State(Enum):
    PREAMBLE = "preamble"  # before the first delimiter
    HEADERS = "headers"  # after a delimiter, reading a part's headers
    BODY = "body"  # in a part's body
    DONE = "done"  # the close delimiter was seen


class _Found(Enum):
    MORE = "more"  # no delimiter decided yet: what comes before the returned offset is no delimiter
    DELIMITER = "delimiter"  # a delimiter; the next part's headers follow
    CLOSE = "close"  # the close delimiter


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


class RelatedParser:
    """Parses one ``multipart/related`` body fed in chunks; see the module docstring for the rules.

    ``feed()`` each chunk as it arrives and handle the events it returns, then call ``close()``
    at the end of the body. A ``MultipartError`` from either is final: later calls raise it again.
    ``max_header_bytes`` limits the size of one part's header block, line endings and the empty
    line included; ``max_headers`` the number of header fields in it.
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = 16384, max_headers: int = 64) -> None:
        if not isinstance(boundary, str) or _BOUNDARY.fullmatch(boundary) is None:
            raise MultipartError(
                "a multipart boundary is 1 to 70 letters, digits, spaces or '()+_,-./:=? characters, "
                "not ending with a space"
            )
        if max_header_bytes < 1 or max_headers < 0:
            raise ValueError("max_header_bytes must be positive and max_headers not negative")
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._state = _State.PREAMBLE
        # Unconsumed bytes from earlier chunks. The CRLF stands for the line break before the
        # body, so that a first delimiter at offset 0 is found like any other.
        self._rest = b"\r\n"
        self._skip = 0  # bytes at the start of _rest that are a line ending, not body data
        self._index = -1  # the current part
        self._fields: list[list[str]] = []  # the current part's headers so far, [name, value]
        self._header_bytes = 0  # the size of the current part's header lines so far
        self._scanned = 0  # bytes at the start of _rest (in HEADERS) known to hold no LF
        self._error: str | None = None
        self._closed = False

    @property
    def finished(self) -> bool:
        """The close delimiter was seen."""
        return self._state is _State.DONE

    @property
    def in_part(self) -> bool:
        """A part has started (``PartStart`` was returned) and has not ended yet."""
        return self._state is _State.BODY

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Event]:
        """Feed the next chunk of the body (any size, including 1 byte or empty); returns the events it completes.

        A ``bytearray`` or ``memoryview`` chunk is copied, so the caller may reuse its buffer; a
        ``bytes`` chunk usually is not. After the close delimiter, chunks are ignored.

        Raises ``MultipartError`` for a malformed body, but the events completed before the fault
        come first: if this chunk completed any, they are returned and the error is raised by the
        next ``feed()`` or ``close()``. So the caller gets the same events before the error (every
        part before the malformed one, ended) however the body is cut into chunks. Raises
        ``RuntimeError`` after ``close()``.
        """
        if self._error is not None:
            raise MultipartError(self._error)
        if self._closed:
            raise RuntimeError("feed() after close()")
        if self._state is _State.DONE or not chunk:
            return []
        data = bytes(chunk)  # no copy for bytes
        buf = self._rest + data if self._rest else data
        events: list[Event] = []
        try:
            pos = self._parse(buf, events)
        except MultipartError as exc:
            self._error = str(exc)
            self._rest = b""
            if not events:
                raise
        else:
            self._rest = buf[pos:]
        return events

    def close(self) -> None:
        """End of the body.

        Raises ``MultipartError`` if the close delimiter (``--boundary--``) was not seen: when no
        delimiter was found at all, or the body ends inside a part's headers or body.
        """
        if self._error is not None:
            raise MultipartError(self._error)
        self._closed = True
        if self._state is _State.DONE:
            return
        if self._state is _State.PREAMBLE:
            self._error = "no multipart boundary found in the body"
        elif self._state is _State.HEADERS:
            self._error = "the body ends inside the headers of a part"
        else:
            self._error = "the body ends before the closing boundary"
        self._rest = b""
        raise MultipartError(self._error)

    # -- internals --------------------------------------------------------------------------------

    def _parse(self, buf: bytes, events: list[Event]) -> int:
        """Turn as much of ``buf`` into events as can be decided; returns where the rest starts."""
        pos = 0
        while True:
            state = self._state
            if state is _State.HEADERS:
                complete, pos = self._read_headers(buf, pos, events)
                if not complete:
                    return pos
            elif state is _State.DONE:
                return len(buf)
            else:
                found, at, after = self._find_delimiter(buf, pos)
                if state is _State.BODY:
                    data_start = pos + self._skip
                    if at > data_start:
                        events.append(PartData(memoryview(buf)[data_start:at]))
                    if found is _Found.MORE:
                        self._skip = max(0, data_start - at)
                        return at
                    events.append(PartEnd(self._index))
                elif found is _Found.MORE:
                    return at  # the preamble is skipped
                if found is _Found.CLOSE:
                    self._state = _State.DONE
                    return len(buf)
                self._state = _State.HEADERS
                self._index += 1
                self._fields = []
                self._header_bytes = 0
                self._scanned = 0
                pos = after

    def _find_delimiter(self, buf: bytes, start: int) -> tuple[_Found, int, int]:
        """Look for the next delimiter in ``buf[start:]``.

        Returns ``(found, at, after)``: where the delimiter starts and where the next part's
        headers start, for ``DELIMITER`` and ``CLOSE``. For ``MORE``, nothing before ``at`` belongs
        to a delimiter, and ``buf[at:]`` must wait for the next chunk to be decided.
        """
        delimiter = self._delimiter
        end = len(buf)
        search = start
        while True:
            at = buf.find(delimiter, search)
            if at < 0:
                # A delimiter may begin in the last bytes and go on in the next chunk. The boundary
                # holds no CR, so only the last CR there can begin it.
                cr = buf.rfind(b"\r", max(search, end - len(delimiter) + 1))
                if cr >= 0 and delimiter.startswith(buf[cr:]):
                    return _Found.MORE, cr, 0
                return _Found.MORE, end, 0
            after = at + len(delimiter)
            if end - after < 2:
                return _Found.MORE, at, 0
            if buf[after] == _DASH and buf[after + 1] == _DASH:
                return _Found.CLOSE, at, after + 2
            line_end = _PADDING.match(buf, after).end()  # type: ignore[union-attr]  # always matches
            if line_end - after <= MAX_TRANSPORT_PADDING:
                if line_end + 1 < end:
                    if buf[line_end] == _CR and buf[line_end + 1] == _LF:
                        return _Found.DELIMITER, at, line_end + 2
                elif line_end == end or buf[line_end] == _CR:
                    return _Found.MORE, at, 0  # the line may still end in CRLF
            search = at + 1  # not a delimiter: body data

    def _read_headers(self, buf: bytes, pos: int, events: list[Event]) -> tuple[bool, int]:
        """Read header lines from ``buf[pos:]``; returns (whether the headers are complete, where to go on)."""
        scan_from = pos + self._scanned
        while True:
            newline = buf.find(b"\n", scan_from)
            if newline < 0:
                if self._header_bytes + len(buf) - pos > self._max_header_bytes:
                    raise MultipartError("part headers too large")
                self._scanned = len(buf) - pos
                return False, pos
            self._scanned = 0
            self._header_bytes += newline + 1 - pos
            if self._header_bytes > self._max_header_bytes:
                raise MultipartError("part headers too large")
            line_end = newline - 1 if newline > pos and buf[newline - 1] == _CR else newline
            line = buf[pos:line_end]
            if not line:
                headers: dict[str, str] = {}
                for name, value in self._fields:
                    value = value.strip(_WSP)
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
                self._fields = []
                events.append(PartStart(self._index, headers))
                self._state = _State.BODY
                if line_end < newline:
                    # The empty line's CRLF may also begin a delimiter (a part without a body).
                    self._skip = 2
                    return True, line_end
                self._skip = 0
                return True, newline + 1
            pos = scan_from = newline + 1
            if line[0] in b" \t":
                if not self._fields:
                    raise MultipartError("malformed part headers: a continuation line comes first")
                field = self._fields[-1]
                field[1] = field[1].rstrip(_WSP) + " " + _decode(line).strip(_WSP)
                continue
            name, colon, value = line.partition(b":")
            if not colon:
                raise MultipartError("malformed part header line: no colon")
            if _HEADER_NAME.fullmatch(name) is None:
                raise MultipartError("malformed part header name")
            if len(self._fields) >= self._max_headers:
                raise MultipartError("part headers too large: too many header fields")
            self._fields.append([name.decode("ascii").lower(), _decode(value)])
