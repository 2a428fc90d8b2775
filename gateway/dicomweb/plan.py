"""From a parsed QIDO query to C-FIND identifiers, and the post-filter for what the PACS ignored (pure).

A QIDO resource targets one level (STUDY, SERIES or IMAGE). Hierarchical C-FIND (PS3.4 C.4.1.2.1)
allows at that level only its own keys plus a single unique key of each level above. When the query
needs more than that:
- a node that accepted relational queries (extended negotiation byte 1) gets one query with all keys;
- any other node gets a fan-out: a query at the highest level that has keys, then one query per match
  at the level below, down to the target, with the parent's attributes merged into each result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

from .attributes import (
    ALL_EXTRA,
    DEFAULTS,
    SEQUENCE_DEFAULT_ITEMS,
    UNIQUE_KEYS,
    Level,
    keyword_of,
    level_of,
    query_level,
    vr_of,
)
from .query import FLOAT_VRS, INT_VRS, MatchKey, QidoQuery, QueryError, comparable, range_bounds

STUDY_UID = UNIQUE_KEYS[Level.STUDY]
SERIES_UID = UNIQUE_KEYS[Level.SERIES]
SOP_UID = UNIQUE_KEYS[Level.IMAGE]
SPECIFIC_CHARACTER_SET = Tag(0x00080005)
QUERY_RETRIEVE_LEVEL = Tag(0x00080052)
RETRIEVE_AE_TITLE = Tag(0x00080054)
RETRIEVE_URL = Tag(0x00081190)

# Date and time attributes matched together when both are ranges (PS3.4 C.2.2.2.5.1).
DATE_TIME_PAIRS = tuple(
    (Tag(d), Tag(t))
    for d, t in (
        (0x00080020, 0x00080030),  # StudyDate, StudyTime
        (0x00080021, 0x00080031),  # SeriesDate, SeriesTime
        (0x00400244, 0x00400245),  # PerformedProcedureStepStartDate/Time
        (0x00080023, 0x00080033),  # ContentDate, ContentTime
    )
)


@dataclass(frozen=True)
class Resource:
    """A QIDO resource: the level it returns and the UIDs in its path."""

    level: Level
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def allowed_levels(self) -> frozenset[Level]:
        """IE levels whose attributes this resource matches and returns (PS3.18 10.6.1.2.1)."""
        levels = {Level.PATIENT}
        if self.study_uid is None:
            levels.add(Level.STUDY)
        if self.level >= Level.SERIES and self.series_uid is None:
            levels.add(Level.SERIES)
        if self.level == Level.IMAGE:
            levels.add(Level.IMAGE)
        return frozenset(levels)

    @property
    def output_levels(self) -> tuple[Level, ...]:
        """The levels whose default attributes each result carries (Tables 10.6.3-3 to -5)."""
        return tuple(
            lv for lv in (Level.STUDY, Level.SERIES, Level.IMAGE)
            if lv == self.level or (lv < self.level and lv in self.allowed_levels)
        )


@dataclass
class Step:
    """One C-FIND level of a plan: the identifier to send (parent UIDs filled in per parent)."""

    level: Level
    identifier: Dataset


@dataclass
class Plan:
    resource: Resource
    steps: list[Step]
    relational_used: bool
    output_tags: list[tuple[BaseTag, frozenset[BaseTag]]]  # (tag, item keys for sequences)
    post_filters: list[MatchKey]
    warnings: list[str] = field(default_factory=list)

    @property
    def fan_out(self) -> bool:
        return len(self.steps) > 1


# ------------------------------------------------------------------------------------------------


def _key_level(key: MatchKey) -> Level | None:
    return level_of(key.tag)


def _element_value(key: MatchKey) -> str | list[str] | None:
    if not key.values:
        return None
    if key.vr == "UI":
        return list(key.values) if len(key.values) > 1 else key.values[0]
    if key.vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return int(key.values[0])  # type: ignore[return-value]
    if key.vr in ("FL", "FD"):
        return float(key.values[0])  # type: ignore[return-value]
    return key.values[0]


def _add_key(ds: Dataset, key: MatchKey, value: object) -> None:
    """Put ``key`` (with ``value`` at its leaf) into ``ds``; sequence paths share one item."""
    target = ds
    for tag in key.path[:-1]:
        if tag not in target or not target[tag].value:
            target.add_new(tag, "SQ", [Dataset()])
        target = target[tag].value[0]
    leaf = key.leaf
    if leaf in target and value in ("", None):
        return  # a return key never overwrites a match value
    target.add_new(leaf, key.vr if key.vr != "UN" else "LO", value)


def _add_return_tag(ds: Dataset, tag: BaseTag) -> None:
    if tag in ds:
        if ds[tag].VR == "SQ" and ds[tag].value:
            item = ds[tag].value[0]
            for sub in SEQUENCE_DEFAULT_ITEMS.get(tag, ()):
                if sub not in item:
                    item.add_new(sub, vr_of(sub), None)
        return
    vr = vr_of(tag)
    if vr == "SQ":
        item = Dataset()
        for sub in SEQUENCE_DEFAULT_ITEMS.get(tag, ()):
            item.add_new(sub, vr_of(sub), None)
        ds.add_new(tag, "SQ", [item] if len(item) else [])
    else:
        ds.add_new(tag, vr, None)


def _needs_charset(keys: list[MatchKey]) -> bool:
    return any(not v.isascii() for k in keys for v in k.values)


def build_plan(
    resource: Resource,
    query: QidoQuery,
    *,
    relational: bool,
    fuzzy_accepted: bool,
    charset: str,
    defaults: bool = True,
) -> Plan:
    """``defaults=False`` asks only for the unique keys and the query's own attributes (a retrieve's
    instance listing needs no more, and a PACS may have to open files for the rest)."""
    warnings: list[str] = []
    allowed = resource.allowed_levels

    matches: list[MatchKey] = []
    out_of_level: list[str] = []
    for key in query.matches:
        lv = _key_level(key)
        if lv is not None and lv not in allowed:
            out_of_level.append(key.param)
            continue
        matches.append(key)
    includes = []
    for key in query.includefields:
        lv = _key_level(key)
        if lv is not None and lv not in allowed:
            out_of_level.append(keyword_of(key.tag))
            continue
        includes.append(key)
    if out_of_level:
        warnings.append(
            "The following attributes do not belong to the levels this resource returns and were ignored: "
            + ", ".join(out_of_level)
        )
    if query.fuzzy and not fuzzy_accepted:
        warnings.append("The fuzzymatching parameter is not supported. Only literal matching has been performed.")
    if query.empty_value_matching:
        warnings.append("The emptyvaluematching parameter is not supported. Empty Value Matching has not been performed.")
    if query.multiple_value_matching:
        warnings.append(
            "The multiplevaluematching parameter is not supported. Multiple Value Matching has not been performed."
        )
    if query.ignored:
        warnings.append("The following parameters are not supported and were ignored: " + ", ".join(query.ignored))

    # Combined date-time ranges are matched here, not by the PACS (we do not negotiate byte 2):
    # the PACS gets the date only; the time becomes a return key and a post-filter.
    by_tag = {m.path: m for m in matches}
    pacs_keys: list[MatchKey] = []
    combined_times: set[BaseTag] = set()
    for d, t in DATE_TIME_PAIRS:
        dk, tk = by_tag.get((d,)), by_tag.get((t,))
        if dk and tk and dk.is_range and tk.is_range:
            combined_times.add(t)
    for key in matches:
        if key.path == (key.tag,) and key.tag in combined_times:
            pacs_keys.append(MatchKey(key.param, key.path, key.vr, ()))
        else:
            pacs_keys.append(key)

    charset_value = charset if _needs_charset(pacs_keys) else None
    if charset_value and charset_value != "ISO_IR 192":
        for key in pacs_keys:
            for value in key.values:
                try:
                    value.encode("latin-1" if charset_value == "ISO_IR 100" else "ascii")
                except UnicodeEncodeError:
                    raise QueryError(key.param, f"the value cannot be sent in the PACS's character set {charset_value}") from None

    # Keys per query level.
    keys_by_level: dict[Level, list[MatchKey]] = {Level.STUDY: [], Level.SERIES: [], Level.IMAGE: []}
    target = resource.level
    for key in pacs_keys:
        keys_by_level[_step_level(_key_level(key), target)].append(key)
    path_uids = {Level.STUDY: resource.study_uid, Level.SERIES: resource.series_uid}

    # Which levels above the target constrain the query beyond a single unique key?

    def constrains(level: Level) -> bool:
        """True when a hierarchical query below ``level`` cannot express the keys of ``level``."""
        keys = [k for k in keys_by_level[level] if k.values]
        if any(k.path != (UNIQUE_KEYS[level],) for k in keys):
            return True
        if path_uids.get(level):
            return False
        uid_key = next((k for k in keys if k.path == (UNIQUE_KEYS[level],)), None)
        return uid_key is None or len(uid_key.values) != 1

    upper = [lv for lv in (Level.STUDY, Level.SERIES) if lv < target]
    # A level above the target takes part when it has keys a hierarchical query cannot carry, or when
    # the results must carry its attributes (/series and /instances return study attributes too).
    wanted_upper = {_step_level(_key_level(k), target) for k in includes}
    constraining = [lv for lv in upper if constrains(lv) or lv in resource.output_levels or lv in wanted_upper]
    use_relational = relational and bool(constraining)
    first = target if use_relational or not constraining else constraining[0]
    # Levels between the first and the target that are fixed by a path UID and add nothing are skipped.
    step_levels = [lv for lv in (Level.STUDY, Level.SERIES, Level.IMAGE)
                   if lv == target or (first <= lv < target and (lv in constraining or not path_uids.get(lv)))]

    output_tags = _output_tags(resource, includes, matches, query.include_all, defaults)

    steps: list[Step] = []
    for level in step_levels:
        ds = Dataset()
        if charset_value:
            ds.SpecificCharacterSet = charset_value
        ds.QueryRetrieveLevel = level.name
        # unique keys from the path, for this level and the ones above it
        for lv, uid in path_uids.items():
            if uid and lv <= level:
                ds.add_new(UNIQUE_KEYS[lv], "UI", uid)
        levels_here = [lv for lv in (Level.STUDY, Level.SERIES, Level.IMAGE) if lv <= level] if use_relational else [level]
        for lv in levels_here:
            for key in keys_by_level[lv]:
                if lv in path_uids and path_uids[lv] and key.path == (UNIQUE_KEYS[lv],):
                    continue
                _add_key(ds, key, _element_value(key))
        for lv in levels_here:
            _add_key_silently(ds, UNIQUE_KEYS[lv])
        for tag, _items in output_tags:
            if _step_level(level_of(tag), target) in levels_here:
                _add_return_tag(ds, tag)
        for key in includes:
            if _step_level(_key_level(key), target) in levels_here:
                _add_key(ds, key, None)
        for lv in (Level.STUDY, Level.SERIES):
            if lv < level:
                _add_key_silently(ds, UNIQUE_KEYS[lv])
        steps.append(Step(level, ds))

    post_filters = [k for k in matches if k.values and not (query.fuzzy and fuzzy_accepted and k.vr == "PN")]
    return Plan(resource, steps, use_relational, output_tags, post_filters, warnings)


def _step_level(level: Level | None, target: Level) -> Level:
    """The C-FIND level that carries an attribute of ``level`` (None: any level, so the target's)."""
    return target if level is None else query_level(level)


def _add_key_silently(ds: Dataset, tag: BaseTag) -> None:
    if tag not in ds:
        ds.add_new(tag, vr_of(tag), None)


def _output_tags(
    resource: Resource, includes: list[MatchKey], matches: list[MatchKey], include_all: bool, defaults: bool
) -> list[tuple[BaseTag, frozenset[BaseTag]]]:
    tags: dict[BaseTag, set[BaseTag]] = {}
    for level in resource.output_levels if defaults else ():
        for tag in DEFAULTS[level]:
            tags.setdefault(tag, set(SEQUENCE_DEFAULT_ITEMS.get(tag, ())))
        if include_all:
            for tag in ALL_EXTRA[level]:
                tags.setdefault(tag, set())
    for key in [*includes, *matches]:
        items = tags.setdefault(key.tag, set())
        if len(key.path) > 1:
            items.add(key.path[1])
    for level in (Level.STUDY, Level.SERIES, Level.IMAGE):
        if level <= resource.level:
            tags.setdefault(UNIQUE_KEYS[level], set())
    return sorted(((t, frozenset(i)) for t, i in tags.items()), key=lambda x: x[0])


# ------------------------------------------------------------------------------------------------
# Post-filtering: the gateway's own matching of results against the query.


def first_value(ds: Dataset, tag: int) -> str | None:
    """The first value of ``tag`` as text (the first of a MultiValue), or None when absent or empty."""
    if tag in ds and ds[tag].value:
        value = ds[tag].value
        return str(value if isinstance(value, str) else value[0]).strip()
    return None


def _values_at(ds: Dataset, path: tuple[BaseTag, ...]) -> list[object] | None:
    """All values at ``path`` (through every sequence item); None when the attribute is absent."""
    if path[0] not in ds:
        return None
    elem = ds[path[0]]
    if len(path) == 1:
        value = elem.value
        if value is None or value == "":
            return []
        if isinstance(value, (list, MultiValue)):
            return [v for v in value if v not in (None, "")]
        return [value]
    if elem.VR != "SQ":
        return None
    found: list[object] = []
    seen = False
    for item in elem.value or []:
        sub = _values_at(item, path[1:])
        if sub is not None:
            seen = True
            found += sub
    return found if seen else None


def _wildcard_re(pattern: str, casefold: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if casefold else 0))


def _pn_groups(value: object) -> list[str]:
    if isinstance(value, PersonName):
        groups = [value.alphabetic, value.ideographic, value.phonetic]
    else:
        groups = (str(value).split("=") + ["", ""])[:3]
    return [g.rstrip("^ ") for g in groups]


def _pn_matches(spec: str, value: object) -> bool:
    """Case-insensitive; a one-group query matches any group, a query with groups matches group-wise."""
    stored = _pn_groups(value)
    wanted = spec.split("=")
    if len(wanted) == 1:
        return any(g and _wildcard_re(spec, True).fullmatch(g) for g in stored)
    return all(not w or _wildcard_re(w.rstrip("^ "), True).fullmatch(g) for w, g in zip(wanted, stored))


def _in_range(vr: str, stored: str, spec: str) -> bool:
    lo, hi = range_bounds(vr, spec)
    low_value, high_value = comparable(vr, stored, high=False), comparable(vr, stored, high=True)
    return (lo is None or high_value >= lo) and (hi is None or low_value <= hi)


def value_matches(key: MatchKey, value: object) -> bool:
    if not key.values:
        return True  # universal
    spec = key.values[0]
    if key.vr == "UI":
        return str(value).strip() in key.values
    if key.vr == "PN":
        return _pn_matches(spec, value)
    if key.vr in ("DA", "TM", "DT"):
        return _in_range(key.vr, str(value), spec)
    if key.vr in INT_VRS:
        try:
            return int(str(value).strip()) == int(spec)
        except ValueError:
            return False
    if key.vr in FLOAT_VRS:
        try:
            return float(str(value).strip()) == float(spec)
        except ValueError:
            return False
    if key.is_wildcard:
        return bool(_wildcard_re(spec, False).fullmatch(str(value).rstrip(" ")))
    return str(value).rstrip(" ") == spec


def _combined_match(ds: Dataset, date_key: MatchKey, time_key: MatchKey) -> bool | None:
    """StudyDate+StudyTime ranges as one date-time range (PS3.4 C.2.2.2.5.1); None if unknowable."""
    dates, times = _values_at(ds, date_key.path), _values_at(ds, time_key.path)
    if not dates:
        return None
    if not times:
        # without the time only the date can be checked; a date outside the range fails anyway
        return None if _in_range("DA", str(dates[0]), date_key.values[0]) else False
    day_lo, _, day_hi = date_key.values[0].partition("-")
    time_lo, _, time_hi = time_key.values[0].partition("-")
    stored = comparable("DA", str(dates[0]), high=False) + comparable("TM", str(times[0]), high=False)
    low = comparable("DA", day_lo, high=False) + comparable("TM", time_lo, high=False) if day_lo else ""
    high = comparable("DA", day_hi, high=True) + comparable("TM", time_hi, high=True) if day_hi else ""
    return (not low or stored >= low) and (not high or stored <= high)


@dataclass
class FilterOutcome:
    keep: bool
    unverified: list[str]


def post_filter(ds: Dataset, filters: list[MatchKey]) -> FilterOutcome:
    """Does ``ds`` match every filter? Attributes the PACS did not return cannot be checked: they are
    kept and reported, so the caller can warn that the node could not apply that filter."""
    unverified: list[str] = []
    by_path = {k.path: k for k in filters}
    handled: set[tuple[BaseTag, ...]] = set()
    for d, t in DATE_TIME_PAIRS:
        dk, tk = by_path.get((d,)), by_path.get((t,))
        if dk and tk and dk.is_range and tk.is_range:
            handled |= {(d,), (t,)}
            result = _combined_match(ds, dk, tk)
            if result is None:
                unverified.append(f"{dk.param}+{tk.param}")
            elif not result:
                return FilterOutcome(False, unverified)
    for key in filters:
        if key.path in handled:
            continue
        values = _values_at(ds, key.path)
        if values is None:
            unverified.append(key.param)
            continue
        if not values:
            continue  # returned empty: the PACS matched it or could not; nothing to compare
        if not any(value_matches(key, v) for v in values):
            return FilterOutcome(False, unverified)
    return FilterOutcome(True, unverified)
