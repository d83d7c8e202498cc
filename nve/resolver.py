"""VN reference -> VN record, cached (draft 4.1: the NVE obtains the VN context).

VN records do not change once created, so an NVE asks the IMA once per VN and
reference spelling; an unknown VN is not cached, so creating it later works.
The NVE also mirrors the registry and ``learn``s every VN record it sees, so
requests for an existing VN need no etcd read at all: a first resolution during
an etcd leader election would otherwise hold the NVE's request loop.
A deleted VN is forgotten (the NVE watches the registry), so a VN deleted and
created again under the same alias resolves to the new record.
"""

from __future__ import annotations

from ima.registry import VnRegistry
from schemas.messages import VnRef
from schemas.records import VnRecord


class VnResolver:
    def __init__(self, registry: VnRegistry) -> None:
        self._registry = registry
        self._cache: dict[VnRef, VnRecord] = {}

    async def resolve(self, ref: VnRef) -> VnRecord:
        record = self._cache.get(ref)
        if record is None:
            record = await self._registry.resolve(ref)
            self._cache[ref] = record
            self._cache[VnRef(name=record.name)] = record
        return record

    def learn(self, record: VnRecord) -> None:
        """Every spelling of ``record``'s reference resolves to it from now on."""
        for ref in (VnRef(name=record.name), VnRef(alias=record.alias),
                    VnRef(id=record.vn_id)):
            self._cache[ref] = record

    def cached(self, ref: VnRef) -> VnRecord | None:
        return self._cache.get(ref)

    def forget(self, name: str) -> int:
        """The VN ``name`` was deleted: drop every spelling of it; how many."""
        stale = [ref for ref, record in self._cache.items() if record.name == name]
        for ref in stale:
            del self._cache[ref]
        return len(stale)
