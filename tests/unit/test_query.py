"""QIDO-RS query-string parsing (PS3.18 8.3.1, 8.3.4; PS3.4 C.2.2.2), as real clients write queries."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from pydicom.tag import Tag

from gateway.dicomweb.query import MatchKey, QidoQuery, QueryError, parse_query

STUDY_UID = Tag(0x0020000D)
PATIENT_NAME = Tag(0x00100010)
REQUEST_ATTRIBUTES_SQ = Tag(0x00400275)
SPS_ID = Tag(0x00400009)
REQUESTED_PROCEDURE_ID = Tag(0x00401001)


def only_match(raw: str) -> MatchKey:
    query = parse_query(raw)
    assert len(query.matches) == 1, query.matches
    return query.matches[0]


def value_of(raw: str) -> tuple[str, ...]:
    return only_match(raw).values


def error(raw: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        parse_query(raw)
    return info.value


# ------------------------------------------------------------------------------------------------
# Form decoding: '+', percent escapes, UTF-8


class TestDecoding:
    def test_plus_is_a_space_and_percent_2b_a_plus(self):
        # httpx params= and dicomweb-client both send this for "AX T1 +C"
        assert value_of("SeriesDescription=AX+T1+%2BC") == ("AX T1 +C",)

    def test_httpx_style_encoding_round_trips(self):
        raw = urlencode({"SeriesDescription": "AX T1 +C", "PatientName": "O'Brien^Ann"})
        query = parse_query(raw)
        assert query.match("SeriesDescription").values == ("AX T1 +C",)
        assert query.match("PatientName").values == ("O'Brien^Ann",)

    def test_percent_20_is_a_space_too(self):
        assert value_of("SeriesDescription=AX%20T1") == ("AX T1",)

    def test_non_ascii_utf8_is_decoded(self):
        key = only_match("PatientName=M%C3%BCller*")
        assert key.values == ("Müller*",)
        assert key.is_wildcard

    def test_cjk_utf8_is_decoded(self):
        assert value_of("PatientName=%E5%B1%B1%E7%94%B0") == ("山田",)

    def test_person_name_caret_decoded(self):
        assert value_of("PatientName=Doe%5EJohn") == ("Doe^John",)

    @pytest.mark.parametrize(
        "raw", ["PatientName=%FF", "PatientName=M%C3", "PatientName=%C3%28", "PatientName=%ED%A0%80"]
    )
    def test_invalid_utf8_is_an_error_naming_the_parameter(self, raw):
        assert error(raw).parameter == "PatientName"

    def test_parameter_names_are_decoded_too(self):
        assert value_of("Patient%4Eame=X") == ("X",)

    def test_empty_chunks_are_skipped(self):
        query = parse_query("&&PatientID=1&&")
        assert query.match("PatientID").values == ("1",)
        assert query.ignored == ()

    def test_empty_query_string(self):
        assert parse_query("") == QidoQuery()

    def test_value_may_contain_equals_sign(self):
        # PN component groups are separated by '='; only the first '=' splits name from value
        assert value_of("PatientName=Yamada%5ETarou=%E5%B1%B1%E7%94%B0") == ("Yamada^Tarou=山田",)

    def test_too_many_parameters(self):
        raw = "&".join(f"x{i}=1" for i in range(201))
        assert error(raw).parameter == "query"


# ------------------------------------------------------------------------------------------------
# Wildcards and universal matching


class TestWildcards:
    def test_star_and_percent_2a_are_the_same_wildcard(self):
        literal, encoded = only_match("PatientName=Smi*"), only_match("PatientName=Smi%2A")
        assert literal.values == encoded.values == ("Smi*",)
        assert literal.is_wildcard and encoded.is_wildcard

    def test_question_mark_wildcard(self):
        key = only_match("PatientID=P%3F1")
        assert key.values == ("P?1",)
        assert key.is_wildcard

    def test_lower_case_2a(self):
        assert value_of("PatientName=Smi%2a") == ("Smi*",)

    @pytest.mark.parametrize(
        "raw",
        ["PatientName=*", "PatientName=%2A", "Modality=*", "StudyDescription=*", "AccessionNumber=*"],
    )
    def test_star_alone_is_universal(self, raw):
        key = only_match(raw)
        assert key.values == ()
        assert key.is_universal
        assert not key.is_wildcard

    def test_empty_value_is_universal(self):
        key = only_match("PatientID=")
        assert key.is_universal

    def test_double_star_is_a_wildcard_not_universal(self):
        key = only_match("PatientName=**")
        assert key.values == ("**",)
        assert key.is_wildcard

    @pytest.mark.parametrize(
        "raw,param",
        [
            ("StudyDate=2020*", "StudyDate"),
            ("StudyDate=*", "StudyDate"),
            ("StudyTime=12%2A", "StudyTime"),
            ("SeriesNumber=1*", "SeriesNumber"),
            ("InstanceNumber=%3F", "InstanceNumber"),
            ("PatientWeight=7?", "PatientWeight"),
            ("StudyInstanceUID=1.2.*", "StudyInstanceUID"),
            ("SeriesInstanceUID=*", "SeriesInstanceUID"),
            ("PatientAge=04*", "PatientAge"),
        ],
    )
    def test_wildcards_in_non_wildcard_vrs_are_rejected(self, raw, param):
        assert error(raw).parameter == param

    @pytest.mark.parametrize(
        "raw",
        [
            "Modality=C*",
            "PatientSex=%3F",
            "AccessionNumber=A*",
            "StudyID=1?",
            "StudyDescription=*brain*",
            "ReferringPhysicianName=Doe*",
            "PerformedStationAETitle=AE*",
        ],
    )
    def test_wildcards_allowed_in_wildcard_vrs(self, raw):
        assert only_match(raw).is_wildcard


# ------------------------------------------------------------------------------------------------
# Lists: UID lists, repeated parameters, commas


class TestLists:
    def test_uid_list_comma_separated(self):
        key = only_match("StudyInstanceUID=1.2.3,1.2.4")
        assert key.values == ("1.2.3", "1.2.4")
        assert key.vr == "UI"

    def test_uid_list_with_encoded_comma(self):
        assert value_of("StudyInstanceUID=1.2.3%2C1.2.4") == ("1.2.3", "1.2.4")

    def test_repeated_uid_parameter_is_a_list(self):
        # dicomweb-client sends SeriesInstanceUID=1.2&SeriesInstanceUID=1.3
        assert value_of("SeriesInstanceUID=1.2&SeriesInstanceUID=1.3") == ("1.2", "1.3")

    def test_repeated_and_comma_combined(self):
        assert value_of("SOPInstanceUID=1.1,1.2&SOPInstanceUID=1.3") == ("1.1", "1.2", "1.3")

    def test_uid_list_by_tag(self):
        key = only_match("0020000D=1.2,1.3")
        assert key.path == (STUDY_UID,)
        assert key.values == ("1.2", "1.3")

    def test_single_uid(self):
        key = only_match("StudyInstanceUID=1.2.840.113619.2.55.3")
        assert key.values == ("1.2.840.113619.2.55.3",)

    def test_empty_uid_is_universal(self):
        assert only_match("StudyInstanceUID=").is_universal

    @pytest.mark.parametrize(
        "raw",
        [
            "StudyInstanceUID=1.2,",
            "StudyInstanceUID=1.2,,1.3",
            "StudyInstanceUID=1.2&StudyInstanceUID=",
            "StudyInstanceUID=abc",
            "StudyInstanceUID=1..2",
            "StudyInstanceUID=1.2.",
            "StudyInstanceUID=" + "1." * 32 + "1",
        ],
    )
    def test_bad_uids_are_rejected(self, raw):
        assert error(raw).parameter == "StudyInstanceUID"

    def test_comma_in_a_lo_value_stays(self):
        assert value_of("StudyDescription=CT+HEAD,+NECK") == ("CT HEAD, NECK",)

    def test_comma_in_a_pn_value_stays(self):
        assert value_of("PatientName=Doe,John") == ("Doe,John",)

    @pytest.mark.parametrize(
        "raw",
        ["PatientID=1&PatientID=2", "StudyDescription=a&StudyDescription=b", "StudyDate=20200101&StudyDate=20200102"],
    )
    def test_repeated_non_uid_parameter_is_an_error(self, raw):
        assert error(raw).parameter == raw.split("=")[0]

    def test_same_attribute_by_keyword_and_tag_is_an_error(self):
        err = error("PatientID=1&00100020=2")
        assert err.parameter in ("PatientID", "00100020")

    def test_comma_list_in_a_cs_attribute_is_not_a_list(self):
        # only UI attributes take lists; "CT,MR" is one (invalid) CS value
        assert error("ModalitiesInStudy=CT,MR").parameter == "ModalitiesInStudy"

    def test_backslash_multi_value_is_rejected(self):
        assert error("ModalitiesInStudy=CT%5CMR").parameter == "ModalitiesInStudy"


# ------------------------------------------------------------------------------------------------
# includefield


class TestIncludefield:
    def test_comma_list_ohif_style(self):
        # OHIF sends includefield=00081030%2C00080060
        query = parse_query("includefield=00081030%2C00080060")
        assert [k.path for k in query.includefields] == [(Tag(0x00081030),), (Tag(0x00080060),)]
        assert all(k.is_universal for k in query.includefields)
        assert all(k.param == "includefield" for k in query.includefields)
        assert query.matches == ()
        assert not query.include_all

    def test_repeated(self):
        query = parse_query("includefield=PatientAge&includefield=PatientSex")
        assert {k.path for k in query.includefields} == {(Tag(0x00101010),), (Tag(0x00100040),)}

    def test_repeated_and_comma_list(self):
        query = parse_query("includefield=PatientAge,StudyDescription&includefield=00080060")
        assert len(query.includefields) == 3

    def test_literal_comma(self):
        query = parse_query("includefield=StudyDescription,SeriesDescription")
        assert [k.vr for k in query.includefields] == ["LO", "LO"]

    def test_empty_items_are_skipped(self):
        query = parse_query("includefield=PatientAge,,PatientSex&includefield=")
        assert len(query.includefields) == 2

    def test_duplicates_collapse(self):
        query = parse_query("includefield=PatientAge&includefield=00101010")
        assert len(query.includefields) == 1

    def test_all_alone(self):
        query = parse_query("includefield=all")
        assert query.include_all
        assert query.includefields == ()

    def test_all_repeated_is_still_all(self):
        assert parse_query("includefield=all&includefield=all").include_all

    @pytest.mark.parametrize(
        "raw",
        [
            "includefield=all,PatientAge",
            "includefield=PatientAge,all",
            "includefield=all&includefield=PatientAge",
            "includefield=PatientAge&includefield=all",
            "includefield=all%2C00080060",
        ],
    )
    def test_all_mixed_with_attributes_is_an_error(self, raw):
        assert error(raw).parameter == "includefield"

    def test_unknown_attribute_is_an_error(self):
        assert error("includefield=NoSuchKeyword").parameter == "includefield"

    def test_sequence_path(self):
        query = parse_query("includefield=RequestAttributesSequence.ScheduledProcedureStepID")
        (key,) = query.includefields
        assert key.path == (REQUEST_ATTRIBUTES_SQ, SPS_ID)
        assert key.vr == "SH"

    def test_bad_path_error_names_includefield(self):
        assert error("includefield=PatientName.PatientID").parameter == "includefield"

    def test_private_without_creator_error_names_includefield(self):
        assert error("includefield=00091002").parameter == "includefield"

    def test_private_with_creator(self):
        query = parse_query("00090010=GEMS_IDEN_01&includefield=00091002")
        (key,) = query.includefields
        assert key.path == (Tag(0x00091002),)
        assert key.vr == "SH"


# ------------------------------------------------------------------------------------------------
# Attribute identifiers


class TestAttributeIds:
    def test_keyword(self):
        key = only_match("PatientName=X")
        assert key.path == (PATIENT_NAME,)
        assert key.tag == key.leaf == PATIENT_NAME
        assert key.vr == "PN"
        assert key.param == "PatientName"

    @pytest.mark.parametrize("name", ["00100010", "00100010".lower()])
    def test_hex_tag(self, name):
        key = only_match(f"{name}=X")
        assert key.path == (PATIENT_NAME,)
        assert key.vr == "PN"
        assert key.param == name

    def test_hex_tag_of_an_uppercase_hex_attribute(self):
        key = only_match("0008103E=AX")
        assert key.path == (Tag(0x0008103E),)
        assert key.vr == "LO"

    def test_query_match_helper_finds_by_keyword(self):
        query = parse_query("00100020=P1")
        assert query.match("PatientID").values == ("P1",)
        assert query.match("PatientName") is None

    def test_sequence_path(self):
        key = only_match("RequestAttributesSequence.ScheduledProcedureStepID=SPS1")
        assert key.path == (REQUEST_ATTRIBUTES_SQ, SPS_ID)
        assert key.tag == REQUEST_ATTRIBUTES_SQ
        assert key.leaf == SPS_ID
        assert key.vr == "SH"
        assert key.values == ("SPS1",)

    def test_sequence_path_by_tags(self):
        key = only_match("00400275.00401001=RP1")
        assert key.path == (REQUEST_ATTRIBUTES_SQ, REQUESTED_PROCEDURE_ID)

    def test_two_paths_into_one_sequence_are_two_keys(self):
        query = parse_query(
            "RequestAttributesSequence.RequestedProcedureID=RP1&RequestAttributesSequence.ScheduledProcedureStepID=S1"
        )
        assert {k.leaf for k in query.matches} == {REQUESTED_PROCEDURE_ID, SPS_ID}

    def test_nested_sequence_path(self):
        key = only_match("ReferencedSeriesSequence.ReferencedInstanceSequence.ReferencedSOPInstanceUID=1.2")
        assert len(key.path) == 3
        assert key.vr == "UI"

    @pytest.mark.parametrize(
        "raw,param",
        [
            ("PatientName.PatientID=X", "PatientName.PatientID"),
            ("00100010.00100020=X", "00100010.00100020"),
            ("RequestAttributesSequence.PatientName.PatientID=X", "RequestAttributesSequence.PatientName.PatientID"),
        ],
    )
    def test_non_sequence_in_the_middle_of_a_path_is_an_error(self, raw, param):
        assert error(raw).parameter == param

    def test_unknown_attribute_inside_a_sequence_path(self):
        assert error("RequestAttributesSequence.NoSuchThing=1").parameter == "RequestAttributesSequence.NoSuchThing"

    def test_sequence_path_depth_limit(self):
        deep = ".".join(["RequestAttributesSequence"] * 4 + ["ScheduledProcedureStepID"])
        assert error(f"{deep}=1").parameter == deep

    def test_sequence_itself_takes_no_value(self):
        assert error("RequestAttributesSequence=X").parameter == "RequestAttributesSequence"

    def test_sequence_itself_as_universal(self):
        key = only_match("RequestAttributesSequence=")
        assert key.vr == "SQ" and key.is_universal

    @pytest.mark.parametrize("name", ["00020010", "00000900", "00100000"])
    def test_command_file_meta_and_group_length_cannot_be_queried(self, name):
        assert error(f"{name}=1").parameter == name

    def test_binary_vrs_cannot_be_matched(self):
        assert error("PixelData=1").parameter == "PixelData"

    # private attributes (PS3.18 8.3.4.1 rule 4)

    def test_private_without_creator_is_an_error(self):
        err = error("00091002=X")
        assert err.parameter == "00091002"
        assert "00090010" in err.message

    def test_private_with_creator_is_ok(self):
        query = parse_query("00090010=GEMS_IDEN_01&00091002=SUITE")
        by_tag = {k.path: k for k in query.matches}
        assert by_tag[(Tag(0x00090010),)].values == ("GEMS_IDEN_01",)
        assert by_tag[(Tag(0x00090010),)].vr == "LO"
        assert by_tag[(Tag(0x00091002),)].values == ("SUITE",)
        assert by_tag[(Tag(0x00091002),)].vr == "SH"

    def test_creator_may_come_after_the_private_attribute(self):
        query = parse_query("00091002=SUITE&00090010=GEMS_IDEN_01")
        assert len(query.matches) == 2

    def test_private_creator_of_another_block_does_not_count(self):
        # 0009,1102 belongs to the block reserved by 0009,0011
        assert error("00090010=GEMS_IDEN_01&00091102=X").parameter == "00091102"

    def test_private_with_unknown_creator_can_be_matched(self):
        query = parse_query("00090010=ACME%201.0&00091010=X")
        assert len(query.matches) == 2

    def test_private_creator_needs_a_value(self):
        assert error("00090010=&00091002=X").parameter == "00090010"

    def test_private_creator_given_twice(self):
        assert error("00090010=A&00090010=B").parameter == "00090010"

    def test_private_value_is_validated_with_its_vr(self):
        # GEMS_ACQU_01 (0019,xx0F) is DS
        assert error("00190010=GEMS_ACQU_01&0019100F=abc").parameter == "0019100F"


# ------------------------------------------------------------------------------------------------
# DA / TM / DT


class TestDateTime:
    @pytest.mark.parametrize("value", ["20200101", "20200229", "19000101"])
    def test_single_date(self, value):
        key = only_match(f"StudyDate={value}")
        assert key.values == (value,)
        assert key.vr == "DA"
        assert not key.is_range

    @pytest.mark.parametrize("value", ["20200101-20200131", "-20200131", "20200101-", "20200101-20200101"])
    def test_date_ranges(self, value):
        key = only_match(f"StudyDate={value}")
        assert key.values == (value,)
        assert key.is_range

    @pytest.mark.parametrize(
        "value",
        [
            "20201301",
            "20200230",
            "20190229",
            "20200100",
            "2020010",
            "202001011",
            "2020-01-01",
            "2020",
            "-",
            "20200101-20200132",
            "20200101--20200102",
            "20200102-20200101",
            "abcdefgh",
            "20200101-20200102-20200103",
        ],
    )
    def test_invalid_dates(self, value):
        assert error(f"StudyDate={value}").parameter == "StudyDate"

    def test_invalid_date_by_tag_names_the_tag(self):
        assert error("00080020=20201301").parameter == "00080020"

    @pytest.mark.parametrize("value", ["12", "1200", "120000", "120000.5", "120000.123456", "235959", "000000"])
    def test_single_time(self, value):
        key = only_match(f"StudyTime={value}")
        assert key.values == (value,)
        assert not key.is_range

    @pytest.mark.parametrize("value", ["1000-1200", "-1200", "1000-", "10-11", "100000.5-115959.999"])
    def test_time_ranges(self, value):
        key = only_match(f"StudyTime={value}")
        assert key.is_range

    @pytest.mark.parametrize(
        "value", ["2500", "1260", "126100", "12:00", "1", "1200000", "12000.1", "ab", "120000.1234567"]
    )
    def test_invalid_times(self, value):
        assert error(f"StudyTime={value}").parameter == "StudyTime"

    @pytest.mark.parametrize("value", ["2200-0200", "1200-1000", "235959-000000"])
    def test_time_range_over_midnight_is_an_error(self, value):
        assert error(f"StudyTime={value}").parameter == "StudyTime"

    @pytest.mark.parametrize("value", ["1000-10", "100000-1000"])
    def test_time_range_with_coarser_end_is_valid(self, value):
        assert only_match(f"StudyTime={value}").is_range

    def test_fraction_needs_seconds(self):
        assert error("StudyTime=12.5").parameter == "StudyTime"

    @pytest.mark.parametrize(
        "value",
        [
            "2020",
            "202001",
            "20200101",
            "2020010112",
            "20200101120000",
            "20200101120000.123456",
            "20200101120000%2B0100",
            "20200101120000-0500",
        ],
    )
    def test_single_datetime(self, value):
        key = only_match(f"AcquisitionDateTime={value}")
        assert key.vr == "DT"
        assert not key.is_range

    def test_datetime_with_negative_offset_is_not_a_range(self):
        key = only_match("AcquisitionDateTime=20200101120000-0500")
        assert key.values == ("20200101120000-0500",)
        assert not key.is_range

    def test_datetime_plus_offset_needs_percent_encoding(self):
        # an unencoded '+' is a space, so "20200101120000+0100" arrives as "20200101120000 0100"
        assert error("AcquisitionDateTime=20200101120000+0100").parameter == "AcquisitionDateTime"

    @pytest.mark.parametrize(
        "value",
        [
            "20200101-20200102",
            "-20200102",
            "20200101-",
            "202001-202012",
            "20200101120000-0500-",
            "-20200101120000-0500",
            "20200101120000-0500-20200102120000-0500",
        ],
    )
    def test_datetime_ranges(self, value):
        assert only_match(f"AcquisitionDateTime={value}").is_range

    def test_year_range_is_a_range(self):
        assert only_match("AcquisitionDateTime=2020-2021").is_range

    @pytest.mark.parametrize("value", ["20200101120000%2B1500", "20200101120000%2B0160", "2020%2B9999"])
    def test_invalid_utc_offset(self, value):
        assert error(f"AcquisitionDateTime={value}").parameter == "AcquisitionDateTime"

    @pytest.mark.parametrize("value", ["20201301", "20200101250000", "2020013", "20200101-20201301", "x"])
    def test_invalid_datetimes(self, value):
        assert error(f"AcquisitionDateTime={value}").parameter == "AcquisitionDateTime"

    def test_empty_date_is_universal(self):
        assert only_match("StudyDate=").is_universal


# ------------------------------------------------------------------------------------------------
# Other VRs


class TestValueRules:
    @pytest.mark.parametrize("value", ["CT", "MR", "SR", "OT", "DERIVED_X", "C T"])
    def test_cs_upper_case_accepted(self, value):
        assert only_match(f"Modality={value.replace(' ', '+')}").values == (value,)

    @pytest.mark.parametrize("raw", ["Modality=ct", "Modality=Ct", "PatientSex=m", "Modality=C-T", "Modality=%C3%84"])
    def test_cs_must_be_upper_case(self, raw):
        assert error(raw).parameter == raw.split("=")[0]

    @pytest.mark.parametrize(
        "raw,value", [("SeriesNumber=12", "12"), ("InstanceNumber=-3", "-3"), ("SeriesNumber=%2B3", "+3")]
    )
    def test_integer_strings(self, raw, value):
        assert value_of(raw) == (value,)

    @pytest.mark.parametrize(
        "raw",
        [
            "SeriesNumber=abc",
            "SeriesNumber=1.5",
            "InstanceNumber=5.0",
            "SeriesNumber=1e3",
            "SeriesNumber=1234567890123",
        ],
    )
    def test_invalid_integer_strings(self, raw):
        assert error(raw).parameter == raw.split("=")[0]

    @pytest.mark.parametrize("value", ["70", "70.5", ".5", "1e3", "-1.5E-2", "%2B2"])
    def test_decimal_strings(self, value):
        assert len(value_of(f"PatientWeight={value}")) == 1

    @pytest.mark.parametrize("value", ["abc", "nan", "inf", "1.2.3", "1,5", "12345678901234567"])
    def test_invalid_decimal_strings(self, value):
        assert error(f"PatientWeight={value}").parameter == "PatientWeight"

    def test_unsigned_short(self):
        assert value_of("Rows=512") == ("512",)

    @pytest.mark.parametrize("value", ["70000", "-1"])
    def test_unsigned_short_out_of_range(self, value):
        assert error(f"Rows={value}").parameter == "Rows"

    def test_unsigned_short_not_a_number(self):
        assert error("Rows=big").parameter == "Rows"

    @pytest.mark.parametrize("value", ["045Y", "003M", "012W", "100D"])
    def test_age_strings(self, value):
        assert value_of(f"PatientAge={value}") == (value,)

    @pytest.mark.parametrize("value", ["45", "45Y", "045y", "0450Y"])
    def test_invalid_age_strings(self, value):
        assert error(f"PatientAge={value}").parameter == "PatientAge"

    @pytest.mark.parametrize("encoded", ["%5C", "%00", "%0A", "%0D", "%09", "%1B", "%7F"])
    def test_backslash_and_control_characters_rejected(self, encoded):
        assert error(f"PatientName=a{encoded}b").parameter == "PatientName"

    def test_control_characters_rejected_in_uid_free_text_too(self):
        assert error("StudyDescription=a%0Ab").parameter == "StudyDescription"

    def test_person_name_with_three_groups(self):
        assert value_of("PatientName=A%5EB=C=D") == ("A^B=C=D",)

    def test_person_name_with_four_groups_is_an_error(self):
        assert error("PatientName=A=B=C=D").parameter == "PatientName"

    def test_person_name_group_too_long(self):
        assert error("PatientName=" + "A" * 65).parameter == "PatientName"

    def test_person_name_groups_each_up_to_64(self):
        value = "=".join(["A" * 64] * 3)
        assert value_of("PatientName=" + value) == (value,)


class TestLengths:
    @pytest.mark.parametrize(
        "keyword,limit",
        [
            ("PatientID", 64),
            ("StudyDescription", 64),
            ("AccessionNumber", 16),
            ("StudyID", 16),
            ("Modality", 16),
            ("PerformedStationAETitle", 16),
        ],
    )
    def test_length_limits(self, keyword, limit):
        filler = "A" * limit
        assert value_of(f"{keyword}={filler}") == (filler,)
        assert error(f"{keyword}={filler}A").parameter == keyword

    def test_length_counts_characters_not_bytes(self):
        # 64 two-byte characters are 64 LO characters
        assert value_of("PatientID=" + "%C3%BC" * 64) == ("ü" * 64,)

    def test_uid_length(self):
        uid = "1." + "2" * 62
        assert value_of(f"StudyInstanceUID={uid}") == (uid,)
        assert error(f"StudyInstanceUID={uid}3").parameter == "StudyInstanceUID"


# ------------------------------------------------------------------------------------------------
# QIDO keywords


class TestKeywords:
    @pytest.mark.parametrize("value,expected", [("1", 1), ("100", 100), ("%2010", 10)])
    def test_limit(self, value, expected):
        assert parse_query(f"limit={value}").limit == expected

    def test_limit_absent(self):
        assert parse_query("PatientID=1").limit is None

    @pytest.mark.parametrize("value", ["0", "-1", "abc", "", "1.5", "1e3", "0x10"])
    def test_invalid_limit(self, value):
        assert error(f"limit={value}").parameter == "limit"

    @pytest.mark.parametrize("value,expected", [("0", 0), ("5", 5), ("1000", 1000)])
    def test_offset(self, value, expected):
        assert parse_query(f"offset={value}").offset == expected

    def test_offset_defaults_to_zero(self):
        assert parse_query("").offset == 0

    @pytest.mark.parametrize("value", ["-1", "abc", "", "2.0"])
    def test_invalid_offset(self, value):
        assert error(f"offset={value}").parameter == "offset"

    @pytest.mark.parametrize(
        "name", ["limit", "offset", "fuzzymatching", "emptyvaluematching", "multiplevaluematching"]
    )
    def test_keywords_given_twice(self, name):
        value = "1" if name in ("limit", "offset") else "true"
        assert error(f"{name}={value}&{name}={value}").parameter == name

    @pytest.mark.parametrize(
        "name,attr",
        [
            ("fuzzymatching", "fuzzy"),
            ("emptyvaluematching", "empty_value_matching"),
            ("multiplevaluematching", "multiple_value_matching"),
        ],
    )
    def test_flags(self, name, attr):
        assert getattr(parse_query(f"{name}=true"), attr) is True
        assert getattr(parse_query(f"{name}=false"), attr) is False
        assert getattr(parse_query(f"{name}=TRUE"), attr) is True
        assert getattr(parse_query(""), attr) is False

    @pytest.mark.parametrize("name", ["fuzzymatching", "emptyvaluematching", "multiplevaluematching"])
    @pytest.mark.parametrize("value", ["yes", "1", "", "on"])
    def test_flag_values(self, name, value):
        assert error(f"{name}={value}").parameter == name

    def test_accept_and_charset_parameters(self):
        query = parse_query("accept=application%2Fdicom%2Bjson&charset=utf-8")
        assert query.accept == ("application/dicom+json",)
        assert query.charset == ("utf-8",)
        assert query.matches == () and query.ignored == ()

    def test_unknown_parameters_are_ignored_and_reported(self):
        query = parse_query("foo=bar&PatientID=1&_=12345&NoSuchKeyword=x&0010001=x")
        assert query.ignored == ("foo", "_", "NoSuchKeyword", "0010001")
        assert [k.param for k in query.matches] == ["PatientID"]

    def test_unknown_dotted_parameter_is_ignored(self):
        assert parse_query("Foo.Bar=1").ignored == ("Foo.Bar",)

    def test_keyword_names_are_case_sensitive(self):
        # "patientid" is not a DICOM keyword: ignored, not matched
        query = parse_query("patientid=1")
        assert query.matches == ()
        assert query.ignored == ("patientid",)

    def test_everything_together(self):
        query = parse_query(
            "PatientName=Doe*&StudyDate=20200101-&includefield=00081030%2C00080060&limit=25&offset=50"
            "&fuzzymatching=true&StudyInstanceUID=1.2,1.3&bogus=1"
        )
        assert {k.param for k in query.matches} == {"PatientName", "StudyDate", "StudyInstanceUID"}
        assert len(query.includefields) == 2
        assert (query.limit, query.offset, query.fuzzy) == (25, 50, True)
        assert query.ignored == ("bogus",)


@pytest.mark.parametrize("raw", ["QueryRetrieveLevel=IMAGE", "SpecificCharacterSet=ISO_IR%20100", "00080054=X"])
def test_attributes_the_gateway_sets_itself_are_ignored(raw):
    q = parse_query(raw + "&PatientID=1")
    assert [m.param for m in q.matches] == ["PatientID"]
    assert q.ignored == (raw.split("=")[0],)
