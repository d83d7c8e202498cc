"""A live local copy of one small IMA prefix: list at a revision, then watch.

Used for data every NVE needs whole (VN profiles, VNIC placements).  After a
compaction the listing is redone (counted), never skipped.  A record that does
not parse is counted and ignored, so one bad value cannot stop the mirror.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from pydantic import ValidationError

from ima.store import EtcdStore, StoreError, WatchCompacted


class PrefixMirror:
    def __init__(
        self,
        store: EtcdStore,
        prefix: str,
        on_put: Callable[[str, bytes, int], None],
        on_delete: Callable[[str], None],
        counters: Counter[str],
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
        self.prefix = prefix
        self._on_put = on_put
        self._on_delete = on_delete
        self._counters = counters
        self._on_change = on_change
        self.revision = 0

    async def load(self) -> int:
        items, self.revision = await self._store.get_prefix(self.prefix)
        for kv in items:
            self._put(kv.key, kv.value, kv.mod_revision)
        self._on_change()
        return self.revision

    async def follow(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self._store.watch_prefix(self.prefix, self.revision + 1) as watch:
                    async for events in watch:
                        for ev in events:
                            if ev.kind == "put":
                                self._put(ev.key, ev.value, ev.mod_revision)
                            else:
                                self._on_delete(ev.key[len(self.prefix):])
                            self.revision = ev.mod_revision
                        self._counters["mirror_updates"] += len(events)
                        self._on_change()
            except WatchCompacted:
                self._counters["relists_after_compaction"] += 1
                await self._reload()
            except StoreError:  # etcd unreachable past its retries: list again later
                self._counters["mirror_retries"] += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._reload()

    async def _reload(self) -> None:
        try:
            await self.load()
        except StoreError:
            self._counters["mirror_retries"] += 1

    def _put(self, key: str, value: bytes, revision: int) -> None:
        try:
            self._on_put(key[len(self.prefix):], value, revision)
        except (ValidationError, ValueError):
            self._counters["bad_ima_records"] += 1
