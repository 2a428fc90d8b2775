"""Fixtures and helpers shared by the STOW-RS integration tests.

STOW changes what a PACS holds, so these tests never store into the session's PACSes that the
search and retrieve tests count on: they get their own empty Orthanc, dcmqrscp and demo PACSes,
and their own gateway process in front of them, with nodes:

- ``demo`` (default): an empty demo PACS that accepts every storage syntax it knows;
- ``picky``: a demo PACS whose storage contexts tests narrow (syntaxes, refused classes);
- ``orthanc``: an empty Orthanc; ``dcmqrscp``: an empty dcmqrscp;
- ``down``: nothing listens there.

Import the fixtures into a test module with ``from tests.integration.stow_support import *``.
"""

from __future__ import annotations

import io
from copy import deepcopy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import (
    DCMQRSCP_BINARY,
    ORTHANC_BINARY,
    DcmqrscpServer,
    OrthancServer,
    free_port,
    require_binary,
)

GATEWAY_AE = "DICOMWEB-GW"
BOUNDARY = "stow-test-boundary-7d2f"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

__all__ = [
    "BOUNDARY", "MULTIPART", "StowTargets", "stow_targets", "picky", "p10_bytes", "multipart_body",
    "fresh_copy", "pydicom_file",
]


@dataclass
class StowTargets:
    gateway: GatewayProcess
    demo: DemoPACS
    picky: DemoPACS
    orthanc: OrthancServer
    dcmqrscp: DcmqrscpServer


@pytest.fixture(scope="session")
def stow_targets() -> Iterator[StowTargets]:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(DCMQRSCP_BINARY, "DCMTK's dcmqrscp (Debian package dcmtk)")
    move_port = free_port()
    with DemoPACS(ae_title="STOW-DEMO", datasets=[]) as demo, \
            DemoPACS(ae_title="STOW-PICKY", datasets=[]) as picky_pacs, \
            OrthancServer(aet="STOW-ORTHANC", modalities={"gateway": (GATEWAY_AE, "127.0.0.1", move_port)},
                          stop_timeout=0) as orthanc, \
            DcmqrscpServer(aet="STOW-DCMQR", peers={"gateway": (GATEWAY_AE, "localhost", move_port)}) as dcmqrscp:

        def node(name: str, ae: str, port: int, **extra: object) -> dict[str, object]:
            return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port, **extra}

        settings = {
            "gateway": {"ae_title": GATEWAY_AE, "move_port": move_port},
            "nodes": [
                node("demo", "STOW-DEMO", demo.port, default=True),
                node("picky", "STOW-PICKY", picky_pacs.port, idle_timeout=1.0),
                node("orthanc", "STOW-ORTHANC", orthanc.dicom_port, max_pdu=131072),
                node("dcmqrscp", "STOW-DCMQR", dcmqrscp.port, max_pdu=131072),
                node("down", "NOBODY", free_port(), retries=1, timeouts={"connect": 2.0}),
            ],
        }
        with GatewayProcess(settings) as gw:
            yield StowTargets(gw, demo, picky_pacs, orthanc, dcmqrscp)


@pytest.fixture
def picky(stow_targets: StowTargets) -> Iterator[DemoPACS]:
    """The picky demo PACS, reset before and after each test."""

    def reset() -> None:
        stow_targets.picky.refuse_storage_classes(set())
        stow_targets.picky.restrict_storage_syntaxes(None)
        stow_targets.picky.reset_counters()

    reset()
    yield stow_targets.picky
    reset()


def pydicom_file(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    return dcmread(path)


def fresh_copy(ds: Dataset, *, study: str | None = None, series: str | None = None) -> Dataset:
    """A copy with new SOP Instance UID (and study/series UIDs when given). Deep: a shallow copy
    shares its elements with ``ds``, so the new UIDs would change ``ds`` (a session's data set) too."""
    copy = deepcopy(ds)
    copy.SOPInstanceUID = generate_uid()
    if getattr(copy, "file_meta", None) is not None:
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    if study is not None:
        copy.StudyInstanceUID = study
    if series is not None:
        copy.SeriesInstanceUID = series
    return copy


def p10_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart_body(parts: Iterable[bytes], boundary: str = BOUNDARY, content_type: str = "application/dicom") -> bytes:
    out = bytearray()
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)
