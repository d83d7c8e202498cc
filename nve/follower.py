"""Learning one VN's remote mappings from the IMA: list at a revision, then watch.

The listing fixes a revision R; the watch starts at R+1, so nothing falls in
between.  If etcd compacted past where the watch wants to resume, the store
raises ``WatchCompacted`` and we list again and replace the VN's remote table
(a counted re-list) instead of silently skipping events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError

from ima.keys import KeyLayout
from ima.store import (
    EtcdStore,
    KeyValue,
    Page,
    RevisionCompacted,
    StoreError,
    WatchCompacted,
    WatchEvent,
)
from nve.construct import construct_unchecked, construct_via_pydantic
from nve.remote import Binding, RemoteEntry, RemoteTable
from schemas.records import IpBinding, MacBinding

_log = logging.getLogger(__name__)

#: Keys per listing page: ~3.3 MB of bindings, under gRPC's default 4 MiB message limit
#: (``iter_prefix`` halves the page if one is refused).  Large pages matter: etcd counts
#: the whole rest of the range for every page it returns, so paging through N keys
#: costs O(N^2 / page) on the server (1M keys: 32 s with 4096-key pages, 9.5 s with
#: 65536-key pages, which need a larger gRPC receive limit in ima/store.py).
RELIST_PAGE = 50_000  # large pages: etcd 3.5 re-counts the rest of the range per page
RELIST_ATTEMPTS = 3


def decode_binding(kind: str, value: bytes) -> Binding:
    """A binding record from etcd, validated exactly as ``model_validate_json`` would.

    Raises ``ValidationError`` for a bad record.  Records written by NVEs are already
    canonical, so most take a fast path: parse with orjson, check every field against
    its canonical form, then build the model without re-running the normalizers.  That
    is several times cheaper than full validation (it runs for every watched event and
    for every mapping of a cold sync) and much smaller in memory, because the repeated
    strings (VN, VNIC, NVE, underlay) are interned and the models share one
    ``fields_set``.  Anything the fast path does not recognise as canonical goes through
    full validation, so what is accepted, and how it is normalized, does not change.
    """
    model: type[MacBinding] | type[IpBinding] = MacBinding if kind == "mac" else IpBinding
    fast = _fast_decode(model, value)
    if fast is not None:
        return fast
    return model.model_validate_json(value)


# Canonical spellings, i.e. fixed points of the normalizers in schemas/types.py.
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAC_RE = re.compile(r"[0-9a-f][02468ace](?::[0-9a-f]{2}){5}")  # unicast, lower case
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")  # a host address, no leading zeros
_TRACE_RE = re.compile(r"[0-9a-f]{16}")
_MAX_VNI = (1 << 24) - 1
_MAX_EPOCH = (1 << 63) - 1


def _uuid(v: Any) -> Any:
    return sys.intern(v) if type(v) is str and _UUID_RE.fullmatch(v) else _NO


def _mac(v: Any) -> Any:
    ok = type(v) is str and _MAC_RE.fullmatch(v) and v != "00:00:00:00:00:00"
    return v if ok else _NO


def _token(v: Any) -> Any:
    return sys.intern(v) if type(v) is str and _TOKEN_RE.fullmatch(v) else _NO


def _ipv4(v: Any) -> Any:
    return v if type(v) is str and _IPV4_RE.fullmatch(v) else _NO


def _underlay(v: Any) -> Any:
    return sys.intern(v) if type(v) is str and _IPV4_RE.fullmatch(v) else _NO


def _nonneg(v: Any) -> Any:
    return v if type(v) is int and v >= 0 else _NO


def _epoch(v: Any) -> Any:
    return v if type(v) is int and 0 <= v <= _MAX_EPOCH else _NO


def _vni(v: Any) -> Any:
    return v if type(v) is int and 1 <= v <= _MAX_VNI else _NO


def _version(v: Any) -> Any:
    return v if type(v) is int and v == 1 else _NO


def _trace(v: Any) -> Any:
    return v if type(v) is str and (not v or _TRACE_RE.fullmatch(v)) else _NO


def _moves(v: Any) -> Any:
    ok = type(v) is list and len(v) <= 16 and all(type(x) is int for x in v)
    return tuple(v) if ok else _NO


_NO: Any = object()
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "v": _version, "vn": _uuid, "vnic": _uuid, "vni": _vni, "mac": _mac, "ip": _ipv4,
    "nve": _token, "underlay": _underlay, "ts_ns": _nonneg, "mobility_seq": _nonneg,
    "moves_ns": _moves, "epoch": _epoch, "trace": _trace,
}


# The exact bytes an NVE writes (orjson of ``model_dump``: every field, in model order,
# no spaces) match one regular expression per model; a record that matches needs no JSON
# parsing and no per-field checks.  Each entry: the value's pattern (one group), and
# what turns the group into the field's value.
_UINT = r"0|[1-9][0-9]{0,18}"
_AS_IS, _INT, _INTERN, _INTS = range(4)  # how a matched group becomes the field's value
_LAYOUT: dict[str, tuple[str, int]] = {
    "v": ("(1)", _INT),
    "vn": (f'"({_UUID_RE.pattern})"', _INTERN),
    "vnic": (f'"({_UUID_RE.pattern})"', _INTERN),
    "vni": (f"({_UINT})", _INT),
    "mac": (f'"({_MAC_RE.pattern})"', _AS_IS),
    "ip": (f'"({_IPV4_RE.pattern})"', _AS_IS),
    "nve": (f'"({_TOKEN_RE.pattern})"', _INTERN),
    "underlay": (f'"({_IPV4_RE.pattern})"', _INTERN),
    "ts_ns": (f"({_UINT})", _INT),
    "mobility_seq": (f"({_UINT})", _INT),
    "moves_ns": (rf"\[((?:{_UINT})(?:,(?:{_UINT})){{0,15}})?\]", _INTS),
    "epoch": (f"({_UINT})", _INT),
    "trace": (r'"((?:[0-9a-f]{16})?)"', _AS_IS),
}


class _Shape:
    """What the fast paths need to know about one record model."""

    def __init__(self, model: type[MacBinding] | type[IpBinding]) -> None:
        fields = model.model_fields
        #: Only if every field has a canonical-form check (a new field disables it).
        self.enabled = set(fields) <= set(_CHECKS)
        self.known = frozenset(fields)
        self.required = frozenset(n for n, f in fields.items() if f.is_required())
        # The models are frozen, so instances may share one fields_set per key set.
        self.fields_sets: dict[frozenset[str], set[str]] = {}
        self.all_fields = set(fields)
        self.canonical: re.Pattern[str] | None = None
        self.names = tuple(fields)
        self.position = {name: i for i, name in enumerate(fields, start=1)}  # regex groups
        self.by_kind: list[tuple[str, ...]] = [
            tuple(n for n in fields if _LAYOUT.get(n, ("", -1))[1] == kind) for kind in range(4)]
        if self.enabled:
            self.canonical = re.compile(
                r"\{" + ",".join(f'"{name}":{_LAYOUT[name][0]}' for name in fields) + r"\}")


_SHAPES = {MacBinding: _Shape(MacBinding), IpBinding: _Shape(IpBinding)}


def _canonical_decode(
    model: type[MacBinding] | type[IpBinding], shape: _Shape, value: bytes
) -> MacBinding | IpBinding | None:
    assert shape.canonical is not None
    try:
        match = shape.canonical.fullmatch(value.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if match is None:
        return None
    values: dict[str, Any] = dict(zip(shape.names, match.groups(), strict=True))
    for name in shape.by_kind[_INT]:
        values[name] = int(values[name])
    for name in shape.by_kind[_INTERN]:
        values[name] = sys.intern(values[name])
    for name in shape.by_kind[_INTS]:
        raw = values[name]
        values[name] = tuple(map(int, raw.split(","))) if raw else ()
    if (not 1 <= values["vni"] <= _MAX_VNI or values["mac"] == "00:00:00:00:00:00"
            or values["epoch"] > _MAX_EPOCH):
        return None
    built: MacBinding | IpBinding = _construct(model, values, shape.all_fields)
    return built


def decode_entry(
    kind: str, value: bytes, make: Callable[[str, str, int, str, int, str | None], RemoteEntry]
) -> tuple[RemoteEntry, Binding | None]:
    """A record straight into a remote-table entry (cold sync), and its model if one was built.

    A canonical record is matched by the same regular expression as in
    ``decode_binding`` and turned into an entry without building a model; anything
    else is decoded (and validated, or refused with ``ValidationError``) as a model.
    """
    model: type[MacBinding] | type[IpBinding] = MacBinding if kind == "mac" else IpBinding
    shape = _SHAPES[model]
    if shape.canonical is not None:
        try:
            match = shape.canonical.fullmatch(value.decode("ascii"))
        except UnicodeDecodeError:
            match = None
        if match is not None:
            group, at = match.group, shape.position
            vni, epoch, mac = int(group(at["vni"])), int(group(at["epoch"])), group(at["mac"])
            if 1 <= vni <= _MAX_VNI and mac != "00:00:00:00:00:00" and epoch <= _MAX_EPOCH:
                return make(group(at["nve"]), group(at["underlay"]), vni, group(at["vnic"]),
                            epoch, mac if kind == "ip" else None), None
    binding = decode_binding(kind, value)
    return make(binding.nve, binding.underlay, binding.vni, binding.vnic, binding.epoch,
                binding.mac if isinstance(binding, IpBinding) else None), binding


_construct = construct_unchecked
_via_pydantic = construct_via_pydantic


def _fast_decode(
    model: type[MacBinding] | type[IpBinding], value: bytes
) -> MacBinding | IpBinding | None:
    shape = _SHAPES[model]
    if not shape.enabled:
        return None
    canonical = _canonical_decode(model, shape, value)
    if canonical is not None:
        return canonical
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    keys = obj.keys()
    if not (shape.required <= keys <= shape.known):
        return None
    for name, raw in obj.items():
        checked = _CHECKS[name](raw)
        if checked is _NO:
            return None
        obj[name] = checked
    names = frozenset(keys)
    fields_set = shape.fields_sets.get(names)
    if fields_set is None:
        fields_set = shape.fields_sets.setdefault(names, set(names))
    built: MacBinding | IpBinding = _via_pydantic(model, obj, fields_set)
    return built


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
        on_foreign: Callable[[str, str, str, Binding | RemoteEntry], None] | None = None,
        stages: dict[str, deque[tuple[int, int]]] | None = None,
        relist_s: float = 0.0,
        on_listed: Callable[[str, list[tuple[str, RemoteEntry]], int], None] | None = None,
    ) -> None:
        self.vn = vn
        #: Given each periodic listing (own entries included), so the NVE can check its
        #: own bindings in etcd against what it publishes (``NveService._check_own``).
        self._on_listed = on_listed
        #: Anti-entropy: list the VN again this often (0: never) while the watch runs,
        #: and count what the listing changed (``relist_repairs``): a watch event that
        #: was missed is repaired within this time, and shows in the counter.
        self.relist_s = relist_s
        self._store = store
        self._layout = layout
        self._remote = remote
        self._counters = counters
        self._latencies = latencies
        self._on_change = on_change
        self._on_foreign = on_foreign
        #: ``watch_ms`` in the NVE's tables, (at_ns, duration_ns) samples: "apply" = how
        #: long applying one watch response held the event loop (decode + remote table),
        #: "propagation" = agent publish -> applied here, per remote put (``latencies``
        #: with the time it was applied).
        self._stages = stages

    async def run(self, resume_from: int = 0) -> None:
        """Follow the VN; ``resume_from`` (a warm restart) skips the first listing."""
        prefix = self._layout.map_prefix(self.vn)
        backoff = 0.1
        periodic = False
        window: asyncio.Timeout | None = None
        while self._remote.serves(self.vn):
            try:
                if resume_from:
                    revision, resume_from = resume_from - 1, 0
                else:
                    revision = await self._relist(prefix, periodic=periodic)
                periodic = False
                async with (self._store.watch_prefix(prefix, revision + 1) as watch,
                            asyncio.timeout(self._next_relist()) as window):
                    async for events in watch:
                        if self._stages is None:
                            self._apply(events)
                        else:
                            started = time.perf_counter_ns()
                            self._apply(events)
                            self._stages["apply"].append(
                                (time.time_ns(), time.perf_counter_ns() - started))
                        backoff = 0.1
            except TimeoutError:
                if window is None or not window.expired():
                    raise
                periodic = True  # time for the anti-entropy listing
            except WatchCompacted as exc:
                self._counters["relists_after_compaction"] += 1
                _log.warning("VN %s: watch revision compacted (%d); re-listing",
                             self.vn, exc.compact_revision)
            except StoreError as exc:  # etcd unreachable for longer than its retries
                self._counters["follower_retries"] += 1
                _log.warning("VN %s: IMA unavailable (%s); re-listing", self.vn, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _next_relist(self) -> float | None:
        """Seconds until the next anti-entropy listing (jittered, so NVEs do not all
        list at once), for ``asyncio.timeout``; None: never."""
        if self.relist_s <= 0:
            return None
        return self.relist_s * random.uniform(0.8, 1.2)

    async def _missed(self, prefix: str) -> list[str] | None:
        """Entries the remote table has wrong: it is compared with a listing at the
        revision it says it reflects, so events merely not delivered yet do not count.
        None if that revision is already compacted (nothing to compare with)."""
        revision = self._remote.revision(self.vn)
        if revision <= 0:
            return None
        try:
            # Only compared: the holders it shows are history, not news (``on_foreign``
            # on them would take an address from a VNIC that has since moved back here).
            snapshot, _ = await self._list(prefix, revision, compare_only=True)
        except RevisionCompacted:
            self._counters["periodic_checks_compacted"] += 1
            return None
        return self._remote.differs_from(self.vn, snapshot)

    async def _relist(self, prefix: str, periodic: bool = False) -> int:
        """List the VN at one revision and replace what the remote table holds of it.

        A compaction racing with the paging restarts the listing at a fresh revision
        (a few times at most), as ``EtcdStore.get_prefix`` does. ``periodic``: first
        count what the watch missed (``relist_repairs``), then repair it.
        """
        if periodic:
            self._counters["periodic_relists"] += 1
            missed = await self._missed(prefix)
            if missed:
                self._counters["relist_repairs"] += len(missed)
                _log.warning("VN %s: the remote table missed %d watch events up to revision "
                             "%d; repaired by the periodic listing: %s", self.vn, len(missed),
                             self._remote.revision(self.vn), "; ".join(missed[:8]))
        for attempt in range(1, RELIST_ATTEMPTS + 1):
            try:
                snapshot, revision = await self._list(prefix)
                break
            except RevisionCompacted:
                if attempt == RELIST_ATTEMPTS:
                    raise
        self._remote.load_snapshot(self.vn, snapshot, revision)
        self._counters["relists"] += 1
        if periodic and self._on_listed is not None:
            self._on_listed(self.vn, snapshot, revision)
        self._on_change()
        return revision

    async def _list(
        self, prefix: str, at_revision: int = 0, compare_only: bool = False
    ) -> tuple[list[tuple[str, RemoteEntry]], int]:
        """Decode each page while the next one is being fetched.

        The etcd round trips overlap the decoding, and the event loop gets a turn
        between pages, so a large cold sync does not stall the NVE's requests.
        """
        pages: asyncio.Queue[Page | BaseException | None] = asyncio.Queue(maxsize=2)

        async def fetch() -> None:
            try:
                async for page in self._store.iter_prefix(prefix, page_size=RELIST_PAGE,
                                                          revision=at_revision):
                    await pages.put(page)
            except Exception as exc:  # handed to the consumer, which raises it
                await pages.put(exc)
                return
            await pages.put(None)

        producer = asyncio.create_task(fetch(), name=f"list-{self.vn}")
        snapshot: list[tuple[str, RemoteEntry]] = []
        revision = 0
        try:
            while (page := await pages.get()) is not None:
                if isinstance(page, BaseException):
                    raise page
                revision = page.revision
                self._decode_page(page.kvs, snapshot, compare_only)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        return snapshot, revision

    def _decode_page(
        self, kvs: list[KeyValue], snapshot: list[tuple[str, RemoteEntry]],
        compare_only: bool = False,
    ) -> None:
        make, on_foreign = self._remote.make, None if compare_only else self._on_foreign
        for kv in kvs:
            parsed = self._layout.parse_map_key(kv.key)
            if parsed is None:
                continue
            _, kind, addr = parsed
            try:
                entry, _ = decode_entry(kind, kv.value, make)
            except ValidationError:
                self._counters["bad_ima_records"] += 1
                continue
            snapshot.append((f"{kind}/{addr}", entry))
            if on_foreign is not None and entry.nve != self._remote.nve_id:
                on_foreign(self.vn, f"{kind}/{addr}", kv.key, entry)

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
                        if self._stages is not None:
                            self._stages["propagation"].append((now, now - binding.ts_ns))
                    if binding.trace and _log.isEnabledFor(logging.DEBUG):
                        _log.debug("learned %s in VN %s at NVE %s", entry, self.vn, binding.nve,
                                   extra={"trace": binding.trace, "nve": self._remote.nve_id,
                                          "remote_nve": binding.nve, "revision": ev.mod_revision,
                                          "propagation_ms": (now - binding.ts_ns) / 1e6
                                          if binding.ts_ns else None})
                    if self._on_foreign is not None:
                        self._on_foreign(self.vn, entry, ev.key, binding)
        self._on_change()
