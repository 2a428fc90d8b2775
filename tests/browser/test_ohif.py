"""The OHIF viewer (npm @ohif/app 3.x, prebuilt) works on the gateway in front of Orthanc.

One browser run per module (``ohif_run``): open the study list, select a study and open it with
"Basic Viewer", then open the multi-frame ultrasound instance and scroll it with the mouse wheel.
Each test checks one part of what the browser saw against the studies the test loaded into Orthanc.
A failure report carries the browser console, failed and CORS-blocked requests, every request made
to the gateway (path with UIDs replaced, Accept, status), screenshots and the gateway's log tail.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from pydicom.dataset import Dataset

from .conftest import ViewerSetup, request_summary, run_driver

pytestmark = pytest.mark.browser

#: The study opened through the study list (CT THORAX: three series, 12 + 10 + 1 instances).
OPEN_ACCESSION = "A15000101"
#: Mouse-wheel steps on the multi-frame instance.
SCROLLS = 3


def studies_by_uid(instances: list[Dataset]) -> dict[str, list[Dataset]]:
    grouped: dict[str, list[Dataset]] = defaultdict(list)
    for ds in instances:
        grouped[ds.StudyInstanceUID].append(ds)
    return grouped


def multiframe_instance(instances: list[Dataset]) -> Dataset:
    found = [ds for ds in instances if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    assert len(found) == 1, "the synthetic data set should hold exactly one multi-frame instance"
    return found[0]


def shown_name(ds: Dataset) -> str:
    """How the study list writes a patient name: 'FAMILY, GIVEN' from the alphabetic group."""
    return f"{ds.PatientName.family_name}, {ds.PatientName.given_name}"


@pytest.fixture(scope="module")
def ohif_run(viewer_setup: ViewerSetup) -> Iterator[ViewerSetup]:
    studies = studies_by_uid(viewer_setup.studies)
    opened = next(s for s in studies.values() if s[0].AccessionNumber == OPEN_ACCESSION)
    mf = multiframe_instance(viewer_setup.studies)
    run_driver(viewer_setup, {
        "studyCount": len(studies),
        "open": {"accession": OPEN_ACCESSION, "seriesCount": len({ds.SeriesInstanceUID for ds in opened})},
        "multiframe": {"studyUID": mf.StudyInstanceUID, "seriesUID": mf.SeriesInstanceUID, "scrolls": SCROLLS},
    })
    yield viewer_setup


def observed(setup: ViewerSetup, part: str) -> Any:
    """One part of the browser's report; fails with the driver's error when the run stopped before it."""
    value = setup.result.get(part)
    if value is None:
        pytest.fail(f"the browser run stopped before '{part}': step {setup.result.get('failedStep')!r}: "
                    f"{(setup.result.get('error') or '')[:1500]}")
    return value


def assert_image(canvas: dict[str, Any] | None, what: str) -> None:
    """A real image: several colours, and neither all background nor all foreground."""
    assert canvas, f"{what}: no viewport canvas"
    assert canvas["distinctColours"] >= 3, f"{what}: the canvas is (nearly) one colour: {canvas}"
    assert 0.02 < canvas["nonBlackShare"] < 0.98, f"{what}: the canvas is nearly blank: {canvas}"
    assert canvas["maxLum"] - canvas["minLum"] >= 64, f"{what}: the canvas has almost no contrast: {canvas}"


def frame_position(indicator: str | None) -> tuple[int, int]:
    match = re.search(r"\((\d+)/(\d+)\)", indicator or "")
    assert match, f"no '(n/total)' in the viewport's frame indicator {indicator!r}"
    return int(match.group(1)), int(match.group(2))


def test_study_list_shows_the_loaded_studies(ohif_run: ViewerSetup) -> None:
    listing = observed(ohif_run, "studyList")
    headers: list[str] = listing["headers"]
    for name in ("Patient", "MRN", "Study Date", "Modalities", "Description", "Accession"):
        assert name in headers, f"study list columns {headers}"
    col = {name: headers.index(name) for name in headers if name}
    instances_col = col["Accession"] + 1  # the instance count's header is an icon
    rows = {row[col["Accession"]]: row for row in listing["rows"]}
    studies = studies_by_uid(ohif_run.studies)
    assert len(listing["rows"]) == len(studies), f"rows: {listing['rows']}"
    for instances in studies.values():
        ds = instances[0]
        row = rows.get(ds.AccessionNumber)
        assert row is not None, f"no row for accession {ds.AccessionNumber}: {listing['rows']}"
        assert row[col["Patient"]] == shown_name(ds)
        assert row[col["MRN"]] == ds.PatientID
        assert row[col["Study Date"]].startswith(datetime.strptime(ds.StudyDate, "%Y%m%d").strftime("%d-%b-%Y"))
        assert set(row[col["Modalities"]].split("\\")) == {i.Modality for i in instances}
        assert row[col["Description"]] == ds.StudyDescription
        assert row[instances_col] == str(len(instances)), f"instance count of {ds.AccessionNumber}: {row}"


def test_selecting_a_study_lists_its_series(ohif_run: ViewerSetup) -> None:
    selection = observed(ohif_run, "selection")
    instances = next(s for s in studies_by_uid(ohif_run.studies).values() if s[0].AccessionNumber == OPEN_ACCESSION)
    counts = Counter((ds.Modality, ds.SeriesDescription) for ds in instances)
    expected = sorted([f"{modality} {description}", str(n)] for (modality, description), n in counts.items())
    assert sorted(selection["series"]) == expected


def test_opening_a_study_renders_an_image(ohif_run: ViewerSetup) -> None:
    viewer = observed(ohif_run, "viewer")
    instances = next(s for s in studies_by_uid(ohif_run.studies).values() if s[0].AccessionNumber == OPEN_ACCESSION)
    assert f"StudyInstanceUIDs={instances[0].StudyInstanceUID}" in viewer["url"]
    assert_image(viewer["canvas"], "opened study")
    # The overlay names one of the study's series, and counts that series' instances from its metadata.
    per_series = Counter(ds.SeriesDescription for ds in instances)
    shown = [text for text in viewer["overlay"]["top-left"] if text in per_series]
    assert shown, f"no series description of the study in the overlay: {viewer['overlay']}"
    position, total = frame_position(viewer["overlay"]["indicator"])
    assert (position, total) == (1, per_series[shown[0]]), viewer["overlay"]


def test_multiframe_instance_scrolls_past_frame_one(ohif_run: ViewerSetup) -> None:
    mf_view = observed(ohif_run, "multiframe")
    mf = multiframe_instance(ohif_run.studies)
    frames = int(mf.NumberOfFrames)
    assert mf.SeriesDescription in mf_view["before"]["overlay"]["top-left"], mf_view["before"]["overlay"]
    assert frame_position(mf_view["before"]["overlay"]["indicator"]) == (1, frames)
    assert_image(mf_view["before"]["canvas"], "frame 1")
    position, total = frame_position(mf_view["after"]["overlay"]["indicator"])
    assert total == frames and 1 < position <= min(frames, 1 + SCROLLS), mf_view["after"]["overlay"]
    assert_image(mf_view["after"]["canvas"], f"frame {position}")
    assert mf_view["after"]["canvas"]["hash"] != mf_view["before"]["canvas"]["hash"], "the image did not change"
    # The frames past the first came through the gateway's WADO-RS frames resource.
    fetched = {int(m.group(1)) for r in ohif_run.result["requests"] if r.get("status") == 200
               for m in [re.search(rf"/instances/{re.escape(mf.SOPInstanceUID)}/frames/(\d+)$", r["url"])] if m}
    assert position in fetched, f"frames fetched for the multi-frame instance: {sorted(fetched)}"


def test_every_gateway_request_succeeds_cross_origin(ohif_run: ViewerSetup) -> None:
    result = ohif_run.result
    requests = result.get("requests") or []
    # What the viewer asks of a DICOMweb server (shown with pytest -rP).
    print("requests to the gateway:", *request_summary(requests), sep="\n  ")
    print("CORS preflights:", *sorted({f"{p['path']} {p['requestMethod']} headers={p['requestHeaders']}"
                                        for p in result.get("preflights") or []}) or ["(none)"], sep="\n  ")
    assert requests, f"the browser made no request to the gateway: {result.get('error')}"
    bad = [r for r in requests if not (r.get("status") and 200 <= r["status"] < 300)]
    assert not bad, "requests to the gateway that failed:\n" + "\n".join(
        f"{r['method']} {r['url']} Accept: {r.get('accept')} -> {r.get('status') or r.get('error')}" for r in bad)
    assert not result.get("corsErrors"), f"CORS errors: {result['corsErrors']}"
    # What a viewer needs: searches, series metadata and pixel data frames.
    paths = {r["path"].split("?")[0] for r in requests}
    for needed in ("/dicom-web/studies", "/dicom-web/studies/{study}/series",
                   "/dicom-web/studies/{study}/series/{series}/metadata",
                   "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"):
        assert needed in paths, f"{needed} was never asked for:\n" + "\n".join(request_summary(requests))
    assert result.get("ok"), f"the browser run did not finish: {result.get('failedStep')}: {result.get('error')}"
