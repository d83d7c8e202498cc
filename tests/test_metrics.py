"""Prometheus metrics of a running NVE, IMA and agent, scraped over HTTP (real servers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.agent import AgentError
from agents.service import AgentService
from ima.client import ImaError
from nvo3.metrics import serve_agent_metrics, serve_ima_metrics, serve_metrics
from schemas.messages import AddressEntry, OkReply, VnRef
from tests.slice import WAIT, Slice, start_slice

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
    # nve2 served one request (hv3's connect): both of its stages are counted.
    assert 'nvo3_nve_request_stage_seconds_count{nve="nve2",stage="receive"} 1.0' in text
    assert 'nvo3_nve_request_stage_seconds_count{nve="nve2",stage="commit"} 1.0' in text


async def test_nve_exposes_errors_by_code_queue_depths_and_etcd_calls(cp: Slice) -> None:
    port = serve_metrics(cp.nves["nve1"], 0)
    hv1 = await cp.agent("hv1", "nve1")
    with pytest.raises(AgentError):
        await hv1.associate(str(uuid.uuid4()), VnRef(alias="blue"),
                            (AddressEntry(mac="02:00:00:00:00:09"),))  # never connected
    text = await asyncio.to_thread(scrape, port)
    assert 'nvo3_nve_errors_total{code="unknown_vnic",nve="nve1"} 1.0' in text
    for queue in ("ima_writes", "replies", "nats_requests"):
        assert f'nvo3_nve_queue_depth{{nve="nve1",queue="{queue}"}}' in text
    assert 'nvo3_nve_etcd_requests_total{nve="nve1",op="txn"}' in text
    assert "nvo3_nve_etcd_retries_total" in text


async def test_ima_exposes_operations_by_result_errors_and_etcd_calls(cp: Slice) -> None:
    assert cp.ima is not None
    assert cp.client is not None
    port = serve_ima_metrics(cp.ima, 0)
    await cp.client.create("blue")  # again: the same VN back
    await cp.client.list()
    with pytest.raises(ImaError):
        await cp.client.get(VnRef(alias="no-such-vn"))
    text = await asyncio.to_thread(scrape, port)
    # the fixture's create plus ours (a replica is reached by the queue group: only one here)
    assert 'nvo3_ima_operations_total{op="create",result="ok"} 2.0' in text
    assert 'nvo3_ima_operations_total{op="list",result="ok"} 1.0' in text
    assert 'nvo3_ima_operations_total{op="get",result="unknown_vn"} 1.0' in text
    assert 'nvo3_ima_errors_total{code="unknown_vn"} 1.0' in text
    assert re.search(r'nvo3_ima_etcd_requests_total\{op="txn"\} [1-9]', text)
    assert "nvo3_ima_etcd_unavailable_total 0.0" in text


def sample(text: str, name: str) -> float:
    """The value of one sample line (exact name and labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


async def test_agent_exposes_requests_replies_syncs_queues_and_round_trips(cp: Slice) -> None:
    agent = await cp.agent("hv1", "nve1")
    service = AgentService(agent)
    port = serve_agent_metrics(service, 0)
    synced, sync = asyncio.Event(), agent.sync

    async def sync_then_signal(nve: str, chunk: int = 500) -> OkReply:
        try:
            return await sync(nve, chunk)
        finally:
            synced.set()  # the syncer counts it before this test runs again

    agent.sync = sync_then_signal  # type: ignore[method-assign]
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(WAIT):
            await synced.wait()  # the start-up sync of its (empty) state to nve1
        blue = VnRef(alias="blue")
        vnic = str(uuid.uuid4())
        await agent.connect(vnic, "eth0", blue)
        with pytest.raises(AgentError):
            await agent.associate(str(uuid.uuid4()), blue,
                                  (AddressEntry(mac="02:00:00:00:00:0a"),))  # unknown VNIC
        text = await asyncio.to_thread(scrape, port)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sample(text, 'nvo3_agent_requests_total{hv="hv1",kind="vn_connect"}') == 1.0
    assert sample(text, 'nvo3_agent_requests_total{hv="hv1",kind="hv_sync"}') == 1.0
    assert sample(text, 'nvo3_agent_replies_total{hv="hv1",result="ok"}') == 2.0
    assert sample(text, 'nvo3_agent_replies_total{hv="hv1",result="unknown_vnic"}') == 1.0
    assert sample(text, 'nvo3_agent_syncs_total{hv="hv1",result="ok"}') == 1.0
    assert sample(text, 'nvo3_agent_resyncs_total{hv="hv1",reason="nve_restart"}') == 0.0
    assert sample(text, 'nvo3_agent_inflight_requests{hv="hv1"}') == 0.0
    assert sample(text, 'nvo3_agent_sync_queue_depth{hv="hv1"}') == 0.0
    assert sample(text, 'nvo3_agent_desired_vnics{hv="hv1"}') == 1.0
    assert sample(text, 'nvo3_agent_request_rtt_seconds_count{hv="hv1"}') == 3.0
    assert sample(text, 'nvo3_agent_request_rtt_seconds_bucket{hv="hv1",le="+Inf"}') == 3.0
    assert sample(text, 'nvo3_agent_request_rtt_seconds_sum{hv="hv1"}') > 0.0


async def start_process(cp: Slice, *args: str) -> tuple[asyncio.subprocess.Process, int]:
    """``nvo3 <args> --metrics-port 0`` as a process; returns it and its metrics port."""
    env = {**os.environ, "NVO3_NATS": ",".join(cp.ep.nats), "NVO3_ETCD": ",".join(cp.ep.etcd),
           "NVO3_KEY_ROOT": cp.ep.key_root, "NVO3_SUBJECT_ROOT": cp.ep.subject_root}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nvo3.cli", *args, "--metrics-port", "0", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            while True:
                line = await proc.stdout.readline()
                assert line, f"{args} exited with {await proc.wait()}"
                match = re.search(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
                if match is not None:
                    return proc, int(match[1])
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


async def test_ima_run_and_agent_run_serve_metrics(cp: Slice, tmp_path: Path) -> None:
    inventory = tmp_path / "hv9.yaml"
    inventory.write_text(
        "hypervisor: hv9\nnve: nve1\nvnics:\n"
        "  - name: 6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e5f\n    port: eth0\n    vns:\n"
        "      - vn: {alias: blue}\n")
    procs = []
    try:
        ima, ima_port = await start_process(cp, "ima", "run")
        procs.append(ima)
        agent, agent_port = await start_process(cp, "agent", "run", "--inventory",
                                                str(inventory))
        procs.append(agent)
        # The sidecar's start-up hv_sync reaches nve1 (and was counted before it was sent).
        nve1 = cp.nves["nve1"]
        await cp.wait("nve1", lambda: nve1.counters["messages.hv_sync"] >= 1)
        ima_text = await asyncio.to_thread(scrape, ima_port)
        agent_text = await asyncio.to_thread(scrape, agent_port)
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()
    # opening the store proves etcd answers: one "current revision" call
    assert 'nvo3_ima_etcd_requests_total{op="current"} 1.0' in ima_text
    assert "# TYPE nvo3_ima_operations_total counter" in ima_text
    assert sample(agent_text, 'nvo3_agent_requests_total{hv="hv9",kind="hv_sync"}') == 1.0
    assert sample(agent_text, 'nvo3_agent_desired_vnics{hv="hv9"}') == 1.0
    assert "# TYPE nvo3_agent_request_rtt_seconds histogram" in agent_text


def test_gc_pauses_are_counted_per_generation() -> None:
    import gc
    from collections import Counter

    from nvo3.gc_watch import watch_gc

    counters: Counter[str] = Counter()
    callback = watch_gc(counters, freeze=False)  # no freezing this test process's heap
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert counters["gc_collections.gen2"] >= 1
    assert counters["gc_pause_us_max.gen2"] >= 0
    assert counters["gc_pause_us_total.gen2"] >= counters["gc_pause_us_max.gen2"]
