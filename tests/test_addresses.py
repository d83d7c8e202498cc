"""Addresses [3.1, 4.2], tag scopes [4], profiles [4.5] and counted signalling.

All against real nats-server and etcd, with exact counts of IMA operations.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from agents.agent import AgentError, HypervisorAgent
from schemas.errors import ErrorCode
from schemas.messages import AddressEntry, AddrObserved, VnRef
from schemas.profile import AclRule, Qos, VnProfile
from schemas.wire import dumps
from tests.slice import Slice, start_slice

pytestmark = pytest.mark.integration

BLUE, RED = VnRef(alias="blue"), VnRef(alias="red")
A = str(uuid.uuid5(uuid.NAMESPACE_URL, "addr/a"))
B = str(uuid.uuid5(uuid.NAMESPACE_URL, "addr/b"))


@pytest.fixture
async def cp(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> AsyncIterator[Slice]:
    s = await start_slice(
        nats_urls, etcd_endpoints, key_prefix, subject_root, ("nve1", "nve2"),
        glean_s=0.3, tick_s=0.05,
        # hv1 and hv2 sit behind one blade switch: one shared tag space.
        port_scopes=(("hv1/eth0", "blade-a"), ("hv2/eth0", "blade-a")),
    )
    try:
        assert s.client is not None
        await s.client.create("blue")
        await s.client.create("red", service="l3")
        yield s
    finally:
        await s.stop()


def mac(i: int) -> str:
    return f"02:00:00:00:{i // 256:02x}:{i % 256:02x}"


async def map_keys(cp: Slice) -> set[str]:
    return {k for k in await cp.keys() if "/map/" in k}


async def test_replace_writes_only_the_diff_and_is_idempotent(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(A, "eth0", BLUE)
    first = (AddressEntry(mac=mac(1), ips=("10.0.0.1",)), AddressEntry(mac=mac(2)))
    assert (await hv1.replace(A, BLUE, first)).ima_ops == 3
    assert (await hv1.replace(A, BLUE, first)).ima_ops == 0  # identical: 0 IMA writes
    second = (AddressEntry(mac=mac(1), ips=("10.0.0.9",)), AddressEntry(mac=mac(3)))
    # -10.0.0.1, +10.0.0.9, -mac2, +mac3
    assert (await hv1.replace(A, BLUE, second)).ima_ops == 4
    tables = cp.nves["nve1"].core.tables()
    macs = next(iter(tables["vnics"][A]["vns"].values()))["macs"]
    assert macs == {mac(1): ["10.0.0.9"], mac(3): []}
    assert len(await map_keys(cp)) == 3


async def test_a_repeated_identical_message_makes_zero_ima_writes(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(A, "eth0", BLUE)
    entries = (AddressEntry(mac=mac(1), ips=("10.0.0.1",)),)
    assert (await hv1.associate(A, BLUE, entries)).ima_ops == 2
    puts = cp.nves["nve1"].counters["ima_puts"]
    assert (await hv1.associate(A, BLUE, entries)).ima_ops == 0
    assert cp.nves["nve1"].counters["ima_puts"] == puts


@pytest.mark.parametrize("n_addresses", [1, 127, 300])
async def test_shutdown_is_one_message_and_at_most_ceil_n_over_128_txns(
    cp: Slice, n_addresses: int
) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(A, "eth0", BLUE)
    await hv1.associate(A, BLUE, tuple(AddressEntry(mac=mac(i)) for i in range(n_addresses)))
    nve = cp.nves["nve1"]
    txns, msgs = nve.counters["ima_txns"], nve.counters["messages.vnic_shutdown"]
    reply = await hv1.shutdown(A)
    assert reply.ima_ops == n_addresses
    assert nve.counters["messages.vnic_shutdown"] - msgs == 1
    assert nve.counters["ima_txns"] - txns <= math.ceil(n_addresses / 128)
    assert await map_keys(cp) == set()


async def test_trunk_vnic_gets_one_tag_per_vn_on_one_port(cp: Slice) -> None:
    hv3 = await cp.agent("hv3", "nve1")
    blue = await hv3.connect(A, "eth7", BLUE)
    red = await hv3.connect(A, "eth7", RED)
    assert blue.tag != red.tag
    tables = cp.nves["nve1"].core.tables()
    assert tables["ports"]["hv3/eth7"] == {str(blue.tag): blue.vn_name, str(red.tag): red.vn_name}


async def test_declared_shared_tag_scope(cp: Slice) -> None:
    hv1, hv2 = await cp.agent("hv1", "nve1"), await cp.agent("hv2", "nve1")
    blue_hv1 = await hv1.connect(A, "eth0", BLUE)
    red_hv2 = await hv2.connect(B, "eth0", RED)
    blue_hv2 = await hv2.connect(str(uuid.uuid4()), "eth0", BLUE)
    # One space behind the blade switch: red cannot reuse blue's tag, blue shares it.
    assert red_hv2.tag != blue_hv1.tag
    assert blue_hv2.tag == blue_hv1.tag
    assert set(cp.nves["nve1"].core.tables()["ports"]) == {"blade-a"}
    # A configuration change that would merge two VNs onto one tag is refused.
    from schemas.errors import ProtocolError

    hv3 = await cp.agent("hv3", "nve1")
    green = await hv3.connect(str(uuid.uuid4()), "eth0", RED)
    assert green.tag == blue_hv1.tag  # its own link: tag 1 means red here
    with pytest.raises(ProtocolError):
        cp.nves["nve1"].core.set_port_scopes({"hv1/eth0": "x", "hv3/eth0": "x"})


async def observe(cp: Slice, **fields: Any) -> dict[str, Any]:
    nc = cp._conns[0]
    msg = await nc.request(cp.ep.subjects.nve_observed("nve1"),
                           dumps(AddrObserved(**fields)), timeout=5)
    reply: dict[str, Any] = orjson.loads(msg.data)
    return reply


async def test_gleaning_inside_authorization_ages_out_and_yields_to_explicit(cp: Slice) -> None:
    hv3 = await cp.agent("hv3", "nve1")
    conn = await hv3.connect(A, "eth0", BLUE, allowed=("10.5.0.0/24",))
    ok = await observe(cp, hypervisor="hv3", port="eth0", tag=conn.tag, mac=mac(1),
                       ip="10.5.0.7")
    assert ok["kind"] == "ok"
    assert ok["ima_ops"] == 2
    assert len(await map_keys(cp)) == 2
    outside = await observe(cp, hypervisor="hv3", port="eth0", tag=conn.tag, mac=mac(1),
                            ip="10.6.0.7")
    assert outside["code"] == "not_authorized"
    wrong_tag = await observe(cp, hypervisor="hv3", port="eth0", tag=99, mac=mac(1))
    assert wrong_tag["code"] == "not_connected"
    # Aging: the gleaned entry disappears by itself.
    vn_macs = cp.nves["nve1"].core.vnics[A].vns[conn.vn_name].macs
    await cp.wait("nve1", lambda: not vn_macs)
    await cp.nves["nve1"].writer.flush()
    assert await map_keys(cp) == set()
    # Explicit association wins over gleaning: it is never aged out.
    await observe(cp, hypervisor="hv3", port="eth0", tag=conn.tag, mac=mac(2), ip="10.5.0.8")
    await hv3.associate(A, BLUE, (AddressEntry(mac=mac(2), ips=("10.5.0.8",)),))
    aged = cp.nves["nve1"].core.events.get("glean_aged_out", 0)
    await observe(cp, hypervisor="hv3", port="eth0", tag=conn.tag, mac=mac(3))
    await cp.wait("nve1", lambda: mac(3) not in vn_macs)
    await cp.nves["nve1"].writer.flush()
    assert cp.nves["nve1"].core.events["glean_aged_out"] > aged
    assert len(await map_keys(cp)) == 2  # mac(2) and its IP stay


async def test_profile_delivered_with_connect_and_pushed_on_change(cp: Slice) -> None:
    assert cp.client is not None
    profile = VnProfile(acl=(AclRule(action="deny", protocol="tcp", dst_port=23),),
                        qos=Qos(rate_mbps=100, dscp=10))
    await cp.client.set_profile(BLUE, profile)
    hv1 = await cp.agent("hv1", "nve1")
    await cp.wait("nve1", lambda: bool(cp.nves["nve1"].core.profiles))
    conn = await hv1.connect(A, "eth0", BLUE)
    assert conn.profile is not None
    assert conn.profile.qos.rate_mbps == 100
    await cp.client.set_profile(BLUE, profile.model_copy(update={"qos": Qos(rate_mbps=500)}))
    await cp.wait("nve1", lambda: cp.nves["nve1"].core.profiles[conn.vn_name].qos.rate_mbps
                  == 500)
    assert cp.nves["nve1"].core.tables()["profiles"][conn.vn_name]["qos"]["rate_mbps"] == 500
    shown = await cp.client.get_profile(BLUE)
    assert shown.profile is not None
    assert shown.profile.qos.rate_mbps == 500


async def test_one_hypervisor_several_nves_by_vn(cp: Slice) -> None:
    hv5 = HypervisorAgent("hv5", "nve1", await cp.nats("hv5"), subjects=cp.ep.subjects,
                          routes={str(RED): "nve2"})
    await hv5.connect(A, "eth0", BLUE)
    await hv5.connect(A, "eth0", RED)
    assert A in cp.nves["nve1"].core.vnics
    assert A in cp.nves["nve2"].core.vnics
    assert list(cp.nves["nve1"].core.vnics[A].vns) != list(cp.nves["nve2"].core.vnics[A].vns)
    await hv5.shutdown(A)  # a VNIC-wide message reaches every NVE that has the VNIC
    assert cp.nves["nve1"].core.vnics[A].state == "down"
    assert cp.nves["nve2"].core.vnics[A].state == "down"


async def test_invalid_lifecycle_transition_is_refused(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(A, "eth0", BLUE)
    await hv1.depart(A)
    with pytest.raises(AgentError) as info:
        await hv1.startup(A)
    assert info.value.code == ErrorCode.INVALID_TRANSITION
