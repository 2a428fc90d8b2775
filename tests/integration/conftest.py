"""Real PACSes and a real gateway process for the integration tests.

Every PACS holds the same synthetic studies (gateway.demo.data). The gateway under test runs as its
own process with one node per PACS:

- ``demo``: the demo PACS, relational queries negotiated; ``demo-move``, ``orthanc-move`` and
  ``dcmqrscp-move`` are the same PACSes retrieved with C-MOVE instead of C-GET;
- ``demo-hier``: a second demo PACS that refuses relational queries (hierarchical fan-out);
- ``orthanc``: Orthanc, relational not negotiated (Orthanc never acknowledges it), so fan-out;
- ``orthanc-rel``: the same Orthanc with ``relational = "assume"``;
- ``dcmqrscp``: DCMTK's dcmqrscp (hierarchical only, ignores keys it cannot match);
- ``chaos``: a demo PACS whose switches failure tests flip, with short timeouts;
- ``victim``: a fixed port where tests start a demo PACS and stop it mid-query;
- ``down``: nothing listens there.
"""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.data import generate_studies
from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import (
    DCMQRSCP_BINARY,
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    DcmqrscpServer,
    OrthancServer,
    free_port,
    require_binary,
)

GATEWAY_AE = "DICOMWEB-GW"


def port_outside_ephemeral_range() -> int:
    """A free port below Linux's ephemeral range (32768-60999), for a server the tests start and
    stop again and again: a port from ``free_port()`` can meanwhile become the local port of some
    outgoing connection, and the next bind then fails."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
QUERY_NODES = ("demo", "demo-hier", "orthanc", "orthanc-rel", "dcmqrscp")


LARGE_SLICES = 2400  # 512x512x16 bits: about 1.26 GB, five times the memory bounds of the tests that use it


@pytest.fixture(scope="session")
def large_ct() -> Iterator[tuple[DemoPACS, list[str], str, str, int]]:
    """A demo PACS holding one CT series of ``LARGE_SLICES`` slices, for the memory tests:
    (PACS, SOP Instance UIDs, study UID, series UID, largest instance in bytes)."""
    from gateway.demo.data import generate_large_ct_series

    series = list(generate_large_ct_series(LARGE_SLICES))
    uids = [str(d.SOPInstanceUID) for d in series]
    study_uid, series_uid = str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)
    largest = max(len(d.PixelData) for d in series) + 4096
    with DemoPACS(ae_title="LARGE-PACS", datasets=series) as pacs:
        del series
        yield pacs, uids, study_uid, series_uid, largest


@pytest.fixture(scope="session")
def studies() -> list[Dataset]:
    return generate_studies()


@pytest.fixture(scope="session")
def move_port() -> int:
    """The gateway's C-MOVE receiver port, known to every PACS as the gateway's address."""
    return free_port()


@pytest.fixture(scope="session")
def demo_pacs(studies: list[Dataset], move_port: int) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="DEMO-PACS", datasets=studies,
                  move_destinations={GATEWAY_AE: ("127.0.0.1", move_port)}) as pacs:
        yield pacs


@pytest.fixture(scope="session")
def demo_hier(studies: list[Dataset]) -> Iterator[DemoPACS]:
    pacs = DemoPACS(ae_title="DEMO-HIER", datasets=studies)
    pacs.relational = False
    with pacs:
        yield pacs


@pytest.fixture(scope="session")
def chaos_pacs(studies: list[Dataset], move_port: int) -> Iterator[DemoPACS]:
    with DemoPACS(ae_title="CHAOS-PACS", datasets=studies,
                  move_destinations={GATEWAY_AE: ("127.0.0.1", move_port)}) as pacs:
        yield pacs


@pytest.fixture
def chaos(chaos_pacs: DemoPACS) -> Iterator[DemoPACS]:
    """The chaos PACS, reset to good behaviour before and after each test."""

    def reset() -> None:
        chaos_pacs.reject = None
        chaos_pacs.response_delay = 0.0
        chaos_pacs.unsupported_keys = set()
        chaos_pacs.silently_ignored_keys = set()
        chaos_pacs.relational = True
        chaos_pacs.refuse_storage_classes(set())
        chaos_pacs.restrict_storage_syntaxes(None)
        chaos_pacs.omit_move_originator = False
        chaos_pacs.reset_counters()

    reset()
    yield chaos_pacs
    reset()


@pytest.fixture(scope="session")
def orthanc(studies: list[Dataset], move_port: int) -> Iterator[OrthancServer]:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    require_binary(ORTHANC_DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    server = OrthancServer(aet="ORTHANC", modalities={"gateway": (GATEWAY_AE, "127.0.0.1", move_port)},
                           stop_timeout=0)
    with server:
        server.load(studies)
        yield server


@pytest.fixture(scope="session")
def dcmqrscp(studies: list[Dataset], move_port: int) -> Iterator[DcmqrscpServer]:
    require_binary(DCMQRSCP_BINARY, "DCMTK's dcmqrscp (Debian package dcmtk)")
    server = DcmqrscpServer(aet="DCMQRSCP", peers={"gateway": (GATEWAY_AE, "localhost", move_port)})
    with server:
        server.load(studies)
        yield server


@pytest.fixture(scope="session")
def gateway(
    demo_pacs: DemoPACS, demo_hier: DemoPACS, chaos_pacs: DemoPACS, orthanc: OrthancServer, dcmqrscp: DcmqrscpServer,
    move_port: int,
) -> Iterator[GatewayProcess]:
    def node(name: str, ae: str, port: int, **extra: object) -> dict[str, object]:
        return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port, **extra}

    victim_port = port_outside_ephemeral_range()
    settings = {
        "gateway": {"ae_title": GATEWAY_AE, "move_port": move_port},
        "qido": {"max_results": 100},
        "nodes": [
            node("demo", "DEMO-PACS", demo_pacs.port, default=True),
            node("demo-hier", "DEMO-HIER", demo_hier.port),
            node("demo-move", "DEMO-PACS", demo_pacs.port, retrieve="move"),
            node("orthanc-move", "ORTHANC", orthanc.dicom_port, max_pdu=131072, retrieve="move"),
            node("dcmqrscp-move", "DCMQRSCP", dcmqrscp.port, max_pdu=131072, retrieve="move"),
            node("orthanc", "ORTHANC", orthanc.dicom_port, max_pdu=131072),
            node("orthanc-rel", "ORTHANC", orthanc.dicom_port, max_pdu=131072, relational="assume"),
            node("dcmqrscp", "DCMQRSCP", dcmqrscp.port, max_pdu=131072),
            node("chaos", "CHAOS-PACS", chaos_pacs.port, max_associations=2, acquire_timeout=1.0, retries=1,
                 idle_timeout=1.0, timeouts={"connect": 2.0, "acse": 2.0, "dimse": 2.0}),
            node("chaos-gtm", "CHAOS-PACS", chaos_pacs.port, retrieve="get-then-move", max_associations=2),
            node("chaos-move", "CHAOS-PACS", chaos_pacs.port, retrieve="move", max_associations=2),
            node("victim", "VICTIM", victim_port, retries=1, timeouts={"connect": 2.0, "dimse": 5.0}),
            node("down", "NOBODY", free_port(), retries=1, timeouts={"connect": 2.0}),
        ],
    }
    with GatewayProcess(settings) as gw:
        gw.victim_port = victim_port
        yield gw


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On a failure, attach the tail of the gateway's log to the report: the gateway runs in its own
    process, and its side of the story is otherwise lost."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        gw = item.funcargs.get("gateway") if hasattr(item, "funcargs") else None
        if isinstance(gw, GatewayProcess):
            report.sections.append(("gateway log (tail)", gw.log_text()[-6000:]))
