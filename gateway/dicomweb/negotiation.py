"""Content negotiation for WADO-RS retrieve (PS3.18 8.3.3.1, 8.4, 8.7.3, 8.7.5, 8.7.7, 8.7.8).

Pure functions: no I/O, no HTTP framework. The handlers pass in the ``Accept`` header and the
``accept`` query parameter values and get back what to send, or an ``HttpProblem`` (400, 406).

Selection (8.7.8.1), the same for every chooser here:

1. Supported media types in the ``accept`` query parameter, highest ``q`` first. Wildcards are not
   allowed there (8.3.3.1), so such ranges are ignored.
2. Then supported media types in the ``Accept`` header, highest ``q`` first.
3. Then the resource's default, if a wildcard range in the header matches it.
4. Nothing left: 406.

Equal ``q`` values keep the client's order. A range with ``q=0`` takes its media type and transfer
syntax out of the candidates from the same source. Invalid or unsupported values, such as a bad
``q``, a malformed range, or a transfer syntax that is not a UID, not supported or not allowed on
the web, make the gateway ignore that range (8.7.7). A mix of explicit DICOM and rendered media
types in one source is a 400 (8.7.5, 8.3.3.1). A missing ``Accept`` header counts as ``*/*``,
unless ``strict`` is set (8.7.7 asks for a 406 then).

The chooser returns the candidates in order instead of one answer, because a transfer syntax can
only be picked per instance (the stored syntax and the codecs decide). The transcoder takes the
first candidate it can produce. ``*`` means "as stored", with Implicit VR Little Endian and
Explicit VR Big Endian converted to Explicit VR Little Endian (see ``web_safe``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.problems import HttpProblem, bad_request, not_acceptable

from .syntaxes import (  # noqa: F401  (re-exported: callers name them from here too)
    IMPLICIT_VR_LE,
    EXPLICIT_VR_LE,
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    JPEG_2000_MC_LOSSLESS,
    JPEG_2000_MC,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    HTJ2K,
    RLE_LOSSLESS,
    NEVER_ON_THE_WEB,
    web_safe,
)

# ------------------------------------------------------------------------------------------------
# Transfer syntaxes

ANY_TRANSFER_SYNTAX = "*"
"""The ``transfer-syntax=*`` marker: send as stored (8.7.3.5.2), but never a non-web syntax."""

PASS_THROUGH_ONLY = frozenset({JPEG_2000_MC_LOSSLESS, JPEG_2000_MC, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K})
"""Sent only when the PACS already has them; the gateway does not encode these."""

SUPPORTED_TRANSFER_SYNTAXES = frozenset({
    EXPLICIT_VR_LE,
    DEFLATED_EXPLICIT_VR_LE,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    RLE_LOSSLESS,
}) | PASS_THROUGH_ONLY
"""What a client may name in ``transfer-syntax=``. Handlers can narrow it with ``supported=``."""

LOSSY_TRANSFER_SYNTAXES = frozenset({
    JPEG_BASELINE,
    JPEG_EXTENDED,
    "1.2.840.10008.1.2.4.52", "1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.54",  # retired JPEG
    "1.2.840.10008.1.2.4.55", "1.2.840.10008.1.2.4.56", "1.2.840.10008.1.2.4.59",
    "1.2.840.10008.1.2.4.60", "1.2.840.10008.1.2.4.61", "1.2.840.10008.1.2.4.62",
    "1.2.840.10008.1.2.4.63", "1.2.840.10008.1.2.4.64",
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000,
    JPEG_2000_MC,
    HTJ2K,
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1",  # MPEG-2
    "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.101.1",
    "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1",
    "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1",
    "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108",  # HEVC/H.265
    "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112",  # JPEG XL (JPEG recompression, general)
})
"""Irreversible (lossy) compression. Sending data in one of these may lose information."""

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")


def is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (PS3.5 9.1): digit components, no leading zeros, 64 chars at most."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None



def is_lossy(ts_uid: str) -> bool:
    """Is this a lossy (irreversible) transfer syntax? Unknown UIDs count as not lossy."""
    return ts_uid in LOSSY_TRANSFER_SYNTAXES


# ------------------------------------------------------------------------------------------------
# Parsing (RFC 9110 12.5.1 and 5.6; PS3.18 8.4.1.1, 8.7.7)

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_MEDIA_RANGE = re.compile(rf"({_TOKEN})/({_TOKEN})")
# Unquoted values may also contain "/" so that type=application/dicom works, as clients send it.
_BARE_VALUE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z/]+")
_QUOTED_VALUE = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_OWS = " \t"


@dataclass(frozen=True)
class MediaRange:
    """One valid media range: lower-case type and subtype, its parameters, and its weight.

    ``params`` has lower-case names and unquoted values as the client wrote them; ``q`` is not
    among them. ``position`` is the range's place in its header, for stable ordering.
    """

    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0
    position: int = 0

    @property
    def media_type(self) -> str:
        return f"{self.type}/{self.subtype}"

    @property
    def is_wildcard(self) -> bool:
        return self.type == "*" or self.subtype == "*"

    @property
    def part_type(self) -> str | None:
        """The ``type`` parameter (the media type of the parts of a multipart type), lower case."""
        value = self.params.get("type")
        return value.strip().lower() if value is not None else None

    @property
    def transfer_syntax(self) -> str | None:
        value = self.params.get("transfer-syntax")
        return value.strip() if value is not None else None

    @property
    def charset(self) -> str | None:
        return self.params.get("charset")


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside quoted strings (which may hold backslash escapes)."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == separator:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return pieces


def _parse_value(raw: str) -> str | None:
    quoted = _QUOTED_VALUE.fullmatch(raw)
    if quoted is not None:
        return re.sub(r"\\(.)", r"\1", quoted.group(1), flags=re.DOTALL)
    return raw if _BARE_VALUE.fullmatch(raw) else None


def _parse_range(text: str, position: int) -> MediaRange | None:
    pieces = _split_outside_quotes(text, ";")
    media = _MEDIA_RANGE.fullmatch(pieces[0].strip(_OWS))
    if media is None:
        return None
    main, sub = media.group(1).lower(), media.group(2).lower()
    if main == "*" and sub != "*":
        return None
    params: dict[str, str] = {}
    q = 1.0
    seen_q = False
    for piece in pieces[1:]:
        piece = piece.strip(_OWS)
        if not piece:
            continue  # "a/b;;c=d" and a trailing ";" are allowed (RFC 9110 5.6.6)
        name, equals, raw = piece.partition("=")
        name = name.strip(_OWS).lower()
        if not equals or not _TOKEN_RE.fullmatch(name):
            return None
        value = _parse_value(raw.strip(_OWS))
        if value is None:
            return None
        if name == "q":
            if seen_q or not _QVALUE.fullmatch(value):
                return None
            q, seen_q = float(value), True
        elif name in params:
            return None  # two values for one parameter: ambiguous, so invalid
        else:
            params[name] = value
    return MediaRange(main, sub, params, q, position)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The valid media ranges of an ``Accept`` value, in the order given (``q`` not applied).

    Ranges that do not parse (a bad media range, a parameter without a value, a bad or repeated
    ``q``, an unterminated quote) are dropped. This function never raises.
    """
    if not header:
        return []
    # An unterminated quote swallows the rest of the header into one piece, whose quoted value
    # then fails to parse: that range is dropped like any other garbage.
    pieces = _split_outside_quotes(header, ",")
    ranges = []
    for position, piece in enumerate(pieces):
        if piece.strip(_OWS):
            media_range = _parse_range(piece, position)
            if media_range is not None:
                ranges.append(media_range)
    return ranges


def parse_accept_param(values: Iterable[str]) -> list[MediaRange]:
    """The ``accept`` query parameter (8.3.3.1): Accept grammar, repeatable, no wildcards allowed.

    The values are joined with commas first, so a value an earlier step split on a comma inside
    a quoted string comes back together.
    """
    return [r for r in parse_accept(",".join(values)) if not r.is_wildcard]


# ------------------------------------------------------------------------------------------------
# Categories (8.7.5: DICOM and rendered types may not be mixed)

_DICOM_TYPES = frozenset({
    "application/dicom",
    "application/dicom+json",
    "application/dicom+xml",
    "application/octet-stream",
    "image/dicom-rle",
    "image/jls",
    "image/jpx",
})
_RENDERED_TYPES = frozenset({
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/jp2",
    "text/html",
    "text/plain",
    "application/pdf",
})


def _category(media_range: MediaRange) -> str | None:
    """"dicom", "rendered" or None (wildcards and types that belong to neither)."""
    if media_range.is_wildcard:
        return None
    if media_range.type == "multipart" or media_range.media_type in _DICOM_TYPES:
        return "dicom"
    if media_range.type == "video" or media_range.media_type in _RENDERED_TYPES:
        return "rendered"
    return None


def _check_not_mixed(ranges: Sequence[MediaRange], parameter: str | None) -> None:
    categories = {_category(r) for r in ranges if r.q > 0}
    if {"dicom", "rendered"} <= categories:
        where = "the accept query parameter" if parameter else "the Accept header"
        raise bad_request(
            f"{where} mixes DICOM media types (application/dicom, multipart/related, ...) with rendered "
            "ones (image/jpeg, image/png, text/html, ...); ask for one kind per request",
            parameter,
        )


# ------------------------------------------------------------------------------------------------
# Selection


class _Candidate(NamedTuple):
    media_type: str  # the response's media type
    part_type: str
    transfer_syntax: str  # a UID or "*"
    q: float

    @property
    def key(self) -> tuple[str, str, str]:
        return self.media_type, self.part_type, self.transfer_syntax


_Matcher = Callable[[MediaRange], list[_Candidate]]
"""Turns one media range into the candidates it allows for a kind of resource."""


def _acceptable_ts(value: str | None, default: str, allowed: Collection[str]) -> str | None:
    """The transfer syntax a range asks for, or None if the range must be ignored."""
    if value is None:
        return default if default in allowed else None
    if value == ANY_TRANSFER_SYNTAX:
        return ANY_TRANSFER_SYNTAX
    if not is_uid(value) or not web_safe(value) or value not in allowed:
        return None
    return value


def _by_q(ranges: Iterable[MediaRange]) -> list[MediaRange]:
    return sorted(ranges, key=lambda r: -r.q)  # stable: equal q keeps the client's order


def _candidates(ranges: Sequence[MediaRange], match: _Matcher, wildcards: bool) -> list[_Candidate]:
    """One source's candidates: explicit ranges by q, then (if allowed) wildcard ranges by q.

    A ``q=0`` range refuses what it matches; an explicit one beats a wildcard (RFC 9110 12.5.1),
    so ``*/*;q=0`` does not refuse what an explicit range asks for.
    """
    def refused(wild: bool) -> set[tuple[str, str, str]]:
        return {c.key for r in ranges if r.q == 0 and r.is_wildcard == wild for c in match(r)}

    refused_explicitly = refused(False)
    explicit = [c for r in _by_q(r for r in ranges if r.q > 0 and not r.is_wildcard) for c in match(r)]
    ordered = [c for c in explicit if c.key not in refused_explicitly]
    if wildcards:
        refused_all = refused_explicitly | refused(True)
        wild = [c for r in _by_q(r for r in ranges if r.q > 0 and r.is_wildcard) for c in match(r)]
        ordered += [c for c in wild if c.key not in refused_all]
    return ordered


@dataclass(frozen=True)
class _Request:
    from_param: list[MediaRange]
    from_header: list[MediaRange]
    header_missing: bool

    def ranked(self, match: _Matcher) -> list[_Candidate]:
        """8.7.8.1: the accept parameter's choices, then the header's, then the header's wildcards."""
        return _candidates(self.from_param, match, wildcards=False) + _candidates(
            self.from_header, match, wildcards=True
        )


def _read(accept_header: str | None, accept_params: Iterable[str], strict: bool) -> _Request:
    """Both sources, checked for mixed categories. A missing header counts as ``*/*`` unless strict."""
    from_param = parse_accept_param(accept_params)
    _check_not_mixed(from_param, "accept")
    header_missing = not (accept_header and accept_header.strip(_OWS))
    if header_missing:
        from_header = [] if strict else [MediaRange("*", "*")]
    else:
        from_header = parse_accept(accept_header)
        _check_not_mixed(from_header, None)
    return _Request(from_param, from_header, header_missing)


def _refusal(request: _Request, offer: str) -> HttpProblem:
    prefix = "an Accept header is required" if request.header_missing else "nothing in Accept can be produced"
    return not_acceptable(f"{prefix}; {offer}")


# -- Instance resources ---------------------------------------------------------------------------

MULTIPART = "multipart/related"
DICOM = "application/dicom"


@dataclass(frozen=True)
class Choice:
    """What to send for a study, series or instance retrieve.

    ``transfer_syntaxes`` lists the acceptable syntaxes, most preferred first. ``"*"`` means as
    stored (converted to Explicit VR LE if stored as Implicit VR LE or Explicit VR BE).
    ``lossy_allowed`` is true only if the client named a lossy syntax: the transcoder may then
    compress lossily to produce it; ``*`` alone never allows that.
    """

    media_type: str
    part_type: str
    transfer_syntaxes: tuple[str, ...]
    q: float
    lossy_allowed: bool

    @property
    def multipart(self) -> bool:
        return self.media_type == MULTIPART


def _instance_matcher(single_instance: bool, supported: Collection[str]) -> _Matcher:
    def match(media_range: MediaRange) -> list[_Candidate]:
        part_type = media_range.part_type
        if media_range.media_type in ("*/*", "multipart/*", MULTIPART):
            if part_type is not None and part_type != DICOM:
                return []
            media_type = MULTIPART
        elif media_range.media_type in ("application/*", DICOM) and single_instance:
            media_type = DICOM  # single part: only for a single instance (Table 10.4.4-1)
        else:
            return []
        ts = _acceptable_ts(media_range.transfer_syntax, EXPLICIT_VR_LE, supported)
        return [] if ts is None else [_Candidate(media_type, DICOM, ts, media_range.q)]

    return match


def choose_instance_media(
    accept_header: str | None,
    accept_params: Iterable[str] = (),
    *,
    single_instance: bool,
    strict: bool = False,
    supported: Collection[str] = SUPPORTED_TRANSFER_SYNTAXES,
) -> Choice:
    """Media type and transfer syntaxes for an Instance resource (Table 10.4.4-1, 8.7.3.5, 8.7.8).

    ``single_instance`` is true for ``.../instances/{uid}``: only there is single-part
    ``application/dicom`` possible. A missing ``Accept`` header counts as ``*/*``; with ``strict``
    it is a 406 (8.7.7) unless the ``accept`` parameter asks for something this resource has.
    ``supported`` narrows the transfer syntaxes a client may name (say, to the codecs installed).
    Raises ``HttpProblem`` 400 for mixed DICOM and rendered types, 406 if nothing acceptable remains.
    """
    request = _read(accept_header, accept_params, strict)
    candidates = request.ranked(_instance_matcher(single_instance, supported))
    if not candidates:
        raise _refusal(request, _instance_offer(single_instance, supported))
    best = candidates[0]
    syntaxes = _unique(c.transfer_syntax for c in candidates if c.media_type == best.media_type)
    return Choice(best.media_type, DICOM, syntaxes, best.q, any(is_lossy(ts) for ts in syntaxes))


def _instance_offer(single_instance: bool, supported: Collection[str]) -> str:
    types = 'multipart/related; type="application/dicom"'
    types += " or application/dicom" if single_instance else " (single-part application/dicom only for one instance)"
    return (
        f"this resource produces {types}, with transfer-syntax=* (as stored) or one of "
        f"{', '.join(sorted(set(supported) - NEVER_ON_THE_WEB))}"
        "; Implicit VR Little Endian and Explicit VR Big Endian are never sent"
    )


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


# -- Bulk data and pixel data ---------------------------------------------------------------------

OCTET_STREAM = "application/octet-stream"

PART_TYPE_SYNTAXES: dict[str, tuple[str, ...]] = {
    "image/jpeg": (JPEG_LOSSLESS_SV1, JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS),
    "image/jls": (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS),
    "image/jp2": (JPEG_2000_LOSSLESS, JPEG_2000),
    "image/jpx": (JPEG_2000_MC_LOSSLESS, JPEG_2000_MC),
    "image/dicom-rle": (RLE_LOSSLESS,),
}
"""Compressed part types (Table 8.7.3-5) and their syntaxes, the default first."""


class BulkPart(NamedTuple):
    part_type: str
    transfer_syntax: str  # a UID or "*"


@dataclass(frozen=True)
class BulkChoice:
    """Acceptable parts for bulk data or frames, most preferred first. ``media_type`` is
    multipart/related, or the part type itself for a single-part answer.

    A ``"*"`` transfer syntax means as stored; with a compressed part type, only if the stored
    syntax belongs to that type (``PART_TYPE_SYNTAXES``).
    """

    parts: tuple[BulkPart, ...]
    q: float
    lossy_allowed: bool
    media_type: str = MULTIPART


def _bulk_matcher(supported: Collection[str], single_part: bool = False) -> _Matcher:
    def match(media_range: MediaRange) -> list[_Candidate]:
        if media_range.media_type in ("*/*", "multipart/*", MULTIPART):
            media_type = MULTIPART
            part_type = media_range.part_type or OCTET_STREAM
            if part_type in ("*/*", "*"):
                # any part type (dicomweb-client's default): as stored, unless a syntax is named
                ts = _acceptable_ts(media_range.transfer_syntax or ANY_TRANSFER_SYNTAX, EXPLICIT_VR_LE,
                                    set(supported) - {DEFLATED_EXPLICIT_VR_LE})
                return [] if ts is None else [_Candidate(MULTIPART, OCTET_STREAM, ts, media_range.q)]
        elif single_part and (media_range.media_type == OCTET_STREAM or media_range.media_type in PART_TYPE_SYNTAXES):
            media_type = part_type = media_range.media_type
        else:
            return []  # single-part types only where the resource is one item
        allowed: Collection[str]
        if part_type == OCTET_STREAM:
            allowed = set(supported) - {DEFLATED_EXPLICIT_VR_LE}  # deflate is for data sets, not bulk bytes
            default = EXPLICIT_VR_LE
        elif part_type in PART_TYPE_SYNTAXES:
            allowed = set(PART_TYPE_SYNTAXES[part_type]) & set(supported)
            default = PART_TYPE_SYNTAXES[part_type][0]
        else:
            return []
        ts = _acceptable_ts(media_range.transfer_syntax, default, allowed)
        return [] if ts is None else [_Candidate(media_type, part_type, ts, media_range.q)]

    return match


def choose_bulk_media(
    accept_header: str | None,
    accept_params: Iterable[str] = (),
    *,
    strict: bool = False,
    supported: Collection[str] = SUPPORTED_TRANSFER_SYNTAXES,
    single_part: bool = False,
) -> BulkChoice:
    """Part types and transfer syntaxes for Bulkdata and Pixel Data resources (Tables 8.7.3-4/-5).

    The default is ``multipart/related; type="application/octet-stream"`` in Explicit VR LE (raw
    little-endian bytes). Single-part types (``application/octet-stream``, ``image/jls``, ...) count
    only with ``single_part``: for a resource that is one item (one frame, one bulk data value).
    ``strict`` and ``supported`` as for ``choose_instance_media``. Raises ``HttpProblem`` 400 for
    mixed types, 406 if nothing acceptable.
    """
    request = _read(accept_header, accept_params, strict)
    candidates = request.ranked(_bulk_matcher(supported, single_part))
    if not candidates:
        raise _refusal(request, _BULK_OFFER)
    media_type = candidates[0].media_type
    parts = tuple(dict.fromkeys(BulkPart(c.part_type, c.transfer_syntax) for c in candidates
                                if c.media_type == media_type))
    return BulkChoice(parts, candidates[0].q, any(is_lossy(p.transfer_syntax) for p in parts), media_type)


_BULK_OFFER = (
    'this resource produces multipart/related with type="application/octet-stream" (the default), '
    + ", ".join(f'"{t}"' for t in PART_TYPE_SYNTAXES)
    + ", each with an optional transfer-syntax parameter"
)
