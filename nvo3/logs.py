"""Structured JSON logs (``nvo3 --log-json ...``), one object per line.

Fields: ts, level, logger, msg, plus any ``extra={...}`` the caller gave
(e.g. ``nve``, ``trace``), so a log shipper can index them without parsing.
With ``-vv`` every event is logged at debug level with its ``trace`` id: by the
agent that publishes it, the NVE that applies it and every remote NVE that
learns the resulting mapping from the IMA, so one id finds the event's whole path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(verbose: int, json_logs: bool) -> None:
    """``verbose``: 0 warnings, 1 info, 2 debug (per-event lines with trace ids)."""
    handler = logging.StreamHandler()
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))
    # nats-py's TLS transport makes asyncio warn "returning true from eof_received()
    # has no effect when using ssl" on every close: noise, not a problem of ours.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
