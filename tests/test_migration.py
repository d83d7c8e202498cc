"""VNIC migration [4.3, 4.4] against real servers, with signalling counted.

Three NVEs: nve1 and nve2 take part in migrations, nve3 is a remote observer
that serves the same VN and must never see the migrating VNIC's addresses
disappear when a pre-arrival or a departure preceded the move.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from agents.agent import AgentError
from ima.mobility import MobilityPolicy
from nve.service import NveService
from nve.writer import WriteDelete, WritePut
from schemas.errors import ErrorCode
from schemas.messages import AddressEntry, VnAddresses, VnRef
from tests.slice import Slice, start_slice

pytestmark = pytest.mark.integration

BLUE = VnRef(alias="blue")
VM = str(uuid.uuid5(uuid.NAMESPACE_URL, "mig/vm"))
OBS = str(uuid.uuid5(uuid.NAMESPACE_URL, "mig/observer"))
ENTRIES = (
    AddressEntry(mac="02:00:00:00:aa:01", ips=("10.7.0.1",)),
    AddressEntry(mac="02:00:00:00:aa:02", ips=("10.7.0.2", "10.7.9.0/24")),
)
KEYS = 5  # 2 MACs + 3 IP entries


@pytest.fixture
async def cp(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> AsyncIterator[Slice]:
    s = await start_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                          ("nve1", "nve2", "nve3"), hold_s=1.0, tick_s=0.05,
                          mobility=MobilityPolicy(max_moves=3, window_ns=60 * 10**9))
    try:
        assert s.client is not None
        await s.client.create("blue")
        observer = await s.agent("hv9", "nve3")
        await observer.connect(OBS, "eth0", BLUE)
        hv1 = await s.agent("hv1", "nve1")
        await hv1.connect(VM, "eth0", BLUE)
        await hv1.associate(VM, BLUE, ENTRIES)
        await s.wait("nve3", lambda: s.nves["nve3"].core.remote.size() == KEYS)
        yield s
    finally:
        await s.stop()


def writes(nve: NveService) -> int:
    c = nve.counters
    return c["ima_puts"] + c["ima_deletes"]


def holders(cp: Slice, nve: str) -> set[str]:
    return {b.nve for r in cp.nves[nve].core.remote.vns.values() for b in r.entries.values()}


async def map_values(cp: Slice) -> dict[str, dict[str, object]]:
    return {k: orjson.loads(v) for k, v in (await cp.keys()).items() if "/map/" in k}


async def test_same_nve_migration_with_prearrival_makes_zero_ima_writes(cp: Slice) -> None:
    nve1 = cp.nves["nve1"]
    hv2 = await cp.agent("hv2", "nve1")
    before, keys_before = writes(nve1), await map_values(cp)
    prepared = await hv2.prepare(VM, "eth3", (VnAddresses(vn=BLUE),))
    assert [r.tag for r in prepared.results] == [1]  # a tag on the new port, ahead
    arrived = await hv2.arrive(VM, "eth3")
    assert arrived.ima_ops == 0
    hv1 = await cp.agent("hv1", "nve1")
    late = await hv1.depart(VM)  # the source's departure arrives after the move
    assert late.ima_ops == 0
    assert writes(nve1) == before
    assert await map_values(cp) == keys_before
    vnic = nve1.core.tables()["vnics"][VM]
    assert (vnic["hypervisor"], vnic["port"], vnic["state"]) == ("hv2", "eth3", "up")
    assert "hv1/eth0" not in nve1.core.tables()["ports"]  # the old port's tag was released


async def test_same_nve_migration_without_handshake_within_hold_time(cp: Slice) -> None:
    nve1 = cp.nves["nve1"]
    hv1, hv2 = await cp.agent("hv1", "nve1"), await cp.agent("hv2", "nve1")
    before = writes(nve1)
    await hv1.depart(VM)
    assert nve1.core.tables()["vnics"][VM]["state"] == "departed"
    await hv2.arrive(VM, "eth1")
    assert writes(nve1) == before
    assert nve1.core.tables()["vnics"][VM]["hypervisor"] == "hv2"
    assert cp.nves["nve3"].counters["remote_deletes"] == 0


async def test_aborted_migration_rolls_back_without_writes(cp: Slice) -> None:
    nve1 = cp.nves["nve1"]
    hv1 = await cp.agent("hv1", "nve1")
    before = writes(nve1)
    await hv1.depart(VM)
    reply = await hv1.arrive(VM, "eth0")
    assert reply.ima_ops == 0
    assert writes(nve1) == before
    assert nve1.core.tables()["vnics"][VM]["state"] == "up"
    assert nve1.core.events["migrations_aborted"] == 1
    await asyncio.sleep(1.3)  # past the hold time: nothing may be purged now
    assert len(await map_values(cp)) == KEYS


async def test_hold_expiry_purges_the_bindings(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.depart(VM)
    await cp.wait("nve3", lambda: cp.nves["nve3"].core.remote.size() == 0)
    assert await map_values(cp) == {}
    assert VM not in cp.nves["nve1"].core.vnics
    assert cp.nves["nve1"].core.events["hold_expired_departed"] == 1


async def test_cross_nve_migration_with_prearrival_is_one_atomic_switch(cp: Slice) -> None:
    nve1, nve2, nve3 = cp.nves["nve1"], cp.nves["nve2"], cp.nves["nve3"]
    hv1, hv3 = await cp.agent("hv1", "nve1"), await cp.agent("hv3", "nve2")
    prepared = await hv3.prepare(VM, "eth0", (VnAddresses(vn=BLUE, entries=ENTRIES),))
    assert prepared.ima_ops == 1  # no binding yet: only nve2's VN attachment
    assert nve2.core.tables()["vnics"][VM]["state"] == "prepared"
    await hv1.depart(VM)
    deletes_before = nve1.counters["ima_deletes"]
    txns_before = nve2.counters["ima_txns"]
    arrived = await hv3.arrive(VM, "eth0")
    assert arrived.ima_ops == KEYS
    assert nve2.counters["ima_txns"] - txns_before == 1  # the switch-over is one txn
    await cp.wait("nve3", lambda: holders(cp, "nve3") == {"nve2"})
    await cp.wait("nve1", lambda: VM not in nve1.core.vnics)
    assert nve3.counters["remote_deletes"] == 0  # never disappeared at the observer
    # The old NVE deleted no binding (they were taken over); at most its VN attachment.
    assert nve1.counters["ima_deletes"] - deletes_before <= 1
    values = await map_values(cp)
    assert {v["nve"] for v in values.values()} == {"nve2"}
    assert {v["mobility_seq"] for v in values.values()} == {1}

    # A stale writer (the old NVE, late) can neither remove nor overwrite the new location.
    key = cp.ep.layout.mac(prepared.results[0].vn_name, "02:00:00:00:aa:01")
    stale = dict(values[key], nve="nve1", underlay="192.0.2.1")
    report = await (await nve1.writer.submit([WritePut(key, orjson.dumps(stale)),
                                              WriteDelete(key)]))
    del report
    assert (await map_values(cp))[key]["nve"] == "nve2"
    report2 = await (await nve1.writer.submit([WritePut(key, orjson.dumps(stale))]))
    assert report2.lost == [key]
    assert (await map_values(cp))[key]["nve"] == "nve2"


async def test_cross_nve_migration_without_handshake(cp: Slice) -> None:
    nve3 = cp.nves["nve3"]
    hv1, hv3 = await cp.agent("hv1", "nve1"), await cp.agent("hv3", "nve2")
    await hv1.depart(VM)
    await hv3.arrive(VM, "eth0", (VnAddresses(vn=BLUE, entries=ENTRIES),))
    await cp.wait("nve3", lambda: holders(cp, "nve3") == {"nve2"})
    await cp.wait("nve1", lambda: VM not in cp.nves["nve1"].core.vnics)
    assert nve3.counters["remote_deletes"] == 0
    assert nve3.core.remote.size() == KEYS


async def test_address_moving_too_often_is_frozen(cp: Slice) -> None:
    agents = {"nve1": await cp.agent("hv1", "nve1"), "nve2": await cp.agent("hv3", "nve2")}
    ports = {"nve1": "eth0", "nve2": "eth0"}
    where = "nve1"
    for _ in range(3):  # three moves are allowed in the window
        to = "nve2" if where == "nve1" else "nve1"
        await agents[where].depart(VM)
        await agents[to].arrive(VM, ports[to], (VnAddresses(vn=BLUE, entries=ENTRIES),))
        await cp.wait(where, lambda w=where: VM not in cp.nves[w].core.vnics)
        where = to
    to = "nve2" if where == "nve1" else "nve1"
    await agents[where].depart(VM)
    with pytest.raises(AgentError) as info:
        await agents[to].arrive(VM, ports[to], (VnAddresses(vn=BLUE, entries=ENTRIES),))
    assert info.value.code == ErrorCode.ADDRESS_FROZEN
    values = await map_values(cp)
    assert {v["nve"] for v in values.values()} == {where}  # not flapped to the new NVE
