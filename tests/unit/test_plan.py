"""From parsed QIDO queries to C-FIND identifiers (PS3.4 C.4.1, C.6; PS3.18 10.6), and the post-filter."""

from __future__ import annotations

import warnings

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from gateway.dicomweb.attributes import Level, level_of
from gateway.dicomweb.plan import Plan, Resource, build_plan, post_filter, value_matches
from gateway.dicomweb.query import QueryError, parse_query

S = "1.2.826.0.1.3680043.8.498.1"
SE = "1.2.826.0.1.3680043.8.498.2"

RESOURCES = {
    "/studies": Resource(Level.STUDY),
    "/studies/{s}/series": Resource(Level.SERIES, S),
    "/studies/{s}/series/{se}/instances": Resource(Level.IMAGE, S, SE),
    "/studies/{s}/instances": Resource(Level.IMAGE, S),
    "/series": Resource(Level.SERIES),
    "/instances": Resource(Level.IMAGE),
}

# Steps without any match key (PS3.18 Table 10.6.1-1; checklist section 1 "Hierarchical vs relational").
EXPECTED_LEVELS = {
    # resource: (hierarchical, relational)
    "/studies": ([Level.STUDY], [Level.STUDY]),
    "/studies/{s}/series": ([Level.SERIES], [Level.SERIES]),
    "/studies/{s}/series/{se}/instances": ([Level.IMAGE], [Level.IMAGE]),
    "/studies/{s}/instances": ([Level.SERIES, Level.IMAGE], [Level.IMAGE]),
    "/series": ([Level.STUDY, Level.SERIES], [Level.SERIES]),
    "/instances": ([Level.STUDY, Level.SERIES, Level.IMAGE], [Level.IMAGE]),
}

# Default return attributes, written out from PS3.18 Tables 10.6.3-3/-4/-5 (RetrieveURL is built by the
# gateway, never asked of the PACS).
STUDY_DEFAULTS = {
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
}
SERIES_DEFAULTS = {
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
}
IMAGE_DEFAULTS = {
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
}
# Levels whose default attributes each resource's results carry (Tables 10.6.3-3 to -5).
OUTPUT_DEFAULTS = {
    "/studies": STUDY_DEFAULTS,
    "/studies/{s}/series": SERIES_DEFAULTS,
    "/studies/{s}/series/{se}/instances": IMAGE_DEFAULTS,
    "/studies/{s}/instances": SERIES_DEFAULTS | IMAGE_DEFAULTS,
    "/series": STUDY_DEFAULTS | SERIES_DEFAULTS,
    "/instances": STUDY_DEFAULTS | SERIES_DEFAULTS | IMAGE_DEFAULTS,
}
SERIES_ONLY = {
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "RequestAttributesSequence",
    "PerformedProcedureStepStartDate",
}
IMAGE_ONLY = {"SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"}
STUDY_ONLY = {
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
}
ANY_LEVEL = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "InstanceAvailability"}

FUZZY_WARNING = "The fuzzymatching parameter is not supported. Only literal matching has been performed."
EMPTY_WARNING = "The emptyvaluematching parameter is not supported. Empty Value Matching has not been performed."
MULTIPLE_WARNING = (
    "The multiplevaluematching parameter is not supported. Multiple Value Matching has not been performed."
)


def T(keyword: str) -> Tag:
    return Tag(tag_for_keyword(keyword))


def make(
    raw: str,
    resource: str | Resource = "/studies",
    *,
    relational: bool = False,
    fuzzy_accepted: bool = False,
    charset: str = "ISO_IR 192",
) -> Plan:
    res = RESOURCES[resource] if isinstance(resource, str) else resource
    return build_plan(res, parse_query(raw), relational=relational, fuzzy_accepted=fuzzy_accepted, charset=charset)


def keywords(ds: Dataset) -> set[str]:
    return {elem.keyword for elem in ds}


def step(plan: Plan, level: Level) -> Dataset:
    found = [s.identifier for s in plan.steps if s.level == level]
    assert len(found) == 1, [s.level for s in plan.steps]
    return found[0]


def value(ds: Dataset, keyword: str):
    assert keyword in ds, f"{keyword} missing from {sorted(keywords(ds))}"
    return ds[T(keyword)].value


def is_empty(ds: Dataset, keyword: str) -> bool:
    return value(ds, keyword) in (None, "", [])


def data(**attrs) -> Dataset:
    """A C-FIND response; PACS data may be sloppy (padded UIDs, TM with colons), so no pydicom warnings."""
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, val in attrs.items():
            setattr(ds, keyword, val)
    return ds


def keep(raw: str, ds: Dataset) -> bool:
    return post_filter(ds, list(parse_query(raw).matches)).keep


def outcome(raw: str, ds: Dataset):
    return post_filter(ds, list(parse_query(raw).matches))


ALL_RESOURCES = list(RESOURCES)
BOTH_MODES = [pytest.param(False, id="hierarchical"), pytest.param(True, id="relational")]


# ------------------------------------------------------------------------------------------------
# The steps of each resource, without match keys


class TestStepsPerResource:
    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_levels(self, resource, relational):
        plan = make("", resource, relational=relational)
        hierarchical, relational_levels = EXPECTED_LEVELS[resource]
        assert [s.level for s in plan.steps] == (relational_levels if relational else hierarchical)
        assert plan.fan_out == (len(plan.steps) > 1)
        assert plan.resource == RESOURCES[resource]

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_query_retrieve_level_per_step(self, resource, relational):
        for s in make("", resource, relational=relational).steps:
            assert value(s.identifier, "QueryRetrieveLevel") == s.level.name

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_path_uids_in_every_step(self, resource, relational):
        res = RESOURCES[resource]
        for s in make("", resource, relational=relational).steps:
            if res.study_uid:
                assert value(s.identifier, "StudyInstanceUID") == S
            if res.series_uid and s.level >= Level.SERIES:
                assert value(s.identifier, "SeriesInstanceUID") == SE

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_unique_keys_of_own_and_upper_levels_are_requested(self, resource, relational):
        uid_kw = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
        for s in make("", resource, relational=relational).steps:
            for lv in (Level.STUDY, Level.SERIES, Level.IMAGE):
                if lv <= s.level:
                    assert uid_kw[lv] in s.identifier, (s.level, uid_kw[lv])

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_unknown_parent_uids_are_empty_return_keys(self, resource, relational):
        # a fan-out step's parent UID is filled in per parent; the step itself holds an empty key
        plan = make("", resource, relational=relational)
        res = RESOURCES[resource]
        for s in plan.steps[1:]:
            if not res.study_uid:
                assert is_empty(s.identifier, "StudyInstanceUID")
            if not res.series_uid and s.level == Level.IMAGE:
                assert is_empty(s.identifier, "SeriesInstanceUID")

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_default_attributes_are_requested(self, resource, relational):
        plan = make("", resource, relational=relational)
        requested = set().union(*(keywords(s.identifier) for s in plan.steps))
        expected = set(OUTPUT_DEFAULTS[resource])
        if resource in ("/studies/{s}/series/{se}/instances", "/studies/{s}/instances"):
            expected.discard("InstanceAvailability")  # see test_image_step_requests_instance_availability
        missing = expected - requested
        assert not missing, missing

    @pytest.mark.parametrize(
        "resource,relational",
        [
            ("/studies/{s}/series/{se}/instances", False),
            ("/studies/{s}/series/{se}/instances", True),
            ("/studies/{s}/instances", False),
            ("/instances", False),
        ],
    )
    def test_image_step_requests_instance_availability(self, resource, relational):
        plan = make("", resource, relational=relational)
        assert "InstanceAvailability" in step(plan, Level.IMAGE)

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_return_keys_are_empty(self, resource, relational):
        res = RESOURCES[resource]
        path_uids = {"StudyInstanceUID": res.study_uid, "SeriesInstanceUID": res.series_uid}
        for s in make("", resource, relational=relational).steps:
            for elem in s.identifier:
                if elem.keyword == "QueryRetrieveLevel" or path_uids.get(elem.keyword):
                    continue
                if elem.VR == "SQ":
                    assert all(all(sub.value in (None, "") for sub in item) for item in elem.value)
                else:
                    assert elem.value in (None, ""), elem

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_gateway_attributes_are_never_asked_of_the_pacs(self, resource, relational):
        for s in make("includefield=all", resource, relational=relational).steps:
            assert "RetrieveURL" not in s.identifier
            assert "RetrieveAETitle" not in s.identifier
            assert "SpecificCharacterSet" not in s.identifier  # ASCII query

    @pytest.mark.parametrize("resource", ["/studies/{s}/series", "/series", "/studies/{s}/instances", "/instances"])
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_request_attributes_sequence_item_keys(self, resource, relational):
        plan = make("", resource, relational=relational)
        target = next(s.identifier for s in plan.steps if "RequestAttributesSequence" in s.identifier)
        items = value(target, "RequestAttributesSequence")
        assert len(items) == 1
        assert keywords(items[0]) == {"ScheduledProcedureStepID", "RequestedProcedureID"}
        assert all(e.value in (None, "") for e in items[0])

    def test_study_step_holds_no_lower_level_keys(self):
        ident = step(make("includefield=all"), Level.STUDY)
        assert not keywords(ident) & (SERIES_ONLY | IMAGE_ONLY)

    def test_series_step_of_a_study_holds_no_study_or_image_keys(self):
        ident = step(make("includefield=all", "/studies/{s}/series"), Level.SERIES)
        assert not keywords(ident) & (STUDY_ONLY | IMAGE_ONLY)

    @pytest.mark.parametrize("resource", ["/series", "/instances", "/studies/{s}/instances"])
    def test_hierarchical_steps_only_hold_their_own_level(self, resource):
        plan = make("PatientID=P1&StudyDate=20200101&Modality=CT&InstanceNumber=3&includefield=all", resource)
        allowed_by_level = {
            Level.STUDY: {Level.PATIENT, Level.STUDY},
            Level.SERIES: {Level.SERIES},
            Level.IMAGE: {Level.IMAGE},
        }
        uid_kw = {"StudyInstanceUID": Level.STUDY, "SeriesInstanceUID": Level.SERIES}
        for s in plan.steps:
            for elem in s.identifier:
                if elem.keyword in ANY_LEVEL or level_of(elem.tag) is None:
                    continue  # attributes of every level (PS3.4 C.6)
                if elem.keyword in uid_kw:
                    assert uid_kw[elem.keyword] <= s.level
                    continue
                assert level_of(elem.tag) in allowed_by_level[s.level], (s.level, elem.keyword)


# ------------------------------------------------------------------------------------------------
# Match values in identifiers, fan-out and relational queries


class TestMatchKeys:
    def test_study_keys_in_study_query(self):
        ident = step(
            make("PatientName=Doe*&StudyDate=20200101-20200131&AccessionNumber=A1&ModalitiesInStudy=CT"), Level.STUDY
        )
        assert str(value(ident, "PatientName")) == "Doe*"
        assert value(ident, "StudyDate") == "20200101-20200131"
        assert value(ident, "AccessionNumber") == "A1"
        assert value(ident, "ModalitiesInStudy") == "CT"

    def test_uid_list_is_multi_valued(self):
        ident = step(make("StudyInstanceUID=1.2,1.3"), Level.STUDY)
        uids = value(ident, "StudyInstanceUID")
        assert isinstance(uids, MultiValue) and list(uids) == ["1.2", "1.3"]

    def test_uid_list_at_the_target_level_needs_no_fan_out(self):
        plan = make("SeriesInstanceUID=1.5,1.6", "/studies/{s}/series")
        assert [s.level for s in plan.steps] == [Level.SERIES]
        assert list(value(plan.steps[0].identifier, "SeriesInstanceUID")) == ["1.5", "1.6"]
        assert value(plan.steps[0].identifier, "StudyInstanceUID") == S

    def test_single_study_uid_on_studies(self):
        plan = make("StudyInstanceUID=1.2.3")
        assert len(plan.steps) == 1
        assert value(plan.steps[0].identifier, "StudyInstanceUID") == "1.2.3"

    def test_universal_match_is_a_return_key(self):
        ident = step(make("StudyDescription=*"), Level.STUDY)
        assert is_empty(ident, "StudyDescription")

    def test_numeric_match_values(self):
        ident = step(make("Rows=512&InstanceNumber=3", "/studies/{s}/series/{se}/instances"), Level.IMAGE)
        assert value(ident, "Rows") == 512
        assert str(value(ident, "InstanceNumber")) == "3"

    def test_sequence_keys_share_one_item(self):
        plan = make(
            "RequestAttributesSequence.ScheduledProcedureStepID=SPS1"
            "&RequestAttributesSequence.RequestedProcedureID=RP1",
            "/studies/{s}/series",
        )
        items = value(step(plan, Level.SERIES), "RequestAttributesSequence")
        assert len(items) == 1
        assert items[0].ScheduledProcedureStepID == "SPS1"
        assert items[0].RequestedProcedureID == "RP1"

    def test_sequence_match_keeps_the_default_item_keys(self):
        plan = make("RequestAttributesSequence.ScheduledProcedureStepID=SPS1", "/studies/{s}/series")
        (item,) = value(step(plan, Level.SERIES), "RequestAttributesSequence")
        assert item.ScheduledProcedureStepID == "SPS1"
        assert "RequestedProcedureID" in item

    def test_includefield_sequence_path(self):
        plan = make("includefield=RequestAttributesSequence.AccessionNumber", "/studies/{s}/series")
        (item,) = value(step(plan, Level.SERIES), "RequestAttributesSequence")
        assert {"AccessionNumber", "ScheduledProcedureStepID", "RequestedProcedureID"} <= keywords(item)

    def test_includefield_adds_return_keys(self):
        ident = step(make("includefield=00081030%2C00101010"), Level.STUDY)
        assert is_empty(ident, "StudyDescription")
        assert is_empty(ident, "PatientAge")

    def test_includefield_all_adds_optional_keys(self):
        plain, everything = (keywords(step(make(q), Level.STUDY)) for q in ("", "includefield=all"))
        assert plain < everything
        assert {"PatientAge", "SOPClassesInStudy"} <= everything - plain

    def test_includefield_all_at_series_and_image_level(self):
        series = keywords(step(make("includefield=all", "/studies/{s}/series"), Level.SERIES))
        image = keywords(step(make("includefield=all", "/studies/{s}/series/{se}/instances"), Level.IMAGE))
        assert {"BodyPartExamined", "SeriesDate"} <= series
        assert "AvailableTransferSyntaxUID" in image

    def test_match_on_path_uid_is_out_of_level(self):
        plan = make("StudyInstanceUID=9.9", "/studies/{s}/series")
        assert value(step(plan, Level.SERIES), "StudyInstanceUID") == S
        assert plan.warnings and "StudyInstanceUID" in plan.warnings[0]

    def test_private_match_with_creator(self):
        plan = make("00090010=GEMS_IDEN_01&00091002=SUITE", "/studies/{s}/series/{se}/instances")
        ident = step(plan, Level.IMAGE)
        assert ident[Tag(0x00090010)].value == "GEMS_IDEN_01"
        assert ident[Tag(0x00091002)].value == "SUITE"


class TestHierarchicalFanOut:
    def test_series_with_study_keys(self):
        plan = make("PatientID=P1&Modality=CT", "/series")
        assert [s.level for s in plan.steps] == [Level.STUDY, Level.SERIES]
        assert not plan.relational_used
        study, series = plan.steps[0].identifier, plan.steps[1].identifier
        assert value(study, "PatientID") == "P1"
        assert "Modality" not in study
        assert value(series, "Modality") == "CT"
        assert "PatientID" not in series
        assert is_empty(series, "StudyInstanceUID")

    def test_series_with_a_study_uid_list(self):
        plan = make("StudyInstanceUID=1.2,1.3&Modality=MR", "/series")
        assert [s.level for s in plan.steps] == [Level.STUDY, Level.SERIES]
        assert list(value(plan.steps[0].identifier, "StudyInstanceUID")) == ["1.2", "1.3"]
        assert is_empty(plan.steps[1].identifier, "StudyInstanceUID")
        assert value(plan.steps[1].identifier, "Modality") == "MR"

    def test_instances_with_keys_at_every_level(self):
        plan = make("StudyDate=20200101&Modality=CT&SOPClassUID=1.2.840.10008.5.1.4.1.1.2", "/instances")
        assert [s.level for s in plan.steps] == [Level.STUDY, Level.SERIES, Level.IMAGE]
        study, series, image = (s.identifier for s in plan.steps)
        assert value(study, "StudyDate") == "20200101"
        assert value(series, "Modality") == "CT"
        assert value(image, "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.2"
        assert "StudyDate" not in series and "StudyDate" not in image
        assert "Modality" not in image

    def test_study_series_with_a_patient_key(self):
        plan = make("PatientName=Doe*", "/studies/{s}/series")
        assert [s.level for s in plan.steps] == [Level.STUDY, Level.SERIES]
        study = plan.steps[0].identifier
        assert value(study, "StudyInstanceUID") == S
        assert str(value(study, "PatientName")) == "Doe*"
        assert "PatientName" not in plan.steps[1].identifier

    def test_study_instances_with_series_and_image_keys(self):
        plan = make("Modality=CT&InstanceNumber=1", "/studies/{s}/instances")
        assert [s.level for s in plan.steps] == [Level.SERIES, Level.IMAGE]
        series, image = (s.identifier for s in plan.steps)
        assert value(series, "Modality") == "CT" and value(series, "StudyInstanceUID") == S
        assert str(value(image, "InstanceNumber")) == "1"
        assert value(image, "StudyInstanceUID") == S and is_empty(image, "SeriesInstanceUID")

    def test_target_level_keys_alone_need_no_fan_out(self):
        plan = make("Modality=CT&SeriesNumber=2", "/studies/{s}/series")
        assert [s.level for s in plan.steps] == [Level.SERIES]
        ident = plan.steps[0].identifier
        assert value(ident, "Modality") == "CT"
        assert str(value(ident, "SeriesNumber")) == "2"

    def test_relational_false_never_used(self):
        for resource in ALL_RESOURCES:
            assert not make("PatientID=P1&Modality=CT", resource).relational_used


class TestRelational:
    def test_series_single_query(self):
        plan = make("PatientID=P1&StudyDate=20200101&Modality=CT", "/series", relational=True)
        assert plan.relational_used
        (only,) = plan.steps
        assert only.level == Level.SERIES
        ident = only.identifier
        assert value(ident, "QueryRetrieveLevel") == "SERIES"
        assert value(ident, "PatientID") == "P1"
        assert value(ident, "StudyDate") == "20200101"
        assert value(ident, "Modality") == "CT"
        assert STUDY_DEFAULTS | SERIES_DEFAULTS <= keywords(ident)

    def test_instances_single_query(self):
        plan = make("StudyInstanceUID=1.2,1.3&SeriesNumber=1&InstanceNumber=2", "/instances", relational=True)
        (only,) = plan.steps
        ident = only.identifier
        assert value(ident, "QueryRetrieveLevel") == "IMAGE"
        assert list(value(ident, "StudyInstanceUID")) == ["1.2", "1.3"]
        assert str(value(ident, "SeriesNumber")) == "1"
        assert str(value(ident, "InstanceNumber")) == "2"
        assert STUDY_DEFAULTS | SERIES_DEFAULTS | IMAGE_DEFAULTS <= keywords(ident)

    def test_study_series_with_patient_key(self):
        plan = make("PatientID=P1&Modality=CT", "/studies/{s}/series", relational=True)
        assert plan.relational_used
        (only,) = plan.steps
        assert value(only.identifier, "PatientID") == "P1"
        assert value(only.identifier, "StudyInstanceUID") == S
        assert value(only.identifier, "Modality") == "CT"

    def test_study_instances_single_query(self):
        plan = make("Modality=CT", "/studies/{s}/instances", relational=True)
        (only,) = plan.steps
        assert only.level == Level.IMAGE
        assert value(only.identifier, "Modality") == "CT"
        assert value(only.identifier, "StudyInstanceUID") == S

    def test_not_used_when_not_needed(self):
        assert not make("PatientID=P1", "/studies", relational=True).relational_used
        assert not make("Modality=CT", "/studies/{s}/series", relational=True).relational_used
        assert not make("", "/studies/{s}/series/{se}/instances", relational=True).relational_used


# ------------------------------------------------------------------------------------------------
# Levels, warnings


class TestOutOfLevelAndWarnings:
    @pytest.mark.parametrize(
        "resource,raw,ignored",
        [
            ("/studies", "Modality=CT", "Modality"),
            ("/studies", "SOPInstanceUID=1.2", "SOPInstanceUID"),
            ("/studies", "00080060=CT", "00080060"),
            ("/studies/{s}/series", "StudyDate=20200101", "StudyDate"),
            ("/studies/{s}/series", "InstanceNumber=1", "InstanceNumber"),
            ("/studies/{s}/series/{se}/instances", "SeriesDescription=X", "SeriesDescription"),
            ("/studies/{s}/series/{se}/instances", "AccessionNumber=A", "AccessionNumber"),
            ("/studies/{s}/instances", "StudyID=1", "StudyID"),
            ("/series", "InstanceNumber=1", "InstanceNumber"),
        ],
    )
    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_out_of_level_match_is_ignored_with_a_warning(self, resource, raw, ignored, relational):
        plan = make(raw, resource, relational=relational)
        assert len(plan.warnings) == 1
        assert ignored in plan.warnings[0]
        assert "ignored" in plan.warnings[0]
        tag = parse_query(raw).matches[0].tag
        for s in plan.steps:
            if tag in s.identifier and not (tag == T("SOPInstanceUID") and s.level == Level.IMAGE):
                assert s.identifier[tag].value in (None, ""), "an ignored key must not be matched"
        assert all(k.tag != tag for k in plan.post_filters)
        assert all(t != tag for t, _ in plan.output_tags)

    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_out_of_level_includefield_is_ignored_with_a_warning(self, relational):
        plan = make("includefield=SeriesDescription", "/studies", relational=relational)
        assert "SeriesDescription" in plan.warnings[0]
        assert "SeriesDescription" not in step(plan, Level.STUDY)
        assert all(t != T("SeriesDescription") for t, _ in plan.output_tags)

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    def test_patient_attributes_allowed_everywhere(self, resource):
        plan = make("PatientID=P1", resource)
        assert plan.warnings == []
        assert [k.param for k in plan.post_filters] == ["PatientID"]
        assert any(
            s.identifier.get(T("PatientID")) is not None and s.identifier[T("PatientID")].value == "P1"
            for s in plan.steps
        )

    @pytest.mark.parametrize("relational", BOTH_MODES)
    def test_patient_includefield_on_study_series_is_requested(self, relational):
        plan = make("includefield=PatientName", "/studies/{s}/series", relational=relational)
        assert any("PatientName" in s.identifier for s in plan.steps)

    def test_fuzzymatching_not_accepted(self):
        plan = make("fuzzymatching=true&PatientName=doe", fuzzy_accepted=False)
        assert plan.warnings == [FUZZY_WARNING]
        assert [k.param for k in plan.post_filters] == ["PatientName"]

    def test_fuzzymatching_accepted(self):
        plan = make("fuzzymatching=true&PatientName=doe&PatientID=P1", fuzzy_accepted=True)
        assert plan.warnings == []
        # the PACS matched the name fuzzily: a literal post-filter would undo that
        assert [k.param for k in plan.post_filters] == ["PatientID"]

    def test_fuzzymatching_false_gives_no_warning(self):
        assert make("fuzzymatching=false&PatientName=doe").warnings == []

    def test_empty_and_multiple_value_matching_warnings(self):
        plan = make("emptyvaluematching=true&multiplevaluematching=true")
        assert plan.warnings == [EMPTY_WARNING, MULTIPLE_WARNING]

    def test_empty_and_multiple_value_matching_false(self):
        assert make("emptyvaluematching=false&multiplevaluematching=false").warnings == []

    def test_ignored_parameters_are_reported(self):
        plan = make("foo=1&bar=2&PatientID=P1")
        assert len(plan.warnings) == 1
        assert "foo" in plan.warnings[0] and "bar" in plan.warnings[0]

    def test_no_warnings_for_a_clean_query(self):
        assert make("PatientID=P1&StudyDate=20200101-&includefield=StudyDescription&limit=5").warnings == []

    def test_timezone_offset_goes_to_the_target_level(self):
        plan = make("TimezoneOffsetFromUTC=-0500", "/studies/{s}/series")
        assert [s.level for s in plan.steps] == [Level.SERIES]
        assert value(plan.steps[0].identifier, "TimezoneOffsetFromUTC") == "-0500"


class TestOutputTags:
    def test_studies_output_has_no_lower_levels(self):
        tags = {t for t, _ in make("includefield=all").output_tags}
        assert not tags & {T(k) for k in SERIES_ONLY | IMAGE_ONLY}
        assert {T(k) for k in STUDY_DEFAULTS} <= tags

    def test_output_tags_carry_matched_and_included_attributes(self):
        tags = dict(make("PatientAge=045Y&includefield=StudyDescription").output_tags)
        assert T("PatientAge") in tags and T("StudyDescription") in tags

    def test_output_tags_record_sequence_item_keys(self):
        tags = dict(make("RequestAttributesSequence.AccessionNumber=A1", "/studies/{s}/series").output_tags)
        assert tags[T("RequestAttributesSequence")] >= {
            T("AccessionNumber"),
            T("ScheduledProcedureStepID"),
            T("RequestedProcedureID"),
        }

    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    def test_output_tags_cover_the_defaults(self, resource):
        tags = {t for t, _ in make("", resource).output_tags}
        assert {T(k) for k in OUTPUT_DEFAULTS[resource]} <= tags
        assert T("RetrieveURL") not in tags

    def test_output_tags_are_sorted(self):
        tags = [t for t, _ in make("", "/instances").output_tags]
        assert tags == sorted(tags)


# ------------------------------------------------------------------------------------------------
# Combined date and time ranges (PS3.4 C.2.2.2.5.1; PS3.18 8.3.4.1.1)


class TestCombinedDateTime:
    RAW = "StudyDate=20200101-20200102&StudyTime=1000-1200"

    @pytest.mark.parametrize("relational", BOTH_MODES)
    @pytest.mark.parametrize("resource", ["/studies", "/series", "/instances"])
    def test_time_not_sent_to_the_pacs(self, resource, relational):
        plan = make(self.RAW, resource, relational=relational)
        ident = next(s.identifier for s in plan.steps if "StudyDate" in s.identifier)
        assert value(ident, "StudyDate") == "20200101-20200102"
        assert is_empty(ident, "StudyTime")
        assert {k.param for k in plan.post_filters} >= {"StudyDate", "StudyTime"}

    @pytest.mark.parametrize(
        "date,time,kept",
        [
            ("20200101", "150000", True),  # after 2020-01-01 10:00
            ("20200102", "130000", False),  # after 2020-01-02 12:00
            ("20200101", "090000", False),  # before 2020-01-01 10:00
            ("20200102", "115959", True),
            ("20200101", "100000", True),
            ("20200102", "120059", True),  # the end 1200 means up to 12:00:59.999999
            ("20200102", "1201", False),
            ("20200101", "2359", True),
            ("20200102", "0030", True),  # the night in between is inside the combined range
            ("20200103", "0000", False),
            ("20191231", "2359", False),
        ],
    )
    def test_combined_semantics(self, date, time, kept):
        plan = make(self.RAW)
        assert post_filter(data(StudyDate=date, StudyTime=time), plan.post_filters).keep is kept

    @pytest.mark.parametrize(
        "raw,date,time,kept",
        [
            ("StudyDate=20200101-&StudyTime=1000-", "20200101", "0959", False),
            ("StudyDate=20200101-&StudyTime=1000-", "20200105", "0100", True),
            ("StudyDate=-20200102&StudyTime=-1200", "20200102", "1201", False),
            ("StudyDate=-20200102&StudyTime=-1200", "20190101", "2300", True),
        ],
    )
    def test_open_combined_ranges(self, raw, date, time, kept):
        plan = make(raw)
        assert post_filter(data(StudyDate=date, StudyTime=time), plan.post_filters).keep is kept

    def test_series_date_and_time(self):
        plan = make("SeriesDate=20200101-20200102&SeriesTime=1000-1200", "/series", relational=True)
        ident = plan.steps[0].identifier
        assert value(ident, "SeriesDate") == "20200101-20200102"
        assert is_empty(ident, "SeriesTime")
        assert post_filter(data(SeriesDate="20200101", SeriesTime="1500"), plan.post_filters).keep
        assert not post_filter(data(SeriesDate="20200102", SeriesTime="1300"), plan.post_filters).keep

    def test_single_time_is_sent(self):
        ident = step(make("StudyDate=20200101-20200102&StudyTime=1000"), Level.STUDY)
        assert value(ident, "StudyTime") == "1000"

    def test_single_date_with_time_range_is_sent(self):
        ident = step(make("StudyDate=20200101&StudyTime=1000-1200"), Level.STUDY)
        assert value(ident, "StudyTime") == "1000-1200"

    def test_time_range_alone_is_sent(self):
        ident = step(make("StudyTime=1000-1200"), Level.STUDY)
        assert value(ident, "StudyTime") == "1000-1200"

    def test_missing_time_is_kept_and_reported(self):
        result = post_filter(data(StudyDate="20200101"), make(self.RAW).post_filters)
        assert result.keep
        assert result.unverified == ["StudyDate+StudyTime"]

    def test_empty_time_is_kept(self):
        assert post_filter(data(StudyDate="20200101", StudyTime=""), make(self.RAW).post_filters).keep

    def test_missing_time_still_checks_the_date(self):
        assert not post_filter(data(StudyDate="20200105"), make(self.RAW).post_filters).keep


# ------------------------------------------------------------------------------------------------
# Character sets (PS3.4 C.4.1.1.3.1)


class TestCharset:
    @pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100", "ISO_IR 6"])
    @pytest.mark.parametrize("resource", ALL_RESOURCES)
    def test_ascii_query_has_no_specific_character_set(self, charset, resource):
        for s in make("PatientName=Doe*&StudyDescription=Head", resource, charset=charset).steps:
            assert "SpecificCharacterSet" not in s.identifier

    @pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
    def test_non_ascii_sets_the_node_charset(self, charset):
        ident = step(make("PatientName=M%C3%BCller*", charset=charset), Level.STUDY)
        assert value(ident, "SpecificCharacterSet") == charset
        assert str(value(ident, "PatientName")) == "Müller*"

    def test_fan_out_step_with_the_value_carries_the_charset(self):
        plan = make("PatientName=M%C3%BCller*&Modality=CT", "/series", charset="ISO_IR 100")
        assert value(step(plan, Level.STUDY), "SpecificCharacterSet") == "ISO_IR 100"

    def test_utf8_identifier_encodes(self):
        ident = step(make("PatientName=%E5%B1%B1%E7%94%B0*", charset="ISO_IR 192"), Level.STUDY)
        assert "山田*".encode() in encode(ident)

    def test_latin1_identifier_encodes(self):
        ident = step(make("PatientName=M%C3%BCller*", charset="ISO_IR 100"), Level.STUDY)
        assert b"M\xfcller*" in encode(ident)

    @pytest.mark.parametrize(
        "raw,param",
        [
            ("PatientName=%E5%B1%B1%E7%94%B0", "PatientName"),
            ("StudyDescription=%E2%82%AC", "StudyDescription"),
            ("PatientID=P1&StudyDescription=%D0%96", "StudyDescription"),
        ],
    )
    def test_not_representable_in_latin1(self, raw, param):
        with pytest.raises(QueryError) as info:
            make(raw, charset="ISO_IR 100")
        assert info.value.parameter == param

    def test_not_representable_in_ascii(self):
        with pytest.raises(QueryError) as info:
            make("PatientName=M%C3%BCller", charset="ISO_IR 6")
        assert info.value.parameter == "PatientName"

    def test_ignored_out_of_level_value_does_not_count(self):
        plan = make("SeriesDescription=%E5%B1%B1", "/studies", charset="ISO_IR 100")
        assert "SpecificCharacterSet" not in step(plan, Level.STUDY)

    def test_combined_time_is_not_a_reason_for_a_charset(self):
        plan = make("StudyDate=20200101-20200102&StudyTime=1000-1200", charset="ISO_IR 6")
        assert "SpecificCharacterSet" not in step(plan, Level.STUDY)


def encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return fp.getvalue()


# ------------------------------------------------------------------------------------------------
# post_filter and value_matches


class TestPostFilter:
    @pytest.mark.parametrize(
        "raw,stored,kept",
        [
            ("PatientID=P?", "P1", True),
            ("PatientID=P?", "P12", False),
            ("PatientID=P*", "P12", True),
            ("PatientID=*1", "P1", True),
            ("PatientID=p1", "P1", False),  # case-sensitive outside PN
            ("PatientID=P1", "P1 ", True),  # trailing padding
            ("PatientID=P1", "P10", False),
            ("StudyDescription=a.b", "axb", False),  # regex characters are literal
            ("StudyDescription=a(b*", "a(bc", True),
            ("StudyDescription=*HEAD*", "CT HEAD W/O", True),
            ("StudyDescription=AX+T1+%2BC", "AX T1 +C", True),
        ],
    )
    def test_wildcards_and_literals(self, raw, stored, kept):
        name = raw.split("=")[0]
        assert keep(raw, data(**{name: stored})) is kept

    @pytest.mark.parametrize(
        "raw,stored,kept",
        [
            ("PatientName=smi*", "SMITH^JOHN", True),
            ("PatientName=SMITH%5EJOHN", "Smith^John", True),
            ("PatientName=Smith", "Smith^John", False),
            ("PatientName=Smith%5EJohn", "Smith^John^^^", True),
            ("PatientName=m%C3%BCller*", "MÜLLER^HANS", True),
            ("PatientName=Sm%3Fth*", "Smith^J", True),
            ("PatientName=Jones*", "Smith^John", False),
        ],
    )
    def test_person_names_case_insensitive(self, raw, stored, kept):
        assert keep(raw, data(PatientName=stored)) is kept

    @pytest.mark.parametrize(
        "raw,kept",
        [
            ("PatientName=Yamada*", True),  # alphabetic group
            ("PatientName=%E5%B1%B1%E7%94%B0*", True),  # ideographic group
            ("PatientName=%E3%82%84%E3%81%BE%E3%81%A0*", True),  # phonetic group
            ("PatientName=Tanaka*", False),
            ("PatientName=%E7%94%B0%E4%B8%AD*", False),
        ],
    )
    def test_person_name_any_group(self, raw, kept):
        stored = "Yamada^Tarou=山田^太郎=やまだ^たろう"
        assert keep(raw, data(PatientName=stored)) is kept

    def test_person_name_query_with_groups(self):
        stored = "Yamada^Tarou=山田^太郎"
        assert keep("PatientName=Yamada%5ETarou%3D%E5%B1%B1%E7%94%B0%5E%E5%A4%AA%E9%83%8E", data(PatientName=stored))

    def test_referring_physician_is_pn_too(self):
        assert keep("ReferringPhysicianName=doe*", data(ReferringPhysicianName="DOE^J"))

    @pytest.mark.parametrize(
        "stored,kept", [("1.3", True), ("1.2", True), ("1.4", False), ("1.3 ", True), ("1.30", False)]
    )
    def test_uid_list(self, stored, kept):
        assert keep("StudyInstanceUID=1.2,1.3", data(StudyInstanceUID=stored)) is kept

    @pytest.mark.parametrize(
        "raw,stored,kept",
        [
            ("StudyDate=20200101-20200131", "20200115", True),
            ("StudyDate=20200101-20200131", "20200131", True),
            ("StudyDate=20200101-20200131", "20200201", False),
            ("StudyDate=-20200131", "19990101", True),
            ("StudyDate=-20200131", "20200201", False),
            ("StudyDate=20200101-", "20191231", False),
            ("StudyDate=20200101-", "20300101", True),
            ("StudyDate=20200101", "20200101", True),
            ("StudyDate=20200101", "20200102", False),
            ("StudyTime=1000-1200", "115959.999", True),
            ("StudyTime=1000-1200", "120030", True),
            ("StudyTime=1000-1200", "1201", False),
            ("StudyTime=1000-1200", "0959", False),
            ("StudyTime=10-11", "1159", True),
            ("StudyTime=10-11", "12", False),
            ("StudyTime=1000", "100059", True),
            ("StudyTime=1000", "1001", False),
            ("StudyTime=-0800", "07", True),
            ("StudyTime=1000-1200", "11:30:00", True),
            ("AcquisitionDateTime=20200101-20200102", "20200102235959", True),
            ("AcquisitionDateTime=20200101-20200102", "20200103", False),
            ("AcquisitionDateTime=20200101-20200102", "20191231235959.999", False),
            ("AcquisitionDateTime=202001-", "20200115", True),
            ("AcquisitionDateTime=2020010112-2020010113", "20200101133000", True),
            ("AcquisitionDateTime=20200101120000%2B0100", "20200101120000+0100", True),
            ("AcquisitionDateTime=20200101120000", "20200101120000", True),
        ],
    )
    def test_date_time_ranges(self, raw, stored, kept):
        name = raw.split("=")[0]
        assert keep(raw, data(**{name: stored})) is kept

    def test_datetime_with_negative_offset_matches_itself(self):
        assert keep("AcquisitionDateTime=20200101120000-0500", data(AcquisitionDateTime="20200101120000-0500"))

    @pytest.mark.parametrize(
        "raw,attrs,kept",
        [
            ("SeriesNumber=3", {"SeriesNumber": "03"}, True),
            ("SeriesNumber=3", {"SeriesNumber": 3}, True),
            ("SeriesNumber=3", {"SeriesNumber": 4}, False),
            ("InstanceNumber=-1", {"InstanceNumber": "-1"}, True),
            ("PatientWeight=70", {"PatientWeight": "70.0"}, True),
            ("PatientWeight=70", {"PatientWeight": "70.5"}, False),
            ("Rows=512", {"Rows": 512}, True),
            ("Rows=512", {"Rows": 256}, False),
        ],
    )
    def test_numeric_equality(self, raw, attrs, kept):
        assert keep(raw, data(**attrs)) is kept

    @pytest.mark.parametrize(
        "raw,kept",
        [
            ("ModalitiesInStudy=CT", True),
            ("ModalitiesInStudy=MR", True),
            ("ModalitiesInStudy=US", False),
            ("ModalitiesInStudy=M*", True),
            ("ModalitiesInStudy=*R", True),
        ],
    )
    def test_multi_valued_attribute(self, raw, kept):
        ds = data(ModalitiesInStudy="CT\\MR")
        assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
        assert keep(raw, ds) is kept

    def test_sequence_path_any_item(self):
        items = [data(ScheduledProcedureStepID="SPS1"), data(ScheduledProcedureStepID="SPS2")]
        ds = data(RequestAttributesSequence=items)
        assert keep("RequestAttributesSequence.ScheduledProcedureStepID=SPS2", ds)
        assert keep("RequestAttributesSequence.ScheduledProcedureStepID=SPS*", ds)
        assert not keep("RequestAttributesSequence.ScheduledProcedureStepID=SPS3", ds)

    def test_sequence_path_without_the_item_attribute_is_unverified(self):
        ds = data(RequestAttributesSequence=[data(ScheduledProcedureStepID="SPS1")])
        result = outcome("RequestAttributesSequence.RequestedProcedureID=RP1", ds)
        assert result.keep
        assert result.unverified == ["RequestAttributesSequence.RequestedProcedureID"]

    def test_empty_sequence_is_unverified(self):
        result = outcome("RequestAttributesSequence.RequestedProcedureID=RP1", data(RequestAttributesSequence=[]))
        assert result.keep and result.unverified

    def test_absent_attribute_is_kept_and_reported(self):
        result = outcome("PatientID=P1&Modality=CT", data(Modality="CT"))
        assert result.keep
        assert result.unverified == ["PatientID"]

    @pytest.mark.parametrize("empty", ["", None])
    def test_present_but_empty_is_kept_silently(self, empty):
        result = outcome("PatientID=P1", data(PatientID=empty))
        assert result.keep
        assert result.unverified == []

    def test_every_filter_must_match(self):
        ds = data(PatientID="P1", Modality="MR")
        assert keep("PatientID=P1", ds)
        assert not keep("PatientID=P1&Modality=CT", ds)

    def test_unverified_survives_a_later_pass(self):
        result = outcome("PatientID=P1&AccessionNumber=A1", data(AccessionNumber="A1"))
        assert result.keep and result.unverified == ["PatientID"]

    def test_no_filters_keeps_everything(self):
        result = post_filter(data(PatientID="X"), [])
        assert result.keep and result.unverified == []

    def test_plan_post_filters_skip_universal_keys(self):
        plan = make("PatientID=&StudyDescription=*&AccessionNumber=A1")
        assert [k.param for k in plan.post_filters] == ["AccessionNumber"]

    def test_value_matches_directly(self):
        key = parse_query("StudyInstanceUID=1.2,1.3").matches[0]
        assert value_matches(key, "1.2") and not value_matches(key, "1.4")
        key = parse_query("PatientName=doe*").matches[0]
        assert value_matches(key, "DOE^JANE") and not value_matches(key, "ROE^JANE")
        key = parse_query("StudyDate=20200101-20200102").matches[0]
        assert value_matches(key, "20200102") and not value_matches(key, "20200103")
