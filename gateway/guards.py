"""Per-node guards against searches too broad for the PACS behind them (pure: no I/O).

Some PACSes answer a search on a whole archive, or on ``PatientName=A*``, by scanning everything,
and every other user waits. Per node, the settings say what a search must narrow it by:

- ``required_keys``: groups of attribute keywords, ``"PatientID|StudyDate|AccessionNumber"``; a
  search must give a value to at least one keyword of every group. A search scoped to a study by
  its URL, or matching on a Study, Series or SOP Instance UID, is as narrow as a search gets and
  passes every group.
- ``min_wildcard_chars``: a value with ``*`` or ``?`` needs at least that many characters before
  the first wildcard (spaces and the person-name separators ``^`` and ``=`` do not count), so
  ``SMI*`` passes 3 and ``A*`` or ``*SMITH`` does not. ``*`` alone is no condition at all (it is
  the same as leaving the key out) and is left to ``required_keys``.

A refusal is a 400 that names the rule, before any C-FIND.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from .config import NodeSettings
from .dicomweb.query import MatchKey, QidoQuery

UNIQUE_KEYS = frozenset(Tag(t) for t in (0x0020000D, 0x0020000E, 0x00080018))  # Study, Series, SOP Instance UID
_NOT_COUNTED = frozenset(" ^=")
_WILDCARDS = "*?"


class Refusal(Exception):
    """A search the node's guards refuse: ``rule`` is the setting, ``parameter`` the key at fault."""

    def __init__(self, rule: str, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.parameter = parameter


def parse_required_keys(groups: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """``["PatientID|StudyDate", "Modality"]`` -> ``(("PatientID", "StudyDate"), ("Modality",))``;
    ValueError naming the first keyword that is not a DICOM attribute keyword."""
    out = []
    for group in groups:
        keywords = tuple(k.strip() for k in group.split("|"))
        if not group.strip() or any(not k for k in keywords):
            raise ValueError(f"{group!r}: each group is one or more attribute keywords joined by '|'")
        for keyword in keywords:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM attribute keyword")
        out.append(keywords)
    return tuple(out)


def _literal_prefix(value: str) -> int:
    """Characters before the first wildcard, not counting spaces and ``^`` / ``=``."""
    count = 0
    for c in value:
        if c in _WILDCARDS:
            break
        if c not in _NOT_COUNTED:
            count += 1
    return count


def _narrows(key: MatchKey) -> bool:
    """The key holds a value that is more than wildcards and separators."""
    return any(any(c not in _WILDCARDS and c not in _NOT_COUNTED for c in v) for v in key.values)


def check_search(query: QidoQuery, scoped_to_study: bool, node: str, required: tuple[tuple[str, ...], ...],
                 min_wildcard_chars: int) -> None:
    """Raise ``Refusal`` when the search breaks one of the node's guards."""
    if min_wildcard_chars:
        for key in query.matches:
            # a value of wildcards alone is as broad as leaving the key out: that is required_keys' business
            if key.is_wildcard and _narrows(key) and _literal_prefix(key.values[0]) < min_wildcard_chars:
                raise Refusal(
                    "min_wildcard_chars",
                    f"node {node!r} needs at least {min_wildcard_chars} characters before a wildcard "
                    f"(nodes.min_wildcard_chars)", key.param)
    if not required:
        return
    top_level = {key.path[0] for key in query.matches if len(key.path) == 1 and _narrows(key)}
    if scoped_to_study or top_level & UNIQUE_KEYS:
        return
    for group in required:
        if not any(Tag(tag_for_keyword(k)) in top_level for k in group):
            raise Refusal(
                "required_keys",
                f"node {node!r} needs a search to give a value to {_one_of(group)} (nodes.required_keys)")


def _one_of(group: tuple[str, ...]) -> str:
    return group[0] if len(group) == 1 else "one of " + ", ".join(group)


def guard_search(query: QidoQuery, scoped_to_study: bool, node: NodeSettings) -> None:
    """The node's guards on a parsed search; ``Refusal`` when it breaks one."""
    if node.required_keys or node.min_wildcard_chars:
        check_search(query, scoped_to_study, node.name, _required_keys(tuple(node.required_keys)),
                     node.min_wildcard_chars)


@lru_cache(maxsize=64)
def _required_keys(groups: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """``parse_required_keys`` once per node setting, not on every search."""
    return parse_required_keys(groups)
