"""Scale-out on one machine: two gateway processes behind nginx, both in front of one Orthanc, and
one of them killed (SIGKILL) while a mixed QIDO-RS / WADO-RS load runs through nginx.

nginx (the Debian package) runs as a foreground process of the test, with its configuration, logs
and pid file in a temporary directory, listening on a free loopback port. Its upstream holds both
gateways, with ``proxy_next_upstream error timeout`` and ``proxy_buffering off``:

- ``error``: connecting to the gateway failed (refused, reset), or sending the request or reading
  the response header failed (the connection closed before a header came); ``timeout``: the same
  steps took longer than their timeouts. In these cases nginx passes the request on to the other
  gateway, which it does only for idempotent methods (GET here; never a STOW POST) and only while
  nothing has gone to the client yet.
- Once a response's header has been sent to the client, nothing can move it: a gateway that dies
  then cuts the response off (with the chunked framing, nginx closes the client connection without
  the last chunk), and the client sees it fail.
- With ``proxy_buffering off`` nginx passes each piece on as it arrives, so what reaches the client
  is what the gateway sent, when it sent it.

So the only requests allowed to fail are those whose response the killed gateway was sending when
it died. The test proves each failure is one of them from three records kept outside the gateways:
the client's clock (the request started before the kill and ended after it); nginx's access log,
which names per request ID the upstream that answered (``$upstream_addr``, the last one tried when
there were several) and the client connection; and nginx's error log, which for that connection and
request says the killed gateway's response ended early "while reading upstream", that is after its
header. (Requests the killed gateway had not answered yet show up there "while reading response
header" instead, and were passed on to the other gateway.) One such request is made on purpose: a slow client reads the first bytes of a 34 MB
series and stops, and the gateway serving it (named in nginx's ``X-Upstream`` header) is the one
killed; the series is far larger than the socket buffers between the gateway and the client, so the
gateway is still sending it when it dies. Every failed request is then sent again, and must succeed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from gateway.demo.data import generate_large_ct_series, generate_studies
from tests.bench.common import log_problems
from tests.soak.workload import (
    MULTIPART_DICOM,
    READ_ONLY_MIX,
    BadAnswer,
    Catalog,
    LoadRun,
    Outcome,
    Workload,
    check_instances,
    perform,
    pixel_digest,
)
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import (
    ORTHANC_BINARY,
    OrthancServer,
    _ManagedServer,
    free_port,
    require_binary,
)

NGINX_BINARY = shutil.which("nginx") or "/usr/sbin/nginx"
GATEWAY_AE = "DICOMWEB-GW"
ORTHANC_AE = "SCALE-ORTHANC"
BIG_SERIES_SLICES = 64  # 512 x 512 x 16 bit: 34 MB, several times what the sockets on the way can buffer
LOAD_REQUESTS = 450
LOAD_CLIENTS = 6
KILL_AFTER = 150  # completed load requests before the kill
AFTER_KILL_MIN = 100  # requests that must start after the kill, all served by the surviving gateway
LOG_FIELDS = ("request_id", "connection", "status", "upstream", "upstream_status", "bytes")
# nginx's error log line for a response cut off after its header went out ("while reading upstream";
# a failure before the header is logged "while reading response header from upstream" and retried)
CUT_OFF_RE = re.compile(r'\*(\d+) (?P<what>[^,]*) while reading upstream, .*? request: "GET (?P<uri>\S+) HTTP/1\.1", '
                        r'upstream: "http://(?P<upstream>[^/"]+)/')

pytestmark = pytest.mark.orthanc


class NginxServer(_ManagedServer):
    """nginx in the foreground (``daemon off``), everything it writes in its temporary directory, a
    reverse proxy on ``127.0.0.1:port`` to ``upstreams`` (``host:port`` each)."""

    _name = "nginx"

    def __init__(self, upstreams: list[str]) -> None:
        super().__init__(start_timeout=20.0, stop_timeout=5.0)
        self.upstreams = upstreams
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "access.log"

    def config(self) -> str:
        d = self.tmpdir
        servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=30s;" for u in self.upstreams)
        return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format scale '$http_x_request_id|$connection|$status|$upstream_addr|$upstream_status|$body_bytes_sent';
    access_log {d}/access.log scale;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream gateways {{
{servers}
        keepalive 16;
        keepalive_timeout 4s;  # below the gateway's own (5 s), so the gateway never closes one under a request
    }}
    server {{
        listen 127.0.0.1:{self.port};
        keepalive_requests 100000;
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""

    def _prepare(self) -> list[str]:
        assert self.tmpdir is not None
        # as root, nginx's workers run as an unprivileged user, which must reach the directory
        os.chmod(self.tmpdir, 0o755)
        self.port = free_port()
        conf = self.tmpdir / "nginx.conf"
        conf.write_text(self.config())
        return [NGINX_BINARY, "-p", str(self.tmpdir), "-c", str(conf), "-e", str(self.tmpdir / "error.log"),
                "-g", "daemon off;"]

    def _ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
        except OSError:
            return False
        return httpx.get(self.base + "/health", timeout=2.0, trust_env=False).status_code == 200

    def log_entries(self) -> dict[str, dict[str, str]]:
        entries = {}
        for line in self.access_log.read_text(errors="replace").splitlines():
            values = line.split("|")
            if len(values) == len(LOG_FIELDS):
                entry = dict(zip(LOG_FIELDS, values))
                entries[entry["request_id"]] = entry
        return entries

    def error_log(self) -> str:
        assert self.tmpdir is not None
        path = self.tmpdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cut_off(self) -> dict[tuple[str, str], str]:
        """Responses nginx saw end early, after their header: (connection, URI) -> the upstream."""
        return {(m.group(1), m.group("uri")): m.group("upstream") for m in CUT_OFF_RE.finditer(self.error_log())}


@dataclass
class Cluster:
    orthanc: OrthancServer
    gateways: list[GatewayProcess]
    nginx: NginxServer
    catalog: Catalog
    big_series: tuple[str, str, dict[str, str | None]]  # study, series, SOP Instance UID -> pixel digest


def upstream_of(gateway: GatewayProcess) -> str:
    return f"127.0.0.1:{gateway.port}"


def last_upstream(entry: dict[str, str]) -> str:
    """The gateway that answered: nginx lists every upstream it tried, the last one answered."""
    return entry["upstream"].split(",")[-1].strip()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_binary(NGINX_BINARY, "nginx (Debian package nginx)")
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    studies = generate_studies()
    big: list[Dataset] = list(generate_large_ct_series(BIG_SERIES_SLICES))
    big_series = (str(big[0].StudyInstanceUID), str(big[0].SeriesInstanceUID),
                  {str(ds.SOPInstanceUID): pixel_digest(ds) for ds in big})
    settings = {
        "gateway": {"ae_title": GATEWAY_AE, "move_port": 0},
        "nodes": [{
            "name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": 0, "default": True,
            "max_pdu": 131072, "relational": "assume",
            "max_associations": 2,  # two gateways share Orthanc's 4 association threads
            "acquire_timeout": 30.0,
        }],
    }
    with OrthancServer(aet=ORTHANC_AE, modalities={"gateway": (GATEWAY_AE, "127.0.0.1", 1)},
                       stop_timeout=0) as orthanc:
        orthanc.load(studies)
        orthanc.load(big)
        del big
        settings["nodes"][0]["port"] = orthanc.dicom_port
        gateways = [GatewayProcess(settings), GatewayProcess(settings)]
        try:
            for gateway in gateways:
                gateway.start()
            with NginxServer([upstream_of(g) for g in gateways]) as nginx:
                yield Cluster(orthanc, gateways, nginx, Catalog.from_datasets(studies), big_series)
        finally:
            for gateway in gateways:
                gateway.stop()
                shutil.rmtree(gateway.dir, ignore_errors=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(0.05)


def test_a_truncated_retrieve_is_told_from_a_whole_one(cluster: Cluster) -> None:
    """The load's retrieve check refuses a multipart body without its closing boundary (which is
    what a client gets from a retrieve cut off midway), so the kill test can trust it."""
    study, series, expected = cluster.big_series
    with httpx.Client(base_url=cluster.nginx.base, timeout=60, trust_env=False) as client:
        whole = client.get(f"/dicom-web/studies/{study}/series/{series}", headers={"Accept": MULTIPART_DICOM})
    check_instances(whole.status_code, whole.headers, whole.content, expected)
    cut = whole.content[: len(whole.content) // 2]
    with pytest.raises(BadAnswer, match="closing boundary"):
        check_instances(whole.status_code, whole.headers, cut, expected)
    missing_last = whole.content[: whole.content.rindex(b"\r\n--")]
    with pytest.raises(BadAnswer):
        check_instances(whole.status_code, whole.headers, missing_last, expected)


def test_killing_one_gateway_fails_only_the_requests_it_was_answering(cluster: Cluster) -> None:
    nginx = cluster.nginx
    workload = Workload(cluster.catalog, READ_ONLY_MIX, seed=7)
    study, series, big_expected = cluster.big_series
    big_path = f"/studies/{study}/series/{series}"

    load = LoadRun(nginx.base, workload, requests=LOAD_REQUESTS, clients=LOAD_CLIENTS, time_limit=300.0,
                   id_prefix="scale").start()
    slow_error: str | None = None
    with httpx.Client(base_url=nginx.base, timeout=60, trust_env=False) as slow_client:
        wait_for(lambda: load.completed >= KILL_AFTER or not load.running, 90, f"{KILL_AFTER} requests")
        slow_start = time.monotonic()
        with slow_client.stream("GET", "/dicom-web" + big_path,
                                headers={"Accept": MULTIPART_DICOM, "X-Request-ID": "slow-reader"}) as response:
            assert response.status_code == 200, response.read()[:300]
            victim_address = response.headers["X-Upstream"].split(",")[-1].strip()
            [victim] = [g for g in cluster.gateways if upstream_of(g) == victim_address]
            [survivor] = [g for g in cluster.gateways if g is not victim]
            chunks = response.iter_raw()
            parts = [next(chunks)]  # the gateway is sending: the response is committed
            assert victim.proc is not None
            killed_at = time.monotonic()
            victim.proc.kill()
            victim.proc.wait(10)
            try:
                parts.extend(chunks)
                check_instances(response.status_code, response.headers, b"".join(parts), big_expected)
            except (httpx.HTTPError, BadAnswer) as exc:
                slow_error = f"{type(exc).__name__}: {exc}"
        slow_end = time.monotonic()
    received = sum(len(p) for p in parts)
    outcomes = load.wait()
    assert not load.stopped_by_time_limit and len(outcomes) == LOAD_REQUESTS

    # the slow reader's request was cut by the kill: the known positive of the classification below
    assert slow_error is not None, f"the slow reader got the whole 34 MB series ({received} bytes) despite the kill"
    slow = Outcome(-1, "wado", "big-series", "GET", big_path, "slow-reader", slow_start, slow_end, 200, received,
                   slow_error)

    request_ids = {o.request_id for o in outcomes} | {slow.request_id}
    wait_for(lambda: request_ids <= set(nginx.log_entries()), 10, "nginx to log every request")
    log = nginx.log_entries()
    cut_off = nginx.cut_off()

    # every failure was a response the killed gateway was sending when it died
    failures = [o for o in [*outcomes, slow] if not o.ok]
    for failure in failures:
        entry = log[failure.request_id]
        assert last_upstream(entry) == victim_address, (failure, entry)
        assert failure.start < killed_at <= failure.end, (failure, killed_at)
        # nginx's error log, for that connection and request, says it was cut off by that gateway mid-body
        assert cut_off.get((entry["connection"], "/dicom-web" + failure.path)) == victim_address, (
            failure, entry, nginx.error_log()[-3000:])
    assert any(o.request_id == "slow-reader" for o in failures)

    # and, sent again, each one succeeds (through nginx, so on the surviving gateway)
    with httpx.Client(base_url=nginx.base, timeout=60, trust_env=False) as client:
        for failure in failures:
            if failure.index >= 0:
                retry = perform(client, workload.call(failure.index), failure.index, f"retry-{failure.index}")
                assert retry.ok, retry
            else:
                again = client.get("/dicom-web" + big_path, headers={"Accept": MULTIPART_DICOM})
                check_instances(again.status_code, again.headers, again.content, big_expected)

    # both gateways served before the kill; after it, everything went to the survivor, and all of it worked
    before = [o for o in outcomes if o.end < killed_at]
    served_before = {last_upstream(log[o.request_id]) for o in before if o.ok}
    assert served_before == {victim_address, upstream_of(survivor)}, served_before
    after = [o for o in outcomes if o.start > killed_at]
    assert len(after) >= AFTER_KILL_MIN, f"only {len(after)} requests started after the kill"
    assert all(o.ok for o in after), [o for o in after if not o.ok][:3]
    assert {last_upstream(log[o.request_id]) for o in after} == {upstream_of(survivor)}
    assert survivor.proc is not None and survivor.proc.poll() is None
    assert log_problems(survivor.log_text(), ("ERROR", "CRITICAL", "Traceback")) == []
