"""The agent's resync keeps the NVE at the agent's intent, whatever the interleaving.

A full sync sent in parts must not roll back what happened between the parts.
``hv_sync`` goes in parts of ``chunk`` VNICs under one ``sync_id``. Every part
gets its own ``seq`` when it is sent, so a request the agent makes while an
earlier part is in flight is numbered (and applied) before the later parts.
Those parts must therefore be read from the desired state when they are sent:
built from the state at the start of the sync, they would undo that request,
and the sync's final sweep would remove a VNIC created meanwhile.

A request overtaken on its last try (``stale_seq``) is not a refusal: the newer
request that overtook it may carry its content, so the intent is kept and a
resync follows.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest

from agents.agent import NveUnreachable
from nvo3.check import gather_and_check
from schemas.messages import AddressEntry, HvSync, VnRef
from tests.slice import Slice, blue_slice_fixture

pytestmark = pytest.mark.integration

BLUE = VnRef(alias="blue")

cp = blue_slice_fixture(lease_ttl=5)


def vnic(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sync-parts/{label}"))


async def startup_sync_done(cp: Slice) -> None:
    """The sidecar's own start-up sync is applied: it cannot interleave with the test's."""
    nve1 = cp.nves["nve1"]
    await cp.wait("nve1", lambda: nve1.counters["messages.hv_sync"] >= 1)


async def test_requests_between_sync_parts_are_not_rolled_back(cp: Slice) -> None:
    svc = await cp.agent_service("hv1", "nve1")
    agent = svc.agent
    await startup_sync_done(cp)
    names = sorted(vnic(f"v{i}") for i in range(5))
    for i, name in enumerate(names):
        await agent.connect(name, "eth0", BLUE)
        await agent.associate(name, BLUE, (AddressEntry(mac=f"02:00:00:00:01:{i:02x}"),))
    latest, created = names[-1], vnic("created-during-the-sync")

    send = agent.send
    parts_sent = 0

    async def send_and_interleave(message: Any, nve: str | None = None) -> Any:
        nonlocal parts_sent
        reply = await send(message, nve)
        if isinstance(message, HvSync):
            parts_sent += 1
            if parts_sent == 1:  # between part 1 and part 2: a change, and a new VNIC
                await agent.associate(latest, BLUE, (AddressEntry(mac="02:00:00:00:02:01"),))
                await agent.connect(created, "eth0", BLUE)
                await agent.associate(created, BLUE, (AddressEntry(mac="02:00:00:00:02:02"),))
        return reply

    agent.send = send_and_interleave  # type: ignore[method-assign]
    await agent.sync("nve1", chunk=2)
    assert parts_sent == 3

    await cp.nves["nve1"].writer.flush()
    assert cp.store is not None
    report = (await gather_and_check(cp._conns[0], cp.store, cp.ep, ["hv1"])).as_dict()
    assert (report["lost"], report["stale"], report["wrong_vni"]) == (0, 0, 0), report
    local = str(cp.nves["nve1"].core.tables())
    assert "02:00:00:00:02:01" in local
    assert "02:00:00:00:02:02" in local


async def test_a_request_overtaken_on_its_last_try_is_kept_and_resynced(cp: Slice) -> None:
    """An hv_sync read after the intent was recorded overtook the request, which then came
    back ``stale_seq`` with no tries left. Rolling the intent back would leave the NVE
    holding what the sync delivered and the agent no longer wanting it, for good."""
    svc = await cp.agent_service("hv1", "nve1", attempts=1)
    agent, nve1 = svc.agent, cp.nves["nve1"]
    await startup_sync_done(cp)
    name = vnic("overtaken")
    await agent.connect(name, "eth0", BLUE)
    late_seq = next(agent._seq)  # numbered now, delivered after a newer request
    agent.desired.set_state(name, "down")  # the intent, recorded first ...
    await agent.sync("nve1")  # ... and carried by a sync that overtakes the request
    agent._seq = itertools.count(late_seq)
    resyncs = svc.counters["resyncs_after_unreachable"]
    with pytest.raises(NveUnreachable, match="overtaken"):
        await agent.shutdown(name)
    assert agent.desired.vnics[name].state == "down", "the intent was rolled back"
    await cp.wait("nve1", lambda: svc.counters["resyncs_after_unreachable"] > resyncs)
    assert nve1.core.tables()["vnics"][name]["state"] == "down"
    await nve1.writer.flush()
    assert cp.store is not None
    report = (await gather_and_check(cp._conns[0], cp.store, cp.ep, ["hv1"])).as_dict()
    assert (report["lost"], report["stale"], report["wrong_vni"]) == (0, 0, 0), report


async def test_unanswered_duplicates_are_counted_not_raised(cp: Slice) -> None:
    """Chaos publishes each answered request again; an unanswered duplicate (the NVE
    restarting) used to escape ``send`` and kill the agent sidecar's sync loop."""
    agent = await cp.agent("hv1", "nve1", timeout=0.2)
    await cp.stop_nve("nve2")  # nobody answers its subject any more
    await agent._duplicates(cp.ep.subjects.hv_request("nve2", "hv1", "vnic_startup"), b"{}", 2)
    assert agent.counters["duplicates_unanswered"] == 2
