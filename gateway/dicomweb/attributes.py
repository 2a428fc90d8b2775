"""Which attributes belong to which query level, and what each QIDO resource returns by default.

Sources: PS3.18 Tables 10.6.1-5 (required matching) and 10.6.3-3/-4/-5 (default return attributes),
PS3.4 C.6.1.1 / C.6.2.1 (Patient and Study Root keys). An attribute listed at no level is an
instance-level attribute, which is how any other element of the stored objects is reached.
"""

from __future__ import annotations

from enum import IntEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.tag import BaseTag, Tag


class Level(IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3

    @property
    def dimse(self) -> str:
        return self.name


def _tags(*keywords: str) -> frozenset[BaseTag]:
    out = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        assert tag is not None, kw
        out.add(Tag(tag))
    return frozenset(out)


PATIENT_KEYS = _tags(
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "EthnicGroup", "PatientComments", "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances", "PatientSpeciesDescription",
    "PatientBreedDescription", "ResponsiblePerson", "PatientMotherBirthName",
)
STUDY_KEYS = _tags(
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "StudyInstanceUID", "ModalitiesInStudy", "SOPClassesInStudy", "ReferringPhysicianName",
    "StudyDescription", "ProcedureCodeSequence", "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory", "OtherStudyNumbers", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "ReasonForPerformedProcedureCodeSequence",
)
SERIES_KEYS = _tags(
    "Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "SeriesDate", "SeriesTime",
    "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepID", "RequestAttributesSequence",
    "BodyPartExamined", "Laterality", "ProtocolName", "OperatorsName", "PerformingPhysicianName",
    "InstitutionName", "InstitutionalDepartmentName", "StationName", "Manufacturer",
    "ManufacturerModelName", "FrameOfReferenceUID",
)
# Attributes that belong to whichever level is queried.
ANY_LEVEL_KEYS = _tags(
    "SpecificCharacterSet", "TimezoneOffsetFromUTC", "QueryRetrieveLevel", "RetrieveAETitle", "InstanceAvailability"
)

UNIQUE_KEYS = {
    Level.STUDY: Tag(tag_for_keyword("StudyInstanceUID")),
    Level.SERIES: Tag(tag_for_keyword("SeriesInstanceUID")),
    Level.IMAGE: Tag(tag_for_keyword("SOPInstanceUID")),
}


def level_of(tag: BaseTag) -> Level | None:
    """The IE level of a top-level attribute; None for attributes of any level."""
    if tag in ANY_LEVEL_KEYS:
        return None
    if tag in PATIENT_KEYS:
        return Level.PATIENT
    if tag in STUDY_KEYS:
        return Level.STUDY
    if tag in SERIES_KEYS:
        return Level.SERIES
    return Level.IMAGE


def query_level(level: Level | None) -> Level:
    """Study Root has no PATIENT level: patient attributes are keys of STUDY queries."""
    if level is None or level == Level.PATIENT:
        return Level.STUDY
    return level


# Default return attributes (PS3.18 Tables 10.6.3-3, -4, -5), always asked for explicitly because
# several are Optional keys in PS3.4 that a PACS returns only when asked.
STUDY_DEFAULTS = _tags(
    "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
    "ReferringPhysicianName", "TimezoneOffsetFromUTC", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "StudyDescription",
)
SERIES_DEFAULTS = _tags(
    "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
    "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
IMAGE_DEFAULTS = _tags(
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC", "InstanceNumber",
    "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
)
DEFAULTS = {Level.STUDY: STUDY_DEFAULTS, Level.SERIES: SERIES_DEFAULTS, Level.IMAGE: IMAGE_DEFAULTS}

# includefield=all (PS3.18 10.6.3.3): the Optional Keys of PS3.4 C.6.2.1 this gateway asks for.
ALL_EXTRA = {
    Level.STUDY: _tags(
        "StudyDescription", "SOPClassesInStudy", "ProcedureCodeSequence", "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
        "AdditionalPatientHistory", "OtherStudyNumbers", "IssuerOfPatientID", "OtherPatientIDsSequence",
        "PatientBirthTime", "OtherPatientNames", "EthnicGroup", "PatientComments",
        "IssuerOfAccessionNumberSequence",
    ),
    Level.SERIES: _tags(
        "SeriesDate", "SeriesTime", "BodyPartExamined", "Laterality", "ProtocolName", "OperatorsName",
        "PerformingPhysicianName", "InstitutionName", "StationName", "Manufacturer", "PerformedProcedureStepID",
    ),
    Level.IMAGE: _tags(
        "ContentDate", "ContentTime", "AcquisitionDateTime", "ImageType", "SamplesPerPixel",
        "PhotometricInterpretation", "BitsStored", "AvailableTransferSyntaxUID",
    ),
}

# Sequence defaults carry their item keys (Table 10.6.3-4: SPS ID and Requested Procedure ID).
SEQUENCE_DEFAULT_ITEMS = {
    Tag(tag_for_keyword("RequestAttributesSequence")): _tags("ScheduledProcedureStepID", "RequestedProcedureID"),
}


def vr_of(tag: BaseTag) -> str:
    vr = dictionary_VR(tag)
    return {"US or SS": "US", "OB or OW": "OW", "US or OW": "US", "US or SS or OW": "US"}.get(vr, vr)


def keyword_of(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or f"{int(tag):08X}"
