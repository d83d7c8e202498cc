"""Asking the IMA service for VN registry operations over NATS (CLI, demo)."""

from __future__ import annotations

import asyncio

import orjson
from nats.aio.client import Client as Nats
from nats.errors import NoRespondersError
from pydantic import BaseModel

from schemas.messages import ErrorReply, ServiceType, VnRef
from schemas.operator import (
    PlacementReply,
    PlacementSet,
    ProfileGet,
    ProfileReply,
    ProfileSet,
    VnCreate,
    VnDelete,
    VnGet,
    VnList,
    VnListReply,
    VnReply,
)
from schemas.profile import VnProfile
from schemas.records import VnMembers, VnRecord
from schemas.subjects import Subjects
from schemas.wire import dumps


class ImaError(Exception):
    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.reason}")
        self.reply = reply


class ImaClient:
    def __init__(self, nc: Nats, subjects: Subjects | None = None, timeout: float = 5.0) -> None:
        self.nc = nc
        self.subjects = subjects or Subjects()
        self.timeout = timeout

    async def _call(self, op: str, request: BaseModel) -> bytes:
        # In a NATS cluster a fresh subscription reaches the other servers a moment
        # later; "no responders" right after start-up is worth a few quick retries.
        for attempt in range(5):
            try:
                msg = await self.nc.request(self.subjects.ima(op), dumps(request),
                                            timeout=self.timeout)
                break
            except NoRespondersError:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
        data: bytes = msg.data
        obj = orjson.loads(data)
        if isinstance(obj, dict) and obj.get("kind") == "error":
            raise ImaError(ErrorReply.model_validate(obj))
        return data

    async def create(
        self,
        alias: str,
        *,
        service: ServiceType = "l2",
        name: str | None = None,
        vn_id: int | None = None,
        members: VnMembers | None = None,
    ) -> VnReply:
        request = VnCreate(alias=alias, service=service, name=name, vn_id=vn_id,
                           members=members or VnMembers())
        return VnReply.model_validate_json(await self._call("create", request))

    async def place(self, vnic: str, hypervisor: str) -> PlacementReply:
        data = await self._call("placement_set", PlacementSet(vnic=vnic, hypervisor=hypervisor))
        return PlacementReply.model_validate_json(data)

    async def get(self, ref: VnRef) -> VnRecord:
        return VnReply.model_validate_json(await self._call("get", VnGet(vn=ref))).vn

    async def set_profile(self, ref: VnRef, profile: VnProfile) -> ProfileReply:
        data = await self._call("profile_set", ProfileSet(vn=ref, profile=profile))
        return ProfileReply.model_validate_json(data)

    async def get_profile(self, ref: VnRef) -> ProfileReply:
        return ProfileReply.model_validate_json(await self._call("profile_get", ProfileGet(vn=ref)))

    async def delete(self, ref: VnRef) -> VnRecord:
        return VnReply.model_validate_json(await self._call("delete", VnDelete(vn=ref))).vn

    async def list(self) -> list[VnRecord]:
        return VnListReply.model_validate_json(await self._call("list", VnList())).vns
