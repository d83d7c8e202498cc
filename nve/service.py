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
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from ima.keys import KeyLayout
from ima.registry import VnRegistry
from ima.store import Delete, EtcdStore, Put
from nve.core import NveCore
from nve.effects import BindIp, BindMac, Effect, StartWatch, StopWatch, UnbindIp, UnbindMac
from nve.follower import VnFollower
from nve.resolver import VnResolver
from nve.writer import ImaWriter
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ErrorReply, HypervisorMessage, OkReply
from schemas.records import NveRecord, VnRecord
from schemas.subjects import Subjects
from schemas.wire import decode_hypervisor, dumps

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NveConfig:
    nve_id: str
    underlay: str
    lease_ttl: int = 5
    pending_limit: int = 65_536  # NATS subscription buffer (messages)


def _json(model: Any) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


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
        self.core = NveCore(config.nve_id, config.underlay)
        self.counters: Counter[str] = Counter()
        self.latencies: deque[int] = deque(maxlen=200_000)
        self.writer = ImaWriter(store, self.counters)
        self.resolver = VnResolver(VnRegistry(store, self.layout))
        self.epoch = time.time_ns()
        self.lease_id = 0
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._replies: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        cfg = self.config
        self.lease_id = await self.store.grant_lease(cfg.lease_ttl)
        record = NveRecord(
            nve=cfg.nve_id, underlay=cfg.underlay, epoch=self.epoch, started_ns=self.epoch
        )
        await self.store.put(self.layout.nve(cfg.nve_id), _json(record), lease=self.lease_id)
        requests = await self.nc.subscribe(
            self.subjects.nve_requests(cfg.nve_id), pending_msgs_limit=cfg.pending_limit
        )
        tables = await self.nc.subscribe(self.subjects.nve_tables(cfg.nve_id))
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.writer.run(), name=f"{cfg.nve_id}-writer")
                tg.create_task(
                    self.store.run_keepalive(self.lease_id, cfg.lease_ttl, self._lease_lost),
                    name=f"{cfg.nve_id}-lease",
                )
                tg.create_task(self._serve_requests(requests), name=f"{cfg.nve_id}-requests")
                tg.create_task(self._serve_tables(tables), name=f"{cfg.nve_id}-tables")
                self.ready.set()
        finally:
            self._tg = None
            for sub in (requests, tables):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            # A graceful stop withdraws our bindings at once instead of waiting for the
            # lease to expire (the bindings carry the lease).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.revoke_lease(self.lease_id))

    def _lease_lost(self) -> None:
        self.counters["lease_lost"] += 1
        _log.error("NVE %s: etcd lease lost; bindings are gone from the IMA", self.config.nve_id)

    # ------------------------------------------------------------- requests

    async def _serve_requests(self, sub: Any) -> None:
        async for msg in sub.messages:
            await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        """One hypervisor request; never raises for anything the sender did."""
        seq: int | None = None
        kind = "?"
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
            vn = await self._resolve(request)
            outcome = self.core.apply(request, vn, time.time_ns())
        except ProtocolError as exc:
            self.counters[f"errors.{exc.code}"] += 1
            await self._reply(msg, ErrorReply(seq=seq, code=exc.code, reason=exc.reason,
                                              details={k: str(v) for k, v in exc.fields.items()}))
            return
        self.counters[f"messages.{kind}"] += 1
        if outcome.replayed:
            self.counters["replays"] += 1
        ops = self._execute(outcome.effects)
        done = await self.writer.submit(ops)
        reply = OkReply(seq=seq, op=kind, result=outcome.result, ima_ops=len(ops))
        self._changed.set()
        if not msg.reply:
            return
        task = asyncio.create_task(self._reply_when(done, msg, reply))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _resolve(self, request: HypervisorMessage) -> VnRecord | None:
        ref = getattr(request, "vn", None)
        if ref is None:
            return None
        try:
            return await self.resolver.resolve(ref)
        except ProtocolError:
            raise
        except Exception as exc:  # the IMA is unreachable: refuse, change nothing
            raise ProtocolError(ErrorCode.IMA_UNAVAILABLE, f"cannot resolve VN: {exc}") from exc

    def _execute(self, effects: tuple[Effect, ...]) -> list[Put | Delete]:
        ops: list[Put | Delete] = []
        keys = self.layout
        for eff in effects:
            if isinstance(eff, BindMac):
                b = eff.binding
                ops.append(Put(keys.mac(b.vn, b.mac), _json(b), lease=self.lease_id))
            elif isinstance(eff, BindIp):
                ib = eff.binding
                ops.append(Put(keys.ip(ib.vn, ib.ip), _json(ib), lease=self.lease_id))
            elif isinstance(eff, UnbindMac):
                ops.append(Delete(keys.mac(eff.vn, eff.mac)))
            elif isinstance(eff, UnbindIp):
                ops.append(Delete(keys.ip(eff.vn, eff.ip)))
            elif isinstance(eff, StartWatch):
                self._start_follower(eff.vn)
            elif isinstance(eff, StopWatch):
                self._stop_follower(eff.vn)
        return ops

    async def _reply_when(self, done: asyncio.Future[int], msg: Msg, reply: OkReply) -> None:
        await done
        await self._reply(msg, reply)

    async def _reply(self, msg: Msg, reply: OkReply | ErrorReply) -> None:
        if not msg.reply:
            self.counters["dropped_no_reply_subject"] += 1
            return
        await self.nc.publish(msg.reply, dumps(reply))

    # ------------------------------------------------------------ followers

    def _start_follower(self, vn: str) -> None:
        assert self._tg is not None
        old = self._followers.pop(vn, None)
        if old is not None:
            old.cancel()
        follower = VnFollower(
            vn, self.store, self.layout, self.core.remote, self.counters, self.latencies,
            self._changed.set,
        )
        self._followers[vn] = self._tg.create_task(follower.run(), name=f"follow-{vn}")

    def _stop_follower(self, vn: str) -> None:
        task = self._followers.pop(vn, None)
        if task is not None:
            task.cancel()

    # ------------------------------------------------------------ operators

    async def _serve_tables(self, sub: Any) -> None:
        async for msg in sub.messages:
            if msg.reply:
                await self.nc.publish(msg.reply, orjson.dumps(self.snapshot()))

    def snapshot(self) -> dict[str, Any]:
        tables = self.core.tables()
        tables["epoch"] = self.epoch
        tables["counters"] = dict(sorted(self.counters.items()))
        tables["queue_depth"] = self.writer.depth
        return tables

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait for a table change that makes ``predicate`` true (tests, demo).

        Callers bound it with ``asyncio.timeout``.
        """
        while not predicate():
            self._changed.clear()
            await self._changed.wait()
