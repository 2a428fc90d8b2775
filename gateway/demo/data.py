"""Deterministic synthetic DICOM studies for the demo PACS, tests and benchmarks.

Every call of :func:`generate_studies` returns the same instances, byte for
byte: UIDs are built from a fixed root and counters, dates and times are fixed
and pixel values come from an integer formula (a phantom: an ellipse "body"
with a row texture and a circular insert whose size and position change with
the slice, so every slice of a series has different pixel data).

Character sets used:

* ``Müller^Jürgen`` and ``Yamada^Tarou=山田^太郎=やまだ^たろう`` are encoded
  with SpecificCharacterSet ``ISO_IR 192`` (UTF-8);
* ``Gómez^María`` is encoded with ``ISO_IR 100`` (Latin-1), to exercise
  conversion between character sets;
* all other patients are plain ASCII without SpecificCharacterSet.

The set contains 7 patients, 11 studies and 28 series: CT, MR, CR, DX, US,
OT (Secondary Capture) and SR.  Image instances carry the Image Pixel module;
the SR instances (Basic Text SR) have no pixel data, as the IOD requires.
Special cases: a multi-frame US instance (8 frames), an RGB US image, a
MONOCHROME1 DX image, a CT series with signed pixels, sagittal and coronal MR
series, a Secondary Capture series whose instances carry a nested sequence
(RequestAttributesSequence > ScheduledProtocolCodeSequence >
EquivalentCodeSequence) and whose first instance has a private block
``ACME 1.0`` with (0009,1001) LO and (0009,1002) DS, a study with three
modalities (CT, OT, SR), a patient with three studies and a study with an
empty ReferringPhysicianName.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from math import isqrt

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1137."
IMPLEMENTATION_CLASS_UID = UID(UID_ROOT + "0.1")
IMPLEMENTATION_VERSION_NAME = "GW_DEMO_DATA_1"

_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
_SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


@dataclass(frozen=True)
class _Series:
    modality: str
    description: str
    body_part: str
    count: int = 1
    orientation: tuple[float, ...] = _AXIAL
    signed: bool = False
    performed: bool = False
    private: bool = False
    laterality: str = ""


@dataclass(frozen=True)
class _Study:
    date: str
    time: str
    description: str
    accession: str
    referring: str
    series: tuple[_Series, ...]
    procedure_code: tuple[str, str] | None = None


@dataclass(frozen=True)
class _Patient:
    name: str
    patient_id: str
    birth_date: str
    sex: str
    charset: str | None
    studies: tuple[_Study, ...] = ()


# fmt: off
_PATIENTS: tuple[_Patient, ...] = (
    _Patient(
        name="DOE^JOHN", patient_id="DEMO-0001", birth_date="19580412", sex="M", charset=None,
        studies=(
            _Study(
                date="20150314", time="081523", description="CT THORAX", accession="A15000101",
                referring="HOUSE^GREGORY^^DR", procedure_code=("CTCHEST", "CT Chest"),
                series=(
                    _Series("CT", "Thorax 1.0 B31f", "CHEST", 12, performed=True),
                    _Series("CT", "Thorax 3.0 B70f", "CHEST", 10, signed=True, performed=True),
                    _Series("CT", "Topogram 0.6 T20f", "CHEST"),
                ),
            ),
            _Study(
                date="20190722", time="142010", description="MR HEAD W/WO CONTRAST", accession="A19000342",
                referring="WILSON^JAMES", procedure_code=("MRHEADC", "MR Head with and without contrast"),
                series=(
                    _Series("MR", "AX T1", "HEAD", 8),
                    _Series("MR", "AX T1 +C", "HEAD", 8),
                    _Series("MR", "COR T2", "HEAD", 8, orientation=_CORONAL),
                ),
            ),
            _Study(
                date="20231103", time="093000", description="XR CHEST 2 VIEWS", accession="A23004410",
                referring="HOUSE^GREGORY^^DR",
                series=(_Series("CR", "PA", "CHEST"), _Series("CR", "LAT", "CHEST")),
            ),
        ),
    ),
    _Patient(
        name="Müller^Jürgen", patient_id="DEMO-0002", birth_date="19720101", sex="M", charset="ISO_IR 192",
        studies=(
            _Study(
                date="20170215", time="101500", description="US ABDOMEN", accession="A17000077",
                referring="CUDDY^LISA",
                series=(_Series("US", "Abdomen cine", "ABDOMEN"), _Series("US", "Liver", "ABDOMEN", 2)),
            ),
            _Study(
                date="20210609", time="163045", description="CT ABDOMEN PELVIS +C", accession="A21002218",
                referring="CUDDY^LISA", procedure_code=("CTABDPEL", "CT Abdomen and Pelvis with contrast"),
                series=(
                    _Series("CT", "Abdomen 5.0 B30f", "ABDOMEN", 10, performed=True),
                    _Series("CT", "Abdomen 1.5 Br40", "ABDOMEN", 12, performed=True),
                    _Series("SR", "Radiology Report", "ABDOMEN"),
                    _Series("OT", "Key Images", "ABDOMEN", 2),
                ),
            ),
        ),
    ),
    _Patient(
        name="Yamada^Tarou=山田^太郎=やまだ^たろう", patient_id="DEMO-0003", birth_date="19850923", sex="M",
        charset="ISO_IR 192",
        studies=(
            _Study(
                date="20180412", time="110000", description="MR KNEE RIGHT", accession="A18001234",
                referring="TANAKA^HIROSHI",
                series=(
                    _Series("MR", "SAG PD FS", "KNEE", 8, _SAGITTAL, performed=True, laterality="R"),
                    _Series("MR", "COR T1", "KNEE", 8, _CORONAL, performed=True, laterality="R"),
                    _Series("MR", "AX T2 FS", "KNEE", 8, performed=True, laterality="R"),
                ),
            ),
        ),
    ),
    _Patient(
        name="Gómez^María", patient_id="DEMO-0004", birth_date="19900317", sex="F", charset="ISO_IR 100",
        studies=(
            _Study(
                date="20200128", time="074512", description="XR HAND LEFT", accession="A20000456",
                referring="",
                series=(
                    _Series("DX", "PA", "HAND", laterality="L"),
                    _Series("DX", "OBL", "HAND", laterality="L"),
                ),
            ),
        ),
    ),
    _Patient(
        name="SMITH^JANE", patient_id="DEMO-0005", birth_date="19470830", sex="F", charset=None,
        studies=(
            _Study(
                date="20160905", time="230112", description="CT HEAD WO CONTRAST", accession="A16003391",
                referring="WILSON^JAMES",
                series=(
                    _Series("CT", "Head 5.0 H30s", "HEAD", 10),
                    _Series("CT", "Head 1.0 H60s", "HEAD", 12, signed=True),
                ),
            ),
            _Study(
                date="20240110", time="120000", description="MR BRAIN", accession="A24000015",
                referring="WILSON^JAMES",
                series=(
                    _Series("MR", "AX T2", "HEAD", 8),
                    _Series("MR", "AX DWI b1000", "HEAD", 6),
                    _Series("MR", "SAG T1", "HEAD", 8, _SAGITTAL),
                ),
            ),
        ),
    ),
    _Patient(
        name="BROWN^ROBERT", patient_id="DEMO-0006", birth_date="19630101", sex="M", charset=None,
        studies=(
            _Study(
                date="20220518", time="151500", description="OUTSIDE IMAGES", accession="A22001987",
                referring="CHASE^ROBERT",
                series=(
                    _Series("DX", "KNEE AP", "KNEE", laterality="L"),
                    _Series("OT", "Outside Images", "KNEE", 2, private=True),
                ),
            ),
        ),
    ),
    _Patient(
        name="NGUYEN^VAN AN", patient_id="DEMO-0007", birth_date="20010612", sex="F", charset=None,
        studies=(
            _Study(
                date="20240822", time="094510", description="US THYROID", accession="A24003070",
                referring="FOREMAN^ERIC",
                series=(_Series("US", "Thyroid", "NECK", 3), _Series("SR", "Measurements", "NECK")),
            ),
        ),
    ),
)
# fmt: on


def generate_studies(scale: int = 1) -> list[Dataset]:
    """Return the demo instances; `scale` multiplies the slice counts of the CT and MR series."""
    if scale < 1:
        raise ValueError("scale must be at least 1")
    instances: list[Dataset] = []
    study_no = 0
    for patient in _PATIENTS:
        for study in patient.studies:
            study_no += 1
            study_uid = f"{UID_ROOT}1.{study_no}"
            for series_no, series in enumerate(study.series, start=1):
                series_uid = f"{UID_ROOT}2.{study_no}.{series_no}"
                scaled = series.modality in ("CT", "MR") and series.count > 1
                count = series.count * scale if scaled else series.count
                for number in range(1, count + 1):
                    ds = _base(patient, study, study_no, study_uid)
                    _add_series(ds, study, series, series_no, series_uid)
                    ds.InstanceNumber = number
                    ds.SOPInstanceUID = f"{UID_ROOT}3.{study_no}.{series_no}.{number}"
                    ds.ContentDate = study.date
                    ds.ContentTime = _add_seconds(study.time, 60 * series_no + number)
                    _add_content(ds, series, study_no * 100 + series_no, number, count)
                    _finish(ds)
                    instances.append(ds)
    return instances


def generate_large_ct_series(n_slices: int, rows: int = 512, cols: int = 512) -> Iterator[Dataset]:
    """Lazily yield one axial CT series of `n_slices` slices (patient BENCH^LARGE)."""
    patient = _Patient("BENCH^LARGE", "BENCH-LARGE", "19700101", "O", None)
    study = _Study("20240301", "120000", "CT BENCHMARK", "BENCH0001", "", ())
    series = _Series("CT", "Benchmark 0.5 B31f", "CHEST", n_slices)
    study_uid = f"{UID_ROOT}9.1"
    series_uid = f"{UID_ROOT}9.2.1"
    for number in range(1, n_slices + 1):
        ds = _base(patient, study, 9000, study_uid)
        _add_series(ds, study, series, 1, series_uid)
        ds.FrameOfReferenceUID = f"{UID_ROOT}9.4.1"
        ds.InstanceNumber = number
        ds.SOPInstanceUID = f"{UID_ROOT}9.3.1.{number}"
        ds.ContentDate = study.date
        ds.ContentTime = study.time
        _add_ct(ds, series, 9001, number, rows, cols)
        _finish(ds)
        yield ds


def instance_bytes(ds: Dataset) -> bytes:
    """Return the PS3.10 file (preamble, ``DICM``, file meta, data set) of `ds`."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _base(patient: _Patient, study: _Study, study_no: int, study_uid: str) -> Dataset:
    ds = Dataset()
    if patient.charset:
        ds.SpecificCharacterSet = patient.charset
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{_age(patient.birth_date, study.date):03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = str(study_no)
    ds.ReferringPhysicianName = study.referring
    ds.StudyDescription = study.description
    if study.procedure_code:
        ds.ProcedureCodeSequence = Sequence([_code(*study.procedure_code)])
    ds.InstitutionName = "Demo General Hospital"
    ds.Manufacturer = "DEMO"
    return ds


def _add_series(ds: Dataset, study: _Study, series: _Series, series_no: int, series_uid: str) -> None:
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_no
    ds.Modality = series.modality
    ds.SeriesDescription = series.description
    ds.SeriesDate = study.date
    ds.SeriesTime = _add_seconds(study.time, 60 * series_no)
    ds.BodyPartExamined = series.body_part
    if series.laterality:
        ds.Laterality = series.laterality
    ds.StationName = f"DEMO{series.modality}01"
    if series.performed:
        ds.PerformedProcedureStepStartDate = study.date
        ds.PerformedProcedureStepStartTime = study.time
        ds.PerformedProcedureStepID = f"PPS{study.accession[1:]}"
        ds.RequestAttributesSequence = Sequence([_request_item(study, series_no)])


def _add_content(ds: Dataset, series: _Series, seed: int, number: int, count: int) -> None:
    modality = series.modality
    if modality == "CT":
        if series.description.startswith("Topogram"):
            _add_topogram(ds, seed)
        else:
            _add_ct(ds, series, seed, number, 64, 64)
            ds.FrameOfReferenceUID = f"{UID_ROOT}4.{seed}"
    elif modality == "MR":
        _add_mr(ds, series, seed, number, count)
        ds.FrameOfReferenceUID = f"{UID_ROOT}4.{seed}"
    elif modality in ("CR", "DX"):
        _add_projection(ds, seed)
    elif modality == "US":
        if series.description.endswith("cine"):
            _add_us_cine(ds, seed)
        else:
            _add_us_rgb(ds, seed + number)
    elif modality == "OT":
        if series.private:
            ds.RequestAttributesSequence = Sequence([_request_item_with_protocol(ds.AccessionNumber)])
        _add_secondary_capture(ds, seed + number, with_private=series.private and number == 1)
    else:
        _add_text_sr(ds, series)


def _add_ct(ds: Dataset, series: _Series, seed: int, number: int, rows: int, cols: int) -> None:
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    kernel = series.description.rsplit(" ", 1)[-1]
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "HFS"
    thickness = float(series.description.split()[1])
    _add_geometry(ds, series.orientation, number, rows, cols, 400.0, thickness)
    ds.SliceThickness = _ds(thickness)
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept = "0" if series.signed else "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    offset = 0 if series.signed else 1024
    pixels = _phantom(
        rows, cols, number, seed, offset - 1000, offset + 40, offset + 700, "h" if series.signed else "H"
    )
    _set_pixels(ds, rows, cols, pixels, bits_stored=16 if series.signed else 12, signed=series.signed)


def _add_topogram(ds: Dataset, seed: int) -> None:
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    _add_geometry(ds, _CORONAL, 1, 96, 64, 500.0, 0.6)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    _set_pixels(ds, 96, 64, _phantom(96, 64, 0, seed, 24, 1064, 1724, "H"), bits_stored=12, signed=False)


def _add_mr(ds: Dataset, series: _Series, seed: int, number: int, count: int) -> None:
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = "1.5" if series.body_part == "KNEE" else "3"
    ds.RepetitionTime = "4000" if "T2" in series.description else "550"
    ds.EchoTime = "95" if "T2" in series.description else "12"
    ds.PatientPosition = "FFS" if series.body_part == "KNEE" else "HFS"
    fov = 160.0 if series.body_part == "KNEE" else 230.0
    _add_geometry(ds, series.orientation, number - (count + 1) / 2, 64, 64, fov, 4.4)
    ds.SliceThickness = "4"
    ds.SpacingBetweenSlices = "4.4"
    ds.AcquisitionNumber = 1
    ds.WindowCenter = "600"
    ds.WindowWidth = "1200"
    _set_pixels(
        ds,
        64,
        64,
        _phantom(64, 64, number, seed, 0, 500 + seed % 300, 1400, "H"),
        bits_stored=12,
        signed=False,
    )


def _add_projection(ds: Dataset, seed: int) -> None:
    rows, cols = 80, 64
    if ds.Modality == "CR":
        ds.SOPClassUID = ComputedRadiographyImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ViewPosition = ds.SeriesDescription
        photometric = "MONOCHROME2"
    else:
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ViewPosition = "PA" if ds.SeriesDescription == "PA" else ""
        photometric = "MONOCHROME1"
    ds.ImagerPixelSpacing = ["0.5", "0.5"]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    pixels = _phantom(rows, cols, 3, seed, 300, 1800, 3500, "H")
    _set_pixels(ds, rows, cols, pixels, bits_stored=12, signed=False, photometric=photometric)


def _add_us_cine(ds: Dataset, seed: int) -> None:
    rows, cols, frames = 48, 64, 8
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.NumberOfFrames = frames
    ds.FrameTime = "33.3"
    ds.FrameIncrementPointer = 0x00181063
    ds.CineRate = 30
    data = b"".join(_phantom(rows, cols, frame, seed, 5, 90, 220, "B") for frame in range(frames))
    _set_pixels(ds, rows, cols, data, bits_stored=8, signed=False)


def _add_us_rgb(ds: Dataset, seed: int) -> None:
    rows, cols = 48, 64
    ds.SOPClassUID = UltrasoundImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    gray = _phantom(rows, cols, seed % 7, seed, 10, 110, 200, "B")
    rgb = bytearray(3 * rows * cols)
    rgb[0::3] = gray
    rgb[1::3] = gray
    rgb[2::3] = bytes(min(255, value + 40) if value > 150 else value for value in gray)
    _set_pixels(ds, rows, cols, bytes(rgb), bits_stored=8, signed=False, photometric="RGB", samples=3)


def _add_secondary_capture(ds: Dataset, seed: int, with_private: bool) -> None:
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    if with_private:
        block = ds.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "Demo private value")
        block.add_new(0x02, "DS", "3.14")
    _set_pixels(ds, 64, 64, _phantom(64, 64, seed % 5, seed, 0, 128, 250, "B"), bits_stored=8, signed=False)


def _add_text_sr(ds: Dataset, series: _Series) -> None:
    ds.SOPClassUID = BasicTextSRStorage
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("11528-7", "Radiology Report", "LN")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "Finding", "DCM")])
    finding.TextValue = f"{series.description}: no acute abnormality."
    ds.ContentSequence = Sequence([finding])


def _add_geometry(
    ds: Dataset,
    orientation: tuple[float, ...],
    step: float,
    rows: int,
    cols: int,
    fov: float,
    spacing: float,
) -> None:
    ds.ImageOrientationPatient = [_ds(value) for value in orientation]
    ds.ImagePositionPatient = _position(orientation, step * spacing, rows, cols, fov)
    pixel_spacing = _ds(fov / max(rows, cols))
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SliceLocation = _ds(step * spacing)


def _position(orientation: tuple[float, ...], offset: float, rows: int, cols: int, fov: float) -> list[str]:
    """Top-left corner of a slice centred on `offset` along the slice normal."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = (
        row_dir[1] * col_dir[2] - row_dir[2] * col_dir[1],
        row_dir[2] * col_dir[0] - row_dir[0] * col_dir[2],
        row_dir[0] * col_dir[1] - row_dir[1] * col_dir[0],
    )
    spacing = fov / max(rows, cols)
    return [
        _ds(-row_dir[axis] * spacing * cols / 2 - col_dir[axis] * spacing * rows / 2 + normal[axis] * offset)
        for axis in range(3)
    ]


def _set_pixels(
    ds: Dataset,
    rows: int,
    cols: int,
    data: bytes,
    *,
    bits_stored: int,
    signed: bool,
    photometric: str = "MONOCHROME2",
    samples: int = 1,
) -> None:
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = data


def _phantom(
    rows: int, cols: int, z: int, seed: int, background: int, tissue: int, insert: int, typecode: str
) -> bytes:
    """Integer phantom: an ellipse with a row texture and a circular insert.

    The geometry is computed in doubled pixel coordinates so that only
    integer arithmetic is used; `z` moves and resizes the insert.
    """
    half_x, half_y = cols * 76 // 100, rows * 84 // 100
    insert_radius = max(rows, cols) // 6 + (z % 5) * max(rows, cols) // 64
    insert_x = ((z * 7 + seed) % (cols // 2)) - cols // 4
    insert_y = ((seed * 3) % (rows // 3)) - rows // 6
    out = array(typecode)
    for y in range(rows):
        row = array(typecode, [background]) * cols
        dy = 2 * y + 1 - rows
        if abs(dy) <= half_y:
            start, stop = _span(
                isqrt(half_x * half_x * (half_y * half_y - dy * dy) // (half_y * half_y)), cols, 0
            )
            texture = (y * 3 + z + seed) % 16
            row[start:stop] = array(typecode, [tissue + texture]) * (stop - start)
        ddy = dy - 2 * insert_y
        if abs(ddy) <= insert_radius:
            start, stop = _span(isqrt(insert_radius * insert_radius - ddy * ddy), cols, 2 * insert_x)
            row[start:stop] = array(typecode, [insert]) * (stop - start)
        out.extend(row)
    if sys.byteorder == "big" and out.itemsize > 1:
        out.byteswap()
    return out.tobytes()


def _span(half_width: int, cols: int, centre: int) -> tuple[int, int]:
    """Columns x whose doubled coordinate ``2x + 1 - cols`` is within `half_width` of `centre`."""
    start = max(0, -((half_width - centre - cols + 1) // 2))
    stop = min(cols, (centre + half_width + cols - 1) // 2 + 1)
    return start, max(start, stop)


def _request_item(study: _Study, series_no: int) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = f"RP{study.accession[1:]}"
    item.RequestedProcedureDescription = study.description
    item.ScheduledProcedureStepID = f"SPS{study.accession[1:]}{series_no}"
    item.ScheduledProcedureStepDescription = study.description
    return item


def _request_item_with_protocol(accession: str) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = f"RP{accession[1:]}"
    item.ScheduledProcedureStepID = f"SPS{accession[1:]}1"
    protocol = _code("OUTSIDE", "Import of outside images")
    protocol.EquivalentCodeSequence = Sequence([_code("IMPORT", "Image import", "99ACME")])
    item.ScheduledProtocolCodeSequence = Sequence([protocol])
    return item


def _code(value: str, meaning: str, scheme: str = "99DEMO") -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _finish(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta


def _age(birth_date: str, on_date: str) -> int:
    years = int(on_date[:4]) - int(birth_date[:4])
    return years - 1 if on_date[4:] < birth_date[4:] else years


def _add_seconds(time: str, seconds: int) -> str:
    total = int(time[:2]) * 3600 + int(time[2:4]) * 60 + int(time[4:6]) + seconds
    total %= 24 * 3600
    return f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"


def _ds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
