"""The NVE process: receive, decode, apply to the pure core, execute effects, reply.

Everything long-lived (request loop, operator queries, IMA writer, lease
keepalive, one follower per served VN) is a task of one ``asyncio.TaskGroup``
owned by ``NveService.run``: a task that fails takes the service down
visibly instead of dying silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.errors import OutboundBufferLimitError, SlowConsumerError

from ima.keys import KeyLayout
from ima.mobility import MobilityPolicy
from ima.registry import VnRegistry
from ima.store import EtcdStore, LeaseLost, StoreError
from nve import warm_state
from nve.core import NveCore, Timers
from nve.effects import BindIp, BindMac, Effect, StartWatch, StopWatch, UnbindIp, UnbindMac
from nve.follower import VnFollower
from nve.mirror import PrefixMirror
from nve.ratelimit import RateLimiter
from nve.registration import Superseded, register
from nve.remote import Binding, RemoteEntry
from nve.resolver import VnResolver
from nve.writer import ImaWriter, WriteClaim, WriteDelete, WriteOp, WritePut, WriteReport
from nvo3.loop_lag import LoopLag
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    AddrObserved,
    EpochAnnounce,
    ErrorReply,
    HypervisorMessage,
    OkReply,
    VnRef,
)
from schemas.operator import TablesQuery
from schemas.profile import VnProfile
from schemas.records import NveRecord, Placement, VnAttachment, VnRecord
from schemas.subjects import Subjects
from schemas.wire import decode_hypervisor, decode_model, dumps

_log = logging.getLogger(__name__)

REPLAY_COMMITS = 512  # as many as the core's replay cache keeps per sender, at least




@dataclass(frozen=True)
class NveConfig:
    nve_id: str
    underlay: str
    lease_ttl: int = 5
    pending_limit: int = 65_536  # NATS subscription buffer (messages)
    hold_s: float = 30.0  # departure without handshake: bindings held this long [4.3]
    prepare_s: float = 120.0  # a pre-arrival that never arrives is dropped after this
    glean_s: float = 300.0  # gleaned addresses age out after this
    tick_s: float = 0.25  # timer resolution
    announce_s: float = 2.0  # epoch announcement period (agents resync on a new epoch)
    port_scopes: tuple[tuple[str, str], ...] = ()  # ("hv/port", scope): shared tag spaces
    enforce_placement: bool = False  # accept a VNIC only from the hypervisor it is placed on
    reply_prefix: str | None = None  # e.g. "_INBOX_{hv}.": replies only into the sender's inbox
    rate_per_s: float = 0.0  # per-hypervisor request rate (0: unlimited)
    burst: float = 1000.0
    mobility: MobilityPolicy = field(default_factory=MobilityPolicy)
    state_file: str | None = None  # warm restart: remote tables + revisions saved on stop
    state_save_s: float = 10.0  # ... and this often while running, so a crash leaves one too
    loop_lag_s: float = 0.005  # event-loop lag probe interval (0: off); see nvo3/loop_lag.py
    #: Anti-entropy: each followed VN is listed again this often (0: never), repairing
    #: and counting any watch event that was missed (``relist_repairs``).
    relist_s: float = 60.0

    @property
    def timers(self) -> Timers:
        second = 10**9
        return Timers(int(self.hold_s * second), int(self.prepare_s * second),
                      int(self.glean_s * second))


def _json(model: Any) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


def percentiles(samples: deque[tuple[int, int]], since_ns: int = 0) -> dict[str, float]:
    """p50/p99/max in ms of (received_ns, duration_ns) samples received after ``since_ns``."""
    ordered = sorted(d for at, d in samples if at > since_ns)
    if not ordered:
        return {"n": 0}
    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 3)
    return {"n": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1] / 1e6, 3)}


class NveService:
    def __init__(
        self,
        config: NveConfig,
        nc: Nats,
        store: EtcdStore,
        *,
        layout: KeyLayout | None = None,
        subjects: Subjects | None = None,
    ) -> None:
        self.config = config
        self.nc = nc
        self.store = store
        self.layout = layout or KeyLayout()
        self.subjects = subjects or Subjects()
        self.core = NveCore(config.nve_id, config.underlay, timers=config.timers,
                            port_scopes=dict(config.port_scopes))
        self.core.enforce_placement = config.enforce_placement
        self.limiter = RateLimiter(config.rate_per_s, config.burst)
        self.resync_seq = 0  # bumped when NATS dropped requests meant for us
        self.counters: Counter[str] = Counter()
        self.latencies: deque[int] = deque(maxlen=200_000)
        #: Where a request's time goes, ns, last 10 000 requests: "receive" = agent publish
        #: -> NVE picks it up (NATS and the NVE's queue); "commit" = picked up -> its IMA
        #: writes are durable (decode, apply, the writer's queue and etcd).
        self.stages: dict[str, deque[tuple[int, int]]] = {  # (received_ns, duration_ns)
            "receive": deque(maxlen=10_000), "commit": deque(maxlen=10_000)}
        #: The remote side, ns, last 10 000 samples: "apply" = how long applying one watch
        #: response (decode + remote table) held the event loop; "propagation" = agent
        #: publish -> applied here, per remote put (nve/follower.py).
        self.watch_stages: dict[str, deque[tuple[int, int]]] = {
            "apply": deque(maxlen=10_000), "propagation": deque(maxlen=10_000)}
        #: How late the event loop runs (a long synchronous step, GC, or no CPU).
        self.loop_lag = LoopLag(self.counters, config.loop_lag_s or 0.005)
        self.writer = ImaWriter(store, self.counters, config.nve_id, config.mobility)
        self.resolver = VnResolver(VnRegistry(store, self.layout))
        self.epoch = time.time_ns()  # this incarnation; newer than any earlier one [issue 4]
        self.core.epoch = self.epoch
        self.writer.epoch = self.epoch
        self.lease_id = 0
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._announce_now = asyncio.Event()
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._warm: dict[str, tuple[int, list[tuple[str, Binding]]]] = {}
        self._tg: asyncio.TaskGroup | None = None
        #: From a lost lease until the republish is queued (``_hold_lease``): our
        #: bindings are missing from etcd for a reason the own-binding check must not
        #: count as drift.
        self._recovering_lease = False
        #: (sender, seq) -> the commit of its writes, for retransmissions (see handle)
        self._commits: OrderedDict[tuple[str, int], asyncio.Future[WriteReport]] = OrderedDict()
        self.crashed = False  # set by tests to stop like kill -9: no revoke, no state save
        self._saved_at: tuple[int, ...] = ()
        self._replies: set[asyncio.Task[None]] = set()
        self.requests_sub: Any = None  # metrics: requests waiting in the NATS client

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        cfg = self.config
        await self._take_lease()
        self._warm = self._load_warm_state()
        requests = self.requests_sub = await self.nc.subscribe(
            self.subjects.nve_requests(cfg.nve_id), pending_msgs_limit=cfg.pending_limit
        )
        tables = await self.nc.subscribe(self.subjects.nve_tables(cfg.nve_id))
        observed = await self.nc.subscribe(self.subjects.nve_observed(cfg.nve_id))
        mirrors = self._mirrors()
        for mirror in mirrors:
            await mirror.load()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.writer.run(), name=f"{cfg.nve_id}-writer")
                tg.create_task(self._hold_lease(), name=f"{cfg.nve_id}-lease")
                tg.create_task(self._serve_requests(requests), name=f"{cfg.nve_id}-requests")
                tg.create_task(self._serve_tables(tables), name=f"{cfg.nve_id}-tables")
                tg.create_task(self._serve_observed(observed), name=f"{cfg.nve_id}-glean")
                tg.create_task(self._timers(), name=f"{cfg.nve_id}-timers")
                for mirror in mirrors:
                    tg.create_task(mirror.follow(), name=f"{cfg.nve_id}-mirror")
                tg.create_task(self._announce(), name=f"{cfg.nve_id}-epoch")
                if cfg.loop_lag_s > 0:
                    tg.create_task(self.loop_lag.run(), name=f"{cfg.nve_id}-loop-lag")
                if cfg.state_file and cfg.state_save_s > 0:
                    tg.create_task(self._save_periodically(), name=f"{cfg.nve_id}-state")
                self.ready.set()
        finally:
            self._tg = None
            for sub in (requests, tables, observed):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            # A simulated kill -9 (tests) says no goodbye: no state saved, no revoke.
            if not self.crashed:
                self._save_warm_state()
                # A graceful stop withdraws our bindings at once instead of waiting for
                # the lease to expire (the bindings carry the lease).
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.revoke_lease(self.lease_id))

    async def _take_lease(self) -> None:
        """Register this incarnation under a new lease (``nve.registration``)."""
        cfg = self.config
        self.lease_id = await self.store.grant_lease(cfg.lease_ttl)
        record = NveRecord(
            nve=cfg.nve_id, underlay=cfg.underlay, epoch=self.epoch, started_ns=time.time_ns()
        )
        await register(self.store, self.layout.nve(cfg.nve_id), record, self.lease_id,
                       self.counters)
        self.writer.new_lease(self.lease_id)

    async def _retake_lease(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._take_lease()
                return
            except StoreError as exc:  # etcd is still recovering: keep trying
                self.counters["lease_retries"] += 1
                _log.warning("NVE %s: cannot take a new lease yet (%s)", self.config.nve_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _hold_lease(self) -> None:
        """Keep the lease; if it was lost (a pause longer than its TTL), come back.

        etcd deleted our bindings with the lease.  We take a new lease and
        publish every binding we still hold locally; an address another NVE
        claimed in the meantime is lost to it (compare-and-swap) and dropped.
        """
        while True:
            try:
                await self.store.run_keepalive(self.lease_id, self.config.lease_ttl,
                                               self.writer.lease_lost)
            except LeaseLost:
                self.counters["lease_lost"] += 1
                _log.error("NVE %s: etcd lease lost; re-registering and republishing",
                           self.config.nve_id)
                self._recovering_lease = True
                try:
                    await self._retake_lease()
                    ops = self._execute(self.core.republish())
                    ops.extend(self._attachment(vn) for vn in self._followers)
                    self.counters["ima_ops.republish"] += len(ops)
                    await self.writer.submit(ops)
                finally:
                    self._recovering_lease = False
                self._changed.set()

    # ------------------------------------------------------------- requests

    async def _serve_requests(self, sub: Any) -> None:
        async for msg in sub.messages:
            await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        """One hypervisor request; never raises for anything the sender did."""
        seq: int | None = None
        kind = "?"
        received = time.time_ns()
        try:
            parsed = self.subjects.parse_hv_request(msg.subject)
            if parsed is None:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad subject {msg.subject}")
            _, subject_hv, subject_kind = parsed
            request = decode_hypervisor(msg.data)
            seq, kind = request.seq, request.kind
            if request.sender != subject_hv or request.kind != subject_kind:
                raise ProtocolError(
                    ErrorCode.SENDER_MISMATCH,
                    f"payload says sender={request.sender} kind={request.kind} but the "
                    f"subject says hypervisor={subject_hv} kind={subject_kind}",
                )
            self._check_reply_subject(msg, subject_hv)
            if not self.limiter.allow(subject_hv, time.monotonic()):
                raise ProtocolError(ErrorCode.RATE_LIMITED,
                                    f"hypervisor {subject_hv} is over {self.config.rate_per_s}/s")
            vn = await self._resolve(request)
            vns = await self._resolve_many(request)
            outcome = self.core.apply(request, vn, time.time_ns(), vns=vns)
        except ProtocolError as exc:
            self.counters[f"errors.{exc.code}"] += 1
            self._changed.set()
            await self._reply(msg, ErrorReply(seq=seq, code=exc.code, reason=exc.reason,
                                              details={k: str(v) for k, v in exc.fields.items()}))
            return
        self.counters[f"messages.{kind}"] += 1
        if request.ts_ns:  # the agent's publish time (same host clock, or synchronized)
            self.stages["receive"].append((received, received - request.ts_ns))
        if request.trace and _log.isEnabledFor(logging.DEBUG):
            _log.debug("applied %s seq=%d from %s: %d IMA ops", kind, seq, request.sender,
                       len(outcome.effects), extra={"trace": request.trace,
                                                    "nve": self.config.nve_id,
                                                    "hypervisor": request.sender})
        ops = self._execute(outcome.effects)
        self.counters[f"ima_ops.{kind}"] += len(ops)
        key = (request.sender, request.seq)
        if outcome.replayed:
            self.counters["replays"] += 1
            # A retransmission of a request whose writes are still being committed gets
            # its answer when they are durable (or lost), like the original would: an
            # early "ok" would tell the agent the IMA has what it may never get.
            done = self._commits.get(key) or await self.writer.submit(ops)
        else:
            done = await self.writer.submit(ops)
            self._commits[key] = done
            if len(self._commits) > REPLAY_COMMITS:
                self._commits.popitem(last=False)
        reply = OkReply(seq=seq, op=kind, result=outcome.result, results=outcome.results,
                        ima_ops=len(ops), refused=dict(outcome.refused), epoch=self.epoch)
        self._changed.set()
        task = asyncio.create_task(self._reply_when(done, msg, reply, received))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    def _check_reply_subject(self, msg: Msg, hypervisor: str) -> None:
        """A request may not aim our reply at another client's inbox [5]."""
        prefix = self.config.reply_prefix
        if prefix and msg.reply and not msg.reply.startswith(prefix.format(hv=hypervisor)):
            self.counters["refused_reply_subject"] += 1
            target, msg.reply = msg.reply, ""  # never answer into someone else's inbox
            raise ProtocolError(ErrorCode.NOT_AUTHORIZED,
                                f"reply subject {target!r} is not {hypervisor}'s inbox")

    async def _resolve(self, request: HypervisorMessage) -> VnRecord | None:
        ref = getattr(request, "vn", None)
        return None if ref is None else await self._resolve_ref(ref)

    async def _resolve_many(self, request: HypervisorMessage) -> dict[VnRef, VnRecord]:
        specs = list(getattr(request, "vns", ()))
        for vnic in getattr(request, "vnics", ()):
            specs.extend(vnic.vns)
        out: dict[VnRef, VnRecord] = {}
        for spec in specs:
            if spec.vn not in out:
                out[spec.vn] = await self._resolve_ref(spec.vn)
        return out

    async def _resolve_ref(self, ref: VnRef) -> VnRecord:
        try:
            return await self.resolver.resolve(ref)
        except ProtocolError:
            raise
        except Exception as exc:  # the IMA is unreachable: refuse, change nothing
            raise ProtocolError(ErrorCode.IMA_UNAVAILABLE, f"cannot resolve VN: {exc}") from exc

    def _execute(self, effects: tuple[Effect, ...]) -> list[WriteOp]:
        ops: list[WriteOp] = []
        keys = self.layout
        for eff in effects:
            if isinstance(eff, BindMac):
                b = eff.binding
                key = keys.mac(b.vn, b.mac)
                # The core builds bindings with every field in model order, so their
                # field dict is the canonical record (tests/test_core.py checks it).
                ops.append(WriteClaim(key, "mac", b) if eff.claim
                           else WritePut(key, orjson.dumps(vars(b))))
            elif isinstance(eff, BindIp):
                ib = eff.binding
                key = keys.ip(ib.vn, ib.ip)
                ops.append(WriteClaim(key, "ip", ib) if eff.claim
                           else WritePut(key, orjson.dumps(vars(ib))))
            elif isinstance(eff, UnbindMac):
                ops.append(WriteDelete(keys.mac(eff.vn, eff.mac)))
            elif isinstance(eff, UnbindIp):
                ops.append(WriteDelete(keys.ip(eff.vn, eff.ip)))
            elif isinstance(eff, StartWatch):
                self._start_follower(eff.vn)
                ops.append(self._attachment(eff.vn))
            elif isinstance(eff, StopWatch):
                self._stop_follower(eff.vn)
                ops.append(WriteDelete(keys.vn_attached(eff.vn, self.config.nve_id)))
        return ops

    def _attachment(self, vn: str) -> WritePut:
        """We serve ``vn`` (held by our lease): a VN in use cannot be deleted."""
        record = VnAttachment(vn=vn, nve=self.config.nve_id, epoch=self.epoch)
        return WritePut(self.layout.vn_attached(vn, self.config.nve_id), _json(record))

    async def _reply_when(
        self, done: asyncio.Future[WriteReport], msg: Msg, reply: OkReply, received: int = 0
    ) -> None:
        report = await done
        if received:
            self.stages["commit"].append((received, time.time_ns() - received))
        failure: ErrorReply | None = None
        # The first request answered from ``report`` drops lost keys locally; a
        # retransmission answered from the same report (``_commits``) only gets the
        # same answer.
        first, report.answered = not report.answered, True
        lost = [key for key in report.lost if self.layout.parse_map_key(key) is not None]
        if lost:
            # Another NVE won the compare-and-swap: the address is not ours.
            for key in lost if first else ():
                self._lost(key)
            failure = ErrorReply(
                seq=reply.seq, code=ErrorCode.MAC_CONFLICT,
                reason=f"lost to another NVE in the IMA: {', '.join(lost)}",
                details={"keys": ",".join(lost)})
        elif report.frozen:
            for key in report.frozen if first else ():  # not ours: do not pretend locally
                self._lost(key)
            failure = ErrorReply(
                seq=reply.seq, code=ErrorCode.ADDRESS_FROZEN,
                reason="; ".join(f"{k}: {why}" for k, why in report.frozen.items()),
                details={"keys": ",".join(report.frozen)})
            _log.warning("NVE %s: frozen addresses %s", self.config.nve_id, report.frozen)
        if failure is not None and first:
            self.counters[f"errors.{failure.code}"] += 1
        if msg.reply:
            await self._reply(msg, failure or reply)

    def _check_own(self, vn: str, listed: list[tuple[str, RemoteEntry]], revision: int) -> None:
        """Anti-entropy for our own bindings: etcd must hold exactly what we publish.

        ``listed`` is a periodic listing of ``vn`` at ``revision``. It is only compared
        when every write of ours is in it (nothing queued or being committed, nothing
        committed after it); otherwise the next period will. A key we publish that etcd
        lacks is written again, one of ours we no longer publish is deleted (both
        compare-and-swap, so a newer holder always wins), and both are counted.
        """
        writer = self.writer
        if (writer.depth or writer.busy or writer.last_revision > revision
                or self._recovering_lease):
            self.counters["own_checks_skipped"] += 1
            return
        prefix = self.layout.map_prefix(vn)
        me = self.config.nve_id
        in_etcd = {prefix + entry: e for entry, e in listed if e.nve == me}
        wanted = self._published(vn)
        repairs: list[WriteOp] = [op for key, op in wanted.items() if key not in in_etcd]
        repairs += [WriteDelete(key) for key in in_etcd if key not in wanted]
        self.counters["own_checks"] += 1
        if repairs and self._tg is not None:
            # Each key, so a post-mortem can follow it through etcd's history.
            shown = [f"{op.key} missing" if op.key in wanted else
                     f"{op.key} stray (epoch {in_etcd[op.key].epoch}, ours {self.epoch})"
                     for op in repairs[:8]]
            self._tg.create_task(self._repair_own(vn, repairs, revision, "; ".join(shown)))

    async def _repair_own(self, vn: str, repairs: list[WriteOp], revision: int,
                          shown: str) -> None:
        """Write the repairs, unless our lease is gone: after a pause past the TTL the
        listing misses every binding of ours because etcd expired them with the lease,
        and the lease-loss path (``_hold_lease``) republishes them all. Counting those
        as repairs would bury the real drifts this check is for. (A lease already
        replaced is caught by ``_recovering_lease``: between the new grant and the
        republish, the new lease is alive and our bindings are still missing.)"""
        lease = self.lease_id
        try:
            alive = await self.store.keepalive_once(lease) > 0
        except StoreError:
            alive = False  # cannot tell: the next period checks again
        if not alive or lease != self.lease_id or self._recovering_lease:
            self.counters["own_checks_lease_gone"] += 1
            return
        # Requests applied meanwhile may have changed what we publish (their writes are
        # queued already): keep only the repairs that still hold.
        wanted = self._published(vn)
        repairs = [op for op in repairs if (op.key in wanted) != isinstance(op, WriteDelete)]
        if not repairs:
            return
        self.counters["own_repairs"] += len(repairs)
        _log.warning("NVE %s: VN %s: %d of our bindings in etcd differed from what we "
                     "publish at revision %d; repaired: %s", self.config.nve_id, vn,
                     len(repairs), revision, shown)
        await self.writer.submit(repairs)

    def _published(self, vn: str) -> dict[str, WriteOp]:
        """Key -> write of every binding we publish in ``vn``."""
        prefix = self.layout.map_prefix(vn)
        return {op.key: op for op in self._execute(self.core.republish(vn))
                if op.key.startswith(prefix)}

    def _lost(self, key: str) -> None:
        parsed = self.layout.parse_map_key(key)
        if parsed is not None:
            vn, kind, addr = parsed
            self._submit_soon(self._execute(self.core.taken_over(vn, f"{kind}/{addr}", "?")))

    def _foreign(self, vn: str, entry: str, key: str, binding: Binding | RemoteEntry) -> None:
        """The watch shows another NVE holding a key: if it was ours, it moved."""
        kind, _, addr = entry.partition("/")
        local = (self.core.mac_owner.get((vn, addr)) if kind == "mac"
                 else self.core.ip_owner.get((vn, addr.replace("_", "/"))))
        if local is None and key not in self.writer.owned:
            return
        self.writer.disown(key)
        self.counters["taken_over"] += 1
        self._submit_soon(self._execute(self.core.taken_over(vn, entry, binding.nve)))

    def _submit_soon(self, ops: list[WriteOp]) -> None:
        """IMA writes decided outside a request (the VNIC's last address moved away,
        so the VN attachment goes): queued by a task of the service's group."""
        if ops and self._tg is not None:
            self._tg.create_task(self._submit_all(ops))

    async def _submit_all(self, ops: list[WriteOp]) -> None:
        await self.writer.submit(ops)

    async def _reply(self, msg: Msg, reply: OkReply | ErrorReply) -> None:
        if not msg.reply:
            self.counters["dropped_no_reply_subject"] += 1
            return
        try:
            await self.nc.publish(msg.reply, dumps(reply))
        except OutboundBufferLimitError:
            # Disconnected with nats-py's reconnect buffer full: this answer is lost
            # like one lost on the wire; the agent retransmits. Never fatal.
            self.counters["replies_dropped"] += 1

    # ------------------------------------------------------------ followers

    def _start_follower(self, vn: str) -> None:
        assert self._tg is not None
        old = self._followers.pop(vn, None)
        if old is not None:
            old.cancel()
        follower = VnFollower(
            vn, self.store, self.layout, self.core.remote, self.counters, self.latencies,
            self._changed.set, self._foreign, self.watch_stages, self.config.relist_s,
            self._check_own,
        )
        resume_from = 0
        saved = self._warm.pop(vn, None)
        if saved is not None:
            # Warm restart: what we knew at ``revision`` plus the watch from there, no
            # re-list (a compacted revision still falls back to one, counted).
            revision, items = saved
            self.core.remote.load_snapshot(vn, items, revision)
            resume_from = revision + 1
            self.counters["warm_resumes"] += 1
        self._followers[vn] = self._tg.create_task(follower.run(resume_from),
                                                   name=f"follow-{vn}")

    async def _save_periodically(self) -> None:
        """Keep a recent warm state on disk, so even a kill -9 allows a warm restart.

        A state saved at revision R is still right after a crash: the watch resumes
        at R+1 and replays what happened since (or re-lists if etcd compacted R).
        """
        while True:
            await asyncio.sleep(self.config.state_save_s)
            marker = tuple(r.revision for r in self.core.remote.vns.values())
            if marker != self._saved_at and self.config.state_file:
                started = time.perf_counter()
                data = warm_state.encode(self.config.nve_id, self.core.remote)
                # Only the encoding holds the event loop; the disk write does not.
                self.counters["warm_state_encode_us"] += int(
                    (time.perf_counter() - started) * 1e6)
                await asyncio.to_thread(warm_state.write, self.config.state_file, data)
                self._saved_at = marker
                self.counters["warm_state_saves"] += 1
                self._changed.set()

    def _save_warm_state(self) -> None:
        if self.config.state_file:
            warm_state.save(self.config.state_file, self.config.nve_id, self.core.remote)

    def _load_warm_state(self) -> warm_state.Saved:
        path = self.config.state_file
        if not path:
            return {}
        try:
            return warm_state.load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.counters["warm_state_unreadable"] += 1
            _log.warning("NVE %s: ignoring warm state %s (%s)", self.config.nve_id, path, exc)
            return {}

    def _stop_follower(self, vn: str) -> None:
        task = self._followers.pop(vn, None)
        if task is not None:
            task.cancel()

    def on_nats_error(self, exc: Exception) -> None:
        """Register with ``nvo3.connect.ErrorRelay``: a dropped request means resync."""
        if isinstance(exc, SlowConsumerError):
            self.counters["slow_consumer_drops"] += 1
            self.resync_seq += 1  # the next announcement asks every agent for its state
            self._announce_now.set()

    async def _announce(self) -> None:
        """Tell agents our epoch; a new one makes them send their full state.

        Repeated, because core NATS may drop a message: an agent that missed
        the first announcement catches the next one.  ``resync`` changes when
        NATS dropped requests meant for us (slow consumer): agents resync then
        too, so a drop is never silent divergence.
        """
        subject = self.subjects.nve_epoch(self.config.nve_id)
        while True:
            payload = dumps(EpochAnnounce(nve=self.config.nve_id, epoch=self.epoch,
                                          resync=self.resync_seq))
            await self.nc.publish(subject, payload)
            self.counters["epoch_announcements"] += 1
            self._announce_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.announce_s):
                    await self._announce_now.wait()

    # ------------------------------------------------------ timers, gleaning

    async def _timers(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            effects = self.core.tick(time.time_ns())
            if effects:
                ops = self._execute(effects)
                self.counters["ima_ops.timers"] += len(ops)
                await self.writer.submit(ops)
                self._changed.set()

    async def _serve_observed(self, sub: Any) -> None:
        async for msg in sub.messages:
            try:
                obs = decode_model(msg.data, AddrObserved)
                outcome = self.core.observe(obs, time.time_ns())
            except ProtocolError as exc:
                self.counters[f"glean_refused.{exc.code}"] += 1
                if msg.reply:
                    await self._reply(msg, ErrorReply(code=exc.code, reason=exc.reason))
                continue
            ops = self._execute(outcome.effects)
            self.counters["ima_ops.addr_observed"] += len(ops)
            done = await self.writer.submit(ops)
            self._changed.set()
            if msg.reply:
                reply = OkReply(op="addr_observed", ima_ops=len(ops))
                task = asyncio.create_task(self._reply_when(done, msg, reply))
                self._replies.add(task)
                task.add_done_callback(self._replies.discard)

    # ------------------------------------------- profiles and placements

    def _mirrors(self) -> list[PrefixMirror]:
        """IMA data every NVE keeps a live copy of: VN profiles [4.5], placements [5],
        NVE incarnations (issue 4) and which VNs exist (to forget deleted ones)."""
        return [
            PrefixMirror(self.store, self.layout.vn_profiles_prefix(), self._set_profile,
                         self._drop_profile, self.counters, self._changed.set),
            PrefixMirror(self.store, self.layout.placements_prefix(), self._set_placement,
                         self._drop_placement, self.counters, self._changed.set),
            PrefixMirror(self.store, self.layout.nves_prefix(), self._set_nve,
                         self._drop_nve, self.counters, self._changed.set),
            PrefixMirror(self.store, self.layout.vn_names_prefix(), self._learn_vn,
                         self._forget_vn, self.counters, self._changed.set),
        ]

    def _learn_vn(self, name: str, value: bytes, revision: int) -> None:
        """A VN exists: resolve it without asking etcd (``nve.resolver``)."""
        del name, revision
        try:
            record = VnRecord.model_validate_json(value)
        except ValueError:
            self.counters["vn_records_unreadable"] += 1
            return
        self.resolver.learn(record)
        self.counters["vns_learned"] += 1

    def _forget_vn(self, name: str) -> None:
        """A VN was deleted from the registry: stop resolving it from the cache."""
        if self.resolver.forget(name):
            self.counters["vns_forgotten"] += 1

    def _set_nve(self, nve: str, value: bytes, revision: int) -> None:
        """An NVE (re)registered: forget what its older incarnations left [issue 4]."""
        del revision
        record = NveRecord.model_validate_json(value)
        if record.nve == self.config.nve_id:
            if record.epoch > self.epoch:
                self.counters["superseded"] += 1
                raise Superseded(f"NVE {record.nve}: a newer incarnation ({record.epoch}) "
                                 f"registered; this one ({self.epoch}) stops")
            return
        dropped = self.core.remote.nve_epoch(record.nve, record.epoch)
        if dropped:
            self.counters["remote_leftovers_dropped"] += dropped
            _log.info("NVE %s restarted (epoch %d): dropped %d leftover mappings",
                      record.nve, record.epoch, dropped)

    def _drop_nve(self, nve: str) -> None:
        del nve  # its lease ended: its bindings go with it, one watch event each

    def _set_profile(self, name: str, value: bytes, revision: int) -> None:
        profile = VnProfile.model_validate_json(value)
        self.core.profiles[name] = profile.model_copy(update={"revision": revision})

    def _drop_profile(self, name: str) -> None:
        self.core.profiles.pop(name, None)

    def _set_placement(self, vnic: str, value: bytes, revision: int) -> None:
        del revision
        self.core.placements[vnic] = Placement.model_validate_json(value).hypervisor

    def _drop_placement(self, vnic: str) -> None:
        self.core.placements.pop(vnic, None)

    # ------------------------------------------------------------ operators

    async def _serve_tables(self, sub: Any) -> None:
        async for msg in sub.messages:
            if not msg.reply:
                continue
            try:
                query = (decode_model(msg.data, TablesQuery) if msg.data.strip(b" {}")
                         else TablesQuery())
            except ProtocolError as exc:
                await self._reply(msg, ErrorReply(code=exc.code, reason=exc.reason))
                continue
            snap = self.snapshot(query.stages_since_ns)
            data = orjson.dumps(snap)
            if len(data) > self.nc.max_payload:
                # Too big for one NATS message: answer with what fits, and say so.
                self.counters["tables_truncated"] += 1
                summary = {k: v for k, v in snap.items()
                           if k not in ("vnics", "ports", "remote")}
                summary["truncated"] = (f"tables are {len(data)} bytes, over NATS "
                                        f"max_payload {self.nc.max_payload}; use etcdctl")
                summary["sizes"] = {"vnics": len(self.core.vnics),
                                    "remote": self.core.remote.size()}
                data = orjson.dumps(summary)
            await self.nc.publish(msg.reply, data)

    def snapshot(self, stages_since_ns: int = 0) -> dict[str, Any]:
        tables = self.core.tables()
        tables["epoch"] = self.epoch
        tables["counters"] = dict(sorted(self.counters.items()))
        tables["queue_depth"] = self.writer.depth
        tables["stages_ms"] = {name: percentiles(samples, stages_since_ns)
                               for name, samples in self.stages.items()}
        # Kept out of ``stages_ms``, which is about requests: the loop's lateness and the
        # remote side (watch responses applied), over the same window.
        tables["loop_lag_ms"] = self.loop_lag.summary(stages_since_ns)
        tables["watch_ms"] = {name: percentiles(samples, stages_since_ns)
                              for name, samples in self.watch_stages.items()}
        tables["writer_ms"] = {"batch": percentiles(self.writer.batch_times, stages_since_ns)}
        return tables

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait for a table change that makes ``predicate`` true (tests, demo).

        Callers bound it with ``asyncio.timeout``.
        """
        while not predicate():
            self._changed.clear()
            await self._changed.wait()
