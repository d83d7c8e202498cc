"""JSON log lines carry the standard fields and the caller's extras."""

from __future__ import annotations

import logging
import uuid

import orjson
import pytest

from nvo3.logs import JsonFormatter
from schemas.messages import AddressEntry, VnRef
from tests.slice import start_slice


def _vnic(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"logs/{label}"))


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


@pytest.mark.integration
async def test_one_trace_id_follows_an_event_from_the_agent_to_the_remote_nve(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = await start_slice(nats_urls, etcd_endpoints, key_prefix, subject_root, ("nve1", "nve2"))
    try:
        assert s.client is not None
        await s.client.create("blue")
        blue = VnRef(alias="blue")
        here = await s.agent("hv1", "nve1")
        there = await s.agent("hv2", "nve2")
        await there.connect(_vnic("there"), "eth0", blue)  # nve2 now follows blue
        caplog.set_level(logging.DEBUG)
        await here.connect(_vnic("here"), "eth0", blue)
        await here.associate(_vnic("here"), blue, (AddressEntry(mac="02:00:00:00:77:01"),))
        await s.wait("nve2", lambda: s.nves["nve2"].core.remote.size() == 1)
        by_logger: dict[str, set[str]] = {}
        for rec in caplog.records:
            trace = getattr(rec, "trace", None)
            if trace:
                by_logger.setdefault(rec.name, set()).add(trace)
        learned = by_logger["nve.follower"]
        assert len(learned) == 1
        assert learned <= by_logger["agents.agent"]  # published with it
        assert learned <= by_logger["nve.service"]  # applied with it
        (stored,) = [orjson.loads(v) for k, v in (await s.keys()).items() if "/map/" in k]
        assert {stored["trace"]} == learned  # and stored with it in the IMA
    finally:
        await s.stop()
