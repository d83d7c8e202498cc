"""Remote mappings learned from the IMA, per VN the NVE serves.

Pure state: the service feeds it a snapshot listed at one etcd revision and
then the watch events after it.  It refuses to go backwards: an event whose
revision is older than the last one applied for that VN is ignored and
counted, so a replayed or reordered watch can never roll a mapping back.

It also knows each NVE's newest incarnation (``epoch``, from the NVE records
and from the bindings themselves).  A binding written by an older incarnation
of its NVE is a dead process's leftover waiting for its lease to expire: it is
dropped as soon as a newer incarnation is known, instead of after the lease
TTL, and a leftover that arrives later is ignored (both counted).

An entry keeps only what forwarding and the conflict checks need
(``RemoteEntry``: ~100 B with shared strings and numbers, against ~600 B for
a binding model, issue 6); the telemetry fields (``ts_ns``, ``trace``) are
used when the event is watched and not kept, and the mobility fields are read
from etcd by the writer when it claims an address.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from schemas.records import IpBinding, MacBinding
from schemas.types import ip_key

Binding = MacBinding | IpBinding


def mac_entry(mac: str) -> str:
    """Entry key of a MAC binding: the tail of its etcd key, root-independent."""
    return f"mac/{mac}"


def ip_entry(ip: str) -> str:
    return f"ip/{ip_key(ip)}"


class RemoteEntry(NamedTuple):
    """A remote mapping: (VN, address) -> the NVE and underlay that reach it [4.2]."""

    nve: str
    underlay: str
    vni: int
    vnic: str
    epoch: int
    mac: str | None = None  # IP entries: the MAC behind the IP (a MAC entry's is its key)

    def as_json(self, entry: str) -> dict[str, Any]:
        """The operator's view of one entry (``nvo3 nve tables``), keyed like etcd."""
        kind, _, addr = entry.partition("/")
        out: dict[str, Any] = {"nve": self.nve, "underlay": self.underlay, "vni": self.vni,
                               "vnic": self.vnic, "epoch": self.epoch}
        if kind == "mac":
            out["mac"] = addr
        else:
            out["ip"] = addr.replace("_", "/")
            out["mac"] = self.mac
        return out


@dataclass
class VnRemote:
    revision: int = 0
    entries: dict[str, RemoteEntry] = field(default_factory=dict)  # 'mac/..' | 'ip/..'


@dataclass
class RemoteTable:
    nve_id: str
    vns: dict[str, VnRemote] = field(default_factory=dict)
    stale_events: int = 0
    epochs: dict[str, int] = field(default_factory=dict)  # nve -> newest incarnation known
    stale_epoch: int = 0  # leftovers of an older incarnation dropped or ignored
    _ints: dict[int, int] = field(default_factory=dict)  # one object per VNI / epoch value

    def entry(self, b: Binding) -> RemoteEntry:
        """The compact entry of a binding."""
        return self.make(b.nve, b.underlay, b.vni, b.vnic, b.epoch,
                         b.mac if isinstance(b, IpBinding) else None)

    def make(self, nve: str, underlay: str, vni: int, vnic: str, epoch: int,
             mac: str | None) -> RemoteEntry:
        """An entry from validated parts; strings and numbers shared between entries."""
        ints = self._ints
        return RemoteEntry(sys.intern(nve), sys.intern(underlay), ints.setdefault(vni, vni),
                           sys.intern(vnic), ints.setdefault(epoch, epoch), mac)

    def nve_epoch(self, nve: str, epoch: int) -> int:
        """``nve`` runs as incarnation ``epoch``: drop what older ones left; how many."""
        if epoch <= self.epochs.get(nve, 0):
            return 0
        self.epochs[nve] = epoch
        dropped = 0
        for remote in self.vns.values():
            old = [k for k, b in remote.entries.items() if b.nve == nve and b.epoch < epoch]
            for key in old:
                del remote.entries[key]
            dropped += len(old)
        self.stale_epoch += dropped
        return dropped

    def _leftover(self, binding: Binding) -> bool:
        known = self.epochs.get(binding.nve, 0)
        if binding.epoch > known:
            self.nve_epoch(binding.nve, binding.epoch)
            return False
        return binding.epoch < known

    def start(self, vn: str) -> None:
        self.vns.setdefault(vn, VnRemote())

    def stop(self, vn: str) -> None:
        self.vns.pop(vn, None)

    def serves(self, vn: str) -> bool:
        return vn in self.vns

    def load_snapshot(
        self, vn: str, items: Sequence[tuple[str, Binding | RemoteEntry]], revision: int
    ) -> None:
        """Replace what we know of ``vn`` by a listing made at ``revision``.

        ``items`` may already be entries (the follower converts page by page, so a
        cold sync never holds a million binding models at once)."""
        remote = self.vns.get(vn)
        if remote is None:
            return
        newest: dict[str, int] = {}
        for _, b in items:
            if b.epoch > newest.get(b.nve, 0):
                newest[b.nve] = b.epoch
        for nve, epoch in newest.items():
            self.nve_epoch(nve, epoch)
        epochs, entry = self.epochs, self.entry
        entries: dict[str, RemoteEntry] = {}
        for k, b in items:
            if b.nve == self.nve_id:
                continue
            if b.epoch < epochs.get(b.nve, 0):
                self.stale_epoch += 1
                continue
            entries[k] = b if isinstance(b, RemoteEntry) else entry(b)
        remote.entries = entries
        remote.revision = revision

    def differs_from(self, vn: str, items: Sequence[tuple[str, RemoteEntry]]) -> list[str]:
        """The entries of ``vn`` that differ from ``items``, a listing made at the
        revision the table says it reflects (``revision(vn)``): each one is an event the
        watch missed or misapplied. Own and older-incarnation entries are left out, as
        ``load_snapshot`` leaves them out."""
        remote = self.vns.get(vn)
        if remote is None:
            return []
        epochs = self.epochs
        expected = {k: b for k, b in items
                    if b.nve != self.nve_id and b.epoch >= epochs.get(b.nve, 0)}
        return _differences(remote.entries, expected)

    def put(self, vn: str, key: str, binding: Binding, revision: int) -> bool:
        remote = self._fresh(vn, revision)
        if remote is None:
            return False
        if binding.nve == self.nve_id:
            remote.entries.pop(key, None)
        elif self._leftover(binding):
            remote.entries.pop(key, None)  # the key's value is now the leftover
            self.stale_epoch += 1
        else:
            remote.entries[key] = self.entry(binding)
        return True

    def delete(self, vn: str, key: str, revision: int) -> bool:
        remote = self._fresh(vn, revision)
        if remote is None:
            return False
        remote.entries.pop(key, None)
        return True

    def get(self, vn: str, key: str) -> RemoteEntry | None:
        remote = self.vns.get(vn)
        return None if remote is None else remote.entries.get(key)

    def revision(self, vn: str) -> int:
        remote = self.vns.get(vn)
        return 0 if remote is None else remote.revision

    def size(self) -> int:
        return sum(len(r.entries) for r in self.vns.values())

    def _fresh(self, vn: str, revision: int) -> VnRemote | None:
        remote = self.vns.get(vn)
        if remote is None:
            return None
        if revision < remote.revision:  # equal: another event of the same txn
            self.stale_events += 1
            return None
        remote.revision = revision
        return remote


def _differences(have: dict[str, RemoteEntry], want: dict[str, RemoteEntry]) -> list[str]:
    """Entries added, removed or different between two views of one VN, each as
    "key: what we have -> what the listing has" (``-`` for none)."""
    def show(e: RemoteEntry | None) -> str:
        return "-" if e is None else f"{e.nve}@{e.epoch}"

    return ([f"{k}: {show(have.get(k))} -> {show(e)}" for k, e in want.items()
             if have.get(k) != e]
            + [f"{k}: {show(e)} -> -" for k, e in have.items() if k not in want])
