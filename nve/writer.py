"""Batched, ordered, ownership-checked IMA writes for one NVE.

Requests are applied to the core one at a time, but their IMA writes are
queued here and committed together: a batch takes everything waiting (up to
``max_batch_ops``), keeps only the last write per key (a put then a delete of
the same key is just the delete), and commits it in etcd transactions of at
most 128 operations; those touch disjoint keys, so they are sent together (up to
``max_txns_in_flight``) and etcd commits them in one round.  Batches themselves
stay strictly one after another.  Each request's future resolves with a ``WriteReport``
once its writes are durable, so the reply to the hypervisor means
"registered in the IMA".

Every write is conditional (compare-and-swap on the key's mod revision):
  * a put of a key we own compares with the revision of our last write, a put
    of a new key requires the key to be missing;
  * a delete only removes a key that is still ours;
  * a claim (migration arrival) reads the current holder, applies the EVPN
    mobility rules (``ima.mobility``) and compares on the holder's revision.
So a stale writer - an old NVE after its VNIC moved, a late withdraw - can
never overwrite or remove the new location.  Ownership also names the
incarnation: every binding carries the writer's ``epoch``, and a key held by a
newer incarnation of this same NVE (we are a zombie: paused, replaced, still
running) is never ours - the write is reported lost.  A write that loses is reported
(``lost``), never retried blindly.

Transient etcd failures are retried forever with capped backoff: the queue is
bounded, so a stuck IMA back-pressures the request loop instead of dropping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from ima.mobility import MobilityPolicy, claim
from ima.store import (
    Compare,
    Delete,
    EtcdStore,
    Get,
    KeyMissing,
    KeyValue,
    LeaseLost,
    ModRevisionEquals,
    Put,
    StoreUnavailable,
)
from nve.follower import decode_binding
from nve.remote import Binding
from schemas.errors import ProtocolError

_log = logging.getLogger(__name__)

MAX_TXN_OPS = 128
_RECHECKS = 3  # a key whose compare-and-swap failed is read again this often


@dataclass(frozen=True)
class WritePut:
    key: str
    value: bytes


@dataclass(frozen=True)
class WriteDelete:
    key: str


@dataclass(frozen=True)
class WriteClaim:
    """Take a binding over from whichever NVE holds it (migration arrival)."""

    key: str
    kind: str  # "mac" | "ip"
    binding: Binding


WriteOp = WritePut | WriteDelete | WriteClaim


@dataclass
class WriteReport:
    revision: int = 0
    lost: list[str] = field(default_factory=list)  # held by another NVE: not written
    frozen: dict[str, str] = field(default_factory=dict)  # key -> reason (duplicate detection)
    answered: bool = False  # the service acted on lost/frozen keys once (nve.service)


@dataclass
class _Pending:
    ops: list[WriteOp]
    done: asyncio.Future[WriteReport]


@dataclass
class _Planned:
    op: WriteOp
    compare: Compare | None  # None: nothing to do (a delete of a key not ours)
    txn_op: Put | Delete | None


@dataclass
class ImaWriter:
    store: EtcdStore
    counters: Counter[str]
    nve_id: str = ""
    policy: MobilityPolicy = field(default_factory=MobilityPolicy)
    max_batch_ops: int = 4096
    queue_size: int = 10_000
    max_txns_in_flight: int = 8  # transactions of one batch sent to etcd together
    owned: dict[str, int] = field(default_factory=dict)  # key -> mod revision we wrote
    lease_id: int = 0  # every binding carries the NVE's lease: it dies with the NVE
    epoch: int = 0  # this incarnation; a key held by a newer one of ours is not ours
    #: (committed_ns, duration_ns) of each batch: planning + etcd round trips (and any
    #: retries), last 10 000; the rest of a request's "commit" stage is queueing.
    batch_times: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=10_000))
    busy: bool = False  # a batch is being committed
    last_revision: int = 0  # etcd revision of the newest commit of ours
    _queue: asyncio.Queue[_Pending] = field(init=False)
    _lease_ok: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        self._lease_ok = asyncio.Event()
        self._lease_ok.set()

    def lease_lost(self) -> None:
        """Hold writes until ``new_lease``: puts with a dead lease would fail."""
        self._lease_ok.clear()

    def new_lease(self, lease_id: int) -> None:
        """The old lease expired and took our keys with it: nothing is ours any more."""
        self.lease_id = lease_id
        self.owned.clear()
        self._lease_ok.set()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def disown(self, key: str) -> None:
        """Another NVE holds ``key`` now (seen on the watch)."""
        self.owned.pop(key, None)

    async def submit(self, ops: list[WriteOp]) -> asyncio.Future[WriteReport]:
        """Queue ``ops``; the returned future gives what happened to them."""
        done: asyncio.Future[WriteReport] = asyncio.get_running_loop().create_future()
        if not ops:
            done.set_result(WriteReport())
            return done
        await self._queue.put(_Pending(ops, done))
        return done

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed (tests, shutdown)."""
        done: asyncio.Future[WriteReport] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending([], done))
        await done

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].ops)
            while size < self.max_batch_ops and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item.ops)
            self.counters["ima_batches"] += 1
            self.counters["ima_batched_requests"] += len(batch)
            merged: dict[str, WriteOp] = {}
            for item in batch:
                for op in item.ops:
                    merged.pop(op.key, None)  # re-insert so order follows the last write
                    merged[op.key] = op
            started = time.perf_counter_ns()
            self.busy = True
            try:
                report = await self._retrying(list(merged.values()))
            finally:
                self.busy = False
            self.last_revision = max(self.last_revision, report.revision)
            self.batch_times.append((time.time_ns(), time.perf_counter_ns() - started))
            clean = WriteReport(report.revision) if not (report.lost or report.frozen) else None
            for item in batch:
                if item.done.done():
                    continue
                if clean is not None:  # nothing lost or frozen: one report fits everybody
                    item.done.set_result(clean)
                    continue
                mine = {op.key for op in item.ops}
                item.done.set_result(
                    WriteReport(
                        report.revision,
                        [k for k in report.lost if k in mine],
                        {k: v for k, v in report.frozen.items() if k in mine},
                    )
                )

    async def _retrying(self, ops: list[WriteOp]) -> WriteReport:
        backoff = 0.05
        while True:
            await self._lease_ok.wait()
            lease = self.lease_id
            try:
                return await self._commit(ops)
            except LeaseLost:
                self.counters["ima_lease_waits"] += 1
                # Hold only if the lease that failed is still the one we have. The
                # service may have installed a new one while this commit was in
                # flight; holding then would wait for a ``new_lease`` that already
                # came, and every write of the NVE would hang (chaos, nve_pause).
                if self.lease_id == lease:
                    self.lease_lost()
                continue
            except StoreUnavailable as exc:
                self.counters["ima_retries"] += 1
                _log.warning("IMA commit of %d ops failed (%s); retrying", len(ops), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # ------------------------------------------------------------ planning

    async def _commit(self, ops: list[WriteOp]) -> WriteReport:
        report = WriteReport()
        claims = [op for op in ops if isinstance(op, WriteClaim)]
        current = await self._read([op.key for op in claims]) if claims else {}
        planned: list[_Planned] = []
        for op in ops:
            plan = self._plan(op, current, report)
            if plan is not None:
                planned.append(plan)
        chunks = [planned[i : i + MAX_TXN_OPS] for i in range(0, len(planned), MAX_TXN_OPS)]
        if len(chunks) <= 1:
            for chunk in chunks:
                await self._commit_chunk(chunk, report)
            return report
        # The chunks of one batch write disjoint keys (merged above), so their order does
        # not matter and they go to etcd together: etcd commits concurrent transactions in
        # one raft round and fsync, where one after the other each pays its own.
        gate = asyncio.Semaphore(self.max_txns_in_flight)

        async def one(chunk: list[_Planned]) -> None:
            async with gate:
                await self._commit_chunk(chunk, report)

        tasks = [asyncio.ensure_future(one(chunk)) for chunk in chunks]
        try:
            # Every chunk runs to its end, even when one fails: a transaction cancelled
            # on our side may still be applied by etcd, and would then land in the
            # middle of the retry's fresh plan (its compare-and-swap would fail
            # against our own late write, and the key would be reported lost).
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:  # only if we are cancelled ourselves
                task.cancel()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return report

    def _plan(
        self, op: WriteOp, current: dict[str, KeyValue], report: WriteReport
    ) -> _Planned | None:
        if isinstance(op, WriteDelete):
            rev = self.owned.get(op.key)
            if rev is None:
                return _Planned(op, None, None)  # resolved per key (maybe ours from before)
            return _Planned(op, ModRevisionEquals(op.key, rev), Delete(op.key))
        if isinstance(op, WritePut):
            rev = self.owned.get(op.key)
            cmp: Compare = KeyMissing(op.key) if rev is None else ModRevisionEquals(op.key, rev)
            return _Planned(op, cmp, Put(op.key, op.value, lease=self.lease_id))
        held = current.get(op.key)
        holder: Binding | None = None
        if held is not None:
            try:
                holder = decode_binding(op.kind, held.value)
            except ValidationError:
                holder = None
        try:
            new = claim(holder, op.binding, time.time_ns(), self.policy)  # type: ignore[type-var]
        except ProtocolError as exc:
            report.frozen[op.key] = exc.reason
            self.counters["ima_frozen"] += 1
            return None
        if holder is not None and holder.nve == self.nve_id and holder.epoch > self.epoch:
            report.lost.append(op.key)
            self.counters["ima_superseded"] += 1
            return None
        if holder is not None and holder.nve != self.nve_id:
            self.counters["ima_claims"] += 1
        value = orjson.dumps(new.model_dump(mode="json"))
        cmp = KeyMissing(op.key) if held is None else ModRevisionEquals(op.key, held.mod_revision)
        return _Planned(op, cmp, Put(op.key, value, lease=self.lease_id))

    async def _read(self, keys: list[str]) -> dict[str, KeyValue]:
        out: dict[str, KeyValue] = {}
        for start in range(0, len(keys), MAX_TXN_OPS):
            chunk = keys[start : start + MAX_TXN_OPS]
            result = await self.store.txn([], [Get(k) for k in chunk])
            for resp in result.responses:
                for kv in resp.kvs:
                    out[kv.key] = kv
        self.counters["ima_reads"] += 1
        return out

    # ----------------------------------------------------------- committing

    async def _commit_chunk(self, chunk: list[_Planned], report: WriteReport) -> None:
        ready = [p for p in chunk if p.compare is not None and p.txn_op is not None]
        unresolved = [p for p in chunk if p.compare is None]
        if ready:
            result = await self.store.txn(
                [p.compare for p in ready if p.compare is not None],
                [p.txn_op for p in ready if p.txn_op is not None],
            )
            self.counters["ima_txns"] += 1
            if result.succeeded:
                self._owned_after(ready, result.revision, report)
            else:
                self.counters["ima_cas_fallbacks"] += 1
                unresolved.extend(ready)
        for plan in unresolved:
            await self._commit_one(plan, report)

    def _owned_after(self, done: list[_Planned], revision: int, report: WriteReport) -> None:
        report.revision = max(report.revision, revision)
        for plan in done:
            if isinstance(plan.txn_op, Delete):
                self.owned.pop(plan.op.key, None)
                self.counters["ima_deletes"] += 1
            else:
                self.owned[plan.op.key] = revision
                self.counters["ima_puts"] += 1

    async def _commit_one(self, plan: _Planned, report: WriteReport, again: int = 0) -> None:
        """One key on its own: find out who holds it and act only if it is ours."""
        key = plan.op.key
        kv = await self.store.get(key)
        holder, epoch = (None, 0) if kv is None else _holder(kv.value)
        if holder == self.nve_id and epoch > self.epoch:
            # A newer incarnation of this NVE holds it: we are the leftover.
            self.owned.pop(key, None)
            if not isinstance(plan.op, WriteDelete):
                report.lost.append(key)
            self.counters["ima_superseded"] += 1
            return
        mine = holder == self.nve_id
        if isinstance(plan.op, WriteDelete):
            if kv is None or not mine:
                self.owned.pop(key, None)
                self.counters["ima_deletes_skipped_not_ours"] += 1
                return
            compare: Compare = ModRevisionEquals(key, kv.mod_revision)
            op: Put | Delete = Delete(key)
        elif isinstance(plan.op, WriteClaim):
            # The holder changed between our read and our write: re-plan the claim.
            current = {} if kv is None else {key: kv}
            replanned = self._plan(plan.op, current, report)
            if replanned is None or replanned.compare is None or replanned.txn_op is None:
                return
            compare, op = replanned.compare, replanned.txn_op
        else:
            if kv is not None and not mine:
                self.owned.pop(key, None)
                report.lost.append(key)
                self.counters["ima_lost"] += 1
                return
            assert plan.txn_op is not None
            compare = KeyMissing(key) if kv is None else ModRevisionEquals(key, kv.mod_revision)
            op = plan.txn_op
        result = await self.store.txn([compare], [op])
        self.counters["ima_txns"] += 1
        if result.succeeded:
            self._owned_after([_Planned(plan.op, compare, op)], result.revision, report)
        elif again < _RECHECKS:
            # The key changed between our read and our write. Only a holder other than
            # this incarnation makes it lost; if it was a write of our own (one that
            # etcd applied late), look again and write on top of it.
            self.counters["ima_cas_rechecks"] += 1
            await self._commit_one(plan, report, again + 1)
        else:
            report.lost.append(key)
            self.counters["ima_lost"] += 1


def _holder(value: bytes) -> tuple[str | None, int]:
    """The NVE holding a binding and the incarnation that wrote it."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, 0
    if not isinstance(obj, dict):
        return None, 0
    nve, epoch = obj.get("nve"), obj.get("epoch", 0)
    return (nve if isinstance(nve, str) else None), (epoch if type(epoch) is int else 0)
