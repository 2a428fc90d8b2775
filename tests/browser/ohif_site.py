"""Serve the OHIF viewer's prebuilt bundle (npm package @ohif/app) on 127.0.0.1.

The viewer is a single-page app built with ``PUBLIC_URL="/"``: it must be served from the root of
its origin, every path that is not a file (``/viewer``, ``/localbasic`` ...) gets ``index.html``,
and ``/app-config.js`` is the one file a deployment replaces. This server answers that file from
memory (rendered from ``app-config.template.js`` next to this module), so the installed package is
never modified.

``proxies`` maps a path prefix to an upstream base URL and forwards those requests (method, body,
Accept and Content-Type headers) unchanged: with ``{"/upstream": orthanc.base_url}`` the viewer can
use Orthanc's own DICOMweb plugin from its own origin, which needs no CORS. The gateway tests do not
use it (the viewer talks to the gateway cross-origin, as in a real deployment); it is there to
compare the gateway with Orthanc by hand (``python -m tests.browser.ohif_site --help``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import mimetypes
import threading
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules"
OHIF_DIST = NODE_MODULES / "@ohif" / "app" / "dist"
PLAYWRIGHT_CORE = NODE_MODULES / "playwright-core"
APP_CONFIG_TEMPLATE = HERE / "app-config.template.js"

_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


def render_app_config(dicomweb_root: str, wado_uri_root: str, friendly_name: str = "DICOMweb gateway") -> str:
    """The viewer's ``app-config.js``: one DICOMweb data source at ``dicomweb_root``."""
    template = APP_CONFIG_TEMPLATE.read_text()
    values = {
        "__FRIENDLY_NAME__": friendly_name,
        "__DICOMWEB_ROOT__": dicomweb_root.rstrip("/"),
        "__WADO_URI_ROOT__": wado_uri_root.rstrip("/"),
    }
    for key, value in values.items():
        template = template.replace(f'"{key}"', json.dumps(value))
    return template


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Quiet: the driver records what the browser asked for."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        for prefix, upstream in self.server.proxies.items():
            if path == prefix or path.startswith(prefix + "/"):
                self._proxy(upstream, self.path[len(prefix):] or "/")
                return
        if self.command not in ("GET", "HEAD"):
            self._send(405, b"method not allowed\n", "text/plain", head)
            return
        if path == "/app-config.js":
            self._send(200, self.server.app_config.encode(), "text/javascript", head, cache=False)
            return
        target = (self.server.root / urllib.parse.unquote(path).lstrip("/")).resolve()
        if not target.is_relative_to(self.server.root):
            self._send(404, b"not found\n", "text/plain", head)
            return
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            if Path(path).suffix:  # a missing asset stays a 404, a route of the app gets the app
                self._send(404, b"not found\n", "text/plain", head)
                return
            target = self.server.root / "index.html"
        ctype = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), ctype, head, cache=target.name != "index.html")

    def _send(self, status: int, body: bytes, ctype: str, head: bool, cache: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache and status == 200 else "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _proxy(self, upstream: str, rest: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request(self.command, parts.path.rstrip("/") + rest, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self._send(502, f"upstream error: {exc}\n".encode(), "text/plain", False)
            return
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    app_config: str
    proxies: dict[str, str]


class StaticSite:
    """The viewer's files on ``http://127.0.0.1:<port>``, served by a thread of this process."""

    def __init__(self, app_config: str, root: Path = OHIF_DIST, proxies: Mapping[str, str] | None = None,
                 port: int = 0) -> None:
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.root = root.resolve()
        self._server.app_config = app_config
        self._server.proxies = dict(proxies or {})
        self.port = int(self._server.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-static", daemon=True)

    @property
    def app_config(self) -> str:
        return self._server.app_config

    @app_config.setter
    def app_config(self, text: str) -> None:
        self._server.app_config = text

    def start(self) -> "StaticSite":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> "StaticSite":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main() -> None:
    """Serve the viewer in front of a DICOMweb server, to look at it by hand."""
    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("dicomweb", help="DICOMweb root, e.g. http://127.0.0.1:8080/dicom-web")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--proxy", action="store_true",
                        help="reach the DICOMweb server through this server's /upstream path (no CORS needed)")
    args = parser.parse_args()
    root = args.dicomweb.rstrip("/")
    proxies: dict[str, str] = {}
    if args.proxy:
        parts = urllib.parse.urlsplit(root)
        proxies["/upstream"] = f"{parts.scheme}://{parts.netloc}"
        root = f"http://127.0.0.1:{args.port}/upstream{parts.path}"
    wado_uri = root.rsplit("/", 1)[0] + "/wado"
    with StaticSite(render_app_config(root, wado_uri), proxies=proxies, port=args.port) as site:
        print(f"OHIF viewer on {site.origin}/ (DICOMweb root {root}); Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _main()
