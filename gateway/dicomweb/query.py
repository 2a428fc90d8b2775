"""QIDO-RS query parameters, parsed the way real clients write them (pure: no I/O).

- ``+`` is a space and ``%2B`` a plus; every value is percent-decoded as UTF-8 (PS3.18 8.3.1).
- Lists are split on ``,`` only where a list is allowed: UID attributes and ``includefield``.
  A repeated parameter is a list too (dicomweb-client repeats UIDs and includefield).
- ``*`` and ``%2A`` are the same wildcard.
- A bad value raises ``QueryError`` naming the parameter (400); a parameter that names no attribute
  and no QIDO keyword is ignored and reported back (PS3.18 8.3: unsupported parameters are ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import unquote_plus

from pydicom.datadict import private_dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag, Tag

from .attributes import vr_of

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 18, "DS": 16, "DT": 54, "IS": 12, "LO": 64, "LT": 10240,
              "PN": 64 * 3 + 2, "SH": 16, "ST": 1024, "TM": 28, "UI": 64}
RESERVED = frozenset({"includefield", "fuzzymatching", "limit", "offset", "emptyvaluematching",
                      "multiplevaluematching", "accept", "charset"})
MAX_PARAMETERS = 200
INT_RANGES = {"IS": (-(2**31), 2**31 - 1), "SS": (-(2**15), 2**15 - 1), "US": (0, 2**16 - 1),
              "SL": (-(2**31), 2**31 - 1), "UL": (0, 2**32 - 1), "SV": (-(2**63), 2**63 - 1), "UV": (0, 2**64 - 1)}
# Attributes of the C-FIND request that the gateway sets itself; a client cannot match on them.
CONTROL_TAGS = frozenset(Tag(t) for t in (0x00080005, 0x00080052, 0x00080054))
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LOOSE_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^(\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?)([+-]\d{4})?$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_AS_RE = re.compile(r"^\d{3}[DWMY]$")
_CS_RE = re.compile(r"^[A-Z0-9 _*?]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\\]")


class QueryError(ValueError):
    """A bad query parameter: ``parameter`` names it, the message says what is wrong."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class MatchKey:
    """One attribute to match (or, with an empty value, to return).

    ``path`` is the tag path: one tag for a top-level attribute, more for ``Sequence.Attribute``.
    ``values`` holds one value, several only for a UID list; ``()`` is universal matching.
    """

    param: str
    path: tuple[BaseTag, ...]
    vr: str
    values: tuple[str, ...]

    @property
    def tag(self) -> BaseTag:
        return self.path[0]

    @property
    def leaf(self) -> BaseTag:
        return self.path[-1]

    @property
    def is_universal(self) -> bool:
        return not self.values

    @property
    def is_range(self) -> bool:
        return self.vr in RANGE_VRS and len(self.values) == 1 and _is_range(self.vr, self.values[0])

    @property
    def is_wildcard(self) -> bool:
        return self.vr in WILDCARD_VRS and len(self.values) == 1 and any(c in self.values[0] for c in "*?")


def _is_range(vr: str, value: str) -> bool:
    if vr == "DT":
        # a DT may carry a '-hhmm' offset of its own: a value that is a valid DT is not a range
        return not _valid_datetime(value) and _split_dt_range(value) is not None
    return "-" in value


@dataclass(frozen=True)
class QidoQuery:
    matches: tuple[MatchKey, ...] = ()
    includefields: tuple[MatchKey, ...] = ()
    include_all: bool = False
    fuzzy: bool = False
    empty_value_matching: bool = False
    multiple_value_matching: bool = False
    limit: int | None = None
    offset: int = 0
    accept: tuple[str, ...] = ()
    charset: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=())

    def match(self, keyword: str) -> MatchKey | None:
        tag = Tag(tag_for_keyword(keyword))
        return next((m for m in self.matches if m.path == (tag,)), None)


# ------------------------------------------------------------------------------------------------
# Splitting the query string


def split_query(raw: str) -> list[tuple[str, str]]:
    """``a=1&b=2`` into decoded (name, value) pairs; ``+`` is a space; invalid UTF-8 is an error."""
    pairs = []
    for chunk in raw.split("&"):
        if not chunk:
            continue
        name, _, value = chunk.partition("=")
        if _BAD_ESCAPE_RE.search(chunk):
            raise QueryError(unquote_plus(name, errors="replace"), "a '%' must start a percent-encoded byte (%XX)")
        try:
            pairs.append((unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict")))
        except UnicodeDecodeError:
            raise QueryError(unquote_plus(name, errors="replace"), "the value is not valid percent-encoded UTF-8") from None
    if len(pairs) > MAX_PARAMETERS:
        raise QueryError("query", f"too many parameters (at most {MAX_PARAMETERS})")
    return pairs


# ------------------------------------------------------------------------------------------------
# Attribute identifiers


def _one_tag(param: str, text: str, creators: dict[BaseTag, str]) -> BaseTag:
    if _TAG_RE.match(text):
        tag = Tag(int(text, 16))
    else:
        number = tag_for_keyword(text)
        if number is None:
            raise LookupError(text)
        tag = Tag(number)
    if tag.group in (0x0000, 0x0002) or tag.element == 0x0000:
        raise QueryError(param, f"{text} cannot be queried (command, file meta or group length)")
    if tag.is_private and not tag.is_private_creator:
        creator_tag = Tag(tag.group, tag.element >> 8)
        if creator_tag not in creators:
            raise QueryError(
                param,
                f"private attribute {int(tag):08X} needs its Private Creator as a match parameter "
                f"({int(creator_tag):08X}=<creator>)",
            )
    return tag


def _vr(tag: BaseTag, creators: dict[BaseTag, str]) -> str:
    if tag.is_private_creator:
        return "LO"
    if tag.is_private:
        creator = creators.get(Tag(tag.group, tag.element >> 8), "")
        try:
            return private_dictionary_VR(tag, creator)
        except KeyError:
            return "LO"  # unknown to the dictionary: matched and sent as text
    try:
        return vr_of(tag)
    except KeyError:
        return "UN"


def parse_attribute(param: str, creators: dict[BaseTag, str]) -> tuple[tuple[BaseTag, ...], str]:
    """``PatientID``, ``00100020`` or ``RequestAttributesSequence.ScheduledProcedureStepID``."""
    parts = param.split(".")
    if len(parts) > 4:
        raise QueryError(param, "sequence paths are limited to 4 levels")
    path = tuple(_one_tag(param, part, creators) for part in parts)
    for tag in path[:-1]:
        if _vr(tag, creators) != "SQ":
            raise QueryError(param, f"{int(tag):08X} is not a sequence, so nothing can follow it in a path")
    return path, _vr(path[-1], creators)


def is_attribute_name(name: str) -> bool:
    first = name.split(".")[0]
    return bool(_TAG_RE.match(first)) or tag_for_keyword(first) is not None


# ------------------------------------------------------------------------------------------------
# Values


def _valid_date(text: str) -> bool:
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        return True
    except ValueError:
        return False


def _valid_time(text: str) -> bool:
    m = _TM_RE.match(text)
    if not m:
        return False
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    return hh < 24 and mm < 60 and ss < 61


def _valid_offset(offset: str) -> bool:
    """&ZZXX: -1200 to +1400, minutes below 60 (PS3.5 Table 6.2-1, DT)."""
    hours, minutes = int(offset[1:3]), int(offset[3:5])
    signed = hours * 60 + minutes if offset[0] == "+" else -(hours * 60 + minutes)
    return minutes < 60 and -12 * 60 <= signed <= 14 * 60


def _valid_datetime(text: str) -> bool:
    m = _DT_RE.match(text)
    if not m:
        return False
    if m.group(2) and not _valid_offset(m.group(2)):
        return False
    body = m.group(1)
    if len(body) >= 8 and not _valid_date(body[:8]):
        return False
    if len(body) > 8 and not _valid_time(body[8:]):
        return False
    if len(body) == 6 and not 1 <= int(body[4:6]) <= 12:
        return False
    return True


def _split_dt_range(value: str) -> tuple[str, str] | None:
    """Split a DT range ``a-b`` where each side may carry a ``-hhmm`` offset; None if not a range."""
    for i, ch in enumerate(value):
        if ch != "-":
            continue
        lo, hi = value[:i], value[i + 1 :]
        if (not lo or _valid_datetime(lo)) and (not hi or _valid_datetime(hi)) and (lo or hi):
            return lo, hi
    return None


def _check_range_value(param: str, vr: str, value: str) -> None:
    single = {"DA": lambda v: bool(_DA_RE.match(v)) and _valid_date(v), "TM": _valid_time, "DT": _valid_datetime}[vr]
    fmt = {"DA": "YYYYMMDD", "TM": "HHMMSS.FFFFFF", "DT": "YYYYMMDDHHMMSS.FFFFFF&ZZXX"}[vr]
    if single(value):
        return
    if vr == "DT":
        parts = _split_dt_range(value)
    else:
        lo, sep, hi = value.partition("-")
        parts = (lo, hi) if sep and (lo or hi) and "-" not in hi else None
    if parts is None or not all(single(p) for p in parts if p):
        raise QueryError(param, f"{value!r} is not a {vr} value or range ({fmt}, or a range a-b, -b or a-)")
    if parts[0] and parts[1] and comparable(vr, parts[0], high=False) > comparable(vr, parts[1], high=True):
        if vr == "TM":
            raise QueryError(param, "a TM range cannot cross midnight")
        raise QueryError(param, "the range's start is after its end")


def _pad_time(value: str, high: bool) -> str:
    value = value.replace(":", "").strip()
    whole, _, frac = value.partition(".")
    whole = whole + ("235959" if high else "000000")[len(whole):]
    frac = frac + ("999999" if high else "000000")[len(frac):]
    return f"{whole[:6]}.{frac[:6]}"


def comparable(vr: str, value: str, *, high: bool) -> str:
    """A DA, TM or DT value as a string that sorts in time order, partial values widened to the
    start (``high=False``) or end (``high=True``) of the period they name. A DT's UTC offset is
    not compared: the gateway matches local times, as it does not negotiate timezone adjustment."""
    value = value.strip()
    if vr == "DA":
        digits = value.replace(".", "").replace("-", "")  # ACR-NEMA dates had dots
        return digits + ("99991231" if high else "00000101")[len(digits):]
    if vr == "TM":
        return _pad_time(value, high)
    m = re.match(r"[\d.]*", value)
    digits = m.group(0) if m else ""
    day, clock = digits[:8], digits[8:]
    return day + ("99991231" if high else "00000101")[len(day):] + _pad_time(clock, high)


def range_bounds(vr: str, spec: str) -> tuple[str | None, str | None]:
    """The comparable bounds of a DA/TM/DT match value: a range, or a single value at its precision."""
    if vr == "DT":
        parts = _split_dt_range(spec) if not _valid_datetime(spec) else None
    else:
        lo_, sep, hi_ = spec.partition("-")
        parts = (lo_, hi_) if sep else None
    lo, hi = parts if parts else (spec, spec)
    return (comparable(vr, lo, high=False) if lo else None, comparable(vr, hi, high=True) if hi else None)


def check_value(param: str, vr: str, value: str) -> str:
    """Validate one match value for ``vr``; return it normalized (``*`` alone becomes universal '')."""
    if _CONTROL_RE.search(value):
        raise QueryError(param, "control characters and backslashes are not allowed in a value")
    if value == "*" and vr in WILDCARD_VRS:
        return ""
    if vr in ("SQ",) and value:
        raise QueryError(param, "a sequence takes no value; match on an attribute inside it (Sequence.Attribute)")
    if vr in BINARY_VRS and value:
        raise QueryError(param, f"attributes of VR {vr} cannot be matched")
    limit = MAX_LENGTH.get(vr)
    if limit is not None and len(value) > limit:
        raise QueryError(param, f"the value is longer than the {limit} characters {vr} allows")
    if not value:
        return value
    if vr not in WILDCARD_VRS and any(c in value for c in "*?"):
        raise QueryError(param, f"wildcards are not allowed for VR {vr}")
    if vr in RANGE_VRS:
        _check_range_value(param, vr, value)
    elif vr in INT_VRS:
        if not _INT_RE.match(value.strip()):
            raise QueryError(param, f"{value!r} is not an integer")
        low, high = INT_RANGES[vr]
        if not low <= int(value) <= high:
            raise QueryError(param, f"{value} is outside the range of VR {vr} ({low} to {high})")
    elif vr in FLOAT_VRS and not _FLOAT_RE.match(value.strip()):
        raise QueryError(param, f"{value!r} is not a number")
    elif vr == "AS" and not _AS_RE.match(value):
        raise QueryError(param, f"{value!r} is not an age string (nnnD, nnnW, nnnM or nnnY)")
    elif vr == "CS" and not _CS_RE.match(value):
        raise QueryError(param, f"{value!r} is not a code string (upper-case letters, digits, space, underscore)")
    elif vr == "PN" and (value.count("=") > 2 or any(len(g) > 64 for g in value.split("="))):
        raise QueryError(param, "a person name has at most three groups of 64 characters each")
    return value


def _check_uid(param: str, uid: str) -> str:
    uid = uid.strip()
    if not uid or len(uid) > 64 or not _LOOSE_UID_RE.match(uid):
        raise QueryError(param, f"{uid!r} is not a UID (digits and dots, at most 64 characters)")
    return uid


def _flag(param: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    raise QueryError(param, f"must be true or false (got {value!r})")


def _uint(param: str, value: str, *, minimum: int) -> int:
    if not value.strip().isdigit():
        raise QueryError(param, f"must be a whole number of at least {minimum} (got {value!r})")
    number = int(value)
    if number < minimum:
        raise QueryError(param, f"must be at least {minimum} (got {number})")
    return number


# ------------------------------------------------------------------------------------------------


def parse_query(raw: str) -> QidoQuery:
    pairs = split_query(raw)
    grouped: dict[str, list[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)

    def single(name: str) -> str:
        values = grouped[name]
        if len(values) > 1:
            raise QueryError(name, "may be given only once")
        return values[0]

    # Private creators first: private attributes anywhere in the query need them.
    creators: dict[BaseTag, str] = {}
    for name in grouped:
        if _TAG_RE.match(name):
            tag = Tag(int(name, 16))
            if tag.is_private_creator:
                value = single(name).strip()
                if not value:
                    raise QueryError(name, "a Private Creator needs a value")
                creators[tag] = value

    matches: dict[tuple[BaseTag, ...], MatchKey] = {}
    includes: dict[tuple[BaseTag, ...], MatchKey] = {}
    include_all = False
    fuzzy = empty_matching = multi_matching = False
    limit: int | None = None
    offset = 0
    ignored: list[str] = []
    accept: list[str] = []
    charset: list[str] = []

    for name, values in grouped.items():
        if name == "includefield":
            for item in (v.strip() for value in values for v in value.split(",")):
                if not item:
                    continue
                if item == "all":
                    include_all = True
                    continue
                try:
                    path, vr = parse_attribute(item, creators)
                except LookupError:
                    raise QueryError("includefield", f"{item!r} is not an attribute keyword or tag") from None
                except QueryError as exc:
                    raise QueryError("includefield", exc.message) from None
                includes[path] = MatchKey("includefield", path, vr, ())
            if include_all and any(v.strip() != "all" for value in values for v in value.split(",") if v.strip()):
                raise QueryError("includefield", "'all' must stand alone")
        elif name == "fuzzymatching":
            fuzzy = _flag(name, single(name))
        elif name == "emptyvaluematching":
            empty_matching = _flag(name, single(name))
        elif name == "multiplevaluematching":
            multi_matching = _flag(name, single(name))
        elif name == "limit":
            limit = _uint(name, single(name), minimum=1)
        elif name == "offset":
            offset = _uint(name, single(name), minimum=0)
        elif name == "accept":
            accept += [v for value in values for v in value.split(",") if v.strip()]
        elif name == "charset":
            charset += [v.strip() for value in values for v in value.split(",") if v.strip()]
        elif is_attribute_name(name):
            try:
                path, vr = parse_attribute(name, creators)
            except LookupError as exc:
                raise QueryError(name, f"{exc.args[0]!r} is not an attribute keyword or tag") from None
            if path[0] in CONTROL_TAGS:
                ignored.append(name)  # the gateway sets these itself
                continue
            if path in matches:
                raise QueryError(name, "the same attribute is given twice")
            if vr == "UI":
                if any(c in "".join(values) for c in "*?"):
                    raise QueryError(name, "wildcards are not allowed in UIDs")
                pieces = [u for value in values for u in value.split(",")]
                uids = () if pieces == [""] else tuple(_check_uid(name, u) for u in pieces)
                matches[path] = MatchKey(name, path, vr, uids)
            else:
                if len(values) > 1:
                    raise QueryError(name, "takes a single value (only UID attributes take a list)")
                value = check_value(name, vr, values[0])
                matches[path] = MatchKey(name, path, vr, (value,) if value else ())
        else:
            ignored.append(name)

    return QidoQuery(
        matches=tuple(matches.values()),
        includefields=tuple(includes.values()),
        include_all=include_all,
        fuzzy=fuzzy,
        empty_value_matching=empty_matching,
        multiple_value_matching=multi_matching,
        limit=limit,
        offset=offset,
        accept=tuple(accept),
        charset=tuple(charset),
        ignored=tuple(ignored),
    )
