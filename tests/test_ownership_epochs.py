"""Liveness and ownership are separate: bindings carry their NVE's incarnation.

Issue 4: "a binding carries the owning NVE's epoch, so a restarted NVE or a
second NVE can never be confused with the dead one's leftovers", and the epoch
is checked with compare-and-swap so a stale writer never overwrites a newer
location.  Pure rules first (the remote table), then real nats-server + etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from agents.service import AgentService
from nve.registration import Superseded
from nve.remote import RemoteTable
from nve.service import NveConfig, NveService
from nve.writer import ImaWriter, WritePut
from schemas.messages import AddressEntry, VnRef
from schemas.records import MacBinding
from tests.slice import Slice, blue_slice_fixture

BLUE = VnRef(alias="blue")
VN = "6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a01"


def vnic(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"epochs/{label}"))


def binding(nve: str, epoch: int, mac: str = "02:00:00:00:00:01") -> MacBinding:
    return MacBinding(vn=VN, vni=7, mac=mac, vnic=vnic(mac), nve=nve, underlay="192.0.2.9",
                      epoch=epoch)


# ------------------------------------------------------------------ pure rules


def test_a_newer_incarnation_drops_what_the_older_one_left() -> None:
    table = RemoteTable("nve2")
    table.start(VN)
    table.put(VN, "mac/a", binding("nve1", 10, "02:00:00:00:00:0a"), 5)
    table.put(VN, "mac/b", binding("nve3", 10, "02:00:00:00:00:0b"), 6)
    assert table.nve_epoch("nve1", 20) == 1  # nve1 restarted: its old mapping goes
    assert table.get(VN, "mac/a") is None
    assert table.get(VN, "mac/b") is not None  # another NVE's mapping stays
    assert table.nve_epoch("nve1", 15) == 0  # epochs never go back
    assert table.stale_epoch == 1


def test_a_leftover_arriving_late_is_ignored_and_replaces_nothing() -> None:
    table = RemoteTable("nve2")
    table.start(VN)
    table.nve_epoch("nve1", 20)
    table.put(VN, "mac/a", binding("nve1", 20), 5)
    # The key's value is now an older incarnation's write (e.g. a zombie's): not a route.
    table.put(VN, "mac/a", binding("nve1", 10), 6)
    assert table.get(VN, "mac/a") is None
    table.put(VN, "mac/a", binding("nve1", 20), 7)
    assert table.get(VN, "mac/a") is not None


def test_a_binding_of_a_newer_incarnation_is_proof_enough() -> None:
    table = RemoteTable("nve2")
    table.start(VN)
    table.put(VN, "mac/a", binding("nve1", 10, "02:00:00:00:00:0a"), 5)
    table.put(VN, "mac/b", binding("nve1", 30, "02:00:00:00:00:0b"), 6)  # before its record
    assert table.get(VN, "mac/a") is None
    assert table.epochs["nve1"] == 30


def test_a_snapshot_keeps_only_the_newest_incarnation_of_each_nve() -> None:
    table = RemoteTable("nve2")
    table.start(VN)
    table.load_snapshot(VN, [("mac/a", binding("nve1", 10, "02:00:00:00:00:0a")),
                             ("mac/b", binding("nve1", 30, "02:00:00:00:00:0b")),
                             ("mac/c", binding("nve3", 5, "02:00:00:00:00:0c"))], 9)
    assert sorted(table.vns[VN].entries) == ["mac/b", "mac/c"]


# ------------------------------------------------------- against real servers


# A long TTL, so that anything cleaned up quickly was not cleaned up by the lease.
cp = blue_slice_fixture(lease_ttl=30)


async def populate(svc: AgentService, label: str, n: int) -> None:
    await svc.agent.connect(vnic(label), "eth0", BLUE)
    await svc.agent.associate(vnic(label), BLUE, tuple(
        AddressEntry(mac=f"02:00:00:{n:02x}:00:{i:02x}") for i in range(n)))


def foreign(nve: NveService, owner: str) -> list[MacBinding | object]:
    return [b for r in nve.core.remote.vns.values() for b in r.entries.values()
            if getattr(b, "nve", None) == owner]


@pytest.mark.integration
async def test_restart_after_a_crash_withdraws_leftovers_before_the_lease_ttl(
    cp: Slice,
) -> None:
    hv1 = await cp.agent_service("hv1", "nve1")
    hv3 = await cp.agent_service("hv3", "nve2")
    await populate(hv3, "remote", 1)  # nve2 serves blue, so it follows it
    await populate(hv1, "a", 3)
    nve2 = cp.nves["nve2"]
    await cp.wait("nve2", lambda: len(foreign(nve2, "nve1")) == 3)
    old_epoch = cp.nves["nve1"].epoch

    hv1.agent.desired.disconnect(vnic("a"), BLUE)  # the VM went away while nve1 was dead
    await cp.crash_nve("nve1")  # kill -9: the bindings would stay for the 30 s lease
    loop = asyncio.get_running_loop()
    started = loop.time()
    new = await cp.start_nve("nve1", "192.0.2.1", announce_s=0.2, lease_ttl=30)
    assert new.epoch > old_epoch
    assert new.counters["predecessor_leases_revoked"] == 1
    await cp.wait("nve2", lambda: not foreign(nve2, "nve1"))
    assert loop.time() - started < 10  # the new incarnation did it, not the TTL
    assert cp.store is not None
    items, _ = await cp.store.get_prefix(cp.ep.key_root)
    assert not [kv for kv in items if b'"nve":"nve1"' in kv.value
                and orjson.loads(kv.value).get("epoch") == old_epoch]


@pytest.mark.integration
async def test_a_new_incarnation_republishes_and_is_trusted(cp: Slice) -> None:
    hv1 = await cp.agent_service("hv1", "nve1")
    hv3 = await cp.agent_service("hv3", "nve2")
    await populate(hv3, "remote", 1)
    await populate(hv1, "a", 2)
    nve2 = cp.nves["nve2"]
    await cp.wait("nve2", lambda: len(foreign(nve2, "nve1")) == 2)
    await cp.crash_nve("nve1")
    new = await cp.start_nve("nve1", "192.0.2.1", announce_s=0.2, lease_ttl=30)
    # The agent sees the new epoch and resyncs; the new incarnation claims its own keys.
    await cp.wait("nve2", lambda: len(foreign(nve2, "nve1")) == 2
                  and all(getattr(b, "epoch", 0) == new.epoch for b in foreign(nve2, "nve1")))


@pytest.mark.integration
async def test_an_old_incarnation_cannot_register_over_a_newer_one(cp: Slice) -> None:
    nve1 = cp.nves["nve1"]
    zombie = NveService(NveConfig("nve1", "192.0.2.1", lease_ttl=30), await cp.nats("zombie"),
                        await cp.new_store(), layout=cp.ep.layout, subjects=cp.ep.subjects)
    zombie.epoch = nve1.epoch - 1  # started before the running one
    zombie.core.epoch = zombie.writer.epoch = zombie.epoch
    with pytest.raises(Superseded):
        await zombie.run()
    assert cp.store is not None
    record = await cp.store.get(cp.ep.layout.nve("nve1"))
    assert record is not None
    assert orjson.loads(record.value)["epoch"] == nve1.epoch


@pytest.mark.integration
async def test_a_running_old_incarnation_stops_when_a_newer_one_registers(cp: Slice) -> None:
    old = cp.nves["nve1"]
    task = cp._nve_tasks["nve1"]
    newer = NveService(NveConfig("nve1", "192.0.2.1", lease_ttl=30), await cp.nats("newer"),
                       await cp.new_store(), layout=cp.ep.layout, subjects=cp.ep.subjects)
    assert newer.epoch > old.epoch
    run = asyncio.create_task(newer.run())
    try:
        with pytest.raises(ExceptionGroup) as raised:
            async with asyncio.timeout(10):
                await task
        assert raised.group_contains(Superseded)
        assert old.counters["superseded"] == 1
    finally:
        cp._nve_tasks.pop("nve1")
        cp.nves.pop("nve1")
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


@pytest.mark.integration
async def test_a_stale_incarnation_never_overwrites_a_newer_ones_binding(cp: Slice) -> None:
    assert cp.store is not None
    key = cp.ep.layout.mac(VN, "02:00:00:00:00:01")
    lease = await cp.store.grant_lease(30)
    newer = ImaWriter(cp.store, Counter(), "nve1", epoch=200, lease_id=lease)
    zombie = ImaWriter(cp.store, Counter(), "nve1", epoch=100, lease_id=lease)
    tasks = [asyncio.create_task(w.run()) for w in (newer, zombie)]
    try:
        value = orjson.dumps(binding("nve1", 200).model_dump(mode="json"))
        await (await newer.submit([WritePut(key, value)]))
        stale = orjson.dumps(binding("nve1", 100).model_dump(mode="json"))
        report = await (await zombie.submit([WritePut(key, stale)]))
        assert report.lost == [key]
        assert zombie.counters["ima_superseded"] == 1
        kv = await cp.store.get(key)
        assert kv is not None
        assert orjson.loads(kv.value)["epoch"] == 200
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.integration
async def test_warm_state_is_saved_while_running_so_a_crash_leaves_one(
    cp: Slice, tmp_path: Path
) -> None:
    state = str(tmp_path / "nve1.state")
    await cp.stop_nve("nve1")
    await cp.start_nve("nve1", "192.0.2.1", announce_s=0.2, lease_ttl=30, state_file=state,
                       state_save_s=0.1)
    hv1 = await cp.agent_service("hv1", "nve1")
    hv3 = await cp.agent_service("hv3", "nve2")
    await hv1.agent.connect(vnic("a"), "eth0", BLUE)
    await populate(hv3, "c", 3)
    nve1 = cp.nves["nve1"]
    await cp.wait("nve1", lambda: nve1.core.remote.size() == 3
                  and nve1.counters["warm_state_saves"] > 0
                  and nve1._saved_at == tuple(r.revision for r in nve1.core.remote.vns.values()))
    await cp.crash_nve("nve1")  # no save on the way down
    assert await asyncio.to_thread(os.path.exists, state)
    new = await cp.start_nve("nve1", "192.0.2.1", announce_s=0.2, lease_ttl=30,
                             state_file=state)
    await cp.wait("nve1", lambda: new.core.remote.size() == 3)
    assert new.counters["warm_resumes"] == 1
    assert new.counters["relists"] == 0
