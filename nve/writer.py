"""Batched, ordered IMA writes for one NVE.

Requests are applied to the core one at a time, but their IMA writes are
queued here and committed together: a batch takes everything waiting (up to
``max_batch_ops``), keeps only the last write per key (a put then a delete of
the same key is just the delete), and commits it in etcd transactions of at
most 128 operations.  Each request's future resolves when its writes are
durable, so the reply to the hypervisor means "registered in the IMA".

Transient etcd failures are retried forever with capped backoff: the queue is
bounded, so a stuck IMA back-pressures the request loop instead of dropping.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

from ima.store import Delete, EtcdStore, Put, StoreUnavailable

_log = logging.getLogger(__name__)

Op = Put | Delete


@dataclass
class _Pending:
    ops: list[Op]
    done: asyncio.Future[int]


@dataclass
class ImaWriter:
    store: EtcdStore
    counters: Counter[str]
    max_batch_ops: int = 4096
    queue_size: int = 10_000
    _queue: asyncio.Queue[_Pending] = field(init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, ops: list[Op]) -> asyncio.Future[int]:
        """Queue ``ops``; the returned future gives the commit revision."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not ops:
            done.set_result(0)
            return done
        await self._queue.put(_Pending(ops, done))
        return done

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].ops)
            while size < self.max_batch_ops and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item.ops)
            merged: dict[str, Op] = {}
            for item in batch:
                for op in item.ops:
                    merged.pop(op.key, None)  # re-insert so order follows the last write
                    merged[op.key] = op
            revision = await self._commit(list(merged.values()))
            for item in batch:
                if not item.done.done():
                    item.done.set_result(revision)

    async def _commit(self, ops: list[Op]) -> int:
        backoff = 0.05
        while True:
            try:
                result = await self.store.commit(ops)
            except StoreUnavailable as exc:
                self.counters["ima_retries"] += 1
                _log.warning("IMA commit of %d ops failed (%s); retrying", len(ops), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.counters["ima_txns"] += result.txns
            for op in ops:
                self.counters["ima_puts" if isinstance(op, Put) else "ima_deletes"] += 1
            return result.revision
