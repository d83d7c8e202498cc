"""Draft 5: the NVE checks a hypervisor's claims against the IMA, not trusts them.

Placement (which hypervisor a VNIC runs on), VN membership, VNIC ownership,
anti-spoofing, reply subjects and per-hypervisor rate limits; real servers.

Every test runs twice (``cp`` is parametrized): on the plain stack, and on a secured
one (TLS, one NKey identity per process, etcd RBAC; ``tests/secured.py``). Each
hypervisor, the attacker included, speaks as its own identity (``hv:hv1``, ``hv:hv2``,
``hv:hv3``) on its own subjects, which nats-server allows: these claims are NATS-legal,
and it is the NVE that refuses them, on both stacks. The NVEs answer only into the
sender's own inbox (``AGENT_REPLY_PREFIX``, ``_INBOX_hv_<hv>.``) on both stacks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.msg import Msg

from agents.agent import AgentError, HypervisorAgent
from nvo3.security import AGENT_REPLY_PREFIX, hv_identity, inbox_prefix
from schemas.errors import ErrorCode
from schemas.messages import AddressEntry, VnAddresses, VnicShutdown, VnRef
from schemas.records import VnMembers
from schemas.wire import dumps
from tests.secured import (
    STACKS,
    Violations,
    request_counters,
    settle,
    start_on_stack,
)
from tests.slice import Slice

pytestmark = pytest.mark.integration

BLUE, RED = VnRef(alias="blue"), VnRef(alias="red")
A = str(uuid.uuid5(uuid.NAMESPACE_URL, "authz/a"))
B = str(uuid.uuid5(uuid.NAMESPACE_URL, "authz/b"))


@pytest.fixture(params=STACKS)
async def cp(request: pytest.FixtureRequest) -> AsyncIterator[Slice]:
    s = await start_on_stack(request, ("nve1", "nve2"), enforce_placement=True,
                             reply_prefix=AGENT_REPLY_PREFIX, rate_per_s=50.0, burst=50.0)
    try:
        assert s.client is not None
        await s.client.create("blue")
        # red admits only hv1, and only VNIC A.
        await s.client.create("red", members=VnMembers(hypervisors=("hv1",), vnics=(A,)))
        yield s
    finally:
        await s.stop()


async def agent(cp: Slice, hv: str, nve: str = "nve1") -> HypervisorAgent:
    """An agent whose NATS inbox is its own (``_INBOX_hv_<hv>``): on the secured stack
    it is the identity's, and the plain stack uses the same prefix."""
    ident = hv_identity(hv)
    nc = await cp.nats(hv, identity=ident, inbox_prefix=inbox_prefix(ident))
    return HypervisorAgent(hv, nve, nc, subjects=cp.ep.subjects, timeout=2.0, attempts=2)


async def placed(cp: Slice, vnic: str, hv: str) -> None:
    assert cp.client is not None
    await cp.client.place(vnic, hv)
    await cp.wait("nve1", lambda: cp.nves["nve1"].core.placements.get(vnic) == hv)
    await cp.wait("nve2", lambda: cp.nves["nve2"].core.placements.get(vnic) == hv)


async def test_vnic_claim_only_from_the_hypervisor_it_is_placed_on(cp: Slice) -> None:
    hv1, hv2 = await agent(cp, "hv1"), await agent(cp, "hv2")
    with pytest.raises(AgentError) as info:
        await hv1.connect(A, "eth0", BLUE)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED  # no placement yet
    await placed(cp, A, "hv1")
    with pytest.raises(AgentError) as info:
        await hv2.connect(A, "eth0", BLUE)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED
    assert A not in cp.nves["nve1"].core.vnics
    await hv1.connect(A, "eth0", BLUE)
    assert cp.nves["nve1"].core.vnics[A].hypervisor == "hv1"


async def test_migration_needs_the_placement_updated_first(cp: Slice) -> None:
    hv1, hv3 = await agent(cp, "hv1"), await agent(cp, "hv3", "nve2")
    await placed(cp, A, "hv1")
    await hv1.connect(A, "eth0", BLUE)
    vns = (VnAddresses(vn=BLUE, entries=(AddressEntry(mac="02:00:00:00:00:0a"),)),)
    with pytest.raises(AgentError) as info:
        await hv3.prepare(A, "eth0", vns)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED
    await placed(cp, A, "hv3")
    reply = await hv3.prepare(A, "eth0", vns)
    assert reply.results


async def test_vn_membership_policy(cp: Slice) -> None:
    hv1, hv2 = await agent(cp, "hv1"), await agent(cp, "hv2")
    await placed(cp, A, "hv1")
    await placed(cp, B, "hv1")
    await hv1.connect(A, "eth0", RED)
    with pytest.raises(AgentError) as info:
        await hv1.connect(B, "eth0", RED)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED  # VNIC not a member
    await placed(cp, B, "hv2")
    with pytest.raises(AgentError) as info:
        await hv2.connect(B, "eth0", RED)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED  # hypervisor not a member


async def test_a_hypervisor_cannot_act_on_another_ones_vnic_or_spoof_addresses(
    cp: Slice
) -> None:
    hv1, hv2 = await agent(cp, "hv1"), await agent(cp, "hv2")
    await placed(cp, A, "hv1")
    await placed(cp, B, "hv2")
    await hv1.connect(A, "eth0", BLUE)
    await hv1.associate(A, BLUE, (AddressEntry(mac="02:00:00:00:00:01",
                                               ips=("10.0.0.1",)),))
    await hv2.connect(B, "eth0", BLUE)
    for attempt in (hv2.shutdown(A), hv2.depart(A), hv2.remove_vnic(A),
                    hv2.disassociate(A, BLUE, (AddressEntry(mac="02:00:00:00:00:01"),))):
        with pytest.raises(AgentError) as info:
            await attempt
        assert info.value.code == ErrorCode.VNIC_OWNED_ELSEWHERE
    with pytest.raises(AgentError) as info:  # the MAC is bound elsewhere in the VN
        await hv2.associate(B, BLUE, (AddressEntry(mac="02:00:00:00:00:01"),))
    assert info.value.code == ErrorCode.MAC_CONFLICT
    with pytest.raises(AgentError) as info:  # so is the IP
        await hv2.associate(B, BLUE, (AddressEntry(mac="02:00:00:00:00:02",
                                                   ips=("10.0.0.1",)),))
    assert info.value.code == ErrorCode.IP_CONFLICT
    assert cp.nves["nve1"].core.vnics[A].state == "up"


async def test_reply_subject_into_another_clients_inbox_gets_no_answer(cp: Slice) -> None:
    await placed(cp, A, "hv1")
    hv1 = await agent(cp, "hv1")
    await hv1.connect(A, "eth0", BLUE)
    # hv2 (as itself: nats-server checks the subject, not the reply subject, of a
    # publish) asks on its own subject with a reply subject in hv1's inbox. The NVE may
    # answer any reply subject (allow_responses), so its reply-prefix check is what
    # refuses, on both stacks.
    attacker = (await agent(cp, "hv2")).nc
    victim_inbox = f"{inbox_prefix(hv_identity('hv1'))}.stolen"
    seen: list[bytes] = []

    async def collect(m: Msg) -> None:
        seen.append(m.data)

    victim = await hv1.nc.subscribe(victim_inbox, cb=collect)
    msg = VnicShutdown(sender="hv2", seq=1, vnic=A)
    await attacker.publish(cp.ep.subjects.hv_request("nve1", "hv2", "vnic_shutdown"),
                           dumps(msg), reply=victim_inbox)
    await attacker.flush()
    nve = cp.nves["nve1"]
    await cp.wait("nve1", lambda: nve.counters["refused_reply_subject"] == 1)
    await hv1.nc.flush()
    await victim.unsubscribe()
    assert seen == []
    assert nve.core.vnics[A].state == "up"


async def test_a_flooding_hypervisor_does_not_starve_the_others(cp: Slice) -> None:
    await placed(cp, A, "hv1")
    hv1 = await agent(cp, "hv1")
    await hv1.connect(A, "eth0", BLUE)
    # hv2 floods on its own subject (allowed by nats-server on the secured stack too),
    # with requests for a VNIC it does not have and no reply subject.
    errors = Violations()
    flood = await cp.nats("hv2", errors.record, identity=hv_identity("hv2"))
    junk = orjson.dumps({"v": 1, "kind": "vnic_shutdown", "sender": "hv2", "seq": 1,
                         "vnic": B})
    subject = cp.ep.subjects.hv_request("nve1", "hv2", "vnic_shutdown")
    for _ in range(2000):
        await flood.publish(subject, junk)
    # hv1 keeps being served while hv2 floods.
    for i in range(5):
        reply = await hv1.associate(A, BLUE, (AddressEntry(mac=f"02:00:00:00:01:{i:02x}"),))
        assert reply.ima_ops == 1
    await flood.flush()
    nve = cp.nves["nve1"]
    await cp.wait("nve1", lambda: nve.counters["errors.rate_limited"] >= 1900)
    assert nve.counters["errors.rate_limited"] + nve.counters["errors.unknown_vnic"] >= 2000
    if not cp.ep.secure:
        return
    # The rate limit is per hypervisor of the subject. On the plain stack any client
    # could send requests in hv1's name (its subject and sender) and spend hv1's budget;
    # with auth on, nats-server refuses hv2's publishes there, so the NVE never sees
    # them and hv1 is served at once.
    before = request_counters(nve)
    spoofed = cp.ep.subjects.hv_request("nve1", "hv1", "vnic_shutdown")
    as_hv1 = orjson.dumps({"v": 1, "kind": "vnic_shutdown", "sender": "hv1", "seq": 1,
                           "vnic": B})
    for _ in range(100):
        await flood.publish(spoofed, as_hv1)
    await settle(flood)
    violations = errors.publish()
    assert violations
    assert set(violations) == {f'nats: permissions violation for publish to "{spoofed}"'}
    assert request_counters(nve) == before
    reply = await hv1.associate(A, BLUE, (AddressEntry(mac="02:00:00:00:02:01"),))
    assert reply.ima_ops == 1
