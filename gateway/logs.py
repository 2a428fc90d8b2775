"""Application logging: plain or JSON lines, with the request ID on every record.

The request ID lives in a context variable (gateway/middleware.py), stamped on each record by a
filter when it is written. It reaches every thread that works for a request: anyio's worker threads
(``to_thread.run_sync`` copies the context, and the DIMSE work of gateway/dimse runs there), tasks
started in a node pool's task group (asyncio copies the context of the task that starts them), and
the C-MOVE receiver's threads (each move carries the context of the request that registered it).

With ``log_json`` every line is one JSON object, Python warnings and exceptions that end a thread
included, so a log shipper never meets a line it cannot parse.

By default nothing here carries patient data: the access log names routes, not paths with UIDs or
query strings, and pynetdicom is told not to log identifiers (gateway/dimse/net.py).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from .middleware import DropStreamAborted, request_id_var


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.addFilter(DropStreamAborted())
    # uvicorn's own access log prints query strings; ours (gateway.access) does not.
    logging.getLogger("uvicorn.access").disabled = True
    logging.captureWarnings(True)  # warnings.warn(...) as log records, not bare lines on stderr
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread, as one log record instead of a traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gateway.error").error(
        "unexpected error in thread %s", name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback))
