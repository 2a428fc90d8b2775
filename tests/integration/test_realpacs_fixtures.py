"""The real-PACS helpers start Orthanc and dcmqrscp, load data, answer C-FIND
and leave no process behind."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.support.realpacs import (
    DCMQRSCP_BINARY,
    HELPER_AET,
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    DcmqrscpServer,
    OrthancServer,
    _group_alive,
    c_find,
    dimse_echo,
    require_binary,
)

PATIENT_NAME = "Müller^Jürgen"
N_SERIES = 2
N_INSTANCES = 2


def make_study(patient_name: str = PATIENT_NAME, patient_id: str = "RP-0001") -> list[Dataset]:
    """A tiny CT study: N_SERIES series of N_INSTANCES 4x4 images, UTF-8 text."""
    study_uid = generate_uid()
    datasets = []
    for s in range(N_SERIES):
        series_uid = generate_uid()
        for i in range(N_INSTANCES):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = "19700101"
            ds.PatientSex = "M"
            ds.StudyDate = "20240102"
            ds.StudyTime = "101010"
            ds.StudyID = "1"
            ds.AccessionNumber = "ACC-RP-1"
            ds.StudyDescription = "Schädel"
            ds.Modality = "CT"
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"Serie {s + 1}"
            ds.InstanceNumber = i + 1
            ds.Rows = ds.Columns = 4
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.PixelData = bytes(4 * 4 * 2)
            datasets.append(ds)
    return datasets


def _query(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _assert_gone(pid: int, pgid: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") and not _group_alive(pgid):
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} (or its group) still alive after stop()")


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc_study():
    require_binary(ORTHANC_BINARY, "Orthanc")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc DICOMweb plugin")
    study = make_study()
    # Throw-away data: no need for Orthanc's ~3 s graceful shutdown.
    with OrthancServer(modalities={"scu": ("RP_SCU", "127.0.0.1", 11112)},
                       stop_timeout=0) as server:
        answers = server.load(study)
        assert [a["Status"] for a in answers] == ["Success"] * len(study)
        yield server, study


@pytest.mark.orthanc
def test_orthanc_cfind_levels(orthanc_study):
    server, study = orthanc_study
    study_uid = study[0].StudyInstanceUID
    series_uid = study[0].SeriesInstanceUID

    studies = c_find(server.dicom_port, server.aet, _query(
        "STUDY", StudyInstanceUID="", PatientName="", ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
        SpecificCharacterSet="ISO_IR 192"))
    assert len(studies) == 1
    found = studies[0]
    assert found.StudyInstanceUID == study_uid
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == PATIENT_NAME
    assert found.ModalitiesInStudy == "CT"
    assert int(found.NumberOfStudyRelatedSeries) == N_SERIES
    assert int(found.NumberOfStudyRelatedInstances) == N_SERIES * N_INSTANCES

    series = c_find(server.dicom_port, server.aet, _query(
        "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
        SeriesDescription="", NumberOfSeriesRelatedInstances=""))
    assert len(series) == N_SERIES
    assert {s.SeriesDescription for s in series} == {"Serie 1", "Serie 2"}
    assert all(int(s.NumberOfSeriesRelatedInstances) == N_INSTANCES for s in series)

    query = _query("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                   SOPInstanceUID="", SOPClassUID="", InstanceNumber="")
    query.Rows = None
    query.Columns = None
    images = c_find(server.dicom_port, server.aet, query)
    assert len(images) == N_INSTANCES
    assert all(i.SOPClassUID == CTImageStorage for i in images)
    assert all(i.Rows == 4 and i.Columns == 4 for i in images)  # read from files

    # Case-insensitive PN matching with a non-ASCII wildcard.
    matches = c_find(server.dicom_port, server.aet, _query(
        "STUDY", StudyInstanceUID="", PatientName="mü*",
        SpecificCharacterSet="ISO_IR 192"))
    assert len(matches) == 1


@pytest.mark.orthanc
def test_orthanc_access_control(orthanc_study):
    server, _ = orthanc_study
    # Echo is open to anyone; C-FIND only to configured modalities.
    assert dimse_echo("127.0.0.1", server.dicom_port, server.aet, calling_aet="NOBODY")
    with pytest.raises(RuntimeError):
        c_find(server.dicom_port, server.aet, _query("STUDY", StudyInstanceUID=""),
               calling_aet="NOBODY")
    assert c_find(server.dicom_port, server.aet, _query("STUDY", StudyInstanceUID=""),
                  calling_aet="RP_SCU")


@pytest.mark.orthanc
def test_orthanc_qido(orthanc_study):
    server, study = orthanc_study
    resp = httpx.get(f"{server.dicomweb_url}studies", timeout=10, trust_env=False)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/dicom+json")
    body = resp.json()
    assert len(body) == 1
    assert body[0]["0020000D"]["Value"] == [study[0].StudyInstanceUID]
    assert body[0]["00100010"]["Value"] == [{"Alphabetic": PATIENT_NAME}]

    # Orthanc 1.10 does not percent-decode query arguments: pass them raw.
    resp = httpx.get(f"{server.dicomweb_url}studies?PatientID=RP-0001&PatientName=M*",
                     timeout=10, trust_env=False)
    assert len(resp.json()) == 1

    resp = httpx.get(
        f"{server.dicomweb_url}studies/{study[0].StudyInstanceUID}/series/"
        f"{study[0].SeriesInstanceUID}/instances", timeout=10, trust_env=False)
    instances = resp.json()
    assert len(instances) == N_INSTANCES
    assert all(i["00280010"]["Value"] == [4] for i in instances)


@pytest.mark.orthanc
def test_orthanc_stop_leaves_nothing():
    require_binary(ORTHANC_BINARY, "Orthanc")
    server = OrthancServer(aet="RP_STOPME", stop_timeout=0.5)  # SIGTERM, then SIGKILL
    server.start()
    pid, tmpdir = server.pid, server.tmpdir
    assert httpx.get(f"{server.base_url}/system", trust_env=False).json()["DicomAet"] == "RP_STOPME"
    server.stop()
    _assert_gone(pid, pid)
    assert not tmpdir.exists()
    server.stop()  # idempotent


# --------------------------------------------------------------------------
# dcmqrscp
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dcmqrscp_study():
    require_binary(DCMQRSCP_BINARY, "DCMTK dcmqrscp")
    study = make_study()
    with DcmqrscpServer(peers={"scu": ("RP_SCU", "localhost", 11112)}) as server:
        server.load(study)  # raises unless every instance is found again
        yield server, study


@pytest.mark.dcmtk
def test_dcmqrscp_cfind_levels(dcmqrscp_study):
    server, study = dcmqrscp_study
    study_uid = study[0].StudyInstanceUID
    series_uid = study[0].SeriesInstanceUID

    studies = c_find(server.port, server.aet, _query(
        "STUDY", StudyInstanceUID="", PatientName="", StudyDescription="",
        ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
        SpecificCharacterSet="ISO_IR 192"))
    assert len(studies) == 1
    found = studies[0]
    assert found.StudyInstanceUID == study_uid
    assert str(found.PatientName) == PATIENT_NAME
    assert found.StudyDescription == "Schädel"
    assert found.SpecificCharacterSet == "ISO_IR 192"
    # Unsupported keys are dropped from the answer, not returned empty.
    assert "ModalitiesInStudy" not in found
    assert "NumberOfStudyRelatedSeries" not in found
    assert found.RetrieveAETitle == server.aet

    series = c_find(server.port, server.aet, _query(
        "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="",
        SeriesNumber="", SeriesDescription=""))
    assert len(series) == N_SERIES
    assert {int(s.SeriesNumber) for s in series} == {1, 2}
    assert all("SeriesDescription" not in s for s in series)

    # A value on an unsupported key does not filter anything.
    unfiltered = c_find(server.port, server.aet, _query(
        "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
        SeriesDescription="no such series"))
    assert len(unfiltered) == N_SERIES

    images = c_find(server.port, server.aet, _query(
        "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
        SOPInstanceUID="", SOPClassUID="", InstanceNumber=""))
    assert len(images) == N_INSTANCES
    assert all("SOPClassUID" not in i for i in images)

    # Hierarchical only: a missing higher-level unique key is a failure.
    with pytest.raises(RuntimeError, match="0xC000"):
        c_find(server.port, server.aet, _query("IMAGE", SOPInstanceUID=study[0].SOPInstanceUID))


@pytest.mark.dcmtk
def test_dcmqrscp_charset(dcmqrscp_study):
    server, _ = dcmqrscp_study
    # Converted to the request's character set when possible ...
    latin1 = c_find(server.port, server.aet, _query(
        "STUDY", StudyInstanceUID="", PatientName="Mü*", SpecificCharacterSet="ISO_IR 100"))
    assert len(latin1) == 1
    assert latin1[0].SpecificCharacterSet == "ISO_IR 100"
    assert str(latin1[0].PatientName) == PATIENT_NAME
    # ... otherwise (no charset -> ASCII impossible) left in UTF-8, labelled.
    plain = c_find(server.port, server.aet, _query("STUDY", StudyInstanceUID="", PatientName=""))
    assert plain[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(plain[0].PatientName) == PATIENT_NAME
    # PN matching is case-sensitive.
    assert c_find(server.port, server.aet, _query(
        "STUDY", StudyInstanceUID="", PatientName="mü*", SpecificCharacterSet="ISO_IR 192")) == []


@pytest.mark.dcmtk
def test_dcmqrscp_access_and_duplicates(dcmqrscp_study):
    server, study = dcmqrscp_study
    assert dimse_echo("127.0.0.1", server.port, server.aet, calling_aet="RP_SCU")
    assert not dimse_echo("127.0.0.1", server.port, server.aet, calling_aet="NOBODY")
    assert not dimse_echo("127.0.0.1", server.port, "NOT_" + server.aet[:12],
                          calling_aet=HELPER_AET)
    # Storing the same SOP Instance UIDs again keeps one record per instance.
    server.load(study[:1])
    images = c_find(server.port, server.aet, _query(
        "IMAGE", StudyInstanceUID=study[0].StudyInstanceUID,
        SeriesInstanceUID=study[0].SeriesInstanceUID, SOPInstanceUID=""))
    assert len(images) == N_INSTANCES


@pytest.mark.dcmtk
def test_dcmqrscp_stop_leaves_nothing():
    require_binary(DCMQRSCP_BINARY, "DCMTK dcmqrscp")
    server = DcmqrscpServer(aet="RP_STOPME")
    with server:
        pid, tmpdir = server.pid, server.tmpdir
        assert dimse_echo("127.0.0.1", server.port, "RP_STOPME")
    _assert_gone(pid, pid)
    assert not tmpdir.exists()
