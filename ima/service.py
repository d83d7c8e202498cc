"""The IMA process: the VN registry served over NATS [2, 4.1, 4.5].

Several replicas may run: they share a NATS queue group, and correctness
under races comes from etcd transactions in ``VnRegistry``, not from there
being one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.errors import OutboundBufferLimitError
from pydantic import BaseModel

from ima.keys import KeyLayout
from ima.registry import VnRegistry
from ima.store import EtcdStore, StoreError
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ErrorReply
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
from schemas.records import Placement
from schemas.subjects import Subjects
from schemas.wire import decode_model, dumps

_log = logging.getLogger(__name__)
QUEUE_GROUP = "nvo3-ima"


class ImaService:
    def __init__(
        self,
        nc: Nats,
        store: EtcdStore,
        *,
        layout: KeyLayout | None = None,
        subjects: Subjects | None = None,
    ) -> None:
        self.nc = nc
        self.store = store
        self.registry = VnRegistry(store, layout or KeyLayout())
        self.subjects = subjects or Subjects()
        self.counters: Counter[str] = Counter()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        subs = [
            await self.nc.subscribe(self.subjects.ima(op), queue=QUEUE_GROUP)
            for op in ("create", "get", "list", "delete", "profile_set", "profile_get",
                       "placement_set")
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                for sub in subs:
                    tg.create_task(self._serve(sub))
                self.ready.set()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _serve(self, sub: Any) -> None:
        async for msg in sub.messages:
            await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        reply: BaseModel
        try:
            reply = await self._dispatch(op, msg.data)
            self.counters[f"ops.{op}.ok"] += 1
        except ProtocolError as exc:
            self.counters[f"errors.{exc.code}"] += 1
            self.counters[f"ops.{op}.{exc.code}"] += 1
            reply = ErrorReply(code=exc.code, reason=exc.reason,
                               details={k: str(v) for k, v in exc.fields.items()})
        except StoreError as exc:
            self.counters[f"errors.{ErrorCode.IMA_UNAVAILABLE}"] += 1
            self.counters[f"ops.{op}.{ErrorCode.IMA_UNAVAILABLE}"] += 1
            reply = ErrorReply(code=ErrorCode.IMA_UNAVAILABLE, reason=str(exc))
        if msg.reply:
            try:
                await self.nc.publish(msg.reply, dumps(reply))
            except OutboundBufferLimitError:
                # Disconnected with nats-py's reconnect buffer full: the answer is lost
                # like one lost on the wire; the caller asks again. Never fatal.
                self.counters["replies_dropped"] += 1

    async def _dispatch(self, op: str, data: bytes) -> BaseModel:
        if op == "create":
            req = decode_model(data, VnCreate)
            record, created = await self.registry.create(
                alias=req.alias, name=req.name, vn_id=req.vn_id, service=req.service,
                members=req.members,
            )
            return VnReply(vn=record, created=created)
        if op == "get":
            get = decode_model(data, VnGet)
            return VnReply(vn=await self.registry.resolve(get.vn))
        if op == "profile_set":
            ps = decode_model(data, ProfileSet)
            record = await self.registry.resolve(ps.vn)
            profile = await self.registry.set_profile(ps.vn, ps.profile)
            return ProfileReply(vn=record.name, profile=profile)
        if op == "delete":
            deleted = decode_model(data, VnDelete)
            return VnReply(vn=await self.registry.delete(deleted.vn))
        if op == "placement_set":
            ps_req = decode_model(data, PlacementSet)
            placement = Placement(vnic=ps_req.vnic, hypervisor=ps_req.hypervisor)
            revision = await self.registry.set_placement(placement)
            return PlacementReply(placement=placement, revision=revision)
        if op == "profile_get":
            pg = decode_model(data, ProfileGet)
            record = await self.registry.resolve(pg.vn)
            return ProfileReply(vn=record.name, profile=await self.registry.get_profile(pg.vn))
        decode_model(data, VnList)
        return VnListReply(vns=await self.registry.list())
