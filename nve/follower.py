"""Learning one VN's remote mappings from the IMA: list at a revision, then watch.

The listing fixes a revision R; the watch starts at R+1, so nothing falls in
between.  If etcd compacted past where the watch wants to resume, the store
raises ``WatchCompacted`` and we list again and replace the VN's remote table
(a counted re-list) instead of silently skipping events.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from pydantic import ValidationError

from ima.keys import KeyLayout
from ima.store import EtcdStore, WatchCompacted, WatchEvent
from nve.remote import Binding, RemoteTable
from schemas.records import IpBinding, MacBinding

_log = logging.getLogger(__name__)


def decode_binding(kind: str, value: bytes) -> Binding:
    if kind == "mac":
        return MacBinding.model_validate_json(value)
    return IpBinding.model_validate_json(value)


class VnFollower:
    def __init__(
        self,
        vn: str,
        store: EtcdStore,
        layout: KeyLayout,
        remote: RemoteTable,
        counters: Counter[str],
        latencies: deque[int],
        on_change: Callable[[], None],
        on_foreign: Callable[[str, str, str, Binding], None] | None = None,
    ) -> None:
        self.vn = vn
        self._store = store
        self._layout = layout
        self._remote = remote
        self._counters = counters
        self._latencies = latencies
        self._on_change = on_change
        self._on_foreign = on_foreign

    async def run(self) -> None:
        prefix = self._layout.map_prefix(self.vn)
        while self._remote.serves(self.vn):
            revision = await self._relist(prefix)
            try:
                async with self._store.watch_prefix(prefix, revision + 1) as watch:
                    async for events in watch:
                        self._apply(events)
            except WatchCompacted as exc:
                self._counters["relists_after_compaction"] += 1
                _log.warning("VN %s: watch revision compacted (%d); re-listing",
                             self.vn, exc.compact_revision)

    async def _relist(self, prefix: str) -> int:
        items, revision = await self._store.get_prefix(prefix)
        snapshot: list[tuple[str, Binding]] = []
        for kv in items:
            parsed = self._layout.parse_map_key(kv.key)
            if parsed is None:
                continue
            _, kind, addr = parsed
            try:
                binding = decode_binding(kind, kv.value)
            except ValidationError:
                self._counters["bad_ima_records"] += 1
                continue
            snapshot.append((f"{kind}/{addr}", binding))
            if self._on_foreign is not None and binding.nve != self._remote.nve_id:
                self._on_foreign(self.vn, f"{kind}/{addr}", kv.key, binding)
        self._remote.load_snapshot(self.vn, snapshot, revision)
        self._counters["relists"] += 1
        self._on_change()
        return revision

    def _apply(self, events: list[WatchEvent]) -> None:
        now = time.time_ns()
        for ev in events:
            parsed = self._layout.parse_map_key(ev.key)
            if parsed is None:
                continue
            _, kind, addr = parsed
            entry = f"{kind}/{addr}"
            if ev.kind == "delete":
                self._remote.delete(self.vn, entry, ev.mod_revision)
                self._counters["remote_deletes"] += 1
                continue
            try:
                binding = decode_binding(kind, ev.value)
            except ValidationError:
                self._counters["bad_ima_records"] += 1
                continue
            if self._remote.put(self.vn, entry, binding, ev.mod_revision):
                self._counters["remote_puts"] += 1
                if binding.nve != self._remote.nve_id:
                    if binding.ts_ns:
                        self._latencies.append(now - binding.ts_ns)
                    if self._on_foreign is not None:
                        self._on_foreign(self.vn, entry, ev.key, binding)
        self._on_change()
