"""Tests for the DICOM JSON (PS3.18 Annex F) encoder."""

from __future__ import annotations

import base64
import io
import json
import ast
import re
import struct
import time
import warnings
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from gateway.dicomweb.dicomjson import (
    BINARY_VRS,
    dataset_to_dict,
    dataset_to_json,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

VALID_VRS = {
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB",
    "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM",
    "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
}  # fmt: skip
NAME = re.compile(r"[0-9A-F]{8}\Z")


def check_model(obj: dict[str, Any]) -> None:
    """Structural PS3.18 F.2 checks applied to every encoder output."""
    assert isinstance(obj, dict)
    keys = list(obj)
    assert keys == sorted(keys)
    for key, member in obj.items():
        assert NAME.match(key), key
        tag = int(key, 16)
        assert tag & 0xFFFF != 0, "group length emitted"
        assert tag >> 16 not in (0x0000, 0x0002), "command/file meta emitted"
        assert set(member) <= {"vr", "Value", "BulkDataURI", "InlineBinary"}
        assert member["vr"] in VALID_VRS, member
        assert len(set(member) & {"Value", "BulkDataURI", "InlineBinary"}) <= 1
        vr = member["vr"]
        if "InlineBinary" in member:
            assert vr in BINARY_VRS
            base64.b64decode(member["InlineBinary"], validate=True)
        if "Value" in member:
            values = member["Value"]
            assert isinstance(values, list) and values
            for value in values:
                if vr == "SQ":
                    check_model(value)
                elif vr == "PN" and value is not None:
                    assert value and set(value) <= {"Alphabetic", "Ideographic", "Phonetic"}
                    assert all(isinstance(v, str) and v for v in value.values())
                elif vr == "AT":
                    assert re.fullmatch(r"[0-9A-F]{8}", value)


def encode(ds: Dataset, **kwargs: Any) -> dict[str, Any]:
    """Encode with both entry points, check the model and their agreement."""
    text = dataset_to_json(ds, **kwargs)
    obj = json.loads(text)
    check_model(obj)
    assert dataset_to_dict(ds, **kwargs) == obj
    return obj


def to_bytes(ds: Dataset, implicit: bool = True, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def from_bytes(data: bytes, implicit: bool = True, little: bool = True) -> Dataset:
    return read_dataset(io.BytesIO(data), implicit, little)


def reread(ds: Dataset, implicit: bool = True, little: bool = True) -> Dataset:
    return from_bytes(to_bytes(ds, implicit, little), implicit, little)


def implicit_element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element, padded to even length with a space."""
    if len(value) % 2:
        value += b" "
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def explicit_element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length field."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def number_texts(text: str, tag: str) -> str:
    """The raw JSON text of the Value array of `tag` (to check number text)."""
    match = re.search(rf'"{tag}":\{{"vr":"[A-Z]{{2}}","Value":\[(.*?)\]\}}', text)
    assert match, text
    return match.group(1)


ALL_READ_MODES = pytest.mark.parametrize(
    "implicit,little",
    [(True, True), (False, True), (False, False)],
    ids=["implicit-le", "explicit-le", "explicit-be"],
)


# ---------------------------------------------------------------------------
# member names, ordering, dropped elements
# ---------------------------------------------------------------------------


def test_members_sorted_uppercase_hex_at_all_levels() -> None:
    ds = Dataset()
    ds.PatientID = "ID"
    ds.Modality = "CT"
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x000910AB, "LO", "x")
    item = Dataset()
    item.SeriesInstanceUID = "1.2"
    item.Modality = "MR"
    item.add_new(0x00091010, "LO", "ACME")
    ds.ReferencedSeriesSequence = [item]
    obj = encode(ds)
    assert list(obj) == ["00080060", "00081115", "00090010", "000910AB", "00100020"]
    assert list(obj["00081115"]["Value"][0]) == ["00080060", "00091010", "0020000E"]


def test_sorted_even_when_raw_dataset_is_out_of_order() -> None:
    data = implicit_element(0x00100020, b"ID") + implicit_element(0x00080060, b"CT")
    ds = from_bytes(data)
    assert list(encode(ds)) == ["00080060", "00100020"]


def test_group_length_file_meta_and_command_elements_dropped() -> None:
    ds = Dataset()
    ds.add_new(0x00000100, "US", 1)  # CommandField
    ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.1")
    ds.add_new(0x00080000, "UL", 42)
    ds.add_new(0x00090000, "UL", 10)
    ds.add_new(0xFFFCFFFC, "OB", b"\0\0")
    ds.PatientID = "X"
    ds.ReferencedSeriesSequence = [Dataset()]
    ds.ReferencedSeriesSequence[0].add_new(0x00200000, "UL", 8)
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2"
    obj = encode(ds)
    assert list(obj) == ["00081115", "00100020"]
    assert list(obj["00081115"]["Value"][0]) == ["0020000E"]


def test_group_length_dropped_from_raw_data() -> None:
    data = (
        implicit_element(0x00080000, struct.pack("<I", 10))
        + implicit_element(0x00080060, b"CT")
        + implicit_element(0x00100020, b"ID")
    )
    assert list(encode(from_bytes(data))) == ["00080060", "00100020"]


def test_file_meta_of_file_dataset_not_emitted() -> None:
    ds = Dataset()
    ds.PatientID = "X"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    assert list(encode(ds)) == ["00100020"]


def test_exclude_applies_to_top_level_only() -> None:
    ds = Dataset()
    ds.PatientID = "X"
    ds.PixelData = b"\0\0"
    ds.BitsAllocated = 8
    item = Dataset()
    item.PatientID = "Y"
    ds.ReferencedSeriesSequence = [item]
    obj = encode(ds, exclude=lambda tag: tag in (0x7FE00010, 0x00100020))
    assert "7FE00010" not in obj and "00100020" not in obj
    assert obj["00081115"]["Value"][0]["00100020"]["Value"] == ["Y"]


# ---------------------------------------------------------------------------
# empty values
# ---------------------------------------------------------------------------


def test_empty_elements_have_vr_only() -> None:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    ds.add_new(0x00280010, "US", None)
    ds.add_new(0x00180050, "DS", "")
    ds.add_new(0x00201041, "DS", None)
    ds.add_new(0x00280009, "AT", None)
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "OB", b"")
    ds.ReferencedSeriesSequence = []
    obj = encode(ds)
    assert obj["00100010"] == {"vr": "PN"}
    assert obj["00100020"] == {"vr": "LO"}
    assert obj["00280010"] == {"vr": "US"}
    assert obj["00180050"] == {"vr": "DS"}
    assert obj["00201041"] == {"vr": "DS"}
    assert obj["00280009"] == {"vr": "AT"}
    assert obj["00091001"] == {"vr": "OB"}
    assert obj["00081115"] == {"vr": "SQ"}


def test_empty_elements_from_raw_data() -> None:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = "   "  # padding only
    ds.Rows = None
    ds.SliceThickness = None
    ds.ReferencedSeriesSequence = []
    ds.IconImageSequence = [Dataset()]
    for implicit in (True, False):
        obj = encode(reread(ds, implicit))
        assert obj["00100010"] == {"vr": "PN"}
        assert obj["00100020"] == {"vr": "LO"}
        assert obj["00280010"] == {"vr": "US"}
        assert obj["00180050"] == {"vr": "DS"}
        assert obj["00081115"] == {"vr": "SQ"}
        assert obj["00880200"] == {"vr": "SQ", "Value": [{}]}


def test_empty_sequence_item_is_empty_object() -> None:
    ds = Dataset()
    first = Dataset()
    first.SeriesInstanceUID = "1.2"
    ds.ReferencedSeriesSequence = [first, Dataset()]
    obj = encode(ds)
    assert obj["00081115"]["Value"][1] == {}


def test_bulk_handler_not_called_for_empty_values() -> None:
    calls: list[Any] = []
    ds = Dataset()
    ds.add_new(0x00091001, "OB", b"")
    ds.add_new(0x00090010, "LO", "ACME")
    obj = encode(ds, bulk_data=lambda path, vr: calls.append(path) or "x")
    assert calls == []
    assert obj["00091001"] == {"vr": "OB"}


# ---------------------------------------------------------------------------
# multi-valued elements with empty components
# ---------------------------------------------------------------------------


def test_multivalued_empty_component_is_null() -> None:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    assert encode(ds)["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}


@ALL_READ_MODES
def test_multivalued_empty_component_from_raw(implicit: bool, little: bool) -> None:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.PixelSpacing = ["0.5", ""]
    ds.add_new(0x00181310, "US", [1, 2, 3, 4])  # AcquisitionMatrix
    obj = encode(reread(ds, implicit, little))
    assert obj["00080008"]["Value"] == ["ORIGINAL", None, "AXIAL"]
    assert obj["00280030"]["Value"] == [0.5, None]
    assert obj["00181310"]["Value"] == [1, 2, 3, 4]


def test_multivalued_padding_stripped_per_value() -> None:
    data = implicit_element(0x00080008, b"ORIGINAL \\ PRIMARY\\\\AXIAL")
    obj = encode(from_bytes(data))
    assert obj["00080008"]["Value"] == ["ORIGINAL", "PRIMARY", None, "AXIAL"]


def test_multivalued_pn_with_empty_value_is_null() -> None:
    ds = Dataset()
    ds.add_new(0x00081070, "PN", ["Doe^John", "", "Roe^Jane"])  # OperatorsName
    assert encode(ds)["00081070"]["Value"] == [
        {"Alphabetic": "Doe^John"},
        None,
        {"Alphabetic": "Roe^Jane"},
    ]
    raw = from_bytes(implicit_element(0x00081070, b"Doe^John\\\\Roe^Jane"))
    assert encode(raw)["00081070"]["Value"] == [
        {"Alphabetic": "Doe^John"},
        None,
        {"Alphabetic": "Roe^Jane"},
    ]


# ---------------------------------------------------------------------------
# PN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("Doe^John", {"Alphabetic": "Doe^John"}),
        ("Doe^John=", {"Alphabetic": "Doe^John"}),
        ("=山田^太郎", {"Ideographic": "山田^太郎"}),
        ("==やまだ^たろう", {"Phonetic": "やまだ^たろう"}),
        ("Yamada^Tarou==やまだ^たろう", {"Alphabetic": "Yamada^Tarou", "Phonetic": "やまだ^たろう"}),
        (
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
        ),
    ],
)
def test_pn_groups(name: str, expected: dict[str, str]) -> None:
    ds = Dataset()
    ds.PatientName = name
    assert encode(ds)["00100010"] == {"vr": "PN", "Value": [expected]}
    ds = Dataset()
    ds.PatientName = PersonName(name)
    assert encode(ds)["00100010"] == {"vr": "PN", "Value": [expected]}


def test_pn_all_groups_empty_is_empty_element() -> None:
    ds = Dataset()
    ds.PatientName = "=="
    assert encode(ds)["00100010"] == {"vr": "PN"}


@ALL_READ_MODES
def test_pn_utf8_dataset_read_from_bytes(implicit: bool, little: bool) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.add_new(0x00081070, "PN", ["山田^太郎=やまだ^たろう", "Müller^Jürgen"])
    ds.StudyDescription = "Schädel – 頭部"
    raw = reread(ds, implicit, little)
    assert isinstance(raw.get_item(0x00100010), RawDataElement)
    obj = encode(raw)
    assert obj["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert obj["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert obj["00081070"]["Value"] == [
        {"Alphabetic": "山田^太郎", "Ideographic": "やまだ^たろう"},
        {"Alphabetic": "Müller^Jürgen"},
    ]
    assert obj["00081030"]["Value"] == ["Schädel – 頭部"]
    text = dataset_to_json(raw)
    assert "Müller^Jürgen" in text and "山田^太郎" in text  # not \\u-escaped
    text.encode("utf-8")


def test_pn_utf8_raw_bytes_written_by_hand() -> None:
    data = (
        implicit_element(0x00080005, b"ISO_IR 192")
        + implicit_element(0x00100010, "山田^太郎=やまだ^たろう".encode())
    )
    obj = encode(from_bytes(data))
    assert obj["00100010"]["Value"] == [
        {"Alphabetic": "山田^太郎", "Ideographic": "やまだ^たろう"}
    ]


def test_latin1_dataset_read_from_bytes() -> None:
    data = (
        implicit_element(0x00080005, b"ISO_IR 100")
        + implicit_element(0x00081030, "Schädel".encode("latin-1"))
        + implicit_element(0x00100010, "Müller^Jürgen".encode("latin-1"))
        + implicit_element(0x00104000, "  Ça va  ".encode("latin-1"))  # LT
    )
    ds = from_bytes(data)
    obj = encode(ds)
    assert obj["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert obj["00081030"]["Value"] == ["Schädel"]
    assert obj["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert obj["00104000"]["Value"] == ["  Ça va"]
    # the source charset is never echoed
    assert "ISO_IR 100" not in dataset_to_json(ds)


def test_latin1_charset_inherited_by_sequence_items() -> None:
    item = implicit_element(0x00100010, "Müller^Jürgen".encode("latin-1"))
    item_bytes = struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    data = implicit_element(0x00080005, b"ISO_IR 100") + implicit_element(
        0x00081115, item_bytes
    )
    obj = encode(from_bytes(data))
    assert obj["00081115"]["Value"][0]["00100010"]["Value"] == [
        {"Alphabetic": "Müller^Jürgen"}
    ]


def test_iso_2022_japanese_person_name() -> None:
    # PS3.5 H.3.1 example
    name = (
        b"Yamada^Tarou="
        b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B="
        b"\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
    )
    data = implicit_element(0x00080005, b"\\ISO 2022 IR 87") + implicit_element(
        0x00100010, name
    )
    obj = encode(from_bytes(data))
    assert obj["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert obj["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    ]


def test_specific_character_set_in_code_built_dataset() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    obj = encode(ds)
    assert obj["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert obj["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]


def test_no_character_set_added_when_absent() -> None:
    ds = Dataset()
    ds.PatientID = "X"
    assert "00080005" not in encode(ds)


# ---------------------------------------------------------------------------
# IS / DS
# ---------------------------------------------------------------------------

DS_CASES = [
    (b"1.50", "1.50"),
    (b" +1.5 ", "1.5"),
    (b".5", "0.5"),
    (b"-.5", "-0.5"),
    (b"1.", "1"),
    (b"-1.e3", "-1e3"),
    (b"1e5", "1e5"),
    (b"+1.5E+03", "1.5E+03"),
    (b"-0.5", "-0.5"),
    (b"007.10", "7.10"),
    (b"0", "0"),
    (b"abc", '"abc"'),
    (b"1,5", '"1,5"'),
    (b"NaN", '"NaN"'),
    (b"+", '"+"'),
]


@pytest.mark.parametrize("raw_value,expected", DS_CASES)
def test_ds_from_raw_bytes(raw_value: bytes, expected: str) -> None:
    ds = from_bytes(implicit_element(0x00180050, raw_value))  # SliceThickness DS
    text = dataset_to_json(ds)
    assert number_texts(text, "00180050") == expected
    assert json.loads(text)["00180050"]["Value"] == [json.loads(expected)]
    check_model(json.loads(text))


def test_ds_invalid_value_does_not_raise_or_warn() -> None:
    ds = from_bytes(implicit_element(0x00180050, b"abc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode(ds)["00180050"] == {"vr": "DS", "Value": ["abc"]}


def test_ds_multivalued_raw_keeps_each_text() -> None:
    ds = from_bytes(implicit_element(0x00280030, b"0.50\\ 1.250 "))  # PixelSpacing
    assert number_texts(dataset_to_json(ds), "00280030") == "0.50,1.250"


def test_ds_code_built_keeps_original_text() -> None:
    ds = Dataset()
    ds.SliceThickness = "1.50"
    ds.PixelSpacing = ["0.50", ".5"]
    ds.add_new(0x00201041, "DS", 2.5)  # float given in code
    ds.add_new(0x00181050, "DS", 1)  # int given in code
    text = dataset_to_json(ds)
    assert number_texts(text, "00180050") == "1.50"
    assert number_texts(text, "00280030") == "0.50,0.5"
    assert number_texts(text, "00201041") == "2.5"
    assert number_texts(text, "00181050") in ("1", "1.0")  # pydicom: DSfloat(1)
    assert encode(ds)["00180050"]["Value"] == [1.5]


def test_ds_after_pydicom_conversion_keeps_original_text() -> None:
    ds = from_bytes(implicit_element(0x00180050, b"1.50"))
    assert ds.SliceThickness == 1.5  # converted and cached by pydicom
    assert number_texts(dataset_to_json(ds), "00180050") == "1.50"


@pytest.mark.parametrize(
    "raw_value,expected",
    [
        (b"42", "42"),
        (b"  42", "42"),
        (b"+7", "7"),
        (b"-0012", "-12"),
        (b"-0", "-0"),
        (b"12345678901", "12345678901"),
        (b"x1", '"x1"'),
    ],
)
def test_is_from_raw_bytes(raw_value: bytes, expected: str) -> None:
    ds = from_bytes(implicit_element(0x00200013, raw_value))  # InstanceNumber IS
    text = dataset_to_json(ds)
    assert number_texts(text, "00200013") == expected
    assert json.loads(text)["00200013"]["Value"] == [json.loads(expected)]


def test_is_code_built() -> None:
    ds = Dataset()
    ds.InstanceNumber = 5
    ds.add_new(0x00200012, "IS", "007")  # AcquisitionNumber
    obj = encode(ds)
    assert obj["00200013"] == {"vr": "IS", "Value": [5]}
    assert obj["00200012"] == {"vr": "IS", "Value": [7]}


# ---------------------------------------------------------------------------
# binary numbers, NaN / Infinity
# ---------------------------------------------------------------------------


def test_fl_fd_nan_and_infinity_are_strings() -> None:
    ds = Dataset()
    ds.add_new(0x00182044, "FL", [float("nan"), float("inf"), float("-inf"), 0.1])
    ds.add_new(0x00189087, "FD", [float("nan"), -float("inf"), 2.5])
    obj = encode(ds)
    assert obj["00182044"]["Value"] == ["NaN", "Infinity", "-Infinity", 0.1]
    assert obj["00189087"]["Value"] == ["NaN", "-Infinity", 2.5]


@ALL_READ_MODES
def test_fl_nan_from_raw_bytes(implicit: bool, little: bool) -> None:
    ds = Dataset()
    ds.add_new(0x00182044, "FL", [float("nan"), 0.1, 1e-7, -3.0, 16777216.0])
    ds.add_new(0x00189087, "FD", [float("inf"), 0.1])
    raw = reread(ds, implicit, little)
    text = dataset_to_json(raw)
    # FL is written with the shortest text that reads back to the same float32
    assert number_texts(text, "00182044") == '"NaN",0.1,1e-07,-3,16777216'
    obj = encode(raw)
    assert obj["00189087"]["Value"] == ["Infinity", 0.1]
    for text_value, number in zip(obj["00182044"]["Value"][1:], [0.1, 1e-7, -3.0, 16777216.0]):
        assert struct.pack("<f", text_value) == struct.pack("<f", number)


@pytest.mark.parametrize("little", [True, False], ids=["explicit-le", "explicit-be"])
def test_integer_vrs_from_raw_bytes(little: bool) -> None:
    ds = Dataset()
    ds.Rows = 512
    ds.add_new(0x00720076, "SL", [-5, 70000])  # SelectorSLValue
    ds.add_new(0x00720078, "UL", [4000000000])  # SelectorULValue
    ds.add_new(0x0072007E, "SS", [-2, 3])  # SelectorSSValue
    ds.add_new(0x00720082, "SV", [-(2**62)])  # SelectorSVValue
    ds.add_new(0x00720083, "UV", [2**63 + 1])  # SelectorUVValue
    obj = encode(reread(ds, implicit=False, little=little))
    assert obj["00280010"] == {"vr": "US", "Value": [512]}
    assert obj["00720076"] == {"vr": "SL", "Value": [-5, 70000]}
    assert obj["00720078"] == {"vr": "UL", "Value": [4000000000]}
    assert obj["0072007E"] == {"vr": "SS", "Value": [-2, 3]}
    assert obj["00720082"] == {"vr": "SV", "Value": [-(2**62)]}
    assert obj["00720083"] == {"vr": "UV", "Value": [2**63 + 1]}


def test_wrong_length_values_become_un_instead_of_raising() -> None:
    data = (
        explicit_element(0x00209165, "AT", b"\x10\x00\x10\x00\x20\x00")  # 6 bytes
        + explicit_element(0x00280010, "US", b"\x01\x02\x03\x04\x05\x06")
    )
    data += struct.pack("<HH2sH", 0x0028, 0x0030, b"FL", 6) + b"\x00" * 6
    ds = from_bytes(data, implicit=False)
    obj = encode(ds)
    assert obj["00209165"] == {"vr": "UN", "InlineBinary": "EAAQACAA"}
    assert obj["00280010"] == {"vr": "US", "Value": [0x0201, 0x0403, 0x0605]}
    assert obj["00280030"]["vr"] == "UN"


# ---------------------------------------------------------------------------
# AT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [None, True, False])
def test_at_values_are_uppercase_hex(implicit: bool | None) -> None:
    ds = Dataset()
    ds.FrameIncrementPointer = [0x00181063, 0x0018106A, 0x7FE00010]
    ds.add_new(0x00209165, "AT", 0x0020A00B)  # DimensionIndexPointer-like
    if implicit is not None:
        ds = reread(ds, implicit)
    obj = encode(ds)
    assert obj["00280009"] == {"vr": "AT", "Value": ["00181063", "0018106A", "7FE00010"]}
    assert obj["00209165"] == {"vr": "AT", "Value": ["0020A00B"]}


# ---------------------------------------------------------------------------
# text VRs
# ---------------------------------------------------------------------------


def test_text_padding_rules() -> None:
    data = (
        implicit_element(0x00080018, b"1.2.3\0")  # UI, NUL padded
        + implicit_element(0x00080060, b" CT ")  # CS
        + implicit_element(0x00081030, b"  Head  ")  # LO
        + implicit_element(0x00204000, b"  keep leading\\no split  ")  # LT
        + implicit_element(0x00321060, b"  SH  ")  # SH
        + implicit_element(0x00400280, b"  comments ")  # ST
        + implicit_element(0x00081190, b"http://x/a b ")  # UR
    )
    obj = encode(from_bytes(data))
    assert obj["00080018"]["Value"] == ["1.2.3"]
    assert obj["00080060"]["Value"] == ["CT"]
    assert obj["00081030"]["Value"] == ["Head"]
    assert obj["00204000"]["Value"] == ["  keep leading\\no split"]
    assert obj["00321060"]["Value"] == ["SH"]
    assert obj["00400280"]["Value"] == ["  comments"]
    assert obj["00081190"]["Value"] == ["http://x/a b"]


def test_single_valued_text_vrs_keep_backslash_in_code() -> None:
    ds = Dataset()
    ds.add_new(0x00204000, "LT", "a\\b")
    ds.add_new(0x00400280, "ST", "c\\d")
    ds.add_new(0x00180015, "CS", "HEAD\\NECK")  # multi-valued CS string
    obj = encode(ds)
    assert obj["00204000"]["Value"] == ["a\\b"]
    assert obj["00400280"]["Value"] == ["c\\d"]
    assert obj["00180015"]["Value"] == ["HEAD", "NECK"]


def test_dates_and_times_are_strings() -> None:
    ds = Dataset()
    ds.StudyDate = "20240131"
    ds.StudyTime = "101500.123"
    ds.AcquisitionDateTime = "20240131101500"
    ds.PatientAge = "042Y"
    obj = encode(reread(ds))
    assert obj["00080020"]["Value"] == ["20240131"]
    assert obj["00080030"]["Value"] == ["101500.123"]
    assert obj["0008002A"]["Value"] == ["20240131101500"]
    assert obj["00101010"]["Value"] == ["042Y"]


def test_json_escaping() -> None:
    ds = Dataset()
    ds.StudyDescription = 'quote " backslash-free \t tab'
    ds.add_new(0x00204000, "LT", 'line1\r\nline2 "q" \\ back')
    text = dataset_to_json(ds)
    obj = json.loads(text)
    assert obj["00081030"]["Value"] == ['quote " backslash-free \t tab']
    assert obj["00204000"]["Value"] == ['line1\r\nline2 "q" \\ back']


# ---------------------------------------------------------------------------
# sequences
# ---------------------------------------------------------------------------


def nested_dataset() -> Dataset:
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3"
    series.ReferencedInstanceSequence = [inner, Dataset()]
    ds = Dataset()
    ds.PatientID = "P"
    ds.ReferencedSeriesSequence = [series]
    return ds


@pytest.mark.parametrize("implicit", [None, True, False])
def test_nested_sequences(implicit: bool | None) -> None:
    ds = nested_dataset()
    if implicit is not None:
        ds = reread(ds, implicit)
    obj = encode(ds)
    assert obj["00081115"] == {
        "vr": "SQ",
        "Value": [
            {
                "0008114A": {
                    "vr": "SQ",
                    "Value": [
                        {
                            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                            "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                        },
                        {},
                    ],
                },
                "0020000E": {"vr": "UI", "Value": ["1.2.3"]},
            }
        ],
    }


def test_raw_input_not_converted_in_place() -> None:
    ds = reread(nested_dataset())
    encode(ds)
    assert isinstance(ds.get_item(0x00100020), RawDataElement)
    assert isinstance(ds.get_item(0x00081115), RawDataElement)


# ---------------------------------------------------------------------------
# private elements
# ---------------------------------------------------------------------------


def private_dataset() -> Dataset:
    ds = Dataset()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "secret")
    block.add_new(0x02, "US", 7)
    block.add_new(0x03, "OB", b"\x01\x02\x03\x04")
    ge = ds.private_block(0x0019, "GEMS_IDEN_01", create=True)
    ge.add_new(0x01, "LO", "known")
    ds.PatientID = "P"
    return ds


def test_private_elements_kept_with_creator_explicit_vr() -> None:
    obj = encode(reread(private_dataset(), implicit=False))
    assert obj["00090010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert obj["00091001"] == {"vr": "LO", "Value": ["secret"]}
    assert obj["00091002"] == {"vr": "US", "Value": [7]}
    assert obj["00091003"]["vr"] == "OB"
    assert base64.b64decode(obj["00091003"]["InlineBinary"]) == b"\x01\x02\x03\x04"


def test_private_elements_implicit_vr_unknown_are_un() -> None:
    obj = encode(reread(private_dataset(), implicit=True))
    assert obj["00090010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert obj["00091001"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"secret").decode()}
    assert obj["00091002"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"\x07\x00").decode()}
    # creator elements are LO, and the private dictionary is used when it knows the tag
    assert obj["00190010"] == {"vr": "LO", "Value": ["GEMS_IDEN_01"]}


def test_private_elements_known_to_private_dictionary() -> None:
    ds = Dataset()
    ds.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(0x01, "LO", "full")
    obj = encode(reread(ds, implicit=True))
    assert obj["00091001"] == {"vr": "LO", "Value": ["full"]}


def test_private_un_goes_to_bulk_handler() -> None:
    calls: list[tuple[tuple[BaseTag, ...], str]] = []

    def handler(path: tuple[BaseTag, ...], vr: str) -> str:
        calls.append((path, vr))
        return f"bulk/{path[-1]:08X}"

    obj = encode(reread(private_dataset(), implicit=True), bulk_data=handler)
    assert obj["00091001"] == {"vr": "UN", "BulkDataURI": "bulk/00091001"}
    assert ((0x00091001,), "UN") in calls


# ---------------------------------------------------------------------------
# binary values and bulk data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [None, True, False])
def test_inline_binary_ob_ow(implicit: bool | None) -> None:
    pixels = bytes(range(256)) * 2
    ds = Dataset()
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    ds.add_new(0x00420011, "OB", b"%PDF-1.4\x00")  # EncapsulatedDocument (odd -> padded)
    ds.add_new(0x00181638, "OF", struct.pack("<2f", 1.0, 2.0))  # VerticesOfThePolygonalOutline
    if implicit is not None:
        ds = reread(ds, implicit)
    obj = encode(ds)
    assert obj["7FE00010"]["vr"] == "OW"
    assert base64.b64decode(obj["7FE00010"]["InlineBinary"]) == pixels
    assert obj["00420011"]["vr"] == "OB"
    assert base64.b64decode(obj["00420011"]["InlineBinary"]).rstrip(b"\0") == b"%PDF-1.4"
    assert obj["00181638"]["vr"] == "OF"


def test_bulk_handler_receives_tag_path_inside_sequence() -> None:
    calls: list[tuple[tuple[BaseTag, ...], str]] = []

    def handler(path: tuple[BaseTag, ...], vr: str) -> str | None:
        calls.append((path, vr))
        return "/bulk/" + "/".join(f"{t:08X}" for t in path)

    icon = Dataset()
    icon.BitsAllocated = 8
    icon.PixelRepresentation = 0
    icon.PixelData = b"\x01\x02\x03\x04"
    ds = Dataset()
    ds.ReferencedSeriesSequence = [Dataset()]
    ds.ReferencedSeriesSequence[0].IconImageSequence = [icon]
    for source in (ds, reread(ds, True), reread(ds, False)):
        calls.clear()
        obj = encode(source, bulk_data=handler)
        member = obj["00081115"]["Value"][0]["00880200"]["Value"][0]["7FE00010"]
        assert member == {"vr": member["vr"], "BulkDataURI": "/bulk/00081115/00880200/7FE00010"}
        assert member["vr"] in ("OB", "OW")
        paths = {call[0] for call in calls}
        assert paths == {(0x00081115, 0x00880200, 0x7FE00010)}
        assert all(isinstance(t, int) for t in next(iter(paths)))


def test_bulk_handler_returning_none_inlines() -> None:
    ds = Dataset()
    ds.add_new(0x00420011, "OB", b"\x01\x02")
    obj = encode(ds, bulk_data=lambda path, vr: None)
    assert obj["00420011"] == {"vr": "OB", "InlineBinary": "AQI="}


def test_bulk_threshold_for_non_binary_vrs() -> None:
    seen: list[tuple[tuple[BaseTag, ...], str]] = []

    def handler(path: tuple[BaseTag, ...], vr: str) -> str:
        seen.append((path, vr))
        return f"uri:{path[-1]:08X}"

    ds = Dataset()
    ds.add_new(0x00204000, "LT", "x" * 100)  # long LT
    ds.add_new(0x00081030, "LO", "short")  # LO never goes to bulk data
    ds.add_new(0x00182044, "FL", [1.0] * 30)  # 120 bytes
    ds.Rows = 5  # short US
    ds.add_new(0x00282000, "OB", b"\x00\x01")  # binary: always offered
    for source in (ds, reread(ds, False)):
        seen.clear()
        obj = encode(source, bulk_data=handler, bulk_threshold=64)
        assert obj["00204000"] == {"vr": "LT", "BulkDataURI": "uri:00204000"}
        assert obj["00182044"] == {"vr": "FL", "BulkDataURI": "uri:00182044"}
        assert obj["00282000"] == {"vr": "OB", "BulkDataURI": "uri:00282000"}
        assert obj["00081030"]["Value"] == ["short"]
        assert obj["00280010"]["Value"] == [5]
        assert {p[-1] for p, _ in seen} == {0x00204000, 0x00182044, 0x00282000}
    obj = encode(ds, bulk_data=handler, bulk_threshold=1024)
    assert obj["00204000"]["Value"] == ["x" * 100]


def test_encapsulated_pixel_data_is_ob() -> None:
    from pydicom.encaps import encapsulate

    ds = Dataset()
    ds.BitsAllocated = 16
    ds.add_new(0x7FE00010, "OB or OW", encapsulate([b"\xff\xd8frame\xff\xd9"]))
    obj = encode(ds)
    assert obj["7FE00010"]["vr"] == "OB"


# ---------------------------------------------------------------------------
# ambiguous VRs
# ---------------------------------------------------------------------------


def test_us_or_ss_resolved_by_pixel_representation() -> None:
    for pixel_rep, expected in ((0, "US"), (1, "SS")):
        ds = Dataset()
        ds.PixelRepresentation = pixel_rep
        ds.add_new(0x00280106, "US or SS", 5)  # SmallestImagePixelValue
        ds.add_new(0x00280120, "US or SS", None)  # PixelPaddingValue
        obj = encode(ds)
        assert obj["00280106"] == {"vr": expected, "Value": [5]}
        assert obj["00280120"] == {"vr": expected}


def test_us_or_ss_in_sequence_inherits_pixel_representation() -> None:
    item = Dataset()
    item.add_new(0x00281101, "US or SS", [256, 0, 16])  # palette descriptor
    item.add_new(0x00280120, "US or SS", -2000)
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.ReferencedSeriesSequence = [item]
    obj = encode(ds)["00081115"]["Value"][0]
    assert obj["00280120"] == {"vr": "SS", "Value": [-2000]}
    assert obj["00281101"] == {"vr": "SS", "Value": [256, 0, 16]}


@pytest.mark.parametrize("pixel_rep,expected", [(0, ("US", 65535)), (1, ("SS", -1))])
def test_us_or_ss_from_implicit_raw(pixel_rep: int, expected: tuple[str, int]) -> None:
    data = implicit_element(0x00280103, struct.pack("<H", pixel_rep)) + implicit_element(
        0x00280120, b"\xff\xff"
    )
    obj = encode(from_bytes(data))
    assert obj["00280120"] == {"vr": expected[0], "Value": [expected[1]]}


def test_us_or_ss_raw_in_sequence_item_uses_top_level_pixel_representation() -> None:
    item = implicit_element(0x00280120, b"\xff\xff")
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    data = implicit_element(0x00280103, struct.pack("<H", 1)) + implicit_element(0x00081115, item)
    obj = encode(from_bytes(data))
    assert obj["00081115"]["Value"][0]["00280120"] == {"vr": "SS", "Value": [-1]}


def test_lut_descriptor_first_value_unsigned() -> None:
    data = implicit_element(0x00280103, struct.pack("<H", 1)) + implicit_element(
        0x00283002, struct.pack("<Hhh", 40000, -1024, 16)
    )
    obj = encode(from_bytes(data))
    assert obj["00283002"] == {"vr": "SS", "Value": [40000, -1024, 16]}


def test_ob_or_ow_pixel_data() -> None:
    ds = Dataset()
    ds.BitsAllocated = 8
    ds.add_new(0x7FE00010, "OB or OW", b"\x01\x02")
    assert encode(ds)["7FE00010"]["vr"] == "OB"
    ds.BitsAllocated = 16
    assert encode(ds)["7FE00010"]["vr"] == "OW"
    # Implicit VR Little Endian native pixel data is OW (PS3.5 A.1)
    eight = Dataset()
    eight.BitsAllocated = 8
    eight.PixelData = b"\x01\x02"
    assert encode(reread(eight, implicit=True))["7FE00010"]["vr"] == "OW"


def test_overlay_and_lut_data() -> None:
    ds = Dataset()
    ds.PixelRepresentation = 0
    ds.LUTDescriptor = [3, 0, 16]
    ds.add_new(0x60003000, "OB or OW", b"\x00\x01")
    ds.add_new(0x00283006, "US or OW", [1, 2, 3])
    ds.add_new(0x00281200, "US or SS or OW", b"\x00\x01")
    obj = encode(ds)
    assert obj["60003000"]["vr"] == "OW"
    assert obj["00283006"] == {"vr": "US", "Value": [1, 2, 3]}
    assert obj["00281200"]["vr"] == "OW"
    ds.add_new(0x00283006, "US or OW", b"\x01\x00\x02\x00\x03\x00")
    raw = encode(reread(ds, implicit=True))
    assert raw["60003000"]["vr"] == "OW"
    assert raw["00283006"] == {"vr": "OW", "InlineBinary": "AQACAAMA"}
    assert raw["00281200"]["vr"] == "OW"


# ---------------------------------------------------------------------------
# round trip through pydicom and general properties
# ---------------------------------------------------------------------------


def simple_dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyDate = "20240131"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "12345"
    ds.SliceThickness = "1.5"
    ds.PixelSpacing = ["0.5", "0.25"]
    ds.InstanceNumber = 7
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.FrameIncrementPointer = 0x00181063
    ds.add_new(0x00182044, "FL", [0.5, 2.0])
    ds.add_new(0x00189087, "FD", 1000.0)
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence = [ref]
    ds.PixelData = b"\x01\x00\x02\x00\x03\x00\x04\x00"
    return ds


def assert_same(original: Dataset, decoded: Dataset) -> None:
    for elem in original:
        if elem.tag == 0x00080005:
            assert decoded.SpecificCharacterSet == "ISO_IR 192"
            continue
        other = decoded[elem.tag]
        if elem.VR == "SQ":
            assert len(other.value) == len(elem.value)
            for a, b in zip(elem.value, other.value):
                assert_same(a, b)
        elif elem.VR == "PN":
            assert str(other.value) == str(elem.value)
        else:
            assert other.value == elem.value, elem


@pytest.mark.parametrize("implicit", [None, True, False])
def test_round_trip_through_pydicom_from_json(implicit: bool | None) -> None:
    original = simple_dataset()
    source = original if implicit is None else reread(original, implicit)
    decoded = Dataset.from_json(dataset_to_json(source))
    assert_same(original, decoded)


def test_round_trip_with_bulk_data_handler() -> None:
    original = simple_dataset()
    store: dict[str, bytes] = {}

    def handler(path: tuple[BaseTag, ...], vr: str) -> str:
        uri = "http://gateway/bulk/" + ".".join(f"{t:08X}" for t in path)
        store[uri] = original[path[-1]].value
        return uri

    text = dataset_to_json(reread(original, False), bulk_data=handler)
    assert "InlineBinary" not in text
    decoded = Dataset.from_json(text, bulk_data_uri_handler=lambda uri: store[uri])
    assert_same(original, decoded)


def test_to_dict_matches_parsed_json_text() -> None:
    ds = simple_dataset()
    assert dataset_to_dict(ds) == json.loads(dataset_to_json(ds))


def test_output_is_compact_and_utf8_encodable() -> None:
    text = dataset_to_json(reread(simple_dataset(), False))
    assert text.startswith('{"00080005":{"vr":"CS","Value":["ISO_IR 192"]}')
    assert "\n" not in text
    assert json.loads(text.encode("utf-8"))


def test_no_ambiguous_vr_ever_emitted() -> None:
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.BitsAllocated = 16
    ds.WaveformBitsAllocated = 8
    for tag in (0x00280106, 0x00280107, 0x00280120, 0x00281101):
        ds.add_new(tag, "US or SS", 1)
    ds.add_new(0x7FE00010, "OB or OW", b"\0\0")
    ds.add_new(0x54001010, "OB or OW", b"\0\0")
    for source in (ds, reread(ds, True)):
        for member in encode(source).values():
            assert member["vr"] in VALID_VRS


def test_serialisation_is_fast_enough() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for i in range(300):
        ds.add_new(0x00110000 | (0x1000 + i), "LO", f"value {i}")
    ds.add_new(0x00110010, "LO", "CREATOR")
    ds.PatientName = "Müller^Jürgen"
    ds.PixelData = b"\0" * 512 * 512 * 2
    ds.BitsAllocated = 16
    raw = reread(ds, False)
    start = time.perf_counter()
    runs = 5
    for _ in range(runs):
        dataset_to_json(raw, bulk_data=lambda path, vr: "uri")
    per_element_ms = (time.perf_counter() - start) / runs / len(raw) * 1000
    assert per_element_ms < 0.5


def test_value_length_pixel_data_inline_is_whole_value_field() -> None:
    ds = Dataset()
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 10
    obj = encode(reread(ds, False))
    assert obj["7FE00010"]["InlineBinary"] == base64.b64encode(b"\x00\x01" * 10).decode()


def test_sequence_item_inside_code_built_dataset_from_raw() -> None:
    raw_item = reread(nested_dataset()).ReferencedSeriesSequence[0]
    ds = Dataset()
    ds.ReferencedSeriesSequence = Sequence([raw_item])
    obj = encode(ds)
    assert obj["00081115"]["Value"][0]["0020000E"]["Value"] == ["1.2.3"]


def test_module_is_pure() -> None:
    import gateway.dicomweb.dicomjson as module

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {
        "__future__", "base64", "collections", "datetime", "json", "math", "re",
        "struct", "typing", "pydicom",
    }  # fmt: skip
