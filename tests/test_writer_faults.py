"""The IMA writer when etcd answers late, or a write of its own lands late.

A late failure of the old lease must not stall it. When an NVE's lease dies (a
pause longer than its TTL), two tasks react: the keepalive reports it and the
service installs a new lease (``new_lease``), and a commit that was in flight
with the old lease fails with ``LeaseLost``. If that failure arrives after the
new lease was installed, the writer must simply retry with the new lease. It
used to hold for a ``new_lease`` that had already come, and every later write of
the NVE hung (found by ``nvo3 chaos``, ``nve_pause``).

A compare-and-swap that fails because a write of this same NVE landed late (a
transaction of an attempt that failed, applied by etcd anyway) is not a conflict.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from ima.store import EtcdStore, TxnResult
from nve.writer import ImaWriter, WritePut

pytestmark = pytest.mark.integration


class _NewLeaseDuringFirstTxn:
    """The real store; its first txn lets ``new_lease`` happen while it is in flight."""

    def __init__(self, store: EtcdStore, on_first_txn: Any) -> None:
        self._store = store
        self._on_first_txn = on_first_txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def txn(self, compares: Sequence[Any], success: Sequence[Any],
                  failure: Sequence[Any] = ()) -> TxnResult:
        hook, self._on_first_txn = self._on_first_txn, None
        if hook is not None:
            hook()  # the service installs the new lease; this txn still carries the old
        return await self._store.txn(compares, success, failure)


async def test_a_commit_failing_on_the_old_lease_after_a_new_one_is_retried(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    async with EtcdStore(etcd_endpoints) as store:
        old = await store.grant_lease(30)
        new = await store.grant_lease(30)
        await store.revoke_lease(old)  # expired during the pause
        writer: ImaWriter
        wrapped = _NewLeaseDuringFirstTxn(store, lambda: writer.new_lease(new))
        writer = ImaWriter(wrapped, Counter(), "nve1", lease_id=old)  # type: ignore[arg-type]
        task = asyncio.create_task(writer.run())
        try:
            async with asyncio.timeout(10):
                report = await (await writer.submit([WritePut(key_prefix + "k", b"v")]))
            assert report.lost == []
            assert writer.counters["ima_lease_waits"] == 1
            kv = await store.get(key_prefix + "k")
            assert kv is not None
            assert kv.lease == new
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.delete_prefix(key_prefix)
            await store.revoke_lease(new)


class _OwnWriteLandsLate:
    """The real store; after the writer reads ``key``, a write of the same NVE lands
    (a transaction of a failed attempt that etcd applied late) before the writer's own
    compare-and-swap."""

    def __init__(self, store: EtcdStore, key: str, late_value: bytes) -> None:
        self._store = store
        self._key = key
        self._late_value: bytes | None = late_value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get(self, key: str) -> Any:
        kv = await self._store.get(key)
        late, self._late_value = self._late_value, None
        if key == self._key and late is not None:
            await self._store.put(key, late)
        return kv


async def test_a_compare_and_swap_lost_to_our_own_late_write_is_not_a_conflict(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    """Only another NVE holding the key makes it lost; our own late write is written
    over (found by ``nvo3 chaos --faults etcd_leader_kill``: false ``mac_conflict``s)."""
    key = key_prefix + "mac"
    ours = orjson.dumps({"nve": "nve1", "epoch": 1, "v": "late"})
    async with EtcdStore(etcd_endpoints) as store:
        await store.put(key, orjson.dumps({"nve": "nve1", "epoch": 1, "v": "old"}))
        wrapped = _OwnWriteLandsLate(store, key, ours)
        writer = ImaWriter(wrapped, Counter(), "nve1", epoch=1)  # type: ignore[arg-type]
        task = asyncio.create_task(writer.run())
        try:
            async with asyncio.timeout(10):
                # Not in ``owned``: the put compares "missing", fails, and goes key by key.
                report = await (await writer.submit([WritePut(key, b'{"nve":"nve1"}')]))
            assert report.lost == []
            assert writer.counters["ima_cas_rechecks"] == 1
            kv = await store.get(key)
            assert kv is not None
            assert kv.value == b'{"nve":"nve1"}'
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.delete_prefix(key_prefix)
