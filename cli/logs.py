"""How the program logs: `text` for a terminal, or `json` (one event per line: time, level,
logger, event, request id and authenticated caller) for a log pipeline. JSON events carry an
exception's type and stack but never its message, which may quote what a caller sent."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import traceback

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Imported here: the gRPC edge is loaded only by the commands that serve.
        from residency.server.api.metrics import REQUEST_ID
        from residency.server.api.tls import CALLER

        event: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if request_id := REQUEST_ID.get():
            event["request_id"] = request_id
        if (caller := CALLER.get()) is not None:
            event["identity"] = caller.uri
        if record.exc_info and record.exc_info[0] is not None:
            event["error"] = record.exc_info[0].__name__
            event["stack"] = "".join(traceback.format_tb(record.exc_info[2])).rstrip()
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def default_format() -> str:
    """`RESIDENCY_LOG_FORMAT` (the image sets `json`), else `text`."""
    value = os.environ.get("RESIDENCY_LOG_FORMAT", "text")
    return value if value in FORMATS else "text"


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """`--log-format` after a long-running command too (`residency serve --log-format json`)."""
    parser.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS, help="text or json")


def configure(level: int, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
