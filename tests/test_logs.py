"""JSON log lines carry the standard fields and the caller's extras."""

from __future__ import annotations

import logging

import orjson

from nvo3.logs import JsonFormatter


def test_json_formatter_keeps_extras() -> None:
    record = logging.LogRecord("nve.service", logging.WARNING, __file__, 1,
                               "lease lost for %s", ("nve1",), None)
    record.nve = "nve1"
    record.trace = "hv1-42"
    line = orjson.loads(JsonFormatter().format(record))
    assert line["level"] == "warning"
    assert line["msg"] == "lease lost for nve1"
    assert line["nve"] == "nve1"
    assert line["trace"] == "hv1-42"
    assert line["ts"].endswith("Z")
