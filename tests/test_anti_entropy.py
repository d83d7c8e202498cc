"""The NVE's periodic listing repairs, and counts, what a missed watch event left wrong.

Watches resume from the last revision they delivered, but chaos runs with etcd leader
kills showed remote tables missing events with no error anywhere (cause not found, see
docs/reliability.md). Each follower therefore lists its VN again every ``relist_s``
(jittered), replaces its entries with the listing, and counts the entries that changed
(``relist_repairs``): a missed event is repaired within that period and is visible.
"""

from __future__ import annotations

import uuid

import pytest

from agents.agent import HypervisorAgent
from schemas.messages import AddressEntry, VnRef
from tests.slice import Slice, running_slice

pytestmark = pytest.mark.integration

BLUE = VnRef(alias="blue")
MAC = "02:00:00:00:ae:01"


async def test_a_missed_watch_event_is_repaired_by_the_periodic_listing(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                             announce_s=0.2, relist_s=0.3) as cp:
        here: HypervisorAgent = await cp.agent("hv1", "nve1")
        there: HypervisorAgent = await cp.agent("hv3", "nve2")
        await here.connect(str(uuid.uuid4()), "eth0", BLUE)  # nve1 follows blue
        vnic = str(uuid.uuid4())
        await there.connect(vnic, "eth0", BLUE)
        await there.associate(vnic, BLUE, (AddressEntry(mac=MAC),))
        nve1 = cp.nves["nve1"]
        assert cp.client is not None
        vn = (await cp.client.get(BLUE)).name
        await cp.wait("nve1", lambda: _knows(cp, vn))
        del nve1.core.remote.vns[vn].entries[f"mac/{MAC}"]  # as if its put event was missed
        await cp.wait("nve1", lambda: _knows(cp, vn) and nve1.counters["relist_repairs"] >= 1)
        assert nve1.counters["periodic_relists"] >= 1


def _knows(cp: Slice, vn: str) -> bool:
    remote = cp.nves["nve1"].core.remote.vns.get(vn)
    return remote is not None and f"mac/{MAC}" in remote.entries


async def test_our_own_bindings_in_etcd_are_brought_back_to_what_we_publish(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    """A binding of ours that vanished from etcd is written again; one we do not
    publish (left behind) is deleted; both counted (``own_repairs``)."""
    async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                             ("nve1",), announce_s=0.2, relist_s=0.3) as cp:
        assert cp.client is not None
        assert cp.store is not None
        agent: HypervisorAgent = await cp.agent("hv1", "nve1")
        vnic = str(uuid.uuid4())
        await agent.connect(vnic, "eth0", BLUE)
        await agent.associate(vnic, BLUE, (AddressEntry(mac=MAC),))
        vn = (await cp.client.get(BLUE)).name
        ours = cp.ep.layout.mac(vn, MAC)
        stray = cp.ep.layout.mac(vn, "02:00:00:00:ae:99")
        kv = await cp.store.get(ours)
        assert kv is not None
        await cp.store.delete(ours)  # drifted away
        await cp.store.put(stray, kv.value.replace(MAC.encode(), b"02:00:00:00:ae:99"))
        nve1 = cp.nves["nve1"]
        deletes = nve1.counters["ima_deletes"]
        # The periodic listings wake the wait, so it sees the repairs committed.
        # ``owned`` still has the key at its first revision (the delete bypassed the
        # NVE): only a newer revision there says the put-back was committed.
        await cp.wait("nve1", lambda: nve1.counters["own_repairs"] >= 2
                      and nve1.writer.owned.get(ours, 0) > kv.mod_revision
                      and nve1.counters["ima_deletes"] > deletes)
        keys = await cp.keys()
        assert ours in keys
        assert stray not in keys


async def test_bindings_gone_with_our_lease_are_not_counted_as_drift(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    """After a lease loss every binding of ours is missing from the listing; the
    lease-loss path republishes them all, so the own-binding check must not also
    "repair" and count them (``own_repairs`` is for drifts nothing else explains)."""
    async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                             ("nve1",), announce_s=0.2, relist_s=0.2, lease_ttl=5) as cp:
        assert cp.store is not None
        agent: HypervisorAgent = await cp.agent("hv1", "nve1")
        vnic = str(uuid.uuid4())
        await agent.connect(vnic, "eth0", BLUE)
        await agent.associate(vnic, BLUE, tuple(AddressEntry(mac=f"02:00:00:00:af:{i:02x}")
                                                for i in range(1, 9)))
        nve1 = cp.nves["nve1"]
        await cp.wait("nve1", lambda: nve1.counters["own_checks"] >= 2)
        assert nve1.counters["own_repairs"] == 0
        await cp.store.revoke_lease(nve1.lease_id)  # etcd drops every binding of ours
        checks = nve1.counters["own_checks"]
        # Until the keepalive notices (up to a third of the TTL), checks see them missing.
        await cp.wait("nve1", lambda: nve1.counters["lease_lost"] >= 1
                      and nve1.counters["own_checks"] >= checks + 3)
        assert nve1.counters["own_repairs"] == 0
        assert nve1.counters["own_checks_lease_gone"] >= 1
