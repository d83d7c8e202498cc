"""Where an NVE's time goes besides the request stages: event-loop lag (with its GC
part), the remote side's watch path and the writer's batches (real servers).

No timing is asserted: only that each instrument records and is reported.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable

import orjson
import pytest

from nvo3.gc_watch import watch_gc
from nvo3.loop_lag import LoopLag
from nvo3.metrics import serve_metrics
from schemas.messages import AddressEntry, VnRef
from schemas.operator import TablesQuery
from schemas.wire import dumps
from tests.slice import WAIT, Slice, blue_slice_fixture

pytestmark = pytest.mark.integration

cp = blue_slice_fixture(lease_ttl=5)
BLUE = VnRef(alias="blue")


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll (the instruments set no event): counters and sample deques."""
    async with asyncio.timeout(WAIT):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def _tables(cp: Slice, nve: str, since_ns: int = 0) -> dict[str, object]:
    nc = cp._conns[0]
    query = dumps(TablesQuery(stages_since_ns=since_ns))
    reply = await nc.request(cp.ep.subjects.nve_tables(nve), query, timeout=5)
    tables = orjson.loads(reply.data)
    assert isinstance(tables, dict)
    return tables


async def test_tables_report_loop_lag_watch_apply_and_writer_batches(cp: Slice) -> None:
    hv1, hv3 = await cp.agent("hv1", "nve1"), await cp.agent("hv3", "nve2")
    await hv3.connect(str(uuid.uuid4()), "eth0", BLUE)  # nve2 follows the VN
    a = str(uuid.uuid4())
    await hv1.connect(a, "eth0", BLUE)
    await hv1.associate(a, BLUE, (AddressEntry(mac="02:00:00:00:77:01", ips=("10.0.7.1",)),))
    await cp.wait("nve2", lambda: cp.nves["nve2"].core.remote.size() == 2)
    await _until(lambda: len(cp.nves["nve1"].loop_lag.samples) > 0)

    nve1, nve2 = await _tables(cp, "nve1"), await _tables(cp, "nve2")
    assert nve1["writer_ms"]["batch"]["n"] >= 1  # type: ignore[index]
    lag = nve1["loop_lag_ms"]
    assert isinstance(lag, dict)
    assert lag["n"] >= 1
    assert 0 <= lag["p50"] <= lag["max"]
    watch = nve2["watch_ms"]
    assert isinstance(watch, dict)
    assert watch["apply"]["n"] >= 1
    assert watch["propagation"]["n"] == 2  # the MAC and the IP binding of nve1
    # The request stages keep their shape (tests/test_e2e.py); the rest sits beside them.
    assert set(nve1["stages_ms"]) == {"receive", "commit"}  # type: ignore[arg-type]
    later = await _tables(cp, "nve2", time.time_ns() + 10**12)
    assert later["watch_ms"] == {"apply": {"n": 0}, "propagation": {"n": 0}}
    assert later["loop_lag_ms"] == {"n": 0}


async def test_a_blocked_loop_is_a_stall_with_its_gc_part(cp: Slice) -> None:
    """The event loop held by a synchronous step (here a blocking sleep and a full
    collection) shows as a stall of the NVE's loop; the collection is its GC part."""
    nve = cp.nves["nve1"]
    callback = watch_gc(nve.counters, freeze=False)  # what `nvo3 nve run` does
    try:
        await _until(lambda: len(nve.loop_lag.samples) > 0)
        stalls = nve.counters["loop_stalls"]
        time.sleep(0.05)  # noqa: ASYNC251 (the point: hold the event loop)
        gc.collect()
        await _until(lambda: nve.counters["loop_stalls"] > stalls)
    finally:
        gc.callbacks.remove(callback)
    lag = (await _tables(cp, "nve1"))["loop_lag_ms"]
    assert isinstance(lag, dict)
    assert lag["stalls"] >= 1
    longest = lag["longest"][0]
    assert set(longest) == {"at_ns", "lag_ms", "gc_ms", "cpu_ms"}
    assert any(s["gc_ms"] > 0 for s in lag["longest"])  # the gc.collect() was inside one
    assert nve.counters["loop_stall_gc_us_total"] > 0


async def test_metrics_expose_loop_lag_and_steps(cp: Slice) -> None:
    nve = cp.nves["nve1"]
    port = serve_metrics(nve, 0)
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(str(uuid.uuid4()), "eth0", BLUE)
    await _until(lambda: len(nve.loop_lag.samples) > 0 and len(nve.writer.batch_times) > 0)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    text = await asyncio.to_thread(scrape)
    assert "# TYPE nvo3_nve_loop_lag_seconds histogram" in text
    assert 'nvo3_nve_loop_lag_seconds_count{nve="nve1"}' in text
    assert 'nvo3_nve_step_seconds_count{nve="nve1",step="ima_batch"}' in text
    assert 'nvo3_nve_step_seconds_count{nve="nve1",step="watch_apply"}' in text


async def test_loop_lag_alone_without_gc_counters() -> None:
    """A process that does not count GC pauses still gets lag and stalls (GC part 0)."""
    lag = LoopLag(Counter(), interval_s=0.001, stall_ms=1)
    task = asyncio.create_task(lag.run())
    try:
        while not lag.samples:  # noqa: ASYNC110 (a deque, no event)
            await asyncio.sleep(0.001)
        time.sleep(0.02)  # noqa: ASYNC251 (hold the loop)
        while not lag.stalls:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    finally:
        task.cancel()
    summary = lag.summary()
    assert summary["stalls"] >= 1
    assert summary["stall_gc_ms_total"] == 0


def test_nve_process_gc_settles_its_startup_heap() -> None:
    """`nvo3 nve run` (through watch_gc) freezes its start-up heap and makes full
    collections rarer; NVO3_GC_FREEZE=0 keeps the interpreter's defaults."""
    code = ("import gc, collections; from nvo3.gc_watch import watch_gc; "
            "c = collections.Counter(); watch_gc(c); "
            "print(gc.get_freeze_count(), c['gc_frozen_objects'], gc.get_threshold()[2])")
    frozen, counted, full = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert int(frozen) > 0
    assert int(counted) == int(frozen)
    assert int(full) >= 100
    default = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={**os.environ, "NVO3_GC_FREEZE": "0"},
    ).stdout.split()
    assert default[0] == "0"
    assert int(default[2]) == 10


def test_counting_collections_never_adds_a_counter_after_it_starts() -> None:
    """The GC callback runs wherever a collection starts, also inside code iterating the
    counters (``NveService.snapshot``); a key added there raised "dictionary changed size
    during iteration" and killed an NVE in a chaos run. Every key exists up front."""
    counters: Counter[str] = Counter()
    callback = watch_gc(counters, freeze=False)
    try:
        keys = set(counters)
        for generation in (0, 1, 2):
            gc.collect(generation)
        assert set(counters) == keys
        assert counters["gc_collections.gen2"] >= 1
    finally:
        gc.callbacks.remove(callback)
