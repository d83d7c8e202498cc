"""Prometheus metrics of a running NVE, scraped over HTTP (real servers)."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator

import pytest

from nvo3.metrics import serve_metrics
from schemas.messages import AddressEntry, VnRef
from tests.slice import Slice, start_slice

pytestmark = pytest.mark.integration


@pytest.fixture
async def cp(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> AsyncIterator[Slice]:
    s = await start_slice(nats_urls, etcd_endpoints, key_prefix, subject_root)
    try:
        assert s.client is not None
        await s.client.create("blue")
        yield s
    finally:
        await s.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


async def test_nve_exposes_counters_tables_and_propagation_latency(cp: Slice) -> None:
    port = serve_metrics(cp.nves["nve2"], 0)
    hv1, hv3 = await cp.agent("hv1", "nve1"), await cp.agent("hv3", "nve2")
    blue = VnRef(alias="blue")
    await hv3.connect(str(uuid.uuid4()), "eth0", blue)
    a = str(uuid.uuid4())
    await hv1.connect(a, "eth0", blue)
    await hv1.associate(a, blue, (AddressEntry(mac="02:00:00:00:00:01", ips=("10.0.0.1",)),))
    await cp.wait("nve2", lambda: cp.nves["nve2"].core.remote.size() == 2)
    text = await asyncio.to_thread(scrape, port)
    assert 'nvo3_nve_events_total{event="messages.vn_connect",nve="nve2"} 1.0' in text
    assert 'nvo3_nve_table_entries{nve="nve2",table="remote_bindings"} 2.0' in text
    assert 'nvo3_propagation_seconds_count{nve="nve2"} 2.0' in text
    assert "nvo3_nve_ima_queue_depth" in text
