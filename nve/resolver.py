"""VN reference -> VN record, cached (draft 4.1: the NVE obtains the VN context).

VN records do not change once created, so an NVE asks the IMA once per VN and
reference spelling; an unknown VN is not cached, so creating it later works.
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
