"""``dicomweb-gateway``: serve | demo | echo | check-config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .config import ConfigError, Settings, load_settings

log = logging.getLogger("gateway")


def _load(path: str | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"dicomweb-gateway: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    import uvicorn

    from .app import create_app
    from .logs import configure_logging

    configure_logging(settings.server.log_level, settings.server.log_json)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()


def demo(args: argparse.Namespace) -> None:
    from .demo.pacs import DemoPACS

    pacs = DemoPACS(ae_title="DEMO-PACS", host="127.0.0.1", port=args.pacs_port)
    pacs.start()
    settings = load_settings(
        data={
            "server": {"host": args.host, "port": args.port},
            "gateway": {"ae_title": "DICOMWEB-GW"},
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


if __name__ == "__main__":
    main()
