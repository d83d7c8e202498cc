"""``make demo``: the whole control plane on an embedded default cluster.

Starts a local nats-server and etcd (temporary data dir, free ports), one
IMA, two NVEs and four hypervisor agents (two per NVE), then plays a script:
create an L2 and an L3 VN, connect VNICs, associate addresses (a bridging VM
with two MACs, a load balancer with a VIP prefix), show a refused MAC claim,
shut one VNIC down, and print each NVE's tables and the etcd keys.  Every
process it started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from agents.agent import AgentError, HypervisorAgent
from agents.inventory import Inventory, VnicSpec, VnicVn
from agents.service import AgentService
from ima.client import ImaClient
from ima.service import ImaService
from nve.service import NveConfig, NveService
from nvo3.check import gather_and_check
from nvo3.connect import Endpoints, connect_nats, open_store
from nvo3.render import nve_tables, vn_table
from nvo3.security import AGENT_REPLY_PREFIX, SecureSpec
from nvo3.servers import LocalServers, find_binary
from schemas.messages import AddressEntry, VnAddresses, VnRef

CONVERGE_TIMEOUT = 15.0


def _vnic(seed: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"nvo3-demo/{seed}"))


def _spec(name: str, port: str, *vns: tuple[str, list[tuple[str, list[str]]]]) -> VnicSpec:
    return VnicSpec(
        name=_vnic(name),
        vm=name,
        port=port,
        vns=tuple(
            VnicVn(
                vn=VnRef(alias=alias),
                addresses=tuple(AddressEntry(mac=m, ips=tuple(ips)) for m, ips in addrs),
            )
            for alias, addrs in vns
        ),
    )


def demo_inventories() -> list[Inventory]:
    """Four hypervisors: hv1, hv2 behind nve1; hv3, hv4 behind nve2."""
    return [
        Inventory(hypervisor="hv1", nve="nve1", vnics=(
            _spec("web-1", "eth0", ("blue", [("02:00:00:00:01:01", ["10.1.0.11"])]),
                  ("red", [("02:00:00:00:01:02", ["10.2.0.11"])])),
        )),
        Inventory(hypervisor="hv2", nve="nve1", vnics=(
            _spec("db-1", "eth0", ("blue", [("02:00:00:00:02:01", ["10.1.0.12"])])),
            # A load balancer: one MAC, a host IP and a VIP range as one prefix [3.1].
            _spec("lb-1", "eth0", ("red", [("02:00:00:00:02:02",
                                            ["10.2.0.12", "10.2.100.0/28"])])),
        )),
        Inventory(hypervisor="hv3", nve="nve2", vnics=(
            _spec("web-2", "eth1", ("blue", [("02:00:00:00:03:01", ["10.1.0.13"])])),
            # A transparent bridge: several MACs behind one VNIC/VN [3.1.1].
            _spec("bridge-1", "eth1", ("blue", [("02:00:00:00:03:02", []),
                                                ("02:00:00:00:03:03", [])])),
        )),
        Inventory(hypervisor="hv4", nve="nve2", vnics=(
            _spec("app-1", "eth0", ("red", [("02:00:00:00:04:01", ["10.2.0.14"])])),
        )),
    ]


@dataclass
class DemoResult:
    vns: int = 0
    agents: int = 0
    vnics: int = 0
    ima_keys: int = 0
    refused: list[str] = field(default_factory=list)
    same_nve_writes: int = -1
    check: tuple[int, int, int] = (-1, -1, -1)
    cross_nve_claims: int = -1
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


def _writes(nve: NveService) -> int:
    return nve.counters["ima_puts"] + nve.counters["ima_deletes"]


def _signalling(nve: NveService) -> str:
    keys = ("ima_puts", "ima_deletes", "ima_txns", "ima_claims", "taken_over")
    msgs = sum(v for k, v in nve.counters.items() if k.startswith("messages."))
    return f"messages={msgs} " + " ".join(f"{k}={nve.counters[k]}" for k in keys)


def _remote_count(nve: NveService) -> int:
    return nve.core.remote.size()


async def run_scenario(ep: Endpoints, out: TextIO, hold: bool = False) -> DemoResult:
    result = DemoResult()

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    connections = []
    stores = []

    # Secured by default: each process has its own NKey identity and TLS (draft 5).
    async def nats_conn(name: str, identity: str) -> Any:
        nc = await connect_nats(ep.nats, name, identity=ep.identity(identity))
        connections.append(nc)
        return nc

    async def store(identity: str) -> Any:
        s = await open_store(ep.etcd, identity=ep.identity(identity))
        stores.append(s)
        return s

    try:
        ima = ImaService(await nats_conn("ima", "ima"), await store("ima"), layout=ep.layout,
                         subjects=ep.subjects)
        nves = {
            nid: NveService(NveConfig(nid, underlay,
                                      reply_prefix=AGENT_REPLY_PREFIX if ep.secure else None),
                            await nats_conn(nid, f"nve:{nid}"), await store(f"nve:{nid}"),
                            layout=ep.layout, subjects=ep.subjects)
            for nid, underlay in (("nve1", "192.0.2.1"), ("nve2", "192.0.2.2"))
        }
        async with asyncio.TaskGroup() as tg:
            services = [tg.create_task(ima.run(), name="ima")]
            services += [tg.create_task(n.run(), name=nid) for nid, n in nves.items()]
            await ima.ready.wait()
            for n in nves.values():
                await n.ready.wait()
            say("== 1. IMA: create VNs (VN Name <-> VN ID <-> VNI, draft 2 and 4.1)")
            client = ImaClient(await nats_conn("operator", "op"), ep.subjects)
            blue = (await client.create("blue", service="l2")).vn
            red = (await client.create("red", service="l3")).vn
            again = await client.create("blue", service="l2")
            say(vn_table([blue, red]))
            say(f"   creating 'blue' again returns the same VN (created={again.created}, "
                f"vni={again.vn.vni})")
            result.vns = 2

            say("\n== 2. Agents connect VNICs and associate addresses (4.1, 4.2)")
            agents = {}
            for inv in demo_inventories():
                nc = await nats_conn(inv.hypervisor, f"hv:{inv.hypervisor}")
                agent = HypervisorAgent(inv.hypervisor, inv.nve, nc,
                                        subjects=ep.subjects)
                sidecar = AgentService(agent)  # resyncs NVE restarts, answers `nvo3 check`
                services.append(tg.create_task(sidecar.run(), name=f"agent-{inv.hypervisor}"))
                await sidecar.ready.wait()
                agents[inv.hypervisor] = agent
                await agent.apply_inventory(inv)
                result.vnics += len(inv.vnics)
                tags = ", ".join(f"{spec.vm}/{vn_name[:8]}->tag {r.tag}"
                                 for (vnic, vn_name), r in agent.tags.items()
                                 for spec in inv.vnics if spec.name == vnic)
                say(f"   {inv.hypervisor} -> {inv.nve}: {len(inv.vnics)} VNIC(s); {tags}")
            result.agents = len(agents)

            await _converge(nves["nve1"], lambda: _remote_count(nves["nve1"]) == 6)
            await _converge(nves["nve2"], lambda: _remote_count(nves["nve2"]) == 9)
            say("   both NVEs learned every remote binding through etcd watches")

            say("\n== 3. A refused claim changes nothing (3.1: a MAC is unique in a VN)")
            try:
                await agents["hv4"].connect(_vnic("rogue"), "eth0", VnRef(alias="blue"))
                await agents["hv4"].associate(_vnic("rogue"), VnRef(alias="blue"),
                                              (AddressEntry(mac="02:00:00:00:01:01"),))
            except AgentError as exc:
                result.refused.append(str(exc.code))
                say(f"   hv4 claiming web-1's MAC in blue -> {exc.code}: {exc.reply.reason}")
            await agents["hv4"].remove_vnic(_vnic("rogue"))
            try:
                await agents["hv4"].associate(_vnic("app-1"), VnRef(alias="red"),
                                              (AddressEntry(mac="02:00:00:00:04:09"),))
            except AgentError as exc:
                result.refused.append(str(exc.code))
                say(f"   hv4 adding a MAC without IP to L3 VN red -> {exc.code}")

            say("\n== 4. Shut down web-2 on hv3: one message withdraws all its addresses (4.4)")
            reply = await agents["hv3"].shutdown(_vnic("web-2"))
            say(f"   vnic_shutdown -> ok, {reply.ima_ops} IMA deletes in one batch")
            await _converge(nves["nve1"], lambda: _remote_count(nves["nve1"]) == 4)
            say("   nve1 dropped web-2's MAC and IP from its remote table")

            say("\n== 5. Migrations (4.3, 4.4): the NVE knows a move from a shutdown")
            nve1, nve2 = nves["nve1"], nves["nve2"]
            writes = _writes(nve1)
            db1 = _vnic("db-1")
            db1_entries = (AddressEntry(mac="02:00:00:00:02:01", ips=("10.1.0.12",)),)
            await agents["hv1"].prepare(db1, "eth0", (VnAddresses(vn=VnRef(alias="blue"),
                                                                  entries=db1_entries),))
            await agents["hv1"].arrive(db1, "eth0")
            await agents["hv2"].depart(db1)  # the source's departure, after the move
            result.same_nve_writes = _writes(nve1) - writes
            say(f"   db-1 hv2 -> hv1 (same NVE, pre-arrival): {result.same_nve_writes} IMA "
                f"writes; now on tag {nve1.core.vnics[db1].vns[blue.name].tag} of hv1/eth0")
            app1 = _vnic("app-1")
            red_entries = (AddressEntry(mac="02:00:00:00:04:01", ips=("10.2.0.14",)),)
            await agents["hv2"].prepare(app1, "eth0",
                                        (VnAddresses(vn=VnRef(alias="red"), entries=red_entries),))
            await agents["hv4"].depart(app1)
            arrival = await agents["hv2"].arrive(app1, "eth0")
            result.cross_nve_claims = arrival.ima_ops
            await _converge(nve2, lambda: app1 not in nve2.core.vnics)
            await _converge(nve1, lambda: _remote_count(nve1) == 2)
            say(f"   app-1 hv4/nve2 -> hv2/nve1 (pre-arrival): {arrival.ima_ops} bindings "
                "claimed in one etcd txn (mobility seq 1); nve2 dropped it with 0 IMA writes")
            say("   counters: nve1 " + _signalling(nve1) + "\n             nve2 "
                + _signalling(nve2))

            say("\n== 6. NVE tables (asked over NATS, as `nvo3 nve tables` does)")
            for nid in nves:
                msg = await client.nc.request(ep.subjects.nve_tables(nid), b"{}", timeout=5)
                snap = orjson.loads(msg.data)
                result.tables[nid] = snap
                say(nve_tables(snap))
                say()

            say("== 7. Consistency check (`nvo3 check`): agents' intent vs NVE tables vs IMA")
            for n in nves.values():
                await n.writer.flush()
            report = await gather_and_check(client.nc, stores[0], ep)
            result.check = (len(report.lost), len(report.stale), len(report.wrong_vni))
            say(f"   lost={result.check[0]} stale={result.check[1]} "
                f"wrong_vni={result.check[2]}")
            for line in (report.lost + report.stale + report.wrong_vni)[:10]:
                say("   " + line)

            say("\n== 8. The IMA in etcd (etcdctl get --prefix " + ep.key_root + " --keys-only)")
            keys = _etcdctl_keys(ep)
            result.ima_keys = len(keys)
            for key in keys:
                say("   " + key)
            say(f"demo ok: {result.vns} VNs, {result.agents} agents, {result.vnics} VNICs, "
                f"{result.ima_keys} IMA keys, refused: {','.join(result.refused)}; "
                f"migrations: same-NVE {result.same_nve_writes} IMA writes, "
                f"cross-NVE {result.cross_nve_claims} claims; check lost={result.check[0]} "
                f"stale={result.check[1]}")
            if hold:
                await _hold(ep, out)
            for task in services:
                task.cancel()
    finally:
        for nc in connections:
            with contextlib.suppress(Exception):
                await nc.close()
        for s in stores:
            with contextlib.suppress(Exception):
                await s.close()
    return result


async def _converge(nve: NveService, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(CONVERGE_TIMEOUT):
        await nve.wait_until(predicate)


def etcdctl_argv(ep: Endpoints) -> list[str]:
    """etcdctl with the read-only ``inspector`` role when the stack is secured."""
    if ep.credentials is None:
        return [find_binary("etcdctl"), f"--endpoints={','.join(ep.etcd)}"]
    return [find_binary("etcdctl"), "--endpoints=" + ",".join(f"https://{e}" for e in ep.etcd),
            *ep.credentials.etcdctl_flags("inspector")]


def _etcdctl_keys(ep: Endpoints) -> list[str]:
    proc = subprocess.run(
        [*etcdctl_argv(ep), "get", "--prefix", ep.key_root, "--keys-only"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return [line for line in proc.stdout.splitlines() if line.strip()]


async def _hold(ep: Endpoints, out: TextIO) -> None:
    creds = "" if ep.credentials is None else f"NVO3_CREDS={ep.credentials.workdir} "
    print("\nCluster, IMA and NVEs kept running (Ctrl-C to stop). Try:\n"
          f"  {' '.join(etcdctl_argv(ep))} get --prefix {ep.key_root}\n"
          f"  {creds}NVO3_NATS={','.join(ep.nats)} NVO3_ETCD={','.join(ep.etcd)} "
          "nvo3 nve tables nve1\n", file=out, flush=True)
    await asyncio.Event().wait()


def main(hold: bool = False, out: TextIO = sys.stdout, insecure: bool = False) -> int:
    spec = None if insecure else SecureSpec(
        {inv.hypervisor: [inv.nve] for inv in demo_inventories()}, ["nve1", "nve2"])
    servers = LocalServers(secure=spec)
    try:
        servers.start()
        ep = Endpoints(nats=tuple(servers.nats_urls), etcd=tuple(servers.etcd_endpoints),
                       credentials=servers.credentials)
        mode = "INSECURE (--insecure)" if insecure else "TLS + NKeys + etcd RBAC"
        print(f"nats-server {ep.nats[0]}  etcd {ep.etcd[0]}  {mode}  "
              f"(data in {servers.workdir})", file=out, flush=True)
        asyncio.run(run_scenario(ep, out, hold))
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=out, flush=True)
        return 130
    finally:
        servers.stop()
