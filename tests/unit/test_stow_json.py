"""STOW-RS DICOM JSON + bulk data to PS3.10 files (gateway.dicomweb.stow_json)."""

from __future__ import annotations

import base64
import copy
import io
import json
import struct
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from gateway.dicomweb.stow_json import BuiltInstance, build_instances
from gateway.problems import HttpProblem

EVRLE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JLS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
PIXEL = "7FE00010"
OCTET = "application/octet-stream"

Parts = list[tuple[dict[str, str], bytearray]]


def _testfile(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing: install pydicom with its test data"
    return dcmread(path)


def _to_json(ds: Dataset, prefix: str, threshold: int = 1024) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The DICOM JSON of `ds` with every value over `threshold` bytes as a BulkDataURI, and those values."""
    bulk: dict[str, bytes] = {}

    def handler(elem: Any) -> str:
        uri = f"{prefix}/bulk/{len(bulk)}/{elem.tag:08X}"
        bulk[uri] = elem.value
        return uri

    return ds.to_json_dict(bulk_data_threshold=threshold, bulk_data_element_handler=handler), bulk


def _parts(metadata: Any, bulk: dict[str, tuple[str, bytes]] | None = None,
           metadata_type: str | None = "application/dicom+json") -> Parts:
    headers = {"content-type": metadata_type} if metadata_type is not None else {}
    parts: Parts = [(headers, bytearray(json.dumps(metadata).encode()))]
    for uri, (media, value) in (bulk or {}).items():
        parts.append(({"content-type": media, "content-location": uri}, bytearray(value)))
    return parts


def _octet(bulk: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    return {uri: (OCTET, value) for uri, value in bulk.items()}


def _pixel_uri(metadata: dict[str, Any]) -> str:
    return metadata[PIXEL]["BulkDataURI"]


def _read(built: BuiltInstance) -> Dataset:
    assert built.error is None, built.error
    assert bytes(built.data[128:132]) == b"DICM"
    return dcmread(io.BytesIO(bytes(built.data)))


def _assert_same(original: Dataset, read: Dataset, compare_pixel_data: bool = True) -> None:
    """Every element of `original` is in `read` with the same VR and value, and nothing else is."""
    assert set(read.keys()) == set(original.keys())
    for elem in original:
        if elem.tag == 0x7FE00010 and not compare_pixel_data:
            continue
        got = read[elem.tag]
        assert got.VR == elem.VR, elem.tag
        assert got.value == elem.value, elem.tag


def _assert_meta(read: Dataset, original: Dataset, syntax: str) -> None:
    assert read.file_meta.TransferSyntaxUID == syntax
    assert read.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert read.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID


def _j2k() -> tuple[Dataset, bytes]:
    ds = _testfile("JPEG2000.dcm")
    assert ds.file_meta.TransferSyntaxUID == J2K
    frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    assert len(frames) == 1
    return ds, frames[0]


def _j2k_parts(media: str, frames: int | None = None) -> tuple[Dataset, bytes, Parts]:
    ds, frame = _j2k()
    metadata, bulk = _to_json(ds, "https://client.example/j2k", threshold=64)  # its Pixel Data is small
    if frames is not None:
        metadata["00280008"] = {"vr": "IS", "Value": [frames]}
    pixel = _pixel_uri(metadata)
    parts_bulk = {uri: (media, frame) if uri == pixel else (OCTET, value) for uri, value in bulk.items()}
    return ds, frame, _parts(metadata, parts_bulk)


# ------------------------------------------------------------------------------------------------
# Instances that are built


def test_uncompressed_pixel_data_and_private_bulk_data_as_octet_stream() -> None:
    ds = _testfile("CT_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/ct")
    assert "BulkDataURI" in metadata[PIXEL]
    assert len(bulk) >= 2  # Pixel Data and a large private OB element
    [built] = build_instances(_parts(metadata, _octet(bulk)))
    assert (built.sop_class, built.sop_instance, built.study, built.series) == (
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    read = _read(built)
    _assert_meta(read, ds, EVRLE)
    _assert_same(ds, read)
    assert read.PixelData == ds.PixelData  # byte for byte
    assert np.array_equal(read.pixel_array, ds.pixel_array)


def test_inline_binary() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "unused", threshold=1 << 30)
    assert not bulk
    assert "InlineBinary" in metadata[PIXEL]
    [built] = build_instances(_parts(metadata))
    read = _read(built)
    _assert_meta(read, ds, EVRLE)
    _assert_same(ds, read)
    assert read.PixelData == ds.PixelData


def test_jpeg_2000_frame_as_image_jp2_with_transfer_syntax_parameter() -> None:
    ds, frame, parts = _j2k_parts(f"image/jp2; transfer-syntax={J2K}")
    [built] = build_instances(parts)
    read = _read(built)
    _assert_meta(read, ds, J2K)
    _assert_same(ds, read, compare_pixel_data=False)
    assert read["PixelData"].VR == "OB"
    assert read["PixelData"].is_undefined_length
    assert read.PixelData == encapsulate([frame])
    assert list(generate_frames(read.PixelData, number_of_frames=1)) == [frame]
    assert np.array_equal(read.pixel_array, ds.pixel_array)


def test_image_jp2_without_parameter_is_jpeg_2000_lossless() -> None:
    ds = _testfile("MR_small_jp2klossless.dcm")
    assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
    [frame] = list(generate_frames(ds.PixelData, number_of_frames=1))
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    pixel = _pixel_uri(metadata)
    [built] = build_instances(_parts(metadata, {pixel: ("image/jp2", frame)}))
    read = _read(built)
    _assert_meta(read, ds, J2K_LOSSLESS)
    # the test file's Pixel Data is OW; an encapsulated one is OB
    assert read["PixelData"].VR == "OB"
    assert list(generate_frames(read.PixelData, number_of_frames=1)) == [frame]
    assert np.array_equal(read.pixel_array, ds.pixel_array)


@pytest.mark.parametrize(("media", "syntax"), [
    ("image/jpeg", JPEG_BASELINE),
    ("image/jls", JLS),
    ("image/dicom-rle", RLE),
    (f"application/octet-stream; transfer-syntax={RLE}", RLE),
    (f'image/jpeg; transfer-syntax="{J2K_LOSSLESS}"', J2K_LOSSLESS),
])
def test_media_type_gives_the_transfer_syntax(media: str, syntax: str) -> None:
    _, frame, parts = _j2k_parts(media)
    [built] = build_instances(parts)
    read = _read(built)
    assert read.file_meta.TransferSyntaxUID == syntax
    assert list(generate_frames(read.PixelData, number_of_frames=1)) == [frame]


def test_two_instances_in_one_metadata_array() -> None:
    ct, mr = _testfile("CT_small.dcm"), _testfile("MR_small.dcm")
    ct_json, ct_bulk = _to_json(ct, "https://client.example/ct")
    mr_json, mr_bulk = _to_json(mr, "https://client.example/mr")
    assert not set(ct_bulk) & set(mr_bulk)
    # bulk parts in another order than the instances
    built = build_instances(_parts([ct_json, mr_json], _octet(mr_bulk) | _octet(ct_bulk)))
    assert [b.sop_instance for b in built] == [ct.SOPInstanceUID, mr.SOPInstanceUID]
    for original, instance in zip((ct, mr), built, strict=True):
        read = _read(instance)
        _assert_meta(read, original, EVRLE)
        _assert_same(original, read)
        assert read.PixelData == original.PixelData


def test_a_single_json_object_is_one_instance() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    built = build_instances(_parts(metadata, _octet(bulk)))  # an object, not an array
    assert len(built) == 1
    _assert_same(ds, _read(built[0]))


@pytest.mark.parametrize("metadata_type", [
    None, "application/dicom+json", "application/json", 'application/dicom+json; charset="utf-8"',
    "Application/DICOM+JSON;charset=UTF-8",
])
def test_metadata_content_types_accepted(metadata_type: str | None) -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    [built] = build_instances(_parts([metadata], _octet(bulk), metadata_type=metadata_type))
    assert built.error is None
    assert _read(built).SOPInstanceUID == ds.SOPInstanceUID


def test_unreferenced_bulk_part_is_ignored_and_surrounding_whitespace_is_stripped() -> None:
    ds = _testfile("CT_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/ct")
    parts = _parts([metadata], _octet(bulk) | {"https://client.example/nobody/uses/this": (OCTET, b"\x01\x02")})
    pixel = _pixel_uri(metadata)
    private = next(uri for uri in bulk if uri != pixel)
    for headers, _ in parts[1:]:
        if headers["content-location"] == pixel:  # whitespace around the Content-Location
            headers["content-location"] = f"  {pixel}\t"
    for element in metadata.values():  # and around the BulkDataURI
        if element.get("BulkDataURI") == private:
            element["BulkDataURI"] = f" {private} "
    parts[0] = (parts[0][0], bytearray(json.dumps(metadata).encode()))
    [built] = build_instances(parts)
    read = _read(built)
    assert read.PixelData == ds.PixelData
    _assert_same(ds, read)


def test_bulk_data_of_numeric_and_text_vrs() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00189327"] = {"vr": "FD", "BulkDataURI": "urn:fd"}  # Table Position
    metadata["00200013"] = {"vr": "IS", "BulkDataURI": "urn:is"}  # Instance Number
    metadata["00204000"] = {"vr": "LT", "BulkDataURI": "urn:lt"}  # Image Comments
    parts_bulk = _octet(bulk) | {"urn:fd": (OCTET, struct.pack("<2d", 1.5, -2.25)), "urn:is": (OCTET, b"42"),
                                 "urn:lt": (OCTET, b"a comment ")}
    [built] = build_instances(_parts([metadata], parts_bulk))
    read = _read(built)
    assert read[0x00189327].value == [1.5, -2.25]
    assert read.InstanceNumber == 42
    assert read.ImageComments == "a comment"


def test_numeric_bulk_data_of_the_wrong_length_fails() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00189327"] = {"vr": "FD", "BulkDataURI": "urn:fd"}
    [built] = build_instances(_parts([metadata], _octet(bulk) | {"urn:fd": (OCTET, b"\x00" * 7)}))
    assert built.error is not None
    assert built.error[0] == 0xC000
    assert built.error[1].startswith("the DICOM JSON cannot be read: ")
    assert "\n" not in built.error[1]


def test_file_meta_and_group_length_elements_from_the_json_are_dropped() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00020010"] = {"vr": "UI", "Value": ["1.2.840.10008.1.2"]}  # would contradict the file meta
    metadata["00020002"] = {"vr": "UI", "Value": ["1.2.3"]}
    metadata["00100000"] = {"vr": "UL", "Value": [12345]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    read = _read(built)
    _assert_meta(read, ds, EVRLE)
    assert not [tag for tag in read.keys() if tag.group == 2 or tag.element == 0]
    _assert_same(ds, read)


def test_text_the_declared_character_set_cannot_hold_is_written_as_utf8() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata.pop("00080005", None)
    metadata["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": "Wang^XiaoDong=王^小东"}]}
    metadata["00081030"] = {"vr": "LO", "Value": ["Étude cérébrale"]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    read = _read(built)
    assert read.SpecificCharacterSet == "ISO_IR 192"
    assert str(read.PatientName) == "Wang^XiaoDong=王^小东"
    assert read.StudyDescription == "Étude cérébrale"


def test_latin_1_text_without_declared_character_set_is_written_as_utf8() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata.pop("00080005", None)
    metadata["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    read = _read(built)
    assert read.SpecificCharacterSet == "ISO_IR 192"
    assert "Müller".encode() in bytes(built.data)


def test_text_the_declared_character_set_holds_keeps_it() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00080005"] = {"vr": "CS", "Value": ["ISO_IR 100"]}
    metadata["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    read = _read(built)
    assert read.SpecificCharacterSet == "ISO_IR 100"
    assert str(read.PatientName) == "Müller^Jürgen"
    assert "Müller".encode("latin-1") in bytes(built.data)


# ------------------------------------------------------------------------------------------------
# Instances that fail, the others going on


def test_missing_bulk_part_fails_that_instance_only() -> None:
    ct, mr = _testfile("CT_small.dcm"), _testfile("MR_small.dcm")
    ct_json, ct_bulk = _to_json(ct, "https://client.example/ct")
    mr_json, mr_bulk = _to_json(mr, "https://client.example/mr")
    del ct_bulk[_pixel_uri(ct_json)]
    failed, stored = build_instances(_parts([ct_json, mr_json], _octet(ct_bulk) | _octet(mr_bulk)))
    assert failed.error == (0xC000, "BulkDataURI not found among the parts")
    assert failed.data == bytearray()
    assert (failed.sop_class, failed.sop_instance, failed.study, failed.series) == (
        ct.SOPClassUID, ct.SOPInstanceUID, ct.StudyInstanceUID, ct.SeriesInstanceUID)
    _assert_same(mr, _read(stored))


@pytest.mark.parametrize("drop", ["00080016", "00080018"])
def test_missing_sop_uids(drop: str) -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    del metadata[drop]
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error == (0xC000, "SOP Class UID or SOP Instance UID missing")
    assert built.data == bytearray()
    assert built.sop_class == (None if drop == "00080016" else ds.SOPClassUID)
    assert built.sop_instance == (None if drop == "00080018" else ds.SOPInstanceUID)
    assert built.study == ds.StudyInstanceUID
    assert built.series == ds.SeriesInstanceUID


def test_png_pixel_data_is_refused() -> None:
    ds = _testfile("CT_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/ct")
    parts_bulk = _octet(bulk)
    pixel = _pixel_uri(metadata)
    parts_bulk[pixel] = ("image/png", b"\x89PNG\r\n\x1a\n")
    [built] = build_instances(_parts([metadata], parts_bulk))
    assert built.error == (0xC122, "image/png is not supported as pixel data")
    assert built.data == bytearray()
    assert built.sop_instance == ds.SOPInstanceUID


@pytest.mark.parametrize("media", ["image/gif", "video/mp4", "text/plain",
                                   "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.100",
                                   "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.2"])
def test_other_pixel_data_types_are_refused(media: str) -> None:
    _, _, parts = _j2k_parts(media)
    [built] = build_instances(parts)
    assert built.error is not None
    assert built.error[0] == 0xC122
    assert built.data == bytearray()


def test_compressed_multi_frame_is_refused() -> None:
    _, _, parts = _j2k_parts(f"image/jp2; transfer-syntax={J2K}", frames=2)
    [built] = build_instances(parts)
    assert built.error == (0xC122, "compressed multi-frame bulk data in one part is not supported")
    assert built.data == bytearray()


def test_compressed_type_on_another_element_is_refused() -> None:
    ds = _testfile("CT_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/ct")
    parts_bulk = _octet(bulk)
    private = next(uri for uri in bulk if uri != _pixel_uri(metadata))
    parts_bulk[private] = ("image/jpeg", bulk[private])
    [built] = build_instances(_parts([metadata], parts_bulk))
    assert built.error == (0xC122, "compressed bulk data is only supported for the top-level Pixel Data")


def test_unreadable_dicom_json_fails_without_quoting_values() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00280010"] = {"vr": "US", "Value": ["SECRET^PATIENT"]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error is not None
    status, reason = built.error
    assert status == 0xC000
    assert reason.startswith("the DICOM JSON cannot be read: ValueError")
    assert "SECRET" not in reason
    assert len(reason) <= len("the DICOM JSON cannot be read: ") + 200
    assert built.sop_instance == ds.SOPInstanceUID  # named from the JSON, for the FailedSOPSequence


def test_value_pydicom_cannot_load_is_not_quoted() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["0010001G"] = {"vr": "LO", "Value": ["SECRET^PATIENT"]}  # not a tag
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error is not None
    assert built.error[0] == 0xC000
    assert "could not be loaded from JSON" in built.error[1]
    assert "SECRET" not in built.error[1]


def test_element_without_vr_fails() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00100010"] = {"Value": [{"Alphabetic": "Doe^Jane"}]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error == (0xC000, "the DICOM JSON cannot be read: KeyError: 'vr'")


def test_bad_inline_binary_fails() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, _ = _to_json(ds, "unused", threshold=1 << 30)
    metadata[PIXEL] = {"vr": "OW", "InlineBinary": "abc"}
    [built] = build_instances(_parts([metadata]))
    assert built.error is not None
    assert built.error[0] == 0xC000
    assert built.error[1].startswith("the DICOM JSON cannot be read: binascii.Error")


def test_vr_un_is_refused() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00091010"] = {"vr": "UN", "InlineBinary": base64.b64encode(b"abcd").decode()}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error == (0xC000, "element (0009,1010) has VR UN, which cannot be stored as sent")


def test_value_too_long_for_its_vr_is_refused() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00204000"] = {"vr": "LT", "Value": ["x" * 70000]}
    with pytest.warns(UserWarning):
        [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error == (0xC000, "element (0020,4000) (LT) has a value longer than 65534 bytes")


def test_unknown_vr_is_refused() -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    metadata["00204000"] = {"vr": "XX", "Value": ["text"]}
    [built] = build_instances(_parts([metadata], _octet(bulk)))
    assert built.error is not None
    assert built.error[0] == 0xC000
    assert built.error[1].startswith("the data set cannot be encoded: NotImplementedError")


# ------------------------------------------------------------------------------------------------
# Requests that cannot be used at all


def _problem(parts: Parts) -> HttpProblem:
    with pytest.raises(HttpProblem) as caught:
        build_instances(parts)
    assert caught.value.status == 400
    assert caught.value.error == "bad-request"
    return caught.value


@pytest.mark.parametrize(("body", "expected"), [
    (b'[{"00080016": {"vr": "UI", "Value": ["1.2.3"]}', "line 1 column 47 (char 46)"),
    (b'[{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J\xe4ne"}]}}]', "not UTF-8"),
    (b"", "line 1 column 1 (char 0)"),
    (b'"just a string"', "not a JSON str"),
    (b"[]", "empty"),
    (b'[{"00080016": {"vr": "UI"}}, 42]', "item 2 of the metadata array is not a JSON object"),
])
def test_unusable_metadata_is_a_bad_request(body: bytes, expected: str) -> None:
    problem = _problem([({"content-type": "application/dicom+json"}, bytearray(body))])
    assert expected in problem.message
    assert "Doe" not in problem.message


@pytest.mark.parametrize("metadata_type", [
    "application/dicom", "application/octet-stream", "text/plain", "application/dicom+xml",
    "application/dicom+json; charset=iso-8859-1", "not a media type",
])
def test_wrong_metadata_content_type_is_a_bad_request(metadata_type: str) -> None:
    ds = _testfile("MR_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/mr")
    _problem(_parts([metadata], _octet(bulk), metadata_type=metadata_type))


def test_bulk_part_without_content_location_is_a_bad_request() -> None:
    ds = _testfile("CT_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/ct")
    parts = _parts([metadata], _octet(bulk))
    del parts[2][0]["content-location"]
    problem = _problem(parts)
    assert "part 3" in problem.message
    assert "Content-Location" in problem.message


def test_duplicate_content_location_is_a_bad_request() -> None:
    ds = _testfile("CT_small.dcm")
    metadata, bulk = _to_json(ds, "https://client.example/ct")
    parts = _parts([metadata], _octet(bulk))
    parts.append(copy.deepcopy(parts[1]))
    problem = _problem(parts)
    assert "parts 2 and 4" in problem.message


def test_no_part_is_a_bad_request() -> None:
    _problem([])
