"""The benchmark's data set: the demo studies plus copies of them under new patients and UIDs.

``generate_studies(scale)`` gives 11 studies of 7 patients. A QIDO benchmark on 11 studies measures
little more than round trips, so ``copies`` more sets are made from it: every UID of the demo root
(study, series, instance, frame of reference; never SOP classes or the implementation UID) moves to
its own branch, PatientID and AccessionNumber get a per-copy prefix and every date moves back by
three years per copy. The original patients keep their IDs, so ``DEMO-0001`` stays a known patient
with three studies, whatever the number of copies.

The queries target:

- the series with the most instances (``scale=2`` gives 24: "Thorax 1.0 B31f" of DOE^JOHN's CT study)
  and the study that holds it (three series);
- the patient ``DEMO-0001``;
- a StudyDate range (2018-2022) that matches about a quarter of the studies (12 of 44 by default).

Expected result counts are computed from the data sets themselves, so every answer can be checked.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass

from pydicom.dataset import Dataset

from gateway.demo.data import UID_ROOT, generate_studies

KNOWN_PATIENT_ID = "DEMO-0001"
DATE_RANGE = ("20180101", "20221231")
_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate", "PerformedProcedureStepStartDate")
_SHIFT_YEARS = 3


@dataclass(frozen=True)
class BenchData:
    datasets: list[Dataset]
    patient_id: str
    study_uid: str
    series_uid: str
    date_range: tuple[str, str]
    studies_total: int
    studies_of_patient: int
    studies_in_range: int
    series_in_study: int
    instances_in_series: int

    @property
    def instances_total(self) -> int:
        return len(self.datasets)

    def summary(self) -> dict[str, object]:
        return {
            "instances": self.instances_total,
            "studies": self.studies_total,
            "patients": len({str(ds.PatientID) for ds in self.datasets}),
            "series": len({str(ds.SeriesInstanceUID) for ds in self.datasets}),
            "patient_id": self.patient_id,
            "studies_of_patient": self.studies_of_patient,
            "date_range": "-".join(self.date_range),
            "studies_in_range": self.studies_in_range,
            "study_uid": self.study_uid,
            "series_in_study": self.series_in_study,
            "series_uid": self.series_uid,
            "instances_in_series": self.instances_in_series,
        }


def _copy_uid(uid: str, copy_no: int) -> str:
    if uid.startswith(UID_ROOT) and not uid.startswith(UID_ROOT + "0."):
        new = f"{UID_ROOT}8.{copy_no}.{uid[len(UID_ROOT):]}"
        if len(new) > 64:
            raise ValueError(f"copied UID too long: {new}")
        return new
    return uid


def _shift_date(value: str, years: int) -> str:
    return f"{int(value[:4]) - years:04d}{value[4:]}" if len(value) == 8 and value.isdigit() else value


def copy_dataset(ds: Dataset, copy_no: int) -> Dataset:
    """``ds`` as it would be in copy number ``copy_no`` (1-based) of the demo set."""
    new = copy.deepcopy(ds)

    def remap(dataset: Dataset, elem) -> None:
        if elem.VR == "UI" and elem.value:
            if isinstance(elem.value, str):
                elem.value = _copy_uid(elem.value, copy_no)
            else:
                elem.value = [_copy_uid(str(v), copy_no) for v in elem.value]

    new.walk(remap)
    meta = new.file_meta
    meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    new.PatientID = f"C{copy_no:02d}-{ds.PatientID}"
    if ds.get("AccessionNumber"):
        new.AccessionNumber = f"C{copy_no:02d}{str(ds.AccessionNumber)[1:]}"[:16]
    for keyword in _DATE_KEYWORDS:
        if keyword in new and new[keyword].value:
            new[keyword].value = _shift_date(str(new[keyword].value), _SHIFT_YEARS * copy_no)
    return new


def bench_data(scale: int = 2, copies: int = 3) -> BenchData:
    """The demo set at ``scale`` plus ``copies`` relabelled copies of it."""
    base = generate_studies(scale=scale)
    datasets = list(base)
    for copy_no in range(1, copies + 1):
        datasets += [copy_dataset(ds, copy_no) for ds in base]

    per_series = Counter(str(ds.SeriesInstanceUID) for ds in base)
    # max() keeps the first of equal counts; dict order is generation order, so this is stable
    series_uid = max(per_series, key=lambda uid: per_series[uid])
    study_uid = next(str(ds.StudyInstanceUID) for ds in base if str(ds.SeriesInstanceUID) == series_uid)

    study_date: dict[str, str] = {}
    study_patient: dict[str, str] = {}
    series_of_study: dict[str, set[str]] = defaultdict(set)
    for ds in datasets:
        study = str(ds.StudyInstanceUID)
        study_date[study] = str(ds.StudyDate)
        study_patient[study] = str(ds.PatientID)
        series_of_study[study].add(str(ds.SeriesInstanceUID))
    low, high = DATE_RANGE
    return BenchData(
        datasets=datasets,
        patient_id=KNOWN_PATIENT_ID,
        study_uid=study_uid,
        series_uid=series_uid,
        date_range=DATE_RANGE,
        studies_total=len(study_date),
        studies_of_patient=sum(1 for p in study_patient.values() if p == KNOWN_PATIENT_ID),
        studies_in_range=sum(1 for d in study_date.values() if low <= d <= high),
        series_in_study=len(series_of_study[study_uid]),
        instances_in_series=per_series[series_uid],
    )
