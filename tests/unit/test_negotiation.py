"""WADO-RS content negotiation (PS3.18 8.3.3.1, 8.7.3, 8.7.5, 8.7.7, 8.7.8; Table 10.4.4-1)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import pytest

from gateway.dicomweb.negotiation import (
    ANY_TRANSFER_SYNTAX,
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    IMPLICIT_VR_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_2000_MC_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    RLE_LOSSLESS,
    SUPPORTED_TRANSFER_SYNTAXES,
    BulkPart,
    Choice,
    choose_bulk_media,
    choose_instance_media,
    is_lossy,
    is_uid,
    parse_accept,
    parse_accept_param,
    web_safe,
)
from gateway.problems import HttpProblem

DICOM_MP = 'multipart/related; type="application/dicom"'
OCTET_MP = 'multipart/related; type="application/octet-stream"'
CHECKLIST_EXAMPLE = (
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
    'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5'
)


def study(
    accept: str | None,
    params: tuple[str, ...] = (),
    *,
    strict: bool = False,
    supported: Collection[str] = SUPPORTED_TRANSFER_SYNTAXES,
) -> Choice:
    return choose_instance_media(accept, params, single_instance=False, strict=strict, supported=supported)


def instance(accept: str | None, params: tuple[str, ...] = ()) -> Choice:
    return choose_instance_media(accept, params, single_instance=True)


def problem(call: Callable[..., object], *args: object, **kwargs: object) -> HttpProblem:
    with pytest.raises(HttpProblem) as info:
        call(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------
# Grammar


class TestParseAccept:
    def test_checklist_example(self) -> None:
        first, second = parse_accept(CHECKLIST_EXAMPLE)
        assert first.media_type == "multipart/related"
        assert first.part_type == "application/dicom"
        assert first.transfer_syntax == JPEG_BASELINE
        assert first.q == 1.0
        assert second.transfer_syntax == "*"
        assert second.q == 0.5
        assert "q" not in second.params
        assert (first.position, second.position) == (0, 1)

    def test_quoted_and_unquoted_values_are_the_same(self) -> None:
        quoted = parse_accept('multipart/related; type="application/dicom"; transfer-syntax="1.2.840.10008.1.2.1"')
        bare = parse_accept("multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1")
        assert quoted[0].params == bare[0].params == {"type": "application/dicom", "transfer-syntax": EXPLICIT_VR_LE}

    def test_commas_and_semicolons_inside_quotes_do_not_split(self) -> None:
        ranges = parse_accept('multipart/related; type="application/dicom"; x="a,b;c", application/dicom')
        assert [r.media_type for r in ranges] == ["multipart/related", "application/dicom"]
        assert ranges[0].params["x"] == "a,b;c"
        assert ranges[0].part_type == "application/dicom"

    def test_quoted_pair_is_unescaped(self) -> None:
        (only,) = parse_accept(r'a/b; x="say \"hi\" \\ ok"')
        assert only.params["x"] == 'say "hi" \\ ok'

    def test_case_insensitive_names_values_kept(self) -> None:
        (only,) = parse_accept(f'Multipart/Related; TYPE="Application/DICOM"; Transfer-Syntax={JPEG_BASELINE}; Q=0.7')
        assert only.media_type == "multipart/related"
        assert only.part_type == "application/dicom"
        assert only.params["type"] == "Application/DICOM"  # as given; part_type folds case
        assert only.transfer_syntax == JPEG_BASELINE
        assert only.q == 0.7

    def test_whitespace_everywhere(self) -> None:
        ranges = parse_accept("  \tmultipart/related ;  type = \"application/dicom\" ;q=0.9 ,\t*/* ; q=0.1  ")
        assert [(r.media_type, r.q) for r in ranges] == [("multipart/related", 0.9), ("*/*", 0.1)]
        assert ranges[0].part_type == "application/dicom"

    def test_empty_parameters_and_empty_list_elements_are_allowed(self) -> None:
        ranges = parse_accept(",, application/dicom;; transfer-syntax=*; ,")
        assert len(ranges) == 1
        assert ranges[0].transfer_syntax == "*"

    @pytest.mark.parametrize("q, expected", [("1", 1.0), ("1.000", 1.0), ("0", 0.0), ("0.", 0.0), ("0.125", 0.125)])
    def test_valid_q(self, q: str, expected: float) -> None:
        assert parse_accept(f"application/dicom; q={q}")[0].q == expected

    @pytest.mark.parametrize("q", ["1.5", "2", "-0.5", "0.1234", ".5", "1.001", "abc", "", "0.5x", "1e0", "0.5 5"])
    def test_invalid_q_ignores_the_range(self, q: str) -> None:
        ranges = parse_accept(f"application/dicom; q={q}, */*")
        assert [r.media_type for r in ranges] == ["*/*"]

    @pytest.mark.parametrize(
        "garbage",
        [
            "application",  # no subtype
            "/dicom",
            "*/dicom",  # a wildcard type needs a wildcard subtype
            "applic ation/dicom",
            "application/dicom; transfer-syntax",  # parameter without a value
            "application/dicom; =x",
            "application/dicom; type=a b",  # an unquoted value with a space
            "application/dicom; q=0.5; q=0.6",  # two weights
            "application/dicom; transfer-syntax=1.2.840.10008.1.2.1; transfer-syntax=*",  # ambiguous
            "applicatión/dicom",
            "\x00\x01",
        ],
    )
    def test_garbage_ranges_are_ignored(self, garbage: str) -> None:
        ranges = parse_accept(f"{garbage}, multipart/related")
        assert [r.media_type for r in ranges] == ["multipart/related"]

    def test_unterminated_quote_drops_only_its_range(self) -> None:
        ranges = parse_accept('application/dicom, multipart/related; type="application/dicom')
        assert [r.media_type for r in ranges] == ["application/dicom"]
        ranges = parse_accept('application/dicom, a/b; x="open, multipart/related, c/d; y="closed"')
        assert [r.media_type for r in ranges] == ["application/dicom"]

    @pytest.mark.parametrize("header", [None, "", "   ", ",", '"', ";;;", "\\"])
    def test_nothing_usable_never_raises(self, header: str | None) -> None:
        assert parse_accept(header) == []

    def test_q_may_come_before_other_parameters(self) -> None:
        (only,) = parse_accept("multipart/related; q=0.3; type=application/dicom")
        assert only.q == 0.3
        assert only.part_type == "application/dicom"

    def test_charset_and_unknown_parameters_are_kept(self) -> None:
        (only,) = parse_accept('multipart/related; type="application/dicom+xml"; charset=UTF-8; foo=bar')
        assert only.charset == "UTF-8"
        assert only.params["foo"] == "bar"

    def test_wildcards(self) -> None:
        flags = [r.is_wildcard for r in parse_accept("*/*, multipart/*, application/dicom")]
        assert flags == [True, True, False]

    def test_accept_param_rejoins_values_and_drops_wildcards(self) -> None:
        # A value split on the comma inside the quotes comes back together.
        ranges = parse_accept_param(['multipart/related; type="application/dicom; x=a', 'b"', "*/*", "image/*"])
        assert [r.media_type for r in ranges] == ["multipart/related"]
        assert ranges[0].part_type == "application/dicom; x=a,b"


# ------------------------------------------------------------------------------------------------
# Transfer syntax helpers


class TestTransferSyntaxHelpers:
    def test_web_safe(self) -> None:
        assert not web_safe(IMPLICIT_VR_LE)
        assert not web_safe(EXPLICIT_VR_BE)
        assert web_safe(EXPLICIT_VR_LE)
        assert web_safe(JPEG_BASELINE)

    @pytest.mark.parametrize("uid", [JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS_NEAR_LOSSLESS, JPEG_2000, HTJ2K])
    def test_lossy(self, uid: str) -> None:
        assert is_lossy(uid)

    @pytest.mark.parametrize(
        "uid",
        [EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS,
         JPEG_2000_LOSSLESS, HTJ2K_LOSSLESS, RLE_LOSSLESS, "*"],
    )
    def test_lossless(self, uid: str) -> None:
        assert not is_lossy(uid)

    @pytest.mark.parametrize("uid", ["1.2", "1.2.840.10008.1.2.4.50", "0.0"])
    def test_uid(self, uid: str) -> None:
        assert is_uid(uid)

    @pytest.mark.parametrize("uid", ["", "1", "1.", ".1", "1..2", "1.02", "1.2a", "1.2.٣", "1." + "1" * 64, "*"])
    def test_not_uid(self, uid: str) -> None:
        assert not is_uid(uid)

    def test_supported_set(self) -> None:
        assert IMPLICIT_VR_LE not in SUPPORTED_TRANSFER_SYNTAXES
        assert EXPLICIT_VR_BE not in SUPPORTED_TRANSFER_SYNTAXES
        for uid in (EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, JPEG_BASELINE, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS,
                    JPEG_2000_LOSSLESS, HTJ2K_LOSSLESS, RLE_LOSSLESS):
            assert uid in SUPPORTED_TRANSFER_SYNTAXES


# ------------------------------------------------------------------------------------------------
# Instance resources


class TestInstanceDefaults:
    DEFAULT = Choice("multipart/related", "application/dicom", (EXPLICIT_VR_LE,), 1.0, False)

    @pytest.mark.parametrize("accept", [None, "", "  ", "*/*", "multipart/*", "multipart/related", DICOM_MP])
    def test_default(self, accept: str | None) -> None:
        assert study(accept) == self.DEFAULT
        assert instance(accept) == self.DEFAULT

    def test_browser_accept_gets_the_default(self) -> None:
        accept = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
        choice = study(accept)
        assert choice.media_type == "multipart/related"
        assert choice.transfer_syntaxes == (EXPLICIT_VR_LE,)
        assert choice.q == 0.8

    def test_strict_requires_an_accept_header(self) -> None:
        err = problem(study, None, strict=True)
        assert err.status == 406
        assert "Accept header is required" in err.message
        assert study("*/*", strict=True).transfer_syntaxes == (EXPLICIT_VR_LE,)

    def test_strict_is_satisfied_by_the_accept_parameter(self) -> None:
        choice = study(None, (f"{DICOM_MP}; transfer-syntax={JPEG_LOSSLESS_SV1}",), strict=True)
        assert choice.transfer_syntaxes == (JPEG_LOSSLESS_SV1,)

    def test_multipart_with_another_part_type_is_not_an_instance(self) -> None:
        err = problem(study, OCTET_MP)
        assert err.status == 406
        assert 'multipart/related; type="application/dicom"' in err.message

    def test_wildcard_with_another_part_type_does_not_match(self) -> None:
        assert problem(study, 'multipart/*; type="application/octet-stream"').status == 406


class TestTransferSyntaxSelection:
    def test_checklist_example(self) -> None:
        choice = study(CHECKLIST_EXAMPLE)
        assert choice.media_type == "multipart/related"
        assert choice.part_type == "application/dicom"
        assert choice.transfer_syntaxes == (JPEG_BASELINE, ANY_TRANSFER_SYNTAX)
        assert choice.q == 1.0
        assert choice.lossy_allowed

    def test_as_stored(self) -> None:
        choice = study(f"{DICOM_MP}; transfer-syntax=*")
        assert choice.transfer_syntaxes == ("*",)
        assert not choice.lossy_allowed

    def test_quoted_transfer_syntax(self) -> None:
        assert study(f'{DICOM_MP}; transfer-syntax="{JPEG_LS_LOSSLESS}"').transfer_syntaxes == (JPEG_LS_LOSSLESS,)
        assert study(f'{DICOM_MP}; transfer-syntax="*"').transfer_syntaxes == ("*",)

    def test_unquoted_type(self) -> None:
        choice = study(f"multipart/related; type=application/dicom; transfer-syntax={RLE_LOSSLESS}")
        assert choice.transfer_syntaxes == (RLE_LOSSLESS,)

    def test_q_order(self) -> None:
        accept = (
            f"{DICOM_MP}; transfer-syntax={JPEG_2000_LOSSLESS}; q=0.2, "
            f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}; q=0.9, "
            f"{DICOM_MP}; q=0.5"
        )
        choice = study(accept)
        assert choice.transfer_syntaxes == (JPEG_LS_LOSSLESS, EXPLICIT_VR_LE, JPEG_2000_LOSSLESS)
        assert choice.q == 0.9

    def test_ties_keep_header_order(self) -> None:
        accept = (
            f"{DICOM_MP}; transfer-syntax={RLE_LOSSLESS}; q=0.5, "
            f"{DICOM_MP}; transfer-syntax={JPEG_LOSSLESS_SV1}; q=0.5, "
            f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}; q=0.5"
        )
        assert study(accept).transfer_syntaxes == (RLE_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS)

    def test_duplicates_keep_their_best_place(self) -> None:
        accept = f"{DICOM_MP}; transfer-syntax=*; q=0.1, {DICOM_MP}; q=0.5, {DICOM_MP}; transfer-syntax=*"
        assert study(accept).transfer_syntaxes == ("*", EXPLICIT_VR_LE)

    def test_q_zero_is_not_acceptable(self) -> None:
        assert problem(study, f"{DICOM_MP}; q=0").status == 406
        assert problem(study, "*/*;q=0").status == 406

    def test_q_zero_refuses_what_a_wildcard_would_give(self) -> None:
        # The default is Explicit VR LE; the client refuses it explicitly.
        assert problem(study, f"*/*, {DICOM_MP}; transfer-syntax={EXPLICIT_VR_LE}; q=0").status == 406
        choice = study(f"*/*, {DICOM_MP}; q=0, {DICOM_MP}; transfer-syntax={JPEG_LOSSLESS}; q=0.3")
        assert choice.transfer_syntaxes == (JPEG_LOSSLESS,)

    def test_q_zero_refuses_an_explicit_range(self) -> None:
        accept = (
            f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}, {DICOM_MP}; q=0.5, "
            f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}; q=0"
        )
        assert study(accept).transfer_syntaxes == (EXPLICIT_VR_LE,)

    def test_more_specific_wildcard_q_zero_refuses(self) -> None:
        assert problem(study, "multipart/*;q=0, */*").status == 406

    def test_explicit_range_beats_wildcard_q_zero(self) -> None:
        assert study(f"*/*;q=0, {DICOM_MP}").transfer_syntaxes == (EXPLICIT_VR_LE,)

    def test_explicit_ranges_before_wildcards_whatever_their_q(self) -> None:
        choice = study(f"*/*, {DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}; q=0.2")
        assert choice.transfer_syntaxes == (JPEG_LS_LOSSLESS, EXPLICIT_VR_LE)
        assert choice.q == 0.2

    def test_wildcard_may_carry_a_transfer_syntax(self) -> None:
        assert study("*/*; transfer-syntax=*").transfer_syntaxes == ("*",)

    def test_invalid_q_ignores_the_range(self) -> None:
        choice = study(f"{DICOM_MP}; transfer-syntax={JPEG_BASELINE}; q=1.5, {DICOM_MP}; q=0.4")
        assert choice.transfer_syntaxes == (EXPLICIT_VR_LE,)
        assert not choice.lossy_allowed

    def test_garbage_next_to_a_good_range(self) -> None:
        choice = study(f'{DICOM_MP}; transfer-syntax=; q=1, ;;;, x, "{DICOM_MP}", {DICOM_MP}; q=0.2')
        assert choice.transfer_syntaxes == (EXPLICIT_VR_LE,)

    def test_only_garbage_is_not_acceptable(self) -> None:
        assert problem(study, "garbage, nonsense/;;").status == 406

    @pytest.mark.parametrize("uid", [IMPLICIT_VR_LE, EXPLICIT_VR_BE])
    def test_never_on_the_web(self, uid: str) -> None:
        err = problem(study, f"{DICOM_MP}; transfer-syntax={uid}")
        assert err.status == 406
        assert "Implicit VR Little Endian" in err.message
        # Not even if a handler puts them in the supported set by mistake.
        err = problem(study, f"{DICOM_MP}; transfer-syntax={uid}", supported=SUPPORTED_TRANSFER_SYNTAXES | {uid})
        assert err.status == 406
        offered = err.message.split("one of ", 1)[1].split(";", 1)[0].split(", ")
        assert EXPLICIT_VR_LE in offered
        assert uid not in offered
        choice = study(f"{DICOM_MP}; transfer-syntax={uid}, {DICOM_MP}; transfer-syntax={RLE_LOSSLESS}; q=0.1")
        assert choice.transfer_syntaxes == (RLE_LOSSLESS,)

    @pytest.mark.parametrize("value", ["1.2.840.10008.1.2.4.050", "jpeg", "1.2.840..1", "1.2.840.10008.1.2.4.50x"])
    def test_not_a_uid_is_ignored(self, value: str) -> None:
        assert problem(study, f"{DICOM_MP}; transfer-syntax={value}").status == 406
        assert study(f"{DICOM_MP}; transfer-syntax={value}, */*;q=0.1").transfer_syntaxes == (EXPLICIT_VR_LE,)

    @pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.4.100", "1.2.3.4.5", "1.2.840.10008.1.2.4.110"])
    def test_unsupported_uid_is_not_acceptable(self, uid: str) -> None:
        err = problem(study, f"{DICOM_MP}; transfer-syntax={uid}")
        assert err.status == 406
        assert err.error == "not-acceptable"
        assert EXPLICIT_VR_LE in err.message  # says what is on offer

    def test_supported_can_be_narrowed(self) -> None:
        accept = f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}, {DICOM_MP}; q=0.5"
        choice = study(accept, supported={EXPLICIT_VR_LE})
        assert choice.transfer_syntaxes == (EXPLICIT_VR_LE,)
        err = problem(study, f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}", supported={EXPLICIT_VR_LE})
        assert err.status == 406

    def test_default_syntax_must_be_supported_too(self) -> None:
        narrow = {JPEG_LS_LOSSLESS}
        assert problem(study, "*/*", supported=narrow).status == 406
        assert problem(study, DICOM_MP, supported=narrow).status == 406
        assert study(f"{DICOM_MP}, */*; transfer-syntax=*", supported=narrow).transfer_syntaxes == ("*",)

    def test_pass_through_syntax_may_be_named(self) -> None:
        assert study(f"{DICOM_MP}; transfer-syntax={HTJ2K_LOSSLESS}").transfer_syntaxes == (HTJ2K_LOSSLESS,)


class TestSinglePart:
    def test_application_dicom_for_an_instance(self) -> None:
        choice = instance(f"application/dicom; transfer-syntax={JPEG_LOSSLESS_SV1}")
        assert choice.media_type == "application/dicom"
        assert not choice.multipart
        assert choice.part_type == "application/dicom"
        assert choice.transfer_syntaxes == (JPEG_LOSSLESS_SV1,)

    def test_application_dicom_default_syntax(self) -> None:
        assert instance("application/dicom").transfer_syntaxes == (EXPLICIT_VR_LE,)

    def test_application_wildcard_for_an_instance(self) -> None:
        assert instance("application/*").media_type == "application/dicom"

    @pytest.mark.parametrize("accept", ["application/dicom", "application/*", "application/dicom; transfer-syntax=*"])
    def test_single_part_ignored_for_a_study(self, accept: str) -> None:
        err = problem(study, accept)
        assert err.status == 406
        assert "single-part application/dicom only for one instance" in err.message

    def test_single_part_ignored_for_a_study_falls_back(self) -> None:
        choice = study(f"application/dicom, {DICOM_MP}; transfer-syntax={RLE_LOSSLESS}; q=0.3")
        assert choice.media_type == "multipart/related"
        assert choice.transfer_syntaxes == (RLE_LOSSLESS,)

    def test_syntaxes_belong_to_the_chosen_media_type(self) -> None:
        accept = f"application/dicom; transfer-syntax={JPEG_LS_LOSSLESS}, {DICOM_MP}; transfer-syntax=*; q=0.5"
        choice = instance(accept)
        assert choice.media_type == "application/dicom"
        assert choice.transfer_syntaxes == (JPEG_LS_LOSSLESS,)
        choice = instance(f"application/dicom; q=0.4, {DICOM_MP}; transfer-syntax=*; q=0.5")
        assert choice.media_type == "multipart/related"
        assert choice.transfer_syntaxes == ("*",)


class TestAcceptParameter:
    def test_parameter_wins_over_the_header(self) -> None:
        choice = study(f"{DICOM_MP}; transfer-syntax=*", (f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}",))
        assert choice.transfer_syntaxes == (JPEG_LS_LOSSLESS, "*")

    def test_parameter_wins_even_with_lower_q(self) -> None:
        choice = study(DICOM_MP, (f"{DICOM_MP}; transfer-syntax={RLE_LOSSLESS}; q=0.1",))
        assert choice.transfer_syntaxes == (RLE_LOSSLESS, EXPLICIT_VR_LE)
        assert choice.q == 0.1

    def test_parameter_repeated_and_comma_separated(self) -> None:
        params = (
            f"{DICOM_MP}; transfer-syntax={RLE_LOSSLESS}; q=0.2,{DICOM_MP}; transfer-syntax={JPEG_LOSSLESS}; q=0.3",
            f"{DICOM_MP}; transfer-syntax={JPEG_LS_LOSSLESS}; q=0.9",
        )
        assert study(None, params).transfer_syntaxes == (JPEG_LS_LOSSLESS, JPEG_LOSSLESS, RLE_LOSSLESS, EXPLICIT_VR_LE)

    @pytest.mark.parametrize("wildcard", ["*/*", "multipart/*", "application/*"])
    def test_parameter_rejects_wildcards(self, wildcard: str) -> None:
        # Ignored in the parameter, so the header decides; with no wildcard there, nothing is left.
        header = f"{DICOM_MP}; transfer-syntax={RLE_LOSSLESS}"
        assert instance(header, (f"{wildcard}; transfer-syntax=*",)).transfer_syntaxes == (RLE_LOSSLESS,)
        assert problem(instance, "image/jpeg", (wildcard,)).status == 406

    def test_unusable_parameter_falls_back_to_the_header(self) -> None:
        params = (f"{DICOM_MP}; transfer-syntax={IMPLICIT_VR_LE}",)
        assert study(f"{DICOM_MP}; transfer-syntax=*", params).transfer_syntaxes == ("*",)

    def test_empty_parameter_values_are_no_parameter(self) -> None:
        assert study(None, ("", " ")).transfer_syntaxes == (EXPLICIT_VR_LE,)
        assert problem(study, None, ("", " "), strict=True).status == 406


class TestMixedCategories:
    @pytest.mark.parametrize(
        "accept",
        [
            f"{DICOM_MP}, image/jpeg",
            "application/dicom, image/png;q=0.5",
            "multipart/related, text/html",
            f"{OCTET_MP}, video/mp4",
            "image/gif, application/dicom+json",
        ],
    )
    def test_header_mix_is_400(self, accept: str) -> None:
        err = problem(instance, accept)
        assert err.status == 400
        assert err.error == "bad-request"
        assert err.parameter is None

    def test_parameter_mix_is_400(self) -> None:
        err = problem(study, "*/*", (f"{DICOM_MP},image/jpeg",))
        assert err.status == 400
        assert err.parameter == "accept"

    @pytest.mark.parametrize(
        "accept",
        [
            f"*/*, {DICOM_MP}",  # a wildcard is no rendered type
            f"image/*, {DICOM_MP}",
            f"text/*;q=0.1, {DICOM_MP}",
            f"{DICOM_MP}, image/jpeg;q=0",  # refused, so not asked for
            f"{DICOM_MP}, image/jpeg;q=7",  # invalid, so ignored
            f"{DICOM_MP}, application/json",  # neither category
            f"video/*, {DICOM_MP}",
            "multipart/*, image/jpeg",
        ],
    )
    def test_not_a_mix(self, accept: str) -> None:
        assert study(accept).transfer_syntaxes == (EXPLICIT_VR_LE,)

    def test_rendered_only_is_406_not_400(self) -> None:
        assert problem(instance, "image/jpeg, image/png").status == 406


class TestLossyAllowed:
    @pytest.mark.parametrize("uid", [JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS_NEAR_LOSSLESS, JPEG_2000, HTJ2K])
    def test_named_lossy_syntax(self, uid: str) -> None:
        choice = study(f"{DICOM_MP}; transfer-syntax={uid}")
        assert choice.lossy_allowed
        assert choice.transfer_syntaxes == (uid,)

    def test_lossy_named_with_low_q(self) -> None:
        assert study(f"{DICOM_MP}; q=0.9, {DICOM_MP}; transfer-syntax={JPEG_2000}; q=0.1").lossy_allowed

    @pytest.mark.parametrize(
        "accept",
        [
            "*/*",
            f"{DICOM_MP}; transfer-syntax=*",
            f"{DICOM_MP}; transfer-syntax={JPEG_LOSSLESS_SV1}, {DICOM_MP}; transfer-syntax={JPEG_2000_LOSSLESS}",
            f"{DICOM_MP}, {DICOM_MP}; transfer-syntax={JPEG_BASELINE}; q=0",  # refused
            f"{DICOM_MP}, {DICOM_MP}; transfer-syntax=1.2.840.10008.1.2.4.100",  # lossy but unsupported
        ],
    )
    def test_not_named(self, accept: str) -> None:
        assert not study(accept).lossy_allowed

    def test_lossy_of_the_other_media_type_does_not_count(self) -> None:
        choice = instance(f"application/dicom, {DICOM_MP}; transfer-syntax={JPEG_BASELINE}; q=0.5")
        assert choice.media_type == "application/dicom"
        assert not choice.lossy_allowed


# ------------------------------------------------------------------------------------------------
# Bulk data and pixel data


class TestBulk:
    @pytest.mark.parametrize("accept", [None, "*/*", "multipart/*", "multipart/related", OCTET_MP])
    def test_default(self, accept: str | None) -> None:
        choice = choose_bulk_media(accept)
        assert choice.media_type == "multipart/related"
        assert choice.parts == (BulkPart("application/octet-stream", EXPLICIT_VR_LE),)
        assert not choice.lossy_allowed

    def test_octet_stream_as_stored(self) -> None:
        assert choose_bulk_media(f"{OCTET_MP}; transfer-syntax=*").parts == (BulkPart("application/octet-stream", "*"),)

    def test_octet_stream_with_a_compressed_syntax(self) -> None:
        choice = choose_bulk_media(f'{OCTET_MP}; transfer-syntax="{JPEG_LS_LOSSLESS}"')
        assert choice.parts == (BulkPart("application/octet-stream", JPEG_LS_LOSSLESS),)

    @pytest.mark.parametrize("uid", [IMPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE, "1.2.3.4", "nope"])
    def test_octet_stream_refuses(self, uid: str) -> None:
        assert problem(choose_bulk_media, f"{OCTET_MP}; transfer-syntax={uid}").status == 406

    @pytest.mark.parametrize(
        "part_type, default",
        [
            ("image/jpeg", JPEG_LOSSLESS_SV1),
            ("image/jls", JPEG_LS_LOSSLESS),
            ("image/jp2", JPEG_2000_LOSSLESS),
            ("image/jpx", JPEG_2000_MC_LOSSLESS),
            ("image/dicom-rle", RLE_LOSSLESS),
        ],
    )
    def test_compressed_defaults(self, part_type: str, default: str) -> None:
        choice = choose_bulk_media(f'multipart/related; type="{part_type}"')
        assert choice.parts == (BulkPart(part_type, default),)
        assert not choice.lossy_allowed

    def test_compressed_default_must_be_supported(self) -> None:
        narrow = SUPPORTED_TRANSFER_SYNTAXES - {JPEG_2000_MC_LOSSLESS}
        assert problem(choose_bulk_media, 'multipart/related; type="image/jpx"', supported=narrow).status == 406

    def test_compressed_with_a_matching_syntax(self) -> None:
        choice = choose_bulk_media(f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_BASELINE}")
        assert choice.parts == (BulkPart("image/jpeg", JPEG_BASELINE),)
        assert choice.lossy_allowed

    def test_compressed_with_a_foreign_syntax_is_ignored(self) -> None:
        accept = f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_2000_LOSSLESS}"
        assert problem(choose_bulk_media, accept).status == 406

    def test_order_and_pairs(self) -> None:
        accept = (
            'multipart/related; type="image/jls"; q=0.5, '
            f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG_BASELINE}; q=0.9, '
            f"{OCTET_MP}; transfer-syntax=*; q=0.5, "
            "multipart/related; type=image/x-unknown, "
            "*/*; q=0.1"
        )
        choice = choose_bulk_media(accept)
        assert choice.parts == (
            BulkPart("image/jpeg", JPEG_BASELINE),
            BulkPart("image/jls", JPEG_LS_LOSSLESS),
            BulkPart("application/octet-stream", "*"),
            BulkPart("application/octet-stream", EXPLICIT_VR_LE),
        )
        assert choice.q == 0.9
        assert choice.lossy_allowed

    def test_single_part_types_are_not_offered(self) -> None:
        assert problem(choose_bulk_media, "application/octet-stream").status == 406
        assert problem(choose_bulk_media, "image/jls").status == 406

    def test_instance_types_are_not_bulk(self) -> None:
        assert problem(choose_bulk_media, DICOM_MP).status == 406

    def test_accept_parameter_wins(self) -> None:
        choice = choose_bulk_media(OCTET_MP, ('multipart/related; type="image/dicom-rle"',))
        assert choice.parts == (
            BulkPart("image/dicom-rle", RLE_LOSSLESS),
            BulkPart("application/octet-stream", EXPLICIT_VR_LE),
        )

    def test_mixed_is_400(self) -> None:
        assert problem(choose_bulk_media, f"{OCTET_MP}, image/png").status == 400

    def test_q_zero(self) -> None:
        assert problem(choose_bulk_media, f"*/*, {OCTET_MP}; q=0").status == 406

    def test_strict(self) -> None:
        assert problem(choose_bulk_media, None, strict=True).status == 406
