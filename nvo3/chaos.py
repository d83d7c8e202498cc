"""``nvo3 chaos``: random VNIC churn under injected faults, judged by the checker.

A 3-member etcd cluster and a 3-server NATS cluster (local processes), an
in-process IMA, two NVEs as their own processes (so they can be killed and
paused), four in-process agents.  Each round: churn from every agent (each
request published 1-3 times), one fault chosen by the seed, then quiesce and
run the consistency checker.  A round passes with 0 lost, 0 stale, 0 wrong VNI.

Faults: kill -9 and restart of an NVE; SIGSTOP/SIGCONT of an NVE for longer
than its lease TTL; kill of the etcd leader; kill of one NATS server; an agent
restart.  etcd auto-compacts every few hundred revisions, so a paused NVE's
watchers fall behind the compaction and must re-list (counted).

``secured=True`` (``nvo3 chaos --secured``) runs the same rounds on a secured stack,
as ``nvo3 demo`` and ``nvo3 up`` do: NATS with TLS and one NKey user per identity,
etcd with client-certificate TLS and RBAC, credentials generated at start
(``SecureSpec``: nvo3/security.py).  Every process uses its own identity: the IMA
``ima``, each NVE process ``nve:<id>`` (``NVO3_CREDS``, answering agents only into
their own inbox), each agent ``hv:<hv>``, the checker and the operator calls ``op``
(read-only in etcd).  Only the harness's own compaction (a fault, not a client's
operation) runs as etcd ``root``.  Killed servers restart with their secured
configuration (same ports, certificates and users).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import orjson

from agents.agent import AgentError, HypervisorAgent, NveUnreachable
from agents.service import AgentService
from ima.client import ImaClient
from ima.service import ImaService
from ima.store import StoreError
from nvo3.check import Gathered, check_gathered, gather
from nvo3.connect import Endpoints, connect_nats, open_store
from nvo3.etcd_members import members_disagree
from nvo3.etcd_versions import kill9_corrupts
from nvo3.progress import Progress
from nvo3.security import ROLE_IMA, ROLE_OP, ROLE_ROOT, SecureSpec, hv_identity
from nvo3.servers import EtcdServer, LocalServers
from schemas.messages import AddressEntry, VnRef

LEASE_TTL = 2
FAULTS = ("nve_kill", "nve_pause", "etcd_leader_kill", "nats_kill", "agent_restart",
          "nve_restart")
VNS = (VnRef(alias="blue"), VnRef(alias="red"))
#: The NVEs' anti-entropy listing period (``nve run --relist-s``), short here so that a
#: missed watch event is repaired, and counted, within a round.
RELIST_S = 5.0
AGENTS = (("hv1", "nve1"), ("hv2", "nve1"), ("hv3", "nve2"), ("hv4", "nve2"))
NVES = ("nve1", "nve2")
SECURED_MODE = "TLS + NKeys + etcd RBAC"


def secure_spec() -> SecureSpec:
    """The secured stack's identities: one per agent (publishing to its own NVE only),
    one per NVE, and ``ima``, ``op``, ``inspector``, ``root``."""
    return SecureSpec({hv: [nve] for hv, nve in AGENTS}, list(NVES))


@dataclass
class RoundResult:
    round: int
    fault: str
    events: int
    refused: int
    unreachable: int
    lost: int
    stale: int
    wrong_vni: int
    cleanup_s: float | None
    converge_s: float
    relists: int
    differences: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # error code -> count
    repairs: int = 0  # remote entries repaired by periodic listings so far (cumulative)
    #: What the etcd members disagree on after quiescence (``nvo3.etcd_members``): empty
    #: when they agree. A divergence is etcd's fault, and no client can converge on it.
    etcd_divergence: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == self.stale == self.wrong_vni == 0


class NveProcess:
    """One NVE as a child process; stopped by its pid only."""

    def __init__(self, nve_id: str, underlay: str, ep: Endpoints, log_dir: str) -> None:
        self.nve_id, self.underlay, self.ep = nve_id, underlay, ep
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = os.path.join(log_dir, f"{nve_id}.log")  # stderr of every start

    def died(self) -> str | None:
        """Why the process is gone without being killed by us, with its last log lines."""
        if self.proc is None or self.proc.returncode is None:
            return None
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                tail = fh.read().splitlines()[-6:]
        except OSError:
            tail = []
        return f"{self.nve_id} exited with {self.proc.returncode}: " + " | ".join(tail)

    async def start(self) -> None:
        env = {**os.environ, "NVO3_NATS": ",".join(self.ep.nats),
               "NVO3_ETCD": ",".join(self.ep.etcd), "NVO3_KEY_ROOT": self.ep.key_root,
               "NVO3_SUBJECT_ROOT": self.ep.subject_root}
        # Secured: the child loads the credentials and connects as `nve:<id>`; plain: no
        # NVO3_CREDS from the caller's environment may secure it by accident.
        env.pop("NVO3_CREDS", None)
        if self.ep.credentials is not None:
            env["NVO3_CREDS"] = str(self.ep.credentials.workdir)
        with self._open_log() as log:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nvo3.cli", "nve", "run", "--id", self.nve_id,
                "--underlay", self.underlay, "--lease-ttl", str(LEASE_TTL), "--hold-s", "1",
                "--announce-s", "0.5", "--relist-s", str(RELIST_S), env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log)

    def _open_log(self) -> Any:
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed by the caller's with)
        log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        return log

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()


class Chaos:
    def __init__(self, servers: LocalServers, seed: int, out: TextIO) -> None:
        self.servers = servers
        self.rng = random.Random(seed)
        self.out = out
        creds = servers.credentials
        nats, etcd = tuple(servers.nats_urls), tuple(servers.etcd_endpoints)
        # A secured stack's permissions name its own roots, so those are the ones used.
        self.ep = (Endpoints(nats, etcd) if creds is None else
                   Endpoints(nats, etcd, creds.key_root, creds.subject_root, creds))
        self.log_dir = tempfile.mkdtemp(prefix="nvo3-chaos-")  # NVE logs, kept for post-mortems
        self.nves = {nve: NveProcess(nve, f"192.0.2.{i}", self.ep, self.log_dir)
                     for i, nve in enumerate(NVES, start=1)}
        self.agents: dict[str, AgentService] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.conns: list[Any] = []
        self.stores: list[Any] = []
        self.mac_counter = 0
        self.tally: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()  # this round's refusals by error code
        self.check_error = ""  # why the checker last failed to gather, for the report
        self.gathered: Gathered | None = None  # what the last check compared
        #: How etcd members die: kill -9, or (versions that corrupt under kill -9) a hang
        #: and a clean stop (``nvo3.etcd_versions.kill9_corrupts``). The faults are still a
        #: leader change and a member gone; only the crash recovery of a buggy etcd is not.
        self.etcd_version: tuple[int, ...] | None = None
        self.etcd_sigkill = True
        self.nc: Any = None  # the operator's and the checker's NATS connection
        self.store: Any = None  # the checker's etcd client (read-only when secured)
        self.admin: Any = None  # the harness's compactions (etcd root when secured)

    async def _nats(self, name: str, identity: str) -> Any:
        """A NATS connection; on the secured stack as ``identity`` (None on the plain one)."""
        nc = await connect_nats(self.ep.nats, name, identity=self.ep.identity(identity))
        self.conns.append(nc)
        return nc

    async def _store(self, identity: str) -> Any:
        store = await open_store(self.ep.etcd, identity=self.ep.identity(identity))
        self.stores.append(store)
        return store

    def choose_etcd_kill(self, force_sigkill: bool) -> str:
        """Decide how etcd members die; returns the line the report prints about it."""
        assert self.servers.etcd is not None
        self.etcd_version = next((v for v in (m.version() for m in self.servers.etcd.members)
                                  if v is not None), None)
        shown = ".".join(map(str, self.etcd_version or ())) or "unknown"
        self.etcd_sigkill = force_sigkill or not kill9_corrupts(self.etcd_version)
        if self.etcd_sigkill:
            return f"etcd {shown}: members are killed with SIGKILL"
        return (f"etcd {shown}: no SIGKILL (kill -9 can make a member of this version "
                f"diverge from its peers, etcd-io/etcd#13766; --etcd-sigkill forces it): the "
                f"leader hangs (SIGSTOP) through the churn, then stops with SIGTERM")

    async def setup(self) -> None:
        self.nc = await self._nats("chaos", ROLE_OP)
        self.store = await self._store(ROLE_OP)
        self.admin = await self._store(ROLE_ROOT) if self.ep.secure else self.store
        ima = ImaService(await self._nats("ima", ROLE_IMA), await self._store(ROLE_IMA),
                         layout=self.ep.layout, subjects=self.ep.subjects)
        self.tasks["ima"] = asyncio.create_task(ima.run())
        await ima.ready.wait()
        client = ImaClient(self.nc, self.ep.subjects)
        await client.create("blue")
        await client.create("red", service="l3")
        for proc in self.nves.values():
            await proc.start()
        for nve in self.nves:
            await self._wait_answering(nve, 30.0)
        for hv, nve in AGENTS:
            await self._start_agent(hv, nve)

    async def _wait_answering(self, nve: str, limit: float) -> None:
        """Until the NVE process answers (its request subscription is up by then), so
        round 1 injects its fault into running NVEs, not into their start-up (which
        takes longer on the secured stack: credentials, TLS, a probing connect)."""
        deadline = time.monotonic() + limit
        while await self._tables(nve) is None:
            why = self.nves[nve].died()
            if why is not None:
                raise RuntimeError(why)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{nve} did not answer within {limit:.0f} s "
                                   f"(log: {self.nves[nve].log_path})")
            await asyncio.sleep(0.1)

    async def _start_agent(self, hv: str, nve: str, previous: AgentService | None = None) -> None:
        agent = HypervisorAgent(hv, nve, await self._nats(hv, hv_identity(hv)),
                                subjects=self.ep.subjects, timeout=0.5, attempts=3)
        agent.resend_extra = lambda: self.rng.randint(0, 2)
        if previous is not None:
            agent.desired = previous.agent.desired  # a restarted agent re-reads its inventory
        service = AgentService(agent)
        self.agents[hv] = service
        self.tasks[hv] = asyncio.create_task(service.run())
        await service.ready.wait()

    async def teardown(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for proc in self.nves.values():
            await proc.stop()
        for nc in self.conns:
            with contextlib.suppress(Exception):
                await nc.close()
        for store in self.stores:
            with contextlib.suppress(Exception):
                await store.close()

    # ------------------------------------------------------------------ churn

    def _mac(self) -> str:
        self.mac_counter += 1
        n = self.mac_counter
        return f"02:cc:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"

    async def churn(self, ops_per_agent: int) -> None:
        results = await asyncio.gather(*(self._churn_agent(s.agent, ops_per_agent)
                                         for s in self.agents.values()))
        for events, refused, unreachable in results:
            self.tally["events"] += events
            self.tally["refused"] += refused
            self.tally["unreachable"] += unreachable

    async def _churn_agent(self, agent: HypervisorAgent, n: int) -> tuple[int, int, int]:
        events = refused = unreachable = 0
        for _ in range(n):
            events += 1
            try:
                await self._one_op(agent)
            except AgentError as exc:
                refused += 1
                self.refusals[str(exc.code)] += 1
            except NveUnreachable:
                unreachable += 1
        return events, refused, unreachable

    async def _one_op(self, agent: HypervisorAgent) -> None:
        rng = self.rng
        vnics = sorted(agent.desired.vnics)
        choice = rng.random()
        if not vnics or choice < 0.25:
            name = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            vn = rng.choice(VNS)
            await agent.connect(name, "eth0", vn)
            await agent.associate(name, vn, (AddressEntry(
                mac=self._mac(), ips=(f"10.{rng.randint(1, 250)}.{rng.randint(0, 255)}."
                                      f"{rng.randint(1, 254)}",)),))
            return
        name = rng.choice(vnics)
        entry = agent.desired.vnics[name]
        vn = rng.choice(sorted(entry.vns, key=str))
        if choice < 0.55:
            await agent.associate(name, vn, (AddressEntry(
                mac=self._mac(), ips=(f"10.{rng.randint(1, 250)}.{rng.randint(0, 255)}."
                                      f"{rng.randint(1, 254)}",)),))
        elif choice < 0.65:
            macs = sorted(entry.vns[vn].macs)
            if macs:
                await agent.disassociate(name, vn, (AddressEntry(mac=rng.choice(macs)),))
        elif choice < 0.75:
            await agent.shutdown(name)
        elif choice < 0.85:
            await agent.startup(name)
        else:
            await agent.remove_vnic(name)

    # ----------------------------------------------------------------- faults

    async def inject(self, fault: str) -> float | None:
        """Inject one fault; returns the crash-cleanup time for an NVE kill."""
        rng = self.rng
        if fault == "nve_kill":
            victim = self.nves[rng.choice(sorted(self.nves))]
            other = next(n for n in self.nves if n != victim.nve_id)
            pointed = await self._points_at(other, victim.nve_id)
            await victim.kill()
            killed = time.monotonic()
            cleanup = await self._wait_no_remote(other, victim.nve_id, LEASE_TTL + 5)
            await victim.start()
            if not pointed:
                return None  # nothing of the victim's was in the other's table to clean
            return float("inf") if cleanup is None else cleanup - killed
        if fault == "nve_restart":
            # kill -9 and start again at once, well inside the lease TTL: the new
            # incarnation must withdraw the old one's leftovers (predecessor revoke),
            # and the other NVE must stop trusting them, without waiting for the TTL.
            victim = self.nves[rng.choice(sorted(self.nves))]
            other = next(n for n in self.nves if n != victim.nve_id)
            pointed = await self._points_at(other, victim.nve_id)
            await victim.kill()
            killed = time.monotonic()
            await victim.start()
            cleanup = await self._wait_no_leftovers(other, victim.nve_id, LEASE_TTL + 5)
            if not pointed:
                return None
            return float("inf") if cleanup is None else cleanup - killed
        if fault == "nve_pause":
            victim = self.nves[rng.choice(sorted(self.nves))]
            victim.signal(19)  # SIGSTOP: longer than the lease TTL, on purpose
            started = time.monotonic()
            await self.churn(3)
            # While it sleeps: history is compacted and every etcd member bounces once,
            # so each of its watch streams must resume from a compacted revision.
            await self._compact_now()
            assert self.servers.etcd is not None
            for member in self.servers.etcd.members:
                self._crash(member)
                await asyncio.to_thread(member.restart)
            await asyncio.sleep(max(0.0, LEASE_TTL + 1.5 - (time.monotonic() - started)))
            victim.signal(18)  # SIGCONT
            return None
        if fault == "etcd_leader_kill":
            assert self.servers.etcd is not None
            leader = next((m for m in self.servers.etcd.members if m.is_leader()), None)
            if leader is not None:
                if self.etcd_sigkill:
                    leader.kill()
                    await self.churn(3)
                else:
                    # The leader hangs (SIGSTOP) while the agents work: its peers elect
                    # another after the election timeout, and clients talking to it get
                    # no answer and fail over, as after a crash. Then a clean stop: a
                    # kill -9 is what corrupts this etcd (``etcd_sigkill``).
                    leader.pause()
                    await self.churn(3)
                    leader.resume()
                    await asyncio.to_thread(leader.stop)
                await asyncio.to_thread(leader.restart)
            return None
        if fault == "nats_kill":
            assert self.servers.nats is not None
            server = rng.choice(self.servers.nats.members)
            server.kill()
            await self.churn(3)
            await asyncio.to_thread(server.restart)
            return None
        hv = rng.choice(sorted(self.agents))
        old = self.agents[hv]
        self.tasks.pop(hv).cancel()
        await self._start_agent(hv, old.agent.nve, old)
        return None

    def _crash(self, member: EtcdServer) -> None:
        """kill -9, unless this etcd is known to corrupt on it (then a clean stop, which
        still breaks every stream to the member: ``nve_pause``'s bounce needs no more)."""
        if self.etcd_sigkill:
            member.kill()
        else:
            member.stop()

    async def _compact_now(self) -> None:
        """Compact at the current revision. Right after a leader change a member may
        not have caught up with the revision another one reported ("required
        revision is a future revision"): ask again, a few times."""
        for attempt in range(10):
            try:
                await self.admin.compact(await self.admin.current_revision())
                return
            except StoreError:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.2)

    async def _points_at(self, observer: str, nve: str) -> bool:
        """Does ``observer``'s remote table hold anything of ``nve``'s?"""
        snap = await self._tables(observer)
        return snap is not None and any(
            b["nve"] == nve for r in snap["remote"].values() for b in r["entries"].values())

    async def _wait_no_remote(self, observer: str, dead: str, limit: float) -> float | None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            snap = await self._tables(observer)
            if snap is not None and not any(
                b["nve"] == dead for r in snap["remote"].values() for b in r["entries"].values()
            ):
                return time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def _wait_no_leftovers(self, observer: str, nve: str, limit: float) -> float | None:
        """When ``observer`` holds nothing of ``nve``'s incarnations older than its newest."""
        deadline = time.monotonic() + limit
        epoch = 0
        while time.monotonic() < deadline:
            if not epoch:
                snap = await self._tables(nve)
                epoch = int(snap["epoch"]) if snap is not None else 0
            if epoch:
                seen = await self._tables(observer)
                if seen is not None and not any(
                    b["nve"] == nve and b.get("epoch", 0) < epoch
                    for r in seen["remote"].values() for b in r["entries"].values()
                ):
                    return time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def _tables(self, nve: str) -> dict[str, Any] | None:
        try:
            msg = await self.nc.request(self.ep.subjects.nve_tables(nve), b"{}", timeout=1)
        except Exception:
            return None
        data: dict[str, Any] = orjson.loads(msg.data)
        return data

    # --------------------------------------------------------------- rounds

    async def quiesce(self, limit: float) -> tuple[Any, float]:
        start = time.monotonic()
        report = None
        self.gathered = None
        while time.monotonic() - start < limit:
            try:
                self.gathered = await gather(self.nc, self.store, self.ep,
                                             sorted(self.agents), request_timeout=2)
                report = check_gathered(self.gathered, self.ep.layout)
            except Exception as exc:
                report = None
                self.check_error = f"{type(exc).__name__}: {exc}"[:300]
            if report is not None and report.ok:
                break
            await asyncio.sleep(0.25)
        return report, time.monotonic() - start

    def _post_mortem(self, index: int, report: Any) -> str:
        """Everything the failed check compared, with every difference, into the log
        directory (the printed table shows only the first few); returns the path."""
        path = os.path.join(self.log_dir, f"round-{index}.json")
        doc = {"differences": None if report is None else report.as_dict()["differences"],
               "checked": None if self.gathered is None else self.gathered.as_dict()}
        with open(path, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return path

    async def etcd_divergence(self) -> list[str]:
        """What the etcd members disagree on (empty: nothing), each read on its own.

        Read a few times while they report different revisions: a follower may still
        be applying the last entries (lease keepalives write nothing, so a quiesced
        cluster stops moving)."""
        assert self.servers.etcd is not None
        flags = ([] if self.ep.credentials is None
                 else self.ep.credentials.etcdctl_flags(ROLE_OP))
        return await members_disagree(
            [(m.name, m.client_url) for m in self.servers.etcd.members],
            self.ep.key_root, flags)

    def _dead_tasks(self) -> list[str]:
        out = []
        for name, task in self.tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                out.append(f"{name} died: {task.exception()!r}")
        return out

    async def relists(self) -> int:
        return await self._counter_sum("relists_after_compaction")

    async def repairs(self) -> int:
        """What the NVEs' periodic listings had to repair: remote entries (missed watch
        events) and own bindings in etcd; cumulative per NVE process, like ``relists``."""
        return (await self._counter_sum("relist_repairs")
                + await self._counter_sum("own_repairs"))

    async def _counter_sum(self, name: str) -> int:
        total = 0
        for nve in self.nves:
            snap = await self._tables(nve)
            if snap is not None:
                total += int(snap["counters"].get(name, 0))
        return total

    async def round(self, index: int, fault: str, ops: int) -> RoundResult:
        self.tally.clear()
        self.refusals.clear()
        await self.churn(ops)
        cleanup = await self.inject(fault)
        await self.churn(2)
        report, converge = await self.quiesce(30.0)
        lost = stale = wrong = -1
        diffs: list[str] = [f"checker could not run ({self.check_error})"]
        if report is not None:
            lost, stale, wrong = len(report.lost), len(report.stale), len(report.wrong_vni)
            diffs = ([f"lost {d}" for d in report.lost] + [f"stale {d}" for d in report.stale]
                     + [f"wrong-VNI {d}" for d in report.wrong_vni])[:10]
        if report is None or not report.ok:
            diffs.append(f"all differences and what was compared: "
                         f"{self._post_mortem(index, report)}")
        # A process or in-process service that died on its own (not by an injected
        # fault) says why, first: an agent sidecar that stopped answering otherwise
        # only shows as "checker could not run".
        diffs[:0] = [*(why for why in (p.died() for p in self.nves.values()) if why),
                     *self._dead_tasks()]
        split = await self.etcd_divergence()
        diffs[:0] = split
        t = self.tally
        return RoundResult(index, fault, t["events"], t["refused"], t["unreachable"],
                           lost, stale, wrong,
                           None if cleanup is None else round(cleanup, 2), round(converge, 2),
                           await self.relists(), diffs, dict(sorted(self.refusals.items())),
                           await self.repairs(), split)


HEADER = (f"{'round':>5} {'fault':<17} {'events':>6} {'refused':>7} {'unreach':>7} "
          f"{'lost':>4} {'stale':>5} {'wrongvni':>8} {'cleanup_s':>9} {'converge_s':>10} "
          f"{'relists':>7}")


def _row(r: RoundResult) -> str:
    cleanup = "-" if r.cleanup_s is None else f"{r.cleanup_s:.2f}"
    return (f"{r.round:>5} {r.fault:<17} {r.events:>6} {r.refused:>7} {r.unreachable:>7} "
            f"{r.lost:>4} {r.stale:>5} {r.wrong_vni:>8} {cleanup:>9} {r.converge_s:>10.2f} "
            f"{r.relists:>7}")


async def run_chaos(
    servers: LocalServers, rounds: int, seed: int, out: TextIO, ops: int = 6,
    faults: Sequence[str] = FAULTS, etcd_sigkill: bool = False,
) -> list[RoundResult]:
    """The rounds on ``servers``, secured if they were started with credentials."""
    chaos = Chaos(servers, seed, out)
    how_etcd_dies = chaos.choose_etcd_kill(etcd_sigkill)
    results = []
    # SIGTERM cancels the run, so the NVE child processes are stopped (by pid) too.
    on_sigterm = _cancel_on_sigterm()
    try:
        await chaos.setup()
        mode = f" secured ({SECURED_MODE})" if chaos.ep.secure else ""
        print(f"chaos: seed={seed} rounds={rounds}{mode}", file=out, flush=True)
        print(f"chaos: {how_etcd_dies}", file=out, flush=True)
        print(HEADER, file=out, flush=True)
        with Progress("chaos", rounds) as bar:  # stderr, terminals only
            for i in range(1, rounds + 1):
                fault = faults[(i - 1) % len(faults)] if i <= len(faults) else chaos.rng.choice(
                    list(faults))
                bar.set_note(f"round {i}: {fault}")
                result = await chaos.round(i, fault, ops)
                results.append(result)
                bar.echo(_row(result), file=out)
                if result.repairs:
                    bar.echo(f"      periodic listings repaired {result.repairs} entries "
                             "so far (missed watch events, own bindings out of step)",
                             file=out)
                if result.refusals:
                    bar.echo("      refused: " + ", ".join(
                        f"{code} {n}" for code, n in result.refusals.items()), file=out)
                for diff in (result.differences if not result.ok
                             else result.etcd_divergence):
                    bar.echo("      " + diff, file=out)
                bar.advance()
    finally:
        await chaos.teardown()
        on_sigterm()
    return results


def _cancel_on_sigterm() -> Callable[[], None]:
    """Let SIGTERM cancel the running task; returns what puts the old handler back."""
    task = asyncio.current_task()
    if task is None or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)

    def restore() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore


def main(rounds: int, seed: int, json_path: str | None = None, out: TextIO = sys.stdout,
         faults: Sequence[str] = FAULTS, secured: bool = False,
         etcd_sigkill: bool = False) -> int:
    """``faults`` narrows the mix (e.g. only ``etcd_leader_kill``) to hunt one class;
    ``secured`` runs on the secured stack (credentials generated into its work dir)."""
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        print(f"chaos: unknown fault(s) {', '.join(unknown) or '(none given)'}; "
              f"known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    servers = LocalServers(
        nats_members=3, etcd_members=3,
        etcd_args=["--auto-compaction-mode", "revision", "--auto-compaction-retention", "200"],
        secure=secure_spec() if secured else None,
    )
    try:
        servers.start()
        try:
            results = asyncio.run(run_chaos(servers, rounds, seed, out, faults=faults,
                                            etcd_sigkill=etcd_sigkill))
        except asyncio.CancelledError:
            print("chaos: stopped by SIGTERM", file=out, flush=True)
            return 143
    finally:
        servers.stop()
    bad = [r for r in results if not r.ok]
    print(f"chaos: {len(results)} rounds, {len(bad)} with lost/stale/wrong-VNI", file=out)
    if json_path:
        with open(json_path, "wb") as fh:
            fh.write(orjson.dumps({"seed": seed, "faults": list(faults), "secured": secured,
                                   "rounds": [asdict(r) for r in results]},
                                  option=orjson.OPT_INDENT_2))
    return 1 if bad else 0
