"""The slice end to end against real nats-server and etcd (no mocks).

agent -> NATS -> NVE tables -> etcd IMA -> watch -> remote NVE, and back.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from agents.agent import AgentError
from ima.client import ImaError
from schemas.errors import ErrorCode
from schemas.messages import AddressEntry, VnRef
from tests.slice import Slice, running_slice

pytestmark = pytest.mark.integration

BLUE = VnRef(alias="blue")
RED = VnRef(alias="red")


def vnic(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"test/{label}"))


@pytest.fixture
async def cp(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> AsyncIterator[Slice]:
    async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                             vns=(("blue", "l2"), ("red", "l3"))) as s:
        yield s


def remote_has(cp: Slice, nve: str, entry: str) -> bool:
    return any(entry in r.entries for r in cp.nves[nve].core.remote.vns.values())


async def test_address_reaches_remote_nve_and_etcd_then_goes_away(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    hv3 = await cp.agent("hv3", "nve2")
    result = await hv1.connect(vnic("a"), "eth0", BLUE)
    assert result.tag in range(1, 4095)
    await hv3.connect(vnic("c"), "eth0", BLUE)  # nve2 now serves blue and watches it
    reply = await hv1.associate(vnic("a"), BLUE,
                                (AddressEntry(mac="02:00:00:00:00:0A", ips=("10.0.0.10",)),))
    assert reply.ima_ops == 2

    await cp.wait("nve2", lambda: remote_has(cp, "nve2", "mac/02:00:00:00:00:0a")
                  and remote_has(cp, "nve2", "ip/10.0.0.10"))
    keys = await cp.keys()
    mac_key = cp.ep.layout.mac(result.vn_name, "02:00:00:00:00:0a")
    assert orjson.loads(keys[mac_key])["nve"] == "nve1"
    assert orjson.loads(keys[mac_key])["underlay"] == "192.0.2.1"
    assert cp.ep.layout.ip(result.vn_name, "10.0.0.10") in keys

    await hv1.disassociate(vnic("a"), BLUE, (AddressEntry(mac="02:00:00:00:00:0a"),))
    await cp.wait("nve2", lambda: not remote_has(cp, "nve2", "mac/02:00:00:00:00:0a")
                  and not remote_has(cp, "nve2", "ip/10.0.0.10"))
    keys = await cp.keys()
    assert mac_key not in keys
    assert cp.ep.layout.ip(result.vn_name, "10.0.0.10") not in keys


async def test_nve_learns_only_vns_it_serves_and_stops_when_last_vnic_leaves(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    hv3 = await cp.agent("hv3", "nve2")
    await hv1.connect(vnic("a"), "eth0", BLUE)
    await hv1.associate(vnic("a"), BLUE, (AddressEntry(mac="02:00:00:00:00:01"),))
    red = await hv1.connect(vnic("a"), "eth0", RED)
    await hv1.associate(vnic("a"), RED, (AddressEntry(mac="02:00:00:00:00:02",
                                                      ips=("10.9.0.2",)),))
    blue = await hv3.connect(vnic("c"), "eth0", BLUE)
    await cp.wait("nve2", lambda: remote_has(cp, "nve2", "mac/02:00:00:00:00:01"))
    remote = cp.nves["nve2"].core.remote
    assert remote.serves(blue.vn_name)
    assert not remote.serves(red.vn_name)  # no local VNIC in red: not watched
    assert not remote_has(cp, "nve2", "mac/02:00:00:00:00:02")

    await hv3.disconnect(vnic("c"), BLUE)
    assert not remote.serves(blue.vn_name)
    assert remote.size() == 0
    assert blue.vn_name not in cp.nves["nve2"]._followers


async def test_shutdown_withdraws_everything_and_startup_restores(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    hv3 = await cp.agent("hv3", "nve2")
    await hv3.connect(vnic("c"), "eth0", BLUE)
    await hv1.connect(vnic("a"), "eth0", BLUE)
    entries = tuple(AddressEntry(mac=f"02:00:00:00:01:{i:02x}", ips=(f"10.1.0.{i}",))
                    for i in range(1, 11))
    await hv1.associate(vnic("a"), BLUE, entries)
    await cp.wait("nve2", lambda: cp.nves["nve2"].core.remote.size() == 20)
    txns_before = cp.nves["nve1"].counters["ima_txns"]

    reply = await hv1.shutdown(vnic("a"))
    assert reply.ima_ops == 20
    assert cp.nves["nve1"].counters["ima_txns"] - txns_before == 1  # <= ceil(20/128)
    await cp.wait("nve2", lambda: cp.nves["nve2"].core.remote.size() == 0)
    tables = cp.nves["nve1"].core.tables()
    assert tables["vnics"][vnic("a")]["state"] == "down"
    assert len(next(iter(tables["vnics"][vnic("a")]["vns"].values()))["macs"]) == 10

    await hv1.startup(vnic("a"))
    await cp.wait("nve2", lambda: cp.nves["nve2"].core.remote.size() == 20)


async def test_vnic_disassociate_removes_the_whole_tree_in_one_message(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(vnic("a"), "eth0", BLUE)
    await hv1.connect(vnic("a"), "eth0", RED)
    await hv1.associate(vnic("a"), BLUE, (AddressEntry(mac="02:00:00:00:00:01"),
                                          AddressEntry(mac="02:00:00:00:00:03")))
    await hv1.associate(vnic("a"), RED, (AddressEntry(mac="02:00:00:00:00:02",
                                                      ips=("10.2.0.1", "10.2.8.0/24")),))
    assert len([k for k in await cp.keys() if "/map/" in k]) == 5
    reply = await hv1.remove_vnic(vnic("a"))
    assert reply.ima_ops == 5 + 2  # 5 bindings, and nve1's attachments to BLUE and RED
    assert [k for k in await cp.keys() if "/map/" in k] == []
    assert cp.nves["nve1"].core.tables()["vnics"] == {}
    assert cp.nves["nve1"].core.tables()["ports"] == {}


async def test_tags_are_per_port(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    hv2 = await cp.agent("hv2", "nve1")
    red_on_hv1 = await hv1.connect(vnic("a"), "eth0", RED)
    blue_on_hv2 = await hv2.connect(vnic("b"), "eth0", BLUE)
    red_on_hv2 = await hv2.connect(vnic("b2"), "eth0", RED)
    # Same tag value on two ports, two different VNs; same VN, different tags.
    assert red_on_hv1.tag == blue_on_hv2.tag == 1
    assert red_on_hv2.tag == 2
    assert red_on_hv1.vni == red_on_hv2.vni


async def test_mac_unique_across_nves_in_a_vn(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    hv3 = await cp.agent("hv3", "nve2")
    await hv1.connect(vnic("a"), "eth0", BLUE)
    await hv3.connect(vnic("c"), "eth0", BLUE)
    await hv1.associate(vnic("a"), BLUE, (AddressEntry(mac="02:00:00:00:00:01"),))
    await cp.wait("nve2", lambda: remote_has(cp, "nve2", "mac/02:00:00:00:00:01"))
    before = await cp.keys()
    with pytest.raises(AgentError) as info:
        await hv3.associate(vnic("c"), BLUE, (AddressEntry(mac="02:00:00:00:00:05"),
                                              AddressEntry(mac="02:00:00:00:00:01")))
    assert info.value.code == ErrorCode.MAC_CONFLICT
    assert await cp.keys() == before  # the good entry in the refused message left no trace


async def test_agent_retransmission_is_applied_once(cp: Slice) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(vnic("a"), "eth0", BLUE)
    from schemas.messages import AddrAssociate

    msg = AddrAssociate(sender="hv1", seq=next(hv1._seq), vnic=vnic("a"), vn=BLUE,
                        entries=(AddressEntry(mac="02:00:00:00:00:01"),))
    first = await hv1.send(msg)
    again = await hv1.send(msg)
    assert first.ima_ops == 1
    assert again.ima_ops == 0
    assert cp.nves["nve1"].counters["replays"] == 1


async def test_vn_delete_is_refused_while_a_vnic_without_addresses_is_connected(
    cp: Slice,
) -> None:
    assert cp.client is not None
    green = VnRef(alias="green")
    await cp.client.create("green")
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(vnic("g"), "eth0", green)  # connected, no address yet
    with pytest.raises(ImaError) as refused:
        await cp.client.delete(green)
    assert refused.value.reply.code == ErrorCode.VN_IN_USE
    assert "nve1" in refused.value.reply.reason
    await hv1.disconnect(vnic("g"), green)  # the last VNIC left: the attachment goes
    await cp.client.delete(green)


async def test_a_deleted_vn_is_forgotten_by_nves_and_can_be_created_again(cp: Slice) -> None:
    assert cp.client is not None
    green = VnRef(alias="green")
    first = await cp.client.create("green")
    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(vnic("g"), "eth0", green)  # nve1 resolves and caches "green"
    await hv1.disconnect(vnic("g"), green)
    await cp.client.delete(green)
    nve1 = cp.nves["nve1"]
    await cp.wait("nve1", lambda: nve1.counters["vns_forgotten"] == 1)
    with pytest.raises(AgentError) as unknown:
        await hv1.connect(vnic("g"), "eth0", green)
    assert unknown.value.code == ErrorCode.UNKNOWN_VN
    second = await cp.client.create("green")
    assert second.vn.name != first.vn.name
    result = await hv1.connect(vnic("g"), "eth0", green)
    assert result.vn_name == second.vn.name  # not the deleted VN's cached record


async def test_tables_report_where_request_time_went(cp: Slice) -> None:
    """`stages_ms`: agent publish -> NVE picks it up, and -> its IMA writes are durable."""
    import time

    from schemas.operator import TablesQuery
    from schemas.wire import dumps

    hv1 = await cp.agent("hv1", "nve1")
    await hv1.connect(vnic("s"), "eth0", BLUE)
    await hv1.associate(vnic("s"), BLUE, (AddressEntry(mac="02:00:00:00:55:01"),))
    nc = cp._conns[0]
    subject = cp.ep.subjects.nve_tables("nve1")
    stages = orjson.loads((await nc.request(subject, b"{}", timeout=5)).data)["stages_ms"]
    assert stages["receive"]["n"] >= 2
    assert stages["commit"]["n"] >= 2
    assert 0 <= stages["commit"]["p50"] <= stages["commit"]["max"]
    later = dumps(TablesQuery(stages_since_ns=time.time_ns()))
    assert orjson.loads((await nc.request(subject, later, timeout=5)).data)["stages_ms"] == {
        "receive": {"n": 0}, "commit": {"n": 0}}
    bad = orjson.loads((await nc.request(subject, b'{"stages_since_ns": -1}', timeout=5)).data)
    assert bad["kind"] == "error"
    assert bad["code"] == "bad_message"
