"""C-FIND attribute matching of the demo PACS, written from DICOM PS3.4 C.2.2.2.

This module is deliberately independent of the gateway's own query code
(``gateway.dicomweb`` and ``gateway.dimse``): the demo PACS must not agree
with the gateway by construction.

Implemented matching types:

* single value matching: exact and case-sensitive, except PN which is
  compared case-insensitively; leading and trailing spaces are not
  significant except for LT, ST, UT and UC;
* wildcard matching with ``*`` and ``?`` for AE, CS, LO, LT, PN, SH, ST, UC,
  UR and UT; a value of ``*`` alone is universal matching;
* list matching: a request value with several (backslash-separated) values
  matches if any of them matches (PS3.4 defines this for UI; the demo PACS
  accepts it for every VR);
* universal matching: an empty key matches everything and only asks for the
  value to be returned;
* range matching for DA, TM and DT (``a-b``, ``-b``, ``a-``, inclusive); a
  single DA/TM/DT value is the range from that value to itself at its own
  precision (``1030`` covers 10:30:00 to 10:30:59.999999);
* sequence matching: a request item with keys matches when one stored item
  matches all of them; an empty sequence or an empty item is universal;
* a stored multi-valued attribute matches when any of its values matches;
  an empty or absent stored value never matches a non-universal key.

PN values with component groups (``alphabetic=ideographic=phonetic``): a
request value without ``=`` may match any one group; a request value with
``=`` is compared group by group, empty request groups matching anything.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"DS", "FD", "FL", "IS", "SL", "SS", "SV", "UL", "US", "UV"})
_SPACE_SIGNIFICANT_VRS = frozenset({"LT", "ST", "UT", "UC"})

LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
#: Attributes qualifying the request itself, never matched (a Timezone Offset
#: From UTC in the request is not supported and is ignored).
CONTROL_KEYWORDS = frozenset(
    {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC"}
)
#: Attributes defined at every query level (key_level() cannot place them).
LEVEL_INDEPENDENT_KEYWORDS = frozenset({"InstanceAvailability"})

# Levels of the attributes of the Patient, Study and Series levels, after
# PS3.4 tables C.6-1, C.6-2, C.6-3, C.6-5 and C.6-6; everything else
# (including private attributes) belongs to the IMAGE level.
_PATIENT_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientBirthName",
        "PatientMotherBirthName",
        "EthnicGroup",
        "PatientComments",
        "PatientSpeciesDescription",
        "PatientBreedDescription",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "PatientIdentityRemoved",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    }
)
_STUDY_KEYWORDS = frozenset(
    {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyID",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "AnatomicRegionsInStudyCodeSequence",
        "ReferringPhysicianName",
        "ReferringPhysicianIdentificationSequence",
        "StudyDescription",
        "ProcedureCodeSequence",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
        "ReferencedStudySequence",
        "ReferencedPatientSequence",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "Occupation",
        "AdditionalPatientHistory",
        "OtherStudyNumbers",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "InterpretationAuthor",
        "IssuerOfAdmissionIDSequence",
        "AdmissionID",
        "ReasonForVisit",
        "StudyStatusID",
    }
)
_SERIES_KEYWORDS = frozenset(
    {
        "Modality",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "Laterality",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedProcedureStepID",
        "PerformedProcedureStepDescription",
        "RequestAttributesSequence",
        "ProtocolName",
        "OperatorsName",
        "PerformingPhysicianName",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "StationName",
        "Manufacturer",
        "ManufacturerModelName",
        "PatientPosition",
        "FrameOfReferenceUID",
    }
)

_DT_PATTERN = r"\d{4}(?:\d{2}){0,5}(?:\.\d{1,6})?(?:[+-]\d{4})?"


def key_level(tag: BaseTag | int) -> str:
    """Return the query level ("PATIENT" ... "IMAGE") an attribute belongs to."""
    keyword = keyword_for_tag(Tag(tag))
    if keyword in _PATIENT_KEYWORDS:
        return "PATIENT"
    if keyword in _STUDY_KEYWORDS:
        return "STUDY"
    if keyword in _SERIES_KEYWORDS:
        return "SERIES"
    return "IMAGE"


def is_universal(key: DataElement) -> bool:
    """True when `key` asks for universal matching (empty, or ``*`` for wildcard VRs)."""
    if key.VR == "SQ":
        # an item whose keys are all universal asks only for the sequence's contents (C.2.2.2.6)
        return not key.value or all(all(is_universal(sub) for sub in item) for item in key.value)
    values = _values(key)
    if not values:
        return True
    return key.VR in WILDCARD_VRS and all(value == "*" for value in values)


def matches(stored: Dataset, key: DataElement) -> bool:
    """True when the record `stored` matches the request attribute `key`."""
    if is_universal(key):
        return True
    element = stored.get(key.tag)
    if key.VR == "SQ":
        return bool(_matching_items(element, key))
    stored_values = _values(element)
    if not stored_values:
        return False
    vr = element.VR if element is not None and key.VR in ("UN", "") else key.VR
    return any(_match_value(vr, wanted, value) for wanted in _values(key) for value in stored_values)


def build_response(
    stored: Dataset,
    identifier: Dataset,
    level: str,
    retrieve_ae_title: str | None = None,
) -> Dataset:
    """Return the C-FIND response identifier for the matching record `stored`.

    The requested return keys are copied from the record (the matching items
    only, for a sequence key with keys); keys the record does not have are
    returned empty.  QueryRetrieveLevel is always set, SpecificCharacterSet
    when the record has one, and RetrieveAETitle when `retrieve_ae_title` is
    given.
    """
    response = Dataset()
    charset = stored.get("SpecificCharacterSet")
    if charset:
        response.SpecificCharacterSet = copy.deepcopy(charset)
    response.QueryRetrieveLevel = level
    if retrieve_ae_title:
        response.RetrieveAETitle = retrieve_ae_title
    _copy_keys(stored, identifier, response, skip_control=True)
    return response


def _copy_keys(stored: Dataset, request: Dataset, target: Dataset, *, skip_control: bool) -> None:
    for key in request:
        if key.tag.element == 0 or (skip_control and key.keyword in CONTROL_KEYWORDS):
            continue
        element = stored.get(key.tag)
        if element is None:
            target.add(DataElement(key.tag, key.VR, [] if key.VR == "SQ" else None))
        elif key.VR == "SQ" and element.VR == "SQ" and not is_universal(key):
            items = []
            for item in _matching_items(element, key):
                projected = Dataset()
                _copy_keys(item, key.value[0], projected, skip_control=False)
                items.append(projected)
            target.add(DataElement(key.tag, "SQ", Sequence(items)))
        else:
            target.add(copy.deepcopy(element))


def _matching_items(element: DataElement | None, key: DataElement) -> list[Dataset]:
    if element is None or element.VR != "SQ" or not element.value:
        return []
    wanted_items = [item for item in key.value if len(item)]
    return [
        item
        for item in element.value
        if any(all(matches(item, sub_key) for sub_key in wanted) for wanted in wanted_items)
    ]


def _values(element: DataElement | None) -> list[str | bytes]:
    if element is None or element.is_empty:
        return []
    value = element.value
    items: Iterable[object] = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    result: list[str | bytes] = []
    for item in items:
        if isinstance(item, bytes):
            result.append(item)
        elif item is not None and str(item) != "":
            result.append(str(item))
    return result


def _match_value(vr: str, wanted: str | bytes, value: str | bytes) -> bool:
    if isinstance(wanted, bytes) or isinstance(value, bytes):
        return wanted == value
    if vr not in _SPACE_SIGNIFICANT_VRS:
        wanted, value = wanted.strip(" "), value.strip(" ")
    if vr in RANGE_VRS:
        return _match_range(vr, wanted, value)
    if vr == "PN":
        return _match_person_name(wanted, value)
    if vr in WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        return _wildcard(wanted).fullmatch(value) is not None
    if vr in NUMERIC_VRS:
        try:
            return float(wanted) == float(value)
        except ValueError:
            return wanted == value
    return wanted == value


def _match_person_name(wanted: str, value: str) -> bool:
    stored_groups = [group.rstrip("^") for group in value.casefold().split("=")]
    wanted = wanted.casefold()
    if "=" not in wanted:
        return any(_match_text(wanted.rstrip("^"), group) for group in stored_groups)
    wanted_groups = [group.rstrip("^") for group in wanted.split("=")]
    stored_groups += [""] * (len(wanted_groups) - len(stored_groups))
    return all(
        not group or _match_text(group, stored_groups[index]) for index, group in enumerate(wanted_groups)
    )


def _match_text(wanted: str, value: str) -> bool:
    if "*" in wanted or "?" in wanted:
        return _wildcard(wanted).fullmatch(value) is not None
    return wanted == value


def _wildcard(pattern: str) -> re.Pattern[str]:
    parts = (".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _match_range(vr: str, wanted: str, value: str) -> bool:
    try:
        lower, upper = _split_range(vr, wanted)
        stored = _normalise(vr, value, upper=False)
        if lower is not None and stored < _normalise(vr, lower, upper=False):
            return False
        return upper is None or stored <= _normalise(vr, upper, upper=True)
    except ValueError:
        return False


def _split_range(vr: str, wanted: str) -> tuple[str | None, str | None]:
    if vr == "DT":
        if re.fullmatch(_DT_PATTERN, wanted):
            return wanted, wanted
        found = re.fullmatch(f"({_DT_PATTERN})?-({_DT_PATTERN})?", wanted)
        if found is None:
            raise ValueError(f"invalid DT range {wanted!r}")
        lower, upper = found.groups()
    elif "-" in wanted:
        lower, upper = wanted.split("-", 1)
    else:
        return wanted, wanted
    if not lower and not upper:
        raise ValueError("empty range")
    return lower or None, upper or None


def _normalise(vr: str, value: str, *, upper: bool) -> str:
    """Fixed-width comparable form of a DA, TM or DT value, padded as a bound."""
    if vr == "DA":
        digits = value.replace(".", "")
        if not re.fullmatch(r"\d{8}", digits):
            raise ValueError(f"invalid DA {value!r}")
        return digits
    if vr == "TM":
        return _pad_digits(value.replace(":", ""), ("00", "00"), ("59", "59"), upper, 2)
    found = re.fullmatch(r"(\d{4}(?:\d{2}){0,5}(?:\.\d{1,6})?)([+-]\d{4})?", value)
    if found is None:
        raise ValueError(f"invalid DT {value!r}")
    lows = ("01", "01", "00", "00", "00")
    highs = ("12", "31", "23", "59", "59")
    return _pad_digits(found.group(1), lows, highs, upper, 4)


def _pad_digits(value: str, lows: tuple[str, ...], highs: tuple[str, ...], upper: bool, head: int) -> str:
    whole, _, fraction = value.partition(".")
    if not re.fullmatch(r"\d+", whole) or len(whole) < head or (len(whole) - head) % 2:
        raise ValueError(f"invalid date/time {value!r}")
    if fraction and not re.fullmatch(r"\d{1,6}", fraction):
        raise ValueError(f"invalid fraction in {value!r}")
    present = (len(whole) - head) // 2
    if present > len(lows):
        raise ValueError(f"invalid date/time {value!r}")
    padding = highs if upper else lows
    whole += "".join(padding[present:])
    fraction = fraction.ljust(6, "9" if upper else "0")
    return f"{whole}.{fraction}"
