"""Nothing lost, nothing stale: restarts, crashes, compaction, and the checker.

Real nats-server and etcd; the crash test runs an NVE as its own process and
kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections import Counter, deque

import orjson
import pytest

from agents.agent import HypervisorAgent, NveUnreachable
from agents.service import AgentService
from ima.keys import KeyLayout
from ima.store import EtcdStore, Put
from nve.follower import VnFollower
from nve.remote import RemoteTable
from nvo3.check import gather_and_check
from schemas.messages import AddressEntry, VnRef
from tests.slice import WAIT, Slice, blue_slice_fixture, start_slice

pytestmark = pytest.mark.integration

BLUE = VnRef(alias="blue")


def vnic(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"recovery/{label}"))


cp = blue_slice_fixture(lease_ttl=2)


async def populate(svc: AgentService, label: str, n: int) -> None:
    agent = svc.agent
    await agent.connect(vnic(label), "eth0", BLUE)
    await agent.associate(vnic(label), BLUE, tuple(
        AddressEntry(mac=f"02:00:00:{n:02x}:00:{i:02x}", ips=(f"10.{n}.0.{i + 1}",))
        for i in range(n)))


async def checked(cp: Slice, agents: list[str]) -> dict[str, object]:
    assert cp.store is not None
    report = await gather_and_check(cp._conns[0], cp.store, cp.ep, agents)
    return report.as_dict()


async def converged(cp: Slice, agents: list[str]) -> dict[str, object]:
    """The checker's verdict once the system has quiesced (bounded wait)."""
    async with asyncio.timeout(WAIT):
        while True:
            for nve in cp.nves.values():
                await nve.writer.flush()
            result = await checked(cp, agents)
            if result["lost"] == result["stale"] == result["wrong_vni"] == 0:
                return result
            await asyncio.sleep(0.1)


async def restart_nve(cp: Slice, nve_id: str) -> None:
    old = await cp.stop_nve(nve_id)
    await cp.start_nve(nve_id, old.config.underlay, announce_s=0.2, lease_ttl=2)


async def test_nve_restart_is_resynced_from_agents(cp: Slice) -> None:
    hv1 = await cp.agent_service("hv1", "nve1")
    hv3 = await cp.agent_service("hv3", "nve2")
    await populate(hv1, "a", 4)
    await populate(hv3, "c", 3)
    assert (await converged(cp, ["hv1", "hv3"]))["lost"] == 0

    await restart_nve(cp, "nve1")  # graceful: lease revoked, tables gone, new epoch
    await cp.wait("nve1", lambda: len(cp.nves["nve1"].core.local_bindings()) == 8)
    result = await converged(cp, ["hv1", "hv3"])
    assert result["stale"] == 0
    assert hv1.counters["nve_restarts_seen"] == 1
    # The diff from empty, no more: 8 bindings and the VN attachment.
    assert cp.nves["nve1"].counters["ima_ops.hv_sync"] == 9


async def test_agent_restart_resends_state_and_changes_nothing(cp: Slice) -> None:
    hv1 = await cp.agent_service("hv1", "nve1")
    await populate(hv1, "a", 5)
    writes = cp.nves["nve1"].counters["ima_puts"] + cp.nves["nve1"].counters["ima_deletes"]
    again = HypervisorAgent("hv1", "nve1", await cp.nats("hv1-again"), subjects=cp.ep.subjects)
    again.desired = hv1.agent.desired  # the restarted agent reads the same inventory
    reply = await again.sync("nve1")
    assert reply.ima_ops == 0
    after = cp.nves["nve1"].counters["ima_puts"] + cp.nves["nve1"].counters["ima_deletes"]
    assert after == writes
    assert (await converged(cp, ["hv1"]))["lost"] == 0


async def test_event_emitted_while_nve_is_down_is_applied_when_it_is_back(cp: Slice) -> None:
    hv1 = await cp.agent_service("hv1", "nve1", timeout=0.2, attempts=2)
    await populate(hv1, "a", 2)
    old = await cp.stop_nve("nve1")
    with pytest.raises(NveUnreachable):
        await hv1.agent.associate(vnic("a"), BLUE, (AddressEntry(mac="02:00:00:00:99:99"),))
    await cp.start_nve("nve1", old.config.underlay, announce_s=0.2, lease_ttl=2)
    await cp.wait("nve1", lambda: ("02:00:00:00:99:99" in str(cp.nves["nve1"].core.tables())))
    assert (await converged(cp, ["hv1"]))["lost"] == 0


async def test_nve_crash_is_cleaned_from_remote_tables_within_the_lease_ttl(
    cp: Slice, tmp_path: object
) -> None:
    env = {**os.environ, "NVO3_NATS": ",".join(cp.ep.nats), "NVO3_ETCD": ",".join(cp.ep.etcd),
           "NVO3_KEY_ROOT": cp.ep.key_root, "NVO3_SUBJECT_ROOT": cp.ep.subject_root}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nvo3.cli", "nve", "run", "--id", "nve9", "--underlay",
        "192.0.2.9", "--lease-ttl", "2", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        hv9 = HypervisorAgent("hv9", "nve9", await cp.nats("hv9"), subjects=cp.ep.subjects,
                              timeout=1.0, attempts=20)
        await hv9.connect(vnic("z"), "eth0", BLUE)
        await hv9.associate(vnic("z"), BLUE, (AddressEntry(mac="02:00:00:00:09:09"),))
        hv3 = HypervisorAgent("hv3", "nve2", await cp.nats("hv3"), subjects=cp.ep.subjects)
        await hv3.connect(vnic("c"), "eth0", BLUE)
        nve2 = cp.nves["nve2"]
        await cp.wait("nve2", lambda: nve2.core.remote.size() == 1)
        loop = asyncio.get_running_loop()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed = loop.time()
        async with asyncio.timeout(2 + 3):  # lease TTL + slack
            await nve2.wait_until(lambda: nve2.core.remote.size() == 0)
        assert loop.time() - killed < 5
        keys = await cp.keys()
        assert not any("nve9" in k for k in keys)  # its liveness key is gone too
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_watcher_behind_a_compaction_relists(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    layout = KeyLayout(key_prefix)
    vn = str(uuid.uuid4())
    binding = {"v": 1, "vn": vn, "vni": 5, "vnic": str(uuid.uuid4()), "nve": "nve2",
               "underlay": "192.0.2.2"}
    async with EtcdStore(etcd_endpoints) as store:
        await store.put(layout.mac(vn, "02:00:00:00:00:01"),
                        orjson.dumps({**binding, "mac": "02:00:00:00:00:01"}))
        remote = RemoteTable("nve1")
        remote.start(vn)
        counters: Counter[str] = Counter()
        changed = asyncio.Event()
        follower = VnFollower(vn, store, layout, remote, counters, deque(), changed.set)
        stalled_at = await follower._relist(layout.map_prefix(vn))  # then the watcher stalls
        for i in range(2, 6):
            await store.commit([Put(layout.mac(vn, f"02:00:00:00:00:{i:02x}"),
                                    orjson.dumps({**binding, "mac": f"02:00:00:00:00:{i:02x}"}))])
        await store.compact(await store.current_revision())
        task = asyncio.create_task(follower.run(resume_from=stalled_at + 1))
        try:
            async with asyncio.timeout(WAIT):
                while remote.size() < 5:
                    changed.clear()
                    await changed.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert counters["relists_after_compaction"] == 1


async def test_checker_finds_lost_and_stale(cp: Slice) -> None:
    hv1 = await cp.agent_service("hv1", "nve1")
    await populate(hv1, "a", 2)
    assert (await converged(cp, ["hv1"]))["lost"] == 0
    from tests.test_cli import nvo3

    rc, out, err = await nvo3(cp, "check", "--json")
    assert rc == 0, err
    assert orjson.loads(out)["lost"] == 0
    assert cp.store is not None
    name = next(iter(cp.nves["nve1"].core.vn_members))
    fake = {"v": 1, "vn": name, "vni": 1, "mac": "02:00:00:00:de:ad", "vnic": str(uuid.uuid4()),
            "nve": "nve7", "underlay": "192.0.2.7"}
    await cp.store.put(cp.ep.layout.mac(name, "02:00:00:00:de:ad"), orjson.dumps(fake))
    await cp.store.delete(cp.ep.layout.ip(name, "10.2.0.1"))
    await cp.wait("nve1", lambda: "02:00:00:00:de:ad" in str(cp.nves["nve1"].core.tables()))
    result = await checked(cp, ["hv1"])
    diffs = result["differences"]
    assert result["lost"] == 1, diffs  # the deleted IP, in the IMA
    assert result["stale"] == 2, diffs  # the planted MAC: in the IMA and nve1's remote table
    assert result["wrong_vni"] == 2, diffs
    rc, out, _ = await nvo3(cp, "check")
    assert rc == 1
    assert b"lost=1 stale=2 wrong_vni=2" in out


async def test_check_members_reads_every_etcd_endpoint_on_its_own(cp: Slice) -> None:
    """``nvo3 check --members``: the etcd members compared, key by key (one here)."""
    hv1 = await cp.agent_service("hv1", "nve1")
    await populate(hv1, "a", 1)
    await converged(cp, ["hv1"])
    from tests.test_cli import nvo3

    rc, out, err = await nvo3(cp, "check", "--members", "--json")
    assert rc == 0, err
    assert orjson.loads(out)["etcd_members"] == []
    rc, out, _ = await nvo3(cp, "check", "--members")
    assert rc == 0
    assert b"etcd members: 1 read one by one, they agree" in out


async def test_lost_lease_is_retaken_and_bindings_republished(cp: Slice) -> None:
    hv1 = await cp.agent_service("hv1", "nve1")
    await populate(hv1, "a", 3)
    nve1 = cp.nves["nve1"]
    old_lease = nve1.lease_id
    assert cp.store is not None
    # What a pause longer than the TTL looks like from etcd: the lease is gone.
    await cp.store.revoke_lease(old_lease)
    await cp.wait("nve1", lambda: nve1.counters["lease_lost"] == 1)
    assert nve1.lease_id != old_lease
    result = await converged(cp, ["hv1"])
    assert result["stale"] == 0
    keys = await cp.keys()
    assert cp.ep.layout.nve("nve1") in keys


async def test_requests_dropped_by_a_slow_consumer_trigger_a_counted_resync(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    s = await start_slice(nats_urls, etcd_endpoints, key_prefix, subject_root, ("nve1",),
                          announce_s=0.2, pending_limit=4)
    try:
        assert s.client is not None
        await s.client.create("blue")
        hv1 = await s.agent_service("hv1", "nve1")
        await populate(hv1, "a", 2)
        flood = s._conns[0]
        junk = orjson.dumps({"v": 1, "kind": "vnic_shutdown", "sender": "hv8", "seq": 1,
                             "vnic": vnic("x")})
        for _ in range(3000):  # far more than the NVE's 4-message buffer
            await flood.publish(s.ep.subjects.hv_request("nve1", "hv8", "vnic_shutdown"), junk)
        await flood.flush()
        nve = s.nves["nve1"]
        await s.wait("nve1", lambda: nve.counters["slow_consumer_drops"] > 0)
        await s.wait("nve1", lambda: hv1.counters["resyncs_after_drops"] > 0)
        assert (await converged(s, ["hv1"]))["lost"] == 0
    finally:
        await s.stop()


async def test_warm_restart_resumes_watches_instead_of_relisting(
    cp: Slice, tmp_path: object
) -> None:
    import pathlib

    state = str(pathlib.Path(str(tmp_path)) / "nve1.state")
    await cp.stop_nve("nve1")
    await cp.start_nve("nve1", "192.0.2.1", announce_s=0.2, lease_ttl=2, state_file=state)
    hv1 = await cp.agent_service("hv1", "nve1")
    hv3 = await cp.agent_service("hv3", "nve2")
    await populate(hv3, "c", 3)  # remote bindings for nve1
    await hv1.agent.connect(vnic("a"), "eth0", BLUE)
    await cp.wait("nve1", lambda: cp.nves["nve1"].core.remote.size() == 6)

    old = await cp.stop_nve("nve1")  # graceful stop writes the state file
    assert await asyncio.to_thread(os.path.exists, state)
    await populate(hv3, "d", 1)  # changes while nve1 is down: the watch must catch them
    new = await cp.start_nve("nve1", old.config.underlay, announce_s=0.2, lease_ttl=2,
                             state_file=state)
    await cp.wait("nve1", lambda: new.core.remote.size() == 8)
    assert new.counters["warm_resumes"] == 1
    assert new.counters["relists"] == 0  # resumed from the saved revision: no listing
    assert (await converged(cp, ["hv1", "hv3"]))["lost"] == 0


async def test_an_overtaken_request_is_resent_and_then_the_state_resynced(cp: Slice) -> None:
    """A request refused as stale_seq is renumbered and applied after the newer one that
    overtook it; the agent then resyncs its desired state, so the NVE ends as intended.
    (Found by `make chaos`: a retransmitted shutdown landed after the startup.)"""
    from schemas.messages import VnicShutdown

    svc = await cp.agent_service("hv1", "nve1")
    agent, nve1 = svc.agent, cp.nves["nve1"]
    await populate(svc, "a", 1)
    late = VnicShutdown(vnic=vnic("a"), **agent._envelope())  # numbered before ...
    await agent.shutdown(vnic("a"))
    await agent.startup(vnic("a"))  # ... these two, which are applied first
    resyncs = svc.counters["resyncs_after_unreachable"]
    await agent.send(late, "nve1")  # stale_seq, renumbered, applied: the VNIC goes down
    assert agent.counters["resyncs_after_stale_seq"] == 1
    await cp.wait("nve1", lambda: svc.counters["resyncs_after_unreachable"] > resyncs)
    await cp.wait("nve1", lambda: nve1.core.tables()["vnics"][vnic("a")]["state"] == "up")
    assert (await converged(cp, ["hv1"]))["lost"] == 0


async def test_a_retransmission_is_answered_only_once_the_original_is_durable(
    cp: Slice,
) -> None:
    """A replay of a request whose IMA writes are still being committed waits for them:
    an early "ok" would tell the agent the IMA has what it may never get."""
    from nats.errors import TimeoutError as NatsTimeout

    from nve.writer import WriteOp, WriteReport
    from schemas.messages import AddrAssociate, OkReply
    from schemas.wire import decode_reply, dumps

    nve1 = cp.nves["nve1"]
    agent = await cp.agent("hv1", "nve1")
    await agent.connect(vnic("r"), "eth0", BLUE)
    gate = asyncio.Event()
    submit, held = nve1.writer.submit, []

    async def slow_submit(ops: list[WriteOp]) -> asyncio.Future[WriteReport]:
        real = await submit(ops)
        if not ops:
            return real
        late: asyncio.Future[WriteReport] = asyncio.get_running_loop().create_future()

        async def release() -> None:
            await gate.wait()
            late.set_result(await real)

        held.append(asyncio.create_task(release()))
        return late

    nve1.writer.submit = slow_submit  # type: ignore[method-assign]
    request = AddrAssociate(vnic=vnic("r"), vn=BLUE,
                            entries=(AddressEntry(mac="02:00:00:00:77:77"),),
                            **agent._envelope())
    subject = cp.ep.subjects.hv_request("nve1", "hv1", "addr_associate")
    with pytest.raises(NatsTimeout):  # the original: its writes are held back
        await agent.nc.request(subject, dumps(request), timeout=0.3)
    replay = asyncio.create_task(agent.nc.request(subject, dumps(request), timeout=10))
    await cp.wait("nve1", lambda: nve1.counters["replays"] == 1)
    # Proving an absence needs a bound: an early answer would come within a few ms.
    finished, _ = await asyncio.wait([replay], timeout=0.5)
    assert not finished  # not answered before the original's writes are durable
    gate.set()
    reply = decode_reply((await replay).data)
    assert isinstance(reply, OkReply)
    blue = next(iter(nve1.core.vnics[vnic("r")].vns))
    assert cp.ep.layout.mac(blue, "02:00:00:00:77:77") in await cp.keys()
    await asyncio.gather(*held)
