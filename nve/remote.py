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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.records import IpBinding, MacBinding
from schemas.types import ip_key

Binding = MacBinding | IpBinding


def mac_entry(mac: str) -> str:
    """Entry key of a MAC binding: the tail of its etcd key, root-independent."""
    return f"mac/{mac}"


def ip_entry(ip: str) -> str:
    return f"ip/{ip_key(ip)}"


@dataclass
class VnRemote:
    revision: int = 0
    entries: dict[str, Binding] = field(default_factory=dict)  # 'mac/..' | 'ip/..'


@dataclass
class RemoteTable:
    nve_id: str
    vns: dict[str, VnRemote] = field(default_factory=dict)
    stale_events: int = 0
    epochs: dict[str, int] = field(default_factory=dict)  # nve -> newest incarnation known
    stale_epoch: int = 0  # leftovers of an older incarnation dropped or ignored

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

    def load_snapshot(self, vn: str, items: list[tuple[str, Binding]], revision: int) -> None:
        """Replace what we know of ``vn`` by a listing made at ``revision``."""
        remote = self.vns.get(vn)
        if remote is None:
            return
        newest: dict[str, int] = {}
        for _, b in items:
            if b.epoch > newest.get(b.nve, 0):
                newest[b.nve] = b.epoch
        for nve, epoch in newest.items():
            self.nve_epoch(nve, epoch)
        entries = {k: b for k, b in items if b.nve != self.nve_id}
        if self.epochs:
            kept = {k: b for k, b in entries.items() if b.epoch >= self.epochs.get(b.nve, 0)}
            self.stale_epoch += len(entries) - len(kept)
            entries = kept
        remote.entries = entries
        remote.revision = revision

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
            remote.entries[key] = binding
        return True

    def delete(self, vn: str, key: str, revision: int) -> bool:
        remote = self._fresh(vn, revision)
        if remote is None:
            return False
        remote.entries.pop(key, None)
        return True

    def get(self, vn: str, key: str) -> Binding | None:
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
