"""The VN registry: Name <-> ID one-to-one, Alias -> Name, and the VN context.

Draft 2 and 4.1: a VN has a globally unique Name (UUID), an administrative
VN ID and a human Alias; when instantiated it gets a VN context (a 24-bit,
VXLAN-style VNI) that only NVEs use.  Allocation must be safe when several
IMA replicas (or NVEs) race: it is one etcd transaction that claims the name,
id, alias and VNI keys only if none exists.  The VNI candidate is derived
from the VN Name, so racers on the same VN try the same value and the loser
reads the winner's record; racers on different VNs that collide on a
candidate retry with the next one.  No lock and no in-process counter.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import orjson

from ima.keys import KeyLayout
from ima.store import Delete, EtcdStore, KeyMissing, Put, StoreUnavailable
from schemas.errors import Conflict, ErrorCode, Exhausted, UnknownVn
from schemas.messages import ServiceType, VnRef
from schemas.profile import VnProfile
from schemas.records import Placement, VnMembers, VnPointer, VnRecord
from schemas.types import MAX_VN_ID, MAX_VNI

MAX_ATTEMPTS = 256
MAX_LOST_ANSWERS = 3  # creation transactions whose answer etcd lost, then give up


def _candidate(name: str, attempt: int, space: int, salt: bytes) -> int:
    digest = hashlib.blake2b(salt + name.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + attempt) % space + 1


def vni_candidate(name: str, attempt: int) -> int:
    return _candidate(name, attempt, MAX_VNI, b"vni:")


def vn_id_candidate(name: str, attempt: int) -> int:
    return _candidate(name, attempt, MAX_VN_ID, b"id:")


def _json(model: VnRecord | VnPointer) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


class VnRegistry:
    def __init__(self, store: EtcdStore, layout: KeyLayout) -> None:
        self._store = store
        self._keys = layout

    async def get(self, name: str) -> VnRecord | None:
        kv = await self._store.get(self._keys.vn_name(name))
        return None if kv is None else VnRecord.model_validate_json(kv.value)

    async def _pointer(self, key: str) -> str | None:
        kv = await self._store.get(key)
        return None if kv is None else VnPointer.model_validate_json(kv.value).name

    async def resolve(self, ref: VnRef) -> VnRecord:
        """Map a VN Name, ID or Alias to its record [4.1]; unknown -> UnknownVn."""
        if ref.name is not None:
            name: str | None = ref.name
        elif ref.id is not None:
            name = await self._pointer(self._keys.vn_id(ref.id))
        else:
            assert ref.alias is not None
            name = await self._pointer(self._keys.vn_alias(ref.alias))
        record = None if name is None else await self.get(name)
        if record is None:
            raise UnknownVn(str(ref))
        return record

    async def list(self) -> list[VnRecord]:
        items, _ = await self._store.get_prefix(self._keys.vn_names_prefix())
        return [VnRecord.model_validate_json(kv.value) for kv in items]

    async def create(
        self,
        *,
        alias: str,
        name: str | None = None,
        vn_id: int | None = None,
        service: ServiceType = "l2",
        members: VnMembers | None = None,
    ) -> tuple[VnRecord, bool]:
        """Create the VN or return the identical existing one; (record, created)."""
        wanted_name = name
        lost_answers = 0
        for attempt in range(MAX_ATTEMPTS):
            existing = await self._existing(alias, wanted_name)
            if existing is not None:
                self._check_same(existing, alias, wanted_name, vn_id, service)
                return existing, False
            vn_name = wanted_name or str(uuid.uuid4())
            record = VnRecord(
                name=vn_name,
                vn_id=vn_id if vn_id is not None else vn_id_candidate(vn_name, attempt),
                alias=alias,
                vni=vni_candidate(vn_name, attempt),
                service=service,
                created_ns=time.time_ns(),
                members=members or VnMembers(),
            )
            pointer = _json(VnPointer(name=vn_name))
            keys = self._keys
            try:
                result = await self._store.txn(
                    [
                        KeyMissing(keys.vn_name(vn_name)),
                        KeyMissing(keys.vn_alias(alias)),
                        KeyMissing(keys.vn_id(record.vn_id)),
                        KeyMissing(keys.vn_vni(record.vni)),
                    ],
                    [
                        Put(keys.vn_name(vn_name), _json(record)),
                        Put(keys.vn_alias(alias), pointer),
                        Put(keys.vn_id(record.vn_id), pointer),
                        Put(keys.vn_vni(record.vni), pointer),
                    ],
                )
            except StoreUnavailable:
                # The answer was lost (a leader that committed and died?): the next
                # round reads the alias again and returns our VN if it was applied.
                lost_answers += 1
                if lost_answers > MAX_LOST_ANSWERS:
                    raise
                continue
            if result.succeeded:
                return record, True
            if vn_id is not None and await self._store.get(keys.vn_id(vn_id)) is not None:
                owner = await self._pointer(keys.vn_id(vn_id))
                if owner is not None and owner != wanted_name:
                    raise Conflict(
                        ErrorCode.VN_EXISTS,
                        f"VN ID {vn_id} already belongs to VN {owner}",
                        vn_id=str(vn_id),
                    )
            # Lost a race: either our VN now exists (next loop returns it) or a
            # candidate VNI/ID was taken by another VN (next loop probes on).
        raise Exhausted(
            ErrorCode.VNI_EXHAUSTED, f"no free VN context found after {MAX_ATTEMPTS} attempts"
        )

    async def delete(self, ref: VnRef) -> VnRecord:
        """Remove a VN from the registry; refused while any address is bound in it
        or any NVE still has a VNIC connected to it (even one without addresses)."""
        record = await self.resolve(ref)
        async for page in self._store.iter_prefix(self._keys.map_prefix(record.name),
                                                  page_size=1):
            if page.kvs:
                raise Conflict(
                    ErrorCode.VN_IN_USE,
                    f"VN {record.alias} still has bindings (e.g. {page.kvs[0].key}); "
                    "disconnect its VNICs first",
                    vn=record.name,
                )
            break
        attached, _ = await self._store.get_prefix(self._keys.vn_attached_prefix(record.name))
        if attached:
            nves = sorted(kv.key.rsplit("/", 1)[-1] for kv in attached)
            raise Conflict(
                ErrorCode.VN_IN_USE,
                f"VN {record.alias} has connected VNICs on NVE(s) {', '.join(nves)}; "
                "disconnect them first",
                vn=record.name,
            )
        keys = self._keys
        await self._store.txn([], [
            Delete(keys.vn_name(record.name)), Delete(keys.vn_alias(record.alias)),
            Delete(keys.vn_id(record.vn_id)), Delete(keys.vn_vni(record.vni)),
            Delete(keys.vn_profile(record.name)),
        ])
        return record

    async def set_profile(self, ref: VnRef, profile: VnProfile) -> VnProfile:
        """Store a VN's profile [4.5]; NVEs serving the VN see it through a watch."""
        record = await self.resolve(ref)
        data = profile.model_dump(mode="json", exclude={"revision"})
        revision = await self._store.put(self._keys.vn_profile(record.name), orjson.dumps(data))
        return profile.model_copy(update={"revision": revision})

    async def get_profile(self, ref: VnRef) -> VnProfile | None:
        record = await self.resolve(ref)
        kv = await self._store.get(self._keys.vn_profile(record.name))
        if kv is None:
            return None
        return VnProfile.model_validate_json(kv.value).model_copy(
            update={"revision": kv.mod_revision}
        )

    async def set_placement(self, placement: Placement) -> int:
        """Where a VNIC runs [5]; NVEs that enforce placement follow it by watch."""
        data = orjson.dumps(placement.model_dump(mode="json"))
        return await self._store.put(self._keys.placement(placement.vnic), data)

    async def _existing(self, alias: str, name: str | None) -> VnRecord | None:
        if name is not None:
            record = await self.get(name)
            if record is not None:
                return record
        owner = await self._pointer(self._keys.vn_alias(alias))
        return None if owner is None else await self.get(owner)

    @staticmethod
    def _check_same(
        existing: VnRecord,
        alias: str,
        name: str | None,
        vn_id: int | None,
        service: ServiceType,
    ) -> None:
        clashes = []
        if existing.alias != alias:
            clashes.append(f"alias {existing.alias}")
        if name is not None and existing.name != name:
            clashes.append(f"name {existing.name}")
        if vn_id is not None and existing.vn_id != vn_id:
            clashes.append(f"VN ID {existing.vn_id}")
        if existing.service != service:
            clashes.append(f"service {existing.service}")
        if clashes:
            raise Conflict(
                ErrorCode.VN_EXISTS,
                f"a VN with that name or alias exists with {', '.join(clashes)}",
                vn=existing.name,
            )
