"""deploy/nginx/dicomweb-gateway.conf: the TLS reverse proxy, tested with the real nginx.

The file is meant for nginx's http context (conf.d), so the tests wrap it in a minimal main
configuration whose pid, logs and temporary directories live in a temporary prefix (nothing under
/var or /etc is touched), with a throw-away self-signed certificate in place of the placeholder
paths. ``nginx -t`` must accept it without a warning. Then it runs, on loopback ports, in front of
two real gateway replicas on a demo PACS: searches, a retrieve and a STOW-RS upload larger than
nginx's default body limit go through it, both replicas serve, the URLs in the answers are the
proxy's https URL even when the client forges Forwarded / X-Forwarded-* headers, and the
operations endpoints stay inside.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from gateway.demo.data import generate_studies, instance_bytes
from gateway.demo.pacs import DemoPACS
from tests.deploy.support import NGINX_CONF
from tests.support.certs import CertificateAuthority
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import free_port, require_binary

NGINX = "/usr/sbin/nginx"
CERT_PATHS = ("/etc/ssl/dicomweb-gateway/fullchain.pem", "/etc/ssl/dicomweb-gateway/privkey.pem")
RETRIEVE_URL = "00081190"
DEFAULT_BODY_LIMIT = 1024 * 1024  # nginx's own client_max_body_size


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost with its chain, and its key, as PEM files; clients
    trust the chain file (it holds the test CA)."""
    ca = CertificateAuthority("dicomweb-gateway proxy test CA")
    leaf = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), client=False)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(leaf.cert_pem + ca.cert_pem)
    key_path.write_bytes(leaf.key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path


def wrapped(prefix: Path, site: str, run: bool = False) -> Path:
    """A main nginx.conf around ``site`` (the deploy file, edited), everything under ``prefix``."""
    cert, key = self_signed(prefix)
    site = site.replace(CERT_PATHS[0], str(cert)).replace(CERT_PATHS[1], str(key))
    (prefix / "site.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = prefix / "nginx.conf"
    main.write_text(
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        + ("daemon off;\nmaster_process off;\n" if run else "")
        + "events {}\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        f"    include {prefix / 'site.conf'};\n"
        "}\n"
    )
    return main


def nginx_test(conf: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    require_binary(NGINX, "nginx (Debian package nginx)")
    return subprocess.run([NGINX, "-t", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                          capture_output=True, text=True, timeout=60)


def test_nginx_accepts_the_config_without_a_warning(tmp_path: Path) -> None:
    proc = nginx_test(wrapped(tmp_path, NGINX_CONF.read_text()), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[warn]" not in proc.stderr and "[emerg]" not in proc.stderr, proc.stderr
    assert "test is successful" in proc.stderr


def test_nginx_t_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check is real: a misspelt directive fails it."""
    broken = NGINX_CONF.read_text().replace("proxy_buffering off;", "proxy_bufering off;")
    proc = nginx_test(wrapped(tmp_path, broken), tmp_path)
    assert proc.returncode != 0 and "proxy_bufering" in proc.stderr


def test_the_config_streams_and_forwards_as_the_gateway_needs() -> None:
    """Unbuffered streaming could only be seen by timing a response, so it is read off the directives."""
    text = NGINX_CONF.read_text()
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;",
                      'proxy_set_header Connection "";', "proxy_set_header X-Forwarded-Proto $scheme;",
                      'proxy_set_header X-Forwarded-Prefix "";', "add_header Strict-Transport-Security"):
        assert directive in text, f"missing: {directive}"
    assert re.search(r"proxy_set_header Forwarded \"proto=\$scheme;", text), "Forwarded is set, not passed on"
    size = re.search(r"client_max_body_size (\d+)([mg]);", text)
    assert size and int(size.group(1)) * (1024 if size.group(2) == "g" else 1) >= 1024, "large STOW-RS bodies"
    timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert timeout and int(timeout.group(1)) >= 300
    servers = re.findall(r"^\s*server\s+(\S+:\d+)\s", text, re.M)
    assert len(servers) >= 2, "several replicas behind one proxy"


# --------------------------------------------------------------------------------------- live run


def for_loopback(site: str, https: int, http: int, replicas: list[int]) -> str:
    """The deploy file with its listen ports and replica addresses moved to loopback test ports."""
    site = re.sub(r"^\s*listen \[::\]:\d+.*\n", "", site, flags=re.M)
    site = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;", site)
    site = re.sub(r"listen 80;", f"listen 127.0.0.1:{http};", site)
    servers = iter(replicas)
    site = re.sub(r"(^\s*server\s+)\S+:\d+(\s)", lambda m: f"{m.group(1)}127.0.0.1:{next(servers)}{m.group(2)}",
                  site, flags=re.M)
    listens = re.findall(r"^\s*listen\s+(\S+)", site, re.M)
    upstreams = re.findall(r"^\s*server\s+(\S+:\d+)\s", site, re.M)
    assert listens and all(a.startswith("127.0.0.1:") for a in listens), listens
    assert upstreams == [f"127.0.0.1:{p}" for p in replicas], upstreams
    return site


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "nginx exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on {port}")


class Proxy:
    def __init__(self, base: str, cert: Path, http_port: int) -> None:
        self.base = base
        self.cert = cert
        self.http_port = http_port


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, list[GatewayProcess]]]:
    require_binary(NGINX, "nginx (Debian package nginx)")
    prefix = tmp_path_factory.mktemp("nginx")
    with DemoPACS(ae_title="PROXY-PACS") as pacs:
        settings = {"server": {"trusted_proxies": ["127.0.0.1"]},
                    "nodes": [{"name": "demo", "ae_title": "PROXY-PACS", "host": "127.0.0.1", "port": pacs.port}]}
        one, two = GatewayProcess(settings), GatewayProcess(settings)
        with ExitStack() as stack, ThreadPoolExecutor(2) as starter:
            stack.callback(one.stop)
            stack.callback(two.stop)
            list(starter.map(GatewayProcess.start, (one, two)))  # both at once: each takes seconds
            https, http = free_port(), free_port()
            site = for_loopback(NGINX_CONF.read_text(), https, http, [one.port, two.port])
            conf = wrapped(prefix, site, run=True)
            log = open(prefix / "nginx.out", "wb")
            proc = subprocess.Popen([NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                try:
                    wait_for_port(https, proc)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}:\n{(prefix / 'error.log').read_text(errors='replace')[-3000:]}")
                yield Proxy(f"https://127.0.0.1:{https}", prefix / "fullchain.pem", http), [one, two]
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                log.close()


def client(p: Proxy) -> httpx.Client:
    return httpx.Client(base_url=p.base, verify=ssl.create_default_context(cafile=str(p.cert)), timeout=30,
                        trust_env=False)


def studies_requests(replica: GatewayProcess) -> float:
    """How many searches for studies this replica answered, from its own /metrics."""
    text = httpx.get(replica.base + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(
        r'^dicomweb_gateway_http_requests_total\{[^}]*route="/dicom-web/studies"[^}]*\} (\S+)$', text, re.M))


def test_searches_go_to_both_replicas_with_the_proxys_url(proxy: tuple[Proxy, list[GatewayProcess]]) -> None:
    p, replicas = proxy
    forged = {"Forwarded": "host=evil.example;proto=http", "X-Forwarded-Host": "evil.example",
              "X-Forwarded-Proto": "http", "X-Forwarded-Prefix": "/evil"}
    with client(p) as c:
        for _ in range(4):
            r = c.get("/dicom-web/studies", params={"limit": "2"}, headers={"Accept": "application/dicom+json",
                                                                            **forged})
            assert r.status_code == 200, r.text
            assert r.headers["strict-transport-security"].startswith("max-age=")
            url = r.json()[0][RETRIEVE_URL]["Value"][0]
            assert url.startswith(f"{p.base}/dicom-web/studies/"), url
    assert all(studies_requests(r) >= 1 for r in replicas), "the upstream spreads requests over the replicas"


def test_a_retrieve_goes_through(proxy: tuple[Proxy, list[GatewayProcess]]) -> None:
    p, _ = proxy
    instances = generate_studies()
    study = instances[0].StudyInstanceUID
    expected = [ds.SOPInstanceUID for ds in instances if ds.StudyInstanceUID == study]
    with client(p) as c, c.stream("GET", f"/dicom-web/studies/{study}",
                                  headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_bytes())
    assert all(uid.encode() in body for uid in expected)


def test_a_stow_body_over_nginxs_default_limit_goes_through(proxy: tuple[Proxy, list[GatewayProcess]]) -> None:
    p, _ = proxy
    boundary = "deploy-test-boundary"
    parts, size = [], 0
    for ds in generate_studies():
        if size > DEFAULT_BODY_LIMIT * 5 // 4:
            break
        blob = instance_bytes(ds)
        parts.append(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), blob))
        size += len(blob)
    assert size > DEFAULT_BODY_LIMIT * 5 // 4, "enough demo data for a body past nginx's default limit"

    def body() -> Iterator[bytes]:  # chunked: nginx passes it on as it arrives
        yield from parts
        yield b"--%s--\r\n" % boundary.encode()

    with client(p) as c:
        r = c.post("/dicom-web/studies", content=body(), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    stored = r.json()["00081199"]["Value"]  # ReferencedSOPSequence: one item per stored instance
    assert len(stored) == len(parts)
    assert all(item[RETRIEVE_URL]["Value"][0].startswith(p.base + "/dicom-web/studies/") for item in stored)


def test_operations_endpoints_stay_inside_and_http_redirects(proxy: tuple[Proxy, list[GatewayProcess]]) -> None:
    p, replicas = proxy
    with client(p) as c:
        assert c.get("/metrics").status_code == 403
        assert c.get("/status").status_code == 403
        assert c.get("/ready").status_code == 200
    assert httpx.get(replicas[0].base + "/metrics", timeout=10).status_code == 200, "scraped on each replica"
    r = httpx.get(f"http://127.0.0.1:{p.http_port}/dicom-web/studies", timeout=10, trust_env=False)
    assert r.status_code == 301 and r.headers["location"].startswith("https://")
