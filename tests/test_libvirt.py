"""VNICs from libvirt domain events (agents/libvirt_source.py).

Pure tests of the mapping (domain XML -> VNICs, lifecycle event -> intent), a
check of what libvirt's test driver (test:///default, in-process, no libvirtd)
emits, and integration tests in which real libvirt events drive a real agent
against real NVEs, nats-server and etcd.  The test driver cannot migrate, so
migration is driven with the events libvirt's QEMU driver emits, as
synthetic tuples through the same adapter.

libvirt takes one event loop implementation per process; each test closes
its connections with ``close_connection``, so the next test's event loop can
take it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import orjson
import pytest

from agents.libvirt_source import (
    NVO3_NS,
    VNIC_NAMESPACE,
    Decision,
    DomainEvent,
    Event,
    Intent,
    LibvirtSource,
    Phase,
    Resumed,
    Started,
    Stopped,
    close_connection,
    decide,
    open_connection,
    plan_domain,
    serve,
    vn_ref,
    vnic_name,
)
from agents.service import AgentService
from schemas.messages import VnRef
from tests.slice import WAIT, Slice, start_slice

DOM_UUID = "0b7d3c7e-4a55-4c2b-9d0e-6f1a2b3c4d5e"
S, R, P, ST = Started, Resumed, Stopped, Event.STOPPED


def domain_xml(name: str, dom_uuid: str | None = None, *, extra: str = "",
               metadata: bool = True) -> str:
    """A test-driver domain: one VNIC on libvirt network ``blue``, one described by
    nvo3 metadata on VN ``red`` (L3, with its IP) and port eth1."""
    meta = f"""<metadata><nvo3:vnics xmlns:nvo3="{NVO3_NS}">
        <nvo3:interface mac="52:54:00:10:00:02" vn="red" port="eth1">
          <nvo3:ip address="10.2.0.12"/><nvo3:ip address="10.2.100.0/28"/>
        </nvo3:interface></nvo3:vnics></metadata>""" if metadata else ""
    return f"""<domain type='test'>
      <name>{name}</name>{f'<uuid>{dom_uuid}</uuid>' if dom_uuid else ''}{meta}
      <memory>65536</memory><os><type>hvm</type></os>
      <devices>
        <interface type='network'><mac address='52:54:00:10:00:01'/>
          <source network='blue'/></interface>
        <interface type='bridge'><mac address='52:54:00:10:00:02'/>
          <source bridge='br0'/><ip address='10.2.0.11' prefix='24'/></interface>
        {extra}
      </devices></domain>"""


# ------------------------------------------------------------------ domain XML


def test_plan_domain_maps_interfaces_to_vnics() -> None:
    xml = domain_xml("web-1", DOM_UUID, extra="""
        <interface type='bridge'><mac address='52:54:00:10:00:03'/>
          <source bridge='br1'/></interface>
        <interface type='network'><mac address='01:00:5e:00:00:01'/>
          <source network='blue'/></interface>""")
    plan = plan_domain(xml, default_port="uplink0")
    assert (plan.uuid, plan.name) == (DOM_UUID, "web-1")
    blue, red = plan.vnics
    assert blue.name == str(uuid.uuid5(VNIC_NAMESPACE, f"{DOM_UUID}/52:54:00:10:00:01"))
    assert (blue.mac, blue.port, blue.vn, blue.ips, blue.source) == (
        "52:54:00:10:00:01", "uplink0", VnRef(alias="blue"), (), "network")
    # metadata names the VN and the port; IPs from the interface and the metadata
    assert (red.port, red.vn, red.source) == ("eth1", VnRef(alias="red"), "metadata")
    assert red.ips == ("10.2.0.11", "10.2.0.12", "10.2.100.0/28")
    assert red.spec().vns[0].addresses[0].ips == red.ips
    skipped = dict(plan.skipped)
    assert "no network, no nvo3 metadata" in skipped["52:54:00:10:00:03"]
    assert "group" in skipped["01:00:5e:00:00:01"]


def test_vnic_names_are_stable_per_domain_and_mac() -> None:
    assert vnic_name(DOM_UUID.upper(), "52-54-00-10-00-01") == vnic_name(
        DOM_UUID, "52:54:00:10:00:01")
    other = "11111111-2222-3333-4444-555555555555"
    assert vnic_name(other, "52:54:00:10:00:01") != vnic_name(DOM_UUID, "52:54:00:10:00:01")
    # the same domain on another host (after a migration) has the same VNIC Names
    assert [v.name for v in plan_domain(domain_xml("a", DOM_UUID)).vnics] == [
        v.name for v in plan_domain(domain_xml("a-renamed", DOM_UUID)).vnics]


def test_metadata_overrides_and_bad_values_skip_only_their_interface() -> None:
    name = "6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a01"
    vn_name = "5a0c2b3e-1111-4222-8333-944455556666"
    xml = f"""<domain type='test'><name>m</name><uuid>{DOM_UUID}</uuid>
      <metadata><v:vnics xmlns:v="{NVO3_NS}">
        <v:interface mac="52:54:00:20:00:01" vn="42" name="{name}"/>
        <v:interface mac="52:54:00:20:00:02" vn="{vn_name}"/>
        <v:interface mac="52:54:00:20:00:03" vn="blue" port="not a port"/>
        <v:interface mac="52:54:00:20:00:04" vn="blue"><v:ip address="10.0.0.1/8"/></v:interface>
        <v:interface mac="52:54:00:20:00:05"/>
      </v:vnics></metadata>
      <devices>{''.join(f"<interface type='ethernet'><mac address='52:54:00:20:00:0{i}'/>"
                        "</interface>" for i in range(1, 6))}</devices></domain>"""
    plan = plan_domain(xml)
    assert [(v.name, v.vn) for v in plan.vnics] == [
        (name, VnRef(id=42)), (vnic_name(DOM_UUID, "52:54:00:20:00:02"), VnRef(name=vn_name))]
    skipped = dict(plan.skipped)
    assert set(skipped) == {"52:54:00:20:00:03", "52:54:00:20:00:04", "52:54:00:20:00:05"}
    assert "port" in skipped["52:54:00:20:00:03"]
    assert "host bits" in skipped["52:54:00:20:00:04"]
    assert "no vn" in skipped["52:54:00:20:00:05"]


def test_vn_ref_reads_like_agent_ctl() -> None:
    assert vn_ref("7") == VnRef(id=7)
    assert vn_ref(" Blue ") == VnRef(alias="blue")
    assert vn_ref(DOM_UUID.upper()) == VnRef(name=DOM_UUID)


# ------------------------------------------------------------- events -> intent


def test_event_numbers_are_libvirts() -> None:
    for enum, prefix in ((Event, "VIR_DOMAIN_EVENT_"), (Started, "VIR_DOMAIN_EVENT_STARTED_"),
                         (Resumed, "VIR_DOMAIN_EVENT_RESUMED_"),
                         (Stopped, "VIR_DOMAIN_EVENT_STOPPED_")):
        for member in enum:
            assert getattr(libvirt, prefix + member.name) == member.value, member


@pytest.mark.parametrize(("event", "detail", "phase", "persistent", "expected"), [
    (Event.STARTED, S.BOOTED, Phase.ABSENT, True, (Intent.START, Phase.RUNNING, True)),
    (Event.STARTED, S.RESTORED, Phase.STOPPED, True, (Intent.START, Phase.RUNNING, True)),
    (Event.STARTED, S.MIGRATED, Phase.ABSENT, False, (Intent.PREPARE, Phase.PREPARED, False)),
    (Event.RESUMED, R.MIGRATED, Phase.PREPARED, False, (Intent.ARRIVE, Phase.RUNNING, False)),
    (Event.RESUMED, R.POSTCOPY, Phase.PREPARED, False, (Intent.ARRIVE, Phase.RUNNING, False)),
    (Event.RESUMED, R.MIGRATED, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),
    (Event.RESUMED, R.UNPAUSED, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),
    (ST, P.DESTROYED, Phase.RUNNING, True, (Intent.SHUTDOWN, Phase.STOPPED, True)),
    (ST, P.SHUTDOWN, Phase.RUNNING, True, (Intent.SHUTDOWN, Phase.STOPPED, True)),
    (ST, P.SAVED, Phase.RUNNING, True, (Intent.SHUTDOWN, Phase.STOPPED, True)),
    (ST, P.CRASHED, Phase.RUNNING, True, (Intent.SHUTDOWN, Phase.STOPPED, True)),
    (ST, P.DESTROYED, Phase.RUNNING, False, (Intent.REMOVE, Phase.ABSENT, False)),
    (ST, P.FAILED, Phase.PREPARED, False, (Intent.REMOVE, Phase.ABSENT, False)),
    (ST, P.MIGRATED, Phase.RUNNING, True, (Intent.DEPART, Phase.ABSENT, True)),
    (ST, P.MIGRATED, Phase.STOPPED, True, (Intent.IGNORE, Phase.ABSENT, True)),
    (ST, P.DESTROYED, Phase.ABSENT, True, (Intent.IGNORE, Phase.ABSENT, True)),
    (ST, P.DESTROYED, Phase.STOPPED, True, (Intent.IGNORE, Phase.STOPPED, True)),
    (Event.UNDEFINED, 0, Phase.STOPPED, True, (Intent.REMOVE, Phase.ABSENT, True)),
    (Event.UNDEFINED, 0, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, False)),
    (Event.UNDEFINED, 0, Phase.ABSENT, True, (Intent.IGNORE, Phase.ABSENT, True)),
    (Event.DEFINED, 0, Phase.RUNNING, False, (Intent.IGNORE, Phase.RUNNING, True)),
    (Event.DEFINED, 0, Phase.ABSENT, True, (Intent.IGNORE, Phase.ABSENT, True)),
    (Event.SUSPENDED, 1, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),
    (Event.SHUTDOWN, 0, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),
    (Event.CRASHED, 0, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),
    (Event.PMSUSPENDED, 0, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),
    (99, 0, Phase.RUNNING, True, (Intent.IGNORE, Phase.RUNNING, True)),  # a future event
])
def test_decide(event: int, detail: int, phase: Phase, persistent: bool,
                expected: tuple[Intent, Phase, bool]) -> None:
    assert decide(event, detail, phase, persistent) == Decision(*expected)


def run_events(events: list[tuple[int, int]], phase: Phase = Phase.ABSENT,
               persistent: bool = True) -> list[Intent]:
    intents = []
    for event, detail in events:
        d = decide(event, detail, phase, persistent)
        intents.append(d.intent)
        phase, persistent = d.phase, d.persistent
    return intents


def test_event_sequences() -> None:
    i = Intent
    # a persistent domain as the test driver reports it (see the test below)
    assert run_events([(Event.DEFINED, 0), (Event.STARTED, S.BOOTED), (ST, P.DESTROYED),
                       (Event.STARTED, S.BOOTED), (ST, P.SHUTDOWN), (Event.UNDEFINED, 0)]) == [
        i.IGNORE, i.START, i.SHUTDOWN, i.START, i.SHUTDOWN, i.REMOVE]
    # a transient domain (createXML): no definition, gone when it stops
    assert run_events([(Event.STARTED, S.BOOTED), (ST, P.DESTROYED)],
                      persistent=False) == [i.START, i.REMOVE]
    # a running domain undefined: it turns transient and keeps running
    assert run_events([(Event.STARTED, S.BOOTED), (Event.UNDEFINED, 0),
                       (ST, P.SHUTDOWN)]) == [i.START, i.IGNORE, i.REMOVE]
    # live migration as QEMU reports it. Source: paused, then gone.
    assert run_events([(Event.SUSPENDED, 1), (ST, P.MIGRATED), (Event.UNDEFINED, 0)],
                      Phase.RUNNING) == [i.IGNORE, i.DEPART, i.IGNORE]
    # destination: started paused for the incoming migration, then resumed
    assert run_events([(Event.STARTED, S.MIGRATED), (Event.RESUMED, R.MIGRATED),
                       (Event.DEFINED, 0)], persistent=False) == [i.PREPARE, i.ARRIVE, i.IGNORE]
    # post-copy: running on the destination at the switch-over already
    assert run_events([(Event.STARTED, S.MIGRATED), (Event.RESUMED, R.POSTCOPY),
                       (Event.RESUMED, R.MIGRATED)]) == [i.PREPARE, i.ARRIVE, i.IGNORE]
    # a failed migration: the destination drops the prepared VNIC, the source resumes
    assert run_events([(Event.STARTED, S.MIGRATED), (ST, P.FAILED)]) == [i.PREPARE, i.REMOVE]
    assert run_events([(Event.SUSPENDED, 1), (Event.RESUMED, R.UNPAUSED)],
                      Phase.RUNNING) == [i.IGNORE, i.IGNORE]


# ----------------------------------------------------- libvirt's test driver


@pytest.fixture
async def conn() -> AsyncIterator[Any]:
    """A connection to test:///default; when the last one closes, its state is dropped."""
    c = open_connection("test:///default")
    try:
        yield c
    finally:
        await close_connection(c)


async def test_what_the_test_driver_emits(conn: Any) -> None:
    events: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
    cb = conn.domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        lambda _c, dom, event, detail, _o: events.put_nowait((dom.name(), event, detail)), None)
    try:
        dom = conn.defineXML(domain_xml("probe"))
        dom.create()
        dom.suspend()
        dom.resume()
        dom.shutdown()
        dom.create()
        dom.destroy()
        dom.undefine()
        conn.createXML(domain_xml("probe-transient"), 0).destroy()
        seen = [await asyncio.wait_for(events.get(), WAIT) for _ in range(10)]
        mig = conn.createXML(domain_xml("probe-mig"), 0)
        with pytest.raises(libvirt.libvirtError, match="not supported"):
            mig.migrate(conn, 0, None, None, 0)
        mig.destroy()
    finally:
        conn.domainEventDeregisterAny(cb)
    E = Event
    assert seen == [
        ("probe", E.DEFINED, 0), ("probe", E.STARTED, S.BOOTED), ("probe", E.SUSPENDED, 0),
        ("probe", E.RESUMED, R.UNPAUSED), ("probe", ST, P.SHUTDOWN),
        ("probe", E.STARTED, S.BOOTED), ("probe", ST, P.DESTROYED), ("probe", E.UNDEFINED, 0),
        ("probe-transient", E.STARTED, S.BOOTED), ("probe-transient", ST, P.DESTROYED)]


async def test_a_swallowed_cancellation_still_stops_the_source(conn: Any) -> None:
    """Python 3.11's wait_for (in nats-py's request) can return a reply and drop a
    cancellation that arrives with it; the source must stop all the same."""
    entered = asyncio.Event()

    class Agent:  # the one call the scan makes for "test"'s VNIC, swallowing the cancel
        desired = types.SimpleNamespace(vnics={})

        async def connect(self, *_: Any) -> None:
            entered.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(WAIT)

        async def associate(self, *_: Any) -> None:
            pass

    source = LibvirtSource(Agent(), conn)  # type: ignore[arg-type]
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(entered.wait(), WAIT)
        task.cancel()
        await asyncio.wait({task}, timeout=WAIT)  # not `await task`: that passes a cancel on
        assert task.done(), "the source went on waiting for libvirt events"
        assert task.cancelled()
        assert source.counters["op:connect"] == 1  # the call did return normally
    finally:
        task.cancel()


# ------------------------------------------------------- against real NVEs


@pytest.fixture
async def cp(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> AsyncIterator[Slice]:
    s = await start_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                          hold_s=1.0, tick_s=0.05)  # a departed VNIC goes within a second
    try:
        assert s.client is not None
        await s.client.create("blue", service="l2")
        await s.client.create("red", service="l3")
        observer = await s.agent("hv3", "nve2")  # nve2 serves both VNs: it learns hv1's
        await observer.connect(str(uuid.uuid4()), "eth0", VnRef(alias="blue"))
        await observer.connect(str(uuid.uuid4()), "eth0", VnRef(alias="red"))
        yield s
    finally:
        await s.stop()


def vnics_of(cp: Slice, nve: str, hv: str) -> dict[str, Any]:
    return {k: v for k, v in cp.nves[nve].core.tables()["vnics"].items()
            if v["hypervisor"] == hv}


def remote_has(cp: Slice, nve: str, entry: str) -> bool:
    return any(entry in r.entries for r in cp.nves[nve].core.remote.vns.values())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.integration
async def test_domain_lifecycle_drives_the_agent(cp: Slice, conn: Any) -> None:
    hv1 = await cp.agent("hv1", "nve1")
    source = LibvirtSource(hv1, open_connection("test:///default"), default_port="eth0")
    task = asyncio.create_task(serve(AgentService(hv1), source))
    try:
        # test:///default runs a domain "test" on libvirt network "default": no such VN
        async with asyncio.timeout(WAIT):
            await source.wait_until(lambda: source.counters["refused:unknown_vn"] == 1)
        dom = conn.defineXML(domain_xml("web-1", DOM_UUID))
        blue = vnic_name(DOM_UUID, "52:54:00:10:00:01")
        red = vnic_name(DOM_UUID, "52:54:00:10:00:02")

        dom.create()  # STARTED/BOOTED: vn_connect + addr_associate per VNIC [4.1, 4.2]
        await cp.wait("nve1", lambda: {
            k: (v["state"], v["port"]) for k, v in vnics_of(cp, "nve1", "hv1").items()} == {
                blue: ("up", "eth0"), red: ("up", "eth1")})
        await cp.wait("nve2", lambda: remote_has(cp, "nve2", "mac/52:54:00:10:00:01")
                   and remote_has(cp, "nve2", "ip/10.2.0.12")
                   and remote_has(cp, "nve2", "ip/10.2.100.0_28"))
        tables = vnics_of(cp, "nve1", "hv1")
        assert next(iter(tables[red]["vns"].values()))["macs"] == {
            "52:54:00:10:00:02": ["10.2.0.11", "10.2.0.12", "10.2.100.0/28"]}
        keys = await cp.keys()
        red_vn = next(iter(tables[red]["vns"]))
        assert orjson.loads(keys[cp.ep.layout.ip(red_vn, "10.2.0.12")])["nve"] == "nve1"

        dom.destroy()  # STOPPED/DESTROYED, persistent: vnic_shutdown [4.4]
        await cp.wait("nve1", lambda: [v["state"] for v in vnics_of(
            cp, "nve1", "hv1").values()] == ["down", "down"])
        await cp.wait("nve2", lambda: not remote_has(cp, "nve2", "mac/52:54:00:10:00:01")
                   and not remote_has(cp, "nve2", "ip/10.2.0.12"))
        assert cp.ep.layout.ip(red_vn, "10.2.0.12") not in await cp.keys()

        dom.create()  # again: vnic_startup re-publishes [4.4]
        await cp.wait("nve2", lambda: remote_has(cp, "nve2", "mac/52:54:00:10:00:01")
                   and remote_has(cp, "nve2", "ip/10.2.0.12"))
        async with asyncio.timeout(WAIT):  # nve2 may learn before hv1 has both replies
            await source.wait_until(lambda: source.counters["op:startup"] == 2)
        assert [v["state"] for v in vnics_of(cp, "nve1", "hv1").values()] == ["up", "up"]

        dom.destroy()
        dom.undefine()  # UNDEFINED of a stopped domain: vnic_disassociate [3.1]
        await cp.wait("nve1", lambda: not vnics_of(cp, "nve1", "hv1"))
        assert blue not in hv1.desired.vnics
        assert red not in hv1.desired.vnics

        # a transient domain is gone when it stops: its VNICs are removed, not shut down
        other = conn.createXML(domain_xml("tmp-1", metadata=False), 0)
        gone = vnic_name(other.UUIDString(), "52:54:00:10:00:01")
        await cp.wait("nve1", lambda: list(vnics_of(cp, "nve1", "hv1")) == [gone])
        # without metadata, the bridge interface is not managed (red needs an IP anyway)
        assert source.counters["skipped_interfaces"] == 1
        other.destroy()
        await cp.wait("nve1", lambda: not vnics_of(cp, "nve1", "hv1"))
        assert source.counters["refused:unknown_vn"] == 1  # only "test"'s VNIC, once
        assert not source.domains.keys() - {conn.lookupByName("test").UUIDString()}
    finally:
        await stop(task)
    assert source.conn is None  # serve() closed its connection


@pytest.mark.integration
async def test_cross_nve_migration_from_qemu_events(cp: Slice) -> None:
    """The events libvirt's QEMU driver emits for a live migration hv1/nve1 -> hv3/nve2
    (the test driver cannot migrate): pre-arrival, arrival, departure [4.4]."""
    xml = domain_xml("db-1", DOM_UUID)
    src = LibvirtSource(await cp.agent("hv1", "nve1"))
    dst = LibvirtSource(await cp.agent("hv3", "nve2"))
    blue = vnic_name(DOM_UUID, "52:54:00:10:00:01")
    red = vnic_name(DOM_UUID, "52:54:00:10:00:02")

    def ev(event: int, detail: int = 0) -> DomainEvent:
        return DomainEvent(DOM_UUID, "db-1", event, detail)

    await src.handle(ev(Event.STARTED, S.BOOTED), xml, persistent=True)
    assert set(vnics_of(cp, "nve1", "hv1")) == {blue, red}
    writes_before = cp.nves["nve2"].counters["ima_claims"]

    d = await dst.handle(ev(Event.STARTED, S.MIGRATED), xml, persistent=False)
    assert d.intent == Intent.PREPARE
    assert {k: v["state"] for k, v in vnics_of(cp, "nve2", "hv3").items()
            if k in (blue, red)} == {blue: "prepared", red: "prepared"}
    assert (await src.handle(ev(Event.SUSPENDED, 1))).intent == Intent.IGNORE
    assert (await dst.handle(ev(Event.RESUMED, R.MIGRATED), xml)).intent == Intent.ARRIVE
    keys = await cp.keys()
    red_vn = next(iter(vnics_of(cp, "nve2", "hv3")[red]["vns"]))
    binding = orjson.loads(keys[cp.ep.layout.ip(red_vn, "10.2.0.12")])
    assert binding["nve"] == "nve2"
    assert cp.nves["nve2"].counters["ima_claims"] > writes_before
    assert (await src.handle(ev(ST, P.MIGRATED))).intent == Intent.DEPART
    # Departed, or already gone: nve1 may have seen nve2's claim on its watch first.
    assert {v["state"] for v in vnics_of(cp, "nve1", "hv1").values()} <= {"departed"}
    await cp.wait("nve1", lambda: not vnics_of(cp, "nve1", "hv1"))  # hold time over
    assert {k: v["state"] for k, v in vnics_of(cp, "nve2", "hv3").items()
            if k in (blue, red)} == {blue: "up", red: "up"}
    assert src.agent.desired.vnics.keys().isdisjoint({blue, red})
    assert {blue, red} <= dst.agent.desired.vnics.keys()
    assert not src.domains
    assert dst.domains[DOM_UUID].phase == Phase.RUNNING
    assert sum(v for k, v in {**src.counters, **dst.counters}.items()
               if k.startswith("refused")) == 0


async def test_same_nve_migration_from_qemu_events(cp: Slice) -> None:
    """hv1 -> hv2, both behind nve1, in QEMU's order (the source's STOPPED/MIGRATED
    comes after the destination resumed): the NVE moves the port, 0 IMA writes [4.3]."""
    xml = domain_xml("app-1", DOM_UUID)
    src = LibvirtSource(await cp.agent("hv1", "nve1"))
    dst = LibvirtSource(await cp.agent("hv2", "nve1"))

    def ev(event: int, detail: int = 0) -> DomainEvent:
        return DomainEvent(DOM_UUID, "app-1", event, detail)

    await src.handle(ev(Event.STARTED, S.BOOTED), xml, persistent=True)
    names = set(vnics_of(cp, "nve1", "hv1"))
    assert len(names) == 2
    counters = cp.nves["nve1"].counters
    writes = counters["ima_puts"] + counters["ima_deletes"]
    await dst.handle(ev(Event.STARTED, S.MIGRATED), xml, persistent=False)
    await dst.handle(ev(Event.RESUMED, R.MIGRATED), xml)
    await src.handle(ev(ST, P.MIGRATED))
    assert {k: v["state"] for k, v in vnics_of(cp, "nve1", "hv2").items()} == dict.fromkeys(
        names, "up")
    assert not vnics_of(cp, "nve1", "hv1")
    assert counters["ima_puts"] + counters["ima_deletes"] == writes
    assert src.counters["op:depart"] == dst.counters["op:arrive"] == 2
    assert not src.agent.desired.vnics
    assert set(dst.agent.desired.vnics) == names


# ------------------------------------------------------------------ the CLI


async def nvo3(cp: Slice, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "NVO3_NATS": ",".join(cp.ep.nats), "NVO3_ETCD": ",".join(cp.ep.etcd),
           "NVO3_KEY_ROOT": cp.ep.key_root, "NVO3_SUBJECT_ROOT": cp.ep.subject_root,
           "PYTHONFAULTHANDLER": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nvo3.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def communicate(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """``proc.communicate()``; a process still running after 30 s is aborted, and
    its threads' stacks (PYTHONFAULTHANDLER) fail the test."""
    output = asyncio.ensure_future(proc.communicate())
    try:
        return await asyncio.wait_for(asyncio.shield(output), 30)
    except TimeoutError:
        proc.send_signal(signal.SIGABRT)
        _, err = await output
        raise AssertionError(f"nvo3 hung:\n{err.decode()}") from None


@pytest.mark.integration
async def test_agent_run_libvirt(cp: Slice, tmp_path: Path) -> None:
    """``nvo3 agent run --libvirt test:///default``: the CLI process has its own
    test:///default, whose domain "test" runs with one VNIC on libvirt network
    "default"; with a VN "default" it reaches the NVE, with --once and as a sidecar."""
    assert cp.client is not None
    await cp.client.create("default")
    inventory = tmp_path / "hv5.yaml"
    inventory.write_text("hypervisor: hv5\nnve: nve1\nvnics: []\n")
    vnic = vnic_name("6695eb01-f6a4-8304-79aa-97f2502e193f", "aa:bb:cc:dd:ee:ff")

    proc = await nvo3(cp, "agent", "run", "--inventory", str(inventory), "--once",
                      "--libvirt", "test:///default", "--libvirt-port", "eth7")
    out, err = await communicate(proc)
    assert proc.returncode == 0, err
    assert b"1 running libvirt domains applied" in out
    assert vnics_of(cp, "nve1", "hv5")[vnic]["port"] == "eth7"

    hv5 = await cp.agent("hv5", "nve1")
    await hv5.remove_vnic(vnic)
    assert not vnics_of(cp, "nve1", "hv5")
    proc = await nvo3(cp, "-vv", "agent", "run", "--inventory", str(inventory),
                      "--libvirt", "test:///default")
    try:
        await cp.wait("nve1", lambda: list(vnics_of(cp, "nve1", "hv5")) == [vnic])
        assert vnics_of(cp, "nve1", "hv5")[vnic]["port"] == "eth0"
    finally:
        proc.terminate()
        _, err = await communicate(proc)
    assert proc.returncode in (0, 130), err
    assert b"Traceback" not in err
