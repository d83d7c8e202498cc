"""``nvo3 bench --quick`` runs end to end, and the performance fast paths keep behaviour.

No timing is asserted anywhere: the benchmark reports, it does not judge the CI
machine.  The smoke test only checks that a quick run completes against real
servers and writes the JSON with its four sections.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from ima.keys import KeyLayout
from ima.store import EtcdStore
from nve.follower import decode_binding, decode_entry
from nve.remote import RemoteTable
from nve.writer import ImaWriter, WritePut
from schemas.records import IpBinding, MacBinding

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.integration
def test_quick_bench_completes_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # A child process, as `make bench` runs it: the bench starts its own servers and
    # processes and must leave nothing behind; warnings-as-errors stays with pytest.
    proc = subprocess.run(
        [sys.executable, "-m", "nvo3.cli", "bench", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = orjson.loads(out.read_bytes())
    assert set(result) >= {"floors", "figures", "ratios", "machine"}
    for floor in ("nats_pubsub_msgs_per_s", "nats_request_p50_ms", "etcd_put_per_s",
                  "etcd_txn128_puts_per_s", "etcd_put_watch_p50_ms"):
        assert floor in result["floors"]
    names = " | ".join(result["figures"])
    for part in ("e2e address events/s", "propagation p50", "propagation p99", "cold sync",
                 "memory per remote mapping", "restart resync", "migration black hole",
                 "signalling"):
        assert part in names
    assert result["machine"]["cpus"] >= 1
    assert "figure" in proc.stdout  # the table was printed


# --------------------------------------------------------------- decode fast path

_BASE = {
    "vn": "6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a01", "vni": 5, "mac": "02:00:00:00:00:01",
    "vnic": "6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a02", "nve": "nve1", "underlay": "192.0.2.1",
    "ts_ns": 7,
}
_MUTATIONS: list[tuple[str, object]] = [
    ("mac", "02:00:00:00:00:0A"), ("mac", "03:00:00:00:00:01"), ("mac", "00:00:00:00:00:00"),
    ("mac", "0200.0000.0001"), ("mac", "02-00-00-00-00-01"),
    ("vn", "6F1C1C2E-0B7A-4D38-9A52-3F0C6C1F0A01"), ("vn", "x"), ("vni", 0), ("vni", 1 << 24),
    ("vni", True), ("vni", 5.0), ("vni", "5"), ("ts_ns", -1), ("ts_ns", 1.5), ("nve", "a.b"),
    ("nve", "n" * 65), ("underlay", "192.0.2.01"), ("underlay", "::1"),
    ("underlay", "10.0.0.0/8"), ("v", 2), ("v", True), ("extra", 1), ("mobility_seq", 3),
    ("mobility_seq", -1), ("moves_ns", [1, 2]), ("moves_ns", list(range(17))),
    ("moves_ns", [1.0]),
]


def _records() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for kind in ("mac", "ip"):
        base = dict(_BASE, ip="10.0.0.1") if kind == "ip" else dict(_BASE)
        out.append((kind, orjson.dumps(base)))
        for name, value in _MUTATIONS:
            out.append((kind, orjson.dumps({**base, name: value})))
        for name in base:
            out.append((kind, orjson.dumps({k: v for k, v in base.items() if k != name})))
        if kind == "ip":
            for ip in ("10.0.0.0/8", "10.0.0.1/8", "::1", "010.0.0.1", "256.0.0.1", "0.0.0.0"):
                out.append((kind, orjson.dumps({**base, "ip": ip})))
    out += [("mac", b"[]"), ("mac", b"nope"), ("mac", b'{"v":1}'), ("ip", b"")]
    # Canonical records (every field, in model order: what NVEs write), valid and not.
    for kind, model in (("mac", MacBinding), ("ip", IpBinding)):
        base = dict(_BASE, ip="10.0.0.1") if kind == "ip" else dict(_BASE)
        full = model.model_validate({**base, "epoch": 9, "trace": "0123456789abcdef",
                                     "moves_ns": [1, 2]}).model_dump(mode="json")
        out.append((kind, orjson.dumps(full)))
        for name, value in (("vni", 0), ("vni", 1 << 24), ("epoch", 1 << 63), ("epoch", -1),
                            ("mac", "00:00:00:00:00:00"), ("trace", "XYZ"), ("trace", ""),
                            ("nve", "a b"), ("ts_ns", -5)):
            out.append((kind, orjson.dumps({**full, name: value})))
    return out


@pytest.mark.parametrize(("kind", "value"), _records())
def test_decode_binding_matches_full_validation(kind: str, value: bytes) -> None:
    """The follower's fast path accepts and normalizes exactly like pydantic does."""
    model = MacBinding if kind == "mac" else IpBinding
    try:
        expected: MacBinding | IpBinding | None = model.model_validate_json(value)
    except ValidationError:
        expected = None
    if expected is None:
        with pytest.raises(ValidationError):
            decode_binding(kind, value)
        return
    got = decode_binding(kind, value)
    assert type(got) is type(expected)
    assert got == expected
    assert got.model_fields_set == expected.model_fields_set
    assert got.model_dump_json() == expected.model_dump_json()


@pytest.mark.parametrize(("kind", "value"), _records())
def test_decode_entry_matches_full_validation(kind: str, value: bytes) -> None:
    """The cold-sync path (record -> table entry, no model) refuses and keeps the same."""
    model = MacBinding if kind == "mac" else IpBinding
    table = RemoteTable("observer")
    try:
        expected = table.entry(model.model_validate_json(value))
    except ValidationError:
        with pytest.raises(ValidationError):
            decode_entry(kind, value, table.make)
        return
    got, _ = decode_entry(kind, value, table.make)
    assert got == expected


# ------------------------------------------------------------ concurrent chunks


@pytest.mark.integration
async def test_writer_commits_a_multi_txn_batch(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    """A batch larger than one etcd transaction is committed whole, chunks in parallel."""
    layout = KeyLayout(key_prefix)
    store = EtcdStore(etcd_endpoints)
    await store.connect()
    counters: Counter[str] = Counter()
    writer = ImaWriter(store, counters, "nve1")
    task = asyncio.create_task(writer.run())
    try:
        ops = [WritePut(f"{layout.root}k/{i:05d}", b"v") for i in range(1000)]
        done = await writer.submit(list(ops))  # one request, 1000 ops: 8 transactions
        report = await asyncio.wait_for(done, 30)
        assert report.revision > 0
        assert not report.lost
        items, _ = await store.get_prefix(f"{layout.root}k/")
        assert len(items) == 1000
        assert counters["ima_txns"] == 8
        assert counters["ima_puts"] == 1000
        assert counters["ima_batches"] == 1
        # Rewriting the same keys: every compare now names our own revision.
        again = await writer.submit([WritePut(op.key, b"w") for op in ops])
        assert not (await asyncio.wait_for(again, 30)).lost
        items, _ = await store.get_prefix(f"{layout.root}k/")
        assert {kv.value for kv in items} == {b"w"}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
