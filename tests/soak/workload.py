"""A mixed QIDO-RS / WADO-RS / STOW-RS workload whose every answer is checked, and the client threads
that drive it (the soak run and the scale-out test share both).

The expected answers come from the synthetic studies (gateway.demo.data) that the PACS behind the
gateway holds: a search must return exactly the matching UIDs, a retrieve exactly the instances it
names, each with its own pixel data, and its multipart body must end with the closing boundary (a
retrieve that fails midway is aborted without it, so a cut answer never passes for a whole one). A
store sends instances with fresh SOP Instance UIDs into a few studies of a patient that no search
looks for, so the searches stay exact however many instances a run has stored; a later retrieve of
a stored instance checks the round trip.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

QIDO, WADO, STOW = "qido", "wado", "stow"
DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
STOW_PATIENT_ID = "SOAK-STOW"
STOW_SERIES = 16  # stores go into this many series (one study each), so the PACS's study count stays put
DEFAULT_MIX: Mapping[str, float] = {QIDO: 0.50, WADO: 0.35, STOW: 0.15}
READ_ONLY_MIX: Mapping[str, float] = {QIDO: 0.55, WADO: 0.45}

_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_DESCRIPTION = "00081030"
_REFERENCED_SOP_SEQUENCE, _FAILED_SOP_SEQUENCE, _REFERENCED_SOP_INSTANCE = "00081199", "00081198", "00081155"
_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


class BadAnswer(Exception):
    """An answer that is not what the request must get."""


@dataclass(frozen=True)
class Call:
    """One request of the workload and how to check its answer (``check(status, headers, body)``)."""

    kind: str
    shape: str
    method: str
    path: str  # under /dicom-web, query string included
    headers: Mapping[str, str]
    body: bytes | None
    check: Callable[[int, httpx.Headers, bytes], None]


@dataclass
class Outcome:
    """What became of one request; ``start`` and ``end`` are ``time.monotonic()`` in the client."""

    index: int
    kind: str
    shape: str
    method: str
    path: str
    request_id: str
    start: float
    end: float
    status: int | None
    size: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------------------------
# What the PACS holds


def pixel_digest(ds: Dataset) -> str | None:
    return hashlib.sha256(bytes(ds.PixelData)).hexdigest() if "PixelData" in ds else None


@dataclass
class Catalog:
    """The synthetic studies as the checks need them."""

    studies_of_patient: dict[str, set[str]]
    description: dict[str, str]
    series_of_study: dict[str, set[str]]
    modality: dict[str, str]
    study_of_series: dict[str, str]
    instances_of_series: dict[str, set[str]]
    digest: dict[str, str | None]
    template: Dataset

    @classmethod
    def from_datasets(cls, datasets: Iterable[Dataset]) -> Catalog:
        studies_of_patient: dict[str, set[str]] = defaultdict(set)
        series_of_study: dict[str, set[str]] = defaultdict(set)
        instances_of_series: dict[str, set[str]] = defaultdict(set)
        description: dict[str, str] = {}
        modality: dict[str, str] = {}
        study_of_series: dict[str, str] = {}
        digest: dict[str, str | None] = {}
        template: Dataset | None = None
        for ds in datasets:
            study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            studies_of_patient[str(ds.PatientID)].add(study)
            description[study] = str(ds.get("StudyDescription", "") or "")
            series_of_study[study].add(series)
            modality[series] = str(ds.Modality)
            study_of_series[series] = study
            instances_of_series[series].add(sop)
            digest[sop] = pixel_digest(ds)
            if template is None and ds.Modality == "CT" and "PixelData" in ds:
                template = ds
        if template is None:
            raise ValueError("the data set has no CT instance to store copies of")
        return cls(dict(studies_of_patient), description, dict(series_of_study), modality, study_of_series,
                   dict(instances_of_series), digest, template)

    def sop_instances(self) -> list[tuple[str, str, str]]:
        return sorted((self.study_of_series[se], se, sop) for se, sops in self.instances_of_series.items()
                      for sop in sops)


# ------------------------------------------------------------------------------------------------
# Checking answers


def _media_type(headers: httpx.Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _status(status: int, expected: int, body: bytes) -> None:
    if status != expected:
        raise BadAnswer(f"status {status} (expected {expected}): {body[:300]!r}")


def _values(item: Mapping[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def parse_dicom_json_list(status: int, headers: httpx.Headers, body: bytes) -> list[dict[str, Any]]:
    _status(status, 200, body)
    if _media_type(headers) != DICOM_JSON:
        raise BadAnswer(f"content type {headers.get('content-type')!r}")
    try:
        results = json.loads(body)
    except ValueError as exc:
        raise BadAnswer(f"not JSON ({exc}): {len(body)} bytes, ends {body[-80:]!r}") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise BadAnswer("not a JSON array of objects")
    return results


def _uids(results: Sequence[Mapping[str, Any]], tag: str) -> list[str]:
    uids = []
    for result in results:
        values = _values(result, tag)
        if len(values) != 1:
            raise BadAnswer(f"a result without exactly one {tag}")
        uids.append(str(values[0]))
    return uids


def split_multipart(headers: httpx.Headers, body: bytes) -> list[tuple[str, bytes]]:
    """``(content type, payload)`` of each part. A body without its closing boundary is truncated."""
    content_type = headers.get("content-type", "")
    if _media_type(headers) != "multipart/related":
        raise BadAnswer(f"content type {content_type!r}")
    match = _BOUNDARY_RE.search(content_type)
    if not match:
        raise BadAnswer(f"no boundary in {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    closing = b"\r\n" + delimiter + b"--"
    end = body.rstrip(b"\r\n")
    if not end.endswith(closing):
        raise BadAnswer(f"no closing boundary: truncated after {len(body)} bytes")
    if not body.startswith(delimiter + b"\r\n"):
        raise BadAnswer("the body does not start with a boundary")
    parts = []
    for chunk in end[len(delimiter) + 2:-len(closing)].split(b"\r\n" + delimiter + b"\r\n"):
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise BadAnswer("a part without a header block")
        part_type = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.strip()
        parts.append((part_type, payload))
    return parts


def check_instances(status: int, headers: httpx.Headers, body: bytes, expected: Mapping[str, str | None]) -> None:
    """A complete multipart answer with exactly the ``expected`` instances (SOP Instance UID ->
    pixel data digest), each a PS3.10 file whose pixel data are the original ones."""
    _status(status, 200, body)
    seen: set[str] = set()
    for part_type, payload in split_multipart(headers, body):
        if part_type.split(";")[0].strip().lower() != "application/dicom":
            raise BadAnswer(f"a part of type {part_type!r}")
        try:
            ds = dcmread(io.BytesIO(payload))
        except Exception as exc:  # pydicom raises several kinds on a broken file
            raise BadAnswer(f"a part that is not a DICOM file: {type(exc).__name__}: {exc}") from None
        sop = str(ds.SOPInstanceUID)
        if sop not in expected:
            raise BadAnswer(f"an instance that was not asked for: {sop}")
        if sop in seen:
            raise BadAnswer(f"the same instance twice: {sop}")
        if pixel_digest(ds) != expected[sop]:
            raise BadAnswer(f"the pixel data of {sop} differ from the original")
        seen.add(sop)
    if seen != set(expected):
        raise BadAnswer(f"{len(seen)} of {len(expected)} instances")


# ------------------------------------------------------------------------------------------------
# The workload


class Workload:
    """Request ``index`` of a run is ``call(index)``: the kind drawn with the ``mix`` weights and the
    shape and its parameters drawn from a generator seeded with ``seed`` and ``index``, so a run can
    be repeated. Stored instances are remembered (thread-safe) for later retrieves."""

    def __init__(self, catalog: Catalog, mix: Mapping[str, float] = DEFAULT_MIX, seed: int = 0) -> None:
        if not mix or any(kind not in (QIDO, WADO, STOW) or w < 0 for kind, w in mix.items()):
            raise ValueError(f"bad mix {dict(mix)!r}")
        self.catalog = catalog
        self.seed = seed
        total = sum(mix.values())
        self._cumulative: list[tuple[float, str]] = []
        acc = 0.0
        for kind, weight in mix.items():
            acc += weight / total
            self._cumulative.append((acc, kind))
        self._patients = sorted(catalog.studies_of_patient)
        self._studies = sorted(catalog.series_of_study)
        self._series = sorted(catalog.instances_of_series)
        self._instances = catalog.sop_instances()
        self._stored: list[tuple[str, str, str]] = []
        self._stored_lock = threading.Lock()
        self._template_digest = pixel_digest(catalog.template)
        self._template_bytes = _part10(catalog.template)
        self._stow_series = [(generate_uid(entropy_srcs=[f"soak-{seed}-study-{n}"]),
                              generate_uid(entropy_srcs=[f"soak-{seed}-series-{n}"])) for n in range(STOW_SERIES)]

    def call(self, index: int) -> Call:
        rng = random.Random(f"{self.seed}:{index}")
        draw = rng.random()
        kind = next((k for edge, k in self._cumulative if draw < edge), self._cumulative[-1][1])
        if kind == QIDO:
            return self._qido(rng)
        if kind == WADO:
            return self._wado(rng)
        return self._stow(rng)

    # -- QIDO-RS ----------------------------------------------------------------------------------
    def _qido(self, rng: random.Random) -> Call:
        c = self.catalog
        shape = rng.choice(("studies-of-patient", "studies-with-description", "series-of-study",
                            "series-by-modality", "instances-of-series", "instance-by-uid", "studies-page"))
        if shape in ("studies-of-patient", "studies-with-description"):
            patient = rng.choice(self._patients)
            expected = c.studies_of_patient[patient]
            with_description = shape == "studies-with-description"
            path = f"/studies?PatientID={patient}" + ("&includefield=StudyDescription" if with_description else "")

            def check(status: int, headers: httpx.Headers, body: bytes) -> None:
                results = parse_dicom_json_list(status, headers, body)
                _same(_uids(results, _STUDY), expected)
                if with_description:
                    for result in results:
                        got = "".join(str(v) for v in _values(result, _DESCRIPTION))
                        study = _values(result, _STUDY)[0]
                        if got != c.description[study]:
                            raise BadAnswer(f"StudyDescription {got!r} for a study described {c.description[study]!r}")

            return self._search(shape, path, check)
        if shape == "series-of-study":
            study = rng.choice(self._studies)
            return self._search(shape, f"/studies/{study}/series", _expect_uids(_SERIES, c.series_of_study[study]))
        if shape == "series-by-modality":
            study = rng.choice(self._studies)
            modality = c.modality[rng.choice(sorted(c.series_of_study[study]))]
            expected = {se for se in c.series_of_study[study] if c.modality[se] == modality}
            return self._search(shape, f"/series?StudyInstanceUID={study}&Modality={modality}",
                                _expect_uids(_SERIES, expected))
        if shape == "instances-of-series":
            series = rng.choice(self._series)
            path = f"/studies/{c.study_of_series[series]}/series/{series}/instances"
            return self._search(shape, path, _expect_uids(_SOP, c.instances_of_series[series]))
        if shape == "instance-by-uid":
            _study, _series, sop = rng.choice(self._instances)
            return self._search(shape, f"/instances?SOPInstanceUID={sop}", _expect_uids(_SOP, {sop}))
        limit, offset = rng.randint(1, 4), rng.randint(0, 3)

        def check_page(status: int, headers: httpx.Headers, body: bytes) -> None:
            uids = _uids(parse_dicom_json_list(status, headers, body), _STUDY)
            if len(uids) != limit or len(set(uids)) != limit:  # the PACS holds more than limit + offset studies
                raise BadAnswer(f"{len(uids)} results ({len(set(uids))} distinct) for limit={limit}")

        return self._search("studies-page", f"/studies?limit={limit}&offset={offset}", check_page)

    @staticmethod
    def _search(shape: str, path: str, check: Callable[[int, httpx.Headers, bytes], None]) -> Call:
        return Call(QIDO, shape, "GET", path, {"Accept": DICOM_JSON}, None, check)

    # -- WADO-RS ----------------------------------------------------------------------------------
    def _wado(self, rng: random.Random) -> Call:
        c = self.catalog
        shape = rng.choice(("instance", "instance", "series", "series", "stored-instance"))
        if shape == "stored-instance":
            with self._stored_lock:
                picked = rng.choice(self._stored) if self._stored else None
            if picked:
                study, series, sop = picked
                return self._retrieve(shape, f"/studies/{study}/series/{series}/instances/{sop}",
                                      {sop: self._template_digest})
            shape = "instance"
        if shape == "instance":
            study, series, sop = rng.choice(self._instances)
            return self._retrieve(shape, f"/studies/{study}/series/{series}/instances/{sop}", {sop: c.digest[sop]})
        series = rng.choice(self._series)
        study = c.study_of_series[series]
        return self._retrieve(shape, f"/studies/{study}/series/{series}",
                              {sop: c.digest[sop] for sop in c.instances_of_series[series]})

    @staticmethod
    def _retrieve(shape: str, path: str, expected: Mapping[str, str | None]) -> Call:
        def check(status: int, headers: httpx.Headers, body: bytes) -> None:
            check_instances(status, headers, body, expected)

        return Call(WADO, shape, "GET", path, {"Accept": MULTIPART_DICOM}, None, check)

    # -- STOW-RS ----------------------------------------------------------------------------------
    def _stow(self, rng: random.Random) -> Call:
        count = rng.choice((1, 1, 1, 2))
        # a fixed set of studies: a search without keys (studies-page) costs the PACS the same at the
        # end of a long run as at its start, so the soak measures the gateway, not a growing database
        study, series = rng.choice(self._stow_series)
        instances = [self._fresh_instance(study, series) for _ in range(count)]
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), data)
                        for _sop, data in instances) + b"--%s--\r\n" % boundary.encode()
        sent = {sop for sop, _data in instances}

        def check(status: int, headers: httpx.Headers, answer: bytes) -> None:
            _status(status, 200, answer)
            if _media_type(headers) != DICOM_JSON:
                raise BadAnswer(f"content type {headers.get('content-type')!r}")
            try:
                response = json.loads(answer)
            except ValueError as exc:
                raise BadAnswer(f"not JSON: {exc}") from None
            if not isinstance(response, dict) or _FAILED_SOP_SEQUENCE in response:
                raise BadAnswer(f"failed instances: {answer[:300]!r}")
            stored = {str(v) for item in _values(response, _REFERENCED_SOP_SEQUENCE)
                      for v in _values(item, _REFERENCED_SOP_INSTANCE)}
            if stored != sent:
                raise BadAnswer(f"{len(stored & sent)} of {len(sent)} instances stored")
            with self._stored_lock:
                self._stored.extend((study, series, sop) for sop in sorted(sent))

        headers = {"Accept": DICOM_JSON,
                   "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
        return Call(STOW, f"store-{count}", "POST", "/studies", headers, body, check)

    def _fresh_instance(self, study: str, series: str) -> tuple[str, bytes]:
        """A copy of the template with new UIDs, of the store-only patient, as a PS3.10 file. Each
        copy is parsed from the template's bytes: pydicom changes an element's value in place, so
        copies that shared elements would write each other's UIDs from other threads."""
        ds = dcmread(io.BytesIO(self._template_bytes))
        sop = generate_uid()
        ds.PatientID = STOW_PATIENT_ID
        ds.PatientName = "SOAK^STOW"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return sop, buffer.getvalue()


def _part10(ds: Dataset) -> bytes:
    """``ds`` as a PS3.10 file in Explicit VR Little Endian, ``ds`` itself left as it was."""
    copy = Dataset()
    copy.update(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy.file_meta = meta
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _same(got: Sequence[str], expected: set[str]) -> None:
    if len(got) != len(set(got)):
        raise BadAnswer(f"duplicate results: {len(got)} results, {len(set(got))} distinct")
    if set(got) != expected:
        raise BadAnswer(f"{len(set(got) & expected)} of {len(expected)} expected results, "
                        f"{len(set(got) - expected)} unexpected")


def _expect_uids(tag: str, expected: set[str]) -> Callable[[int, httpx.Headers, bytes], None]:
    def check(status: int, headers: httpx.Headers, body: bytes) -> None:
        _same(_uids(parse_dicom_json_list(status, headers, body), tag), expected)

    return check


# ------------------------------------------------------------------------------------------------
# Driving it


def perform(client: httpx.Client, call: Call, index: int, request_id: str) -> Outcome:
    """Send one call and check its answer; any failure becomes the outcome's ``error``."""
    start = time.monotonic()
    status: int | None = None
    body = b""
    error: str | None = None
    end = start
    try:
        response = client.request(call.method, "/dicom-web" + call.path, content=call.body,
                                  headers={**call.headers, "X-Request-ID": request_id})
        status, body = response.status_code, response.content
        end = time.monotonic()
        call.check(status, response.headers, body)
    except BadAnswer as exc:
        error = f"bad answer: {exc}"
    except httpx.HTTPError as exc:
        end = time.monotonic()
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a check that tripped over a malformed answer: still that request's failure
        error = f"bad answer: {type(exc).__name__}: {exc}"
    return Outcome(index, call.kind, call.shape, call.method, call.path, request_id, start, end, status,
                   len(body), error)


@dataclass
class LoadRun:
    """``clients`` threads, each with its own keep-alive HTTP client, share the request indices
    ``0 .. requests - 1``. Bounded twice: by ``requests`` and by ``time_limit`` seconds, after which
    no new request starts (``stopped_by_time_limit``)."""

    base_url: str
    workload: Workload
    requests: int
    clients: int
    time_limit: float
    id_prefix: str = "load"
    timeout: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    stopped_by_time_limit: bool = False
    started_at: float = 0.0
    ended_at: float = 0.0
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> LoadRun:
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._client, name=f"load-client-{n}", daemon=True)
                         for n in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def completed(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait(self) -> list[Outcome]:
        """Join the client threads (each ends within ``time_limit`` plus one request's ``timeout``)."""
        for thread in self._threads:
            thread.join()
        self.ended_at = time.monotonic()
        with self._lock:
            return sorted(self.outcomes, key=lambda o: o.index)

    def stop(self) -> None:
        """No new request starts (the run is being abandoned)."""
        with self._lock:
            self._next = self.requests

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.requests:
                return None
            if time.monotonic() - self.started_at > self.time_limit:
                self.stopped_by_time_limit = True
                return None
            index = self._next
            self._next += 1
            return index

    def _client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout, trust_env=False) as client:
            while (index := self._take()) is not None:
                call = self.workload.call(index)
                outcome = perform(client, call, index, f"{self.id_prefix}-{index}")
                with self._lock:
                    self.outcomes.append(outcome)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
