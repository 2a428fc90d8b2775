"""``dicomweb-gateway``: serve | demo | echo | check-config | hash-key."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence, TextIO

from .config import ConfigError, Settings, load_settings

log = logging.getLogger("gateway")


def _load(path: str | None) -> Settings:
    from .tls import check_files

    try:
        settings = load_settings(path)
        check_files(settings)  # every certificate, key and CA file loads, or start-up stops here
        return settings
    except ConfigError as exc:
        print(f"dicomweb-gateway: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    import uvicorn

    from .admission import GracefulServer, server_options
    from .app import create_app
    from .logs import configure_logging
    from .memory import tune_allocator
    from .tls import https_options

    configure_logging(settings.server.log_level, settings.server.log_json)
    tune_allocator()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        **server_options(settings),  # request-head limits, keep-alive, the wait after the drain
        **https_options(settings.server),  # HTTPS with the gateway's own context and certificate reload
    )
    GracefulServer(config, app).run()  # SIGTERM: drain for limits.shutdown_grace, then exit


def demo(args: argparse.Namespace) -> None:
    from .demo.pacs import DemoPACS

    pacs = DemoPACS(ae_title="DEMO-PACS", host="127.0.0.1", port=args.pacs_port)
    pacs.start()
    settings = load_settings(
        data={
            "server": {"host": args.host, "port": args.port},
            "gateway": {"ae_title": "DICOMWEB-GW"},
            "auth": {"enabled": False},  # synthetic data on loopback: auth off, and said so explicitly
            "nodes": [{"name": "demo", "ae_title": "DEMO-PACS", "host": "127.0.0.1", "port": pacs.port, "default": True}],
        }
    )
    base = f"http://{args.host}:{args.port}"
    print(
        f"Demo PACS (DICOM) on 127.0.0.1:{pacs.port}, AE title DEMO-PACS\n"
        f"Gateway on {base}. Try:\n"
        f"  curl '{base}/dicom-web/studies'\n"
        f"  curl '{base}/dicom-web/studies?PatientName=M*&includefield=StudyDescription'\n"
        f"  curl '{base}/dicom-web/series?Modality=CT'\n"
        f"  curl '{base}/nodes/demo/dicom-web/studies?StudyDate=20180101-20221231&limit=2'\n",
        flush=True,
    )
    try:
        serve(settings)
    finally:
        pacs.stop()


def echo(settings: Settings, node_name: str, as_json: bool) -> int:
    from .dimse.errors import DimseError
    from .dimse.probe import probe

    node = settings.node(node_name)
    if node is None:
        print(f"dicomweb-gateway: no node named {node_name!r} (known: {', '.join(n.name for n in settings.nodes)})",
              file=sys.stderr)
        return 2
    try:
        report = probe(node, settings.gateway.ae_title)
    except DimseError as exc:
        print(f"C-ECHO to {node.name} failed: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:28} {value}")
    return 0 if report["echo_status"] == "0x0000" else 1


def hash_key(stdin: TextIO) -> int:
    """Print the ``sha256:<hex>`` form of the API key on the first line of ``stdin``, for
    ``[[auth.api_keys]] hash``; the key itself never goes into the configuration."""
    from .auth import MIN_API_KEY_LENGTH, hash_api_key

    key = stdin.readline().strip()
    if len(key) < MIN_API_KEY_LENGTH:
        print(f"dicomweb-gateway: an API key needs at least {MIN_API_KEY_LENGTH} characters of random text "
              "(its hash is a fast SHA-256, safe only for keys nobody can guess); make one with\n"
              "  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'", file=sys.stderr)
        return 2
    print(hash_api_key(key))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dicomweb-gateway", description="A DICOMweb face on any DIMSE PACS.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gateway")
    p_serve.add_argument("--config", "-c", help="TOML settings file (environment variables override it)")
    p_demo = sub.add_parser("demo", help="run the gateway in front of the embedded demo PACS")
    p_demo.add_argument("--host", default="127.0.0.1")
    p_demo.add_argument("--port", type=int, default=8080)
    p_demo.add_argument("--pacs-port", type=int, default=11112)
    p_echo = sub.add_parser("echo", help="C-ECHO a node and show what it accepts")
    p_echo.add_argument("node")
    p_echo.add_argument("--config", "-c")
    p_echo.add_argument("--json", action="store_true")
    p_check = sub.add_parser("check-config", help="validate a settings file and print the result")
    p_check.add_argument("--config", "-c")
    sub.add_parser("hash-key", help="print the hash of an API key read from standard input, for [[auth.api_keys]]")
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(_load(args.config))
    elif args.command == "demo":
        demo(args)
    elif args.command == "echo":
        raise SystemExit(echo(_load(args.config), args.node, args.json))
    elif args.command == "check-config":
        settings = _load(args.config)
        print(f"configuration OK: {len(settings.nodes)} node(s), default {settings.default_node.name!r}")
    elif args.command == "hash-key":
        raise SystemExit(hash_key(sys.stdin))


if __name__ == "__main__":
    main()
