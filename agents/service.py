"""The agent as a long-running sidecar: resync on NVE restarts, answer state queries.

It listens to the epoch announcements of its NVEs; a new epoch (an NVE
restarted and lost its tables) triggers one ``hv_sync`` with this
hypervisor's full state.  It also answers ``<root>.v1.agent.<hv>.state`` with
that state, which is what the consistency checker compares the NVEs against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import orjson
from nats.errors import OutboundBufferLimitError

from agents.agent import AgentError, HypervisorAgent, NveUnreachable
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import EpochAnnounce, ErrorReply, OkReply, VnAddresses, VnRef
from schemas.operator import AgentCommand
from schemas.wire import decode_model, dumps

_log = logging.getLogger(__name__)


class AgentService:
    def __init__(self, agent: HypervisorAgent) -> None:
        self.agent = agent
        self.synced: dict[str, int] = {}  # NVE -> the epoch our last full sync reached
        self.resyncs: dict[str, int] = {}  # NVE -> its last announced drop counter
        self.counters: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self._wanted: asyncio.Queue[str] = asyncio.Queue()

    async def run(self) -> None:
        agent = self.agent
        subs = [await agent.nc.subscribe(agent.subjects.nve_epoch(nve)) for nve in agent.nves()]
        state = await agent.nc.subscribe(agent.subjects.agent_state(agent.hypervisor))
        ctl = await agent.nc.subscribe(agent.subjects.agent_ctl(agent.hypervisor))
        try:
            async with asyncio.TaskGroup() as tg:
                for sub in subs:
                    tg.create_task(self._epochs(sub))
                tg.create_task(self._answer_state(state))
                tg.create_task(self._commands(ctl))
                tg.create_task(self._syncer())
                for nve in sorted(agent.nves()):
                    self._wanted.put_nowait(nve)  # agent (re)start: send our full state
                self.ready.set()
        finally:
            for sub in [*subs, state, ctl]:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _epochs(self, sub: Any) -> None:
        async for msg in sub.messages:
            try:
                announce = decode_model(msg.data, EpochAnnounce)
            except Exception:
                self.counters["bad_announcements"] += 1
                continue
            synced = self.synced.get(announce.nve)
            resync = self.resyncs.setdefault(announce.nve, announce.resync)
            if resync != announce.resync:
                # The NVE dropped requests (slow consumer): send everything again.
                self.resyncs[announce.nve] = announce.resync
                self.counters["resyncs_after_drops"] += 1
                self._wanted.put_nowait(announce.nve)
            elif synced is not None and synced != announce.epoch:
                self.counters["nve_restarts_seen"] += 1
                self.synced[announce.nve] = announce.epoch  # one sync per new epoch
                self._wanted.put_nowait(announce.nve)
            elif announce.nve in self.agent.unsynced:
                # It missed requests of ours while unreachable and is back: resync.
                self.agent.unsynced.discard(announce.nve)
                self.counters["resyncs_after_unreachable"] += 1
                self._wanted.put_nowait(announce.nve)

    async def _syncer(self) -> None:
        while True:
            nve = await self._wanted.get()
            try:
                reply = await self.agent.sync(nve)
            except (NveUnreachable, AgentError) as exc:
                self.counters["sync_failures"] += 1
                self.synced[nve] = -1  # the next announcement triggers another try
                _log.warning("%s: sync with %s failed (%s); waiting for its next epoch",
                             self.agent.hypervisor, nve, exc)
                continue
            self.counters["syncs"] += 1
            self.synced[nve] = reply.epoch
            if reply.refused:
                _log.warning("%s: %s refused %s", self.agent.hypervisor, nve, reply.refused)

    async def _commands(self, sub: Any) -> None:
        """Operator VNIC operations (``nvo3 agent ctl``): run them as this hypervisor."""
        async for msg in sub.messages:
            reply: Any
            try:
                reply = await self.execute(decode_model(msg.data, AgentCommand))
                self.counters["commands"] += 1
            except AgentError as exc:
                reply = exc.reply
            except ProtocolError as exc:
                reply = ErrorReply(code=exc.code, reason=exc.reason)
            except NveUnreachable as exc:
                reply = ErrorReply(code=ErrorCode.NVE_UNREACHABLE,
                                   reason=f"{exc} (kept; delivered by the next resync)")
            if isinstance(reply, ErrorReply):
                self.counters[f"command_errors.{reply.code}"] += 1
            await self._answer(msg, dumps(reply))

    @property
    def sync_queue_depth(self) -> int:
        """NVEs waiting for a full ``hv_sync`` from this agent (metrics)."""
        return self._wanted.qsize()

    async def execute(self, cmd: AgentCommand) -> Any:
        agent, vnic = self.agent, cmd.vnic

        def need_vn() -> VnRef:
            if cmd.vn is None:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cmd.op} needs a VN")
            return cmd.vn

        def need_port() -> str:
            if cmd.port is None:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cmd.op} needs a port")
            return cmd.port

        if cmd.op == "connect":
            result = await agent.connect(vnic, need_port(), need_vn())
            return OkReply(op="vn_connect", result=result)
        if cmd.op == "disconnect":
            return await agent.disconnect(vnic, need_vn())
        if cmd.op == "associate":
            return await agent.associate(vnic, need_vn(), cmd.entries)
        if cmd.op == "disassociate":
            return await agent.disassociate(vnic, need_vn(), cmd.entries)
        if cmd.op == "shutdown":
            return await agent.shutdown(vnic)
        if cmd.op == "startup":
            return await agent.startup(vnic)
        if cmd.op == "remove":
            return await agent.remove_vnic(vnic)
        if cmd.op == "depart":
            return await agent.depart(vnic)
        vns = (VnAddresses(vn=need_vn(), entries=cmd.entries),) if cmd.vn else ()
        if cmd.op == "prepare":
            return await agent.prepare(vnic, need_port(), vns)
        return await agent.arrive(vnic, need_port(), vns)

    async def _answer_state(self, sub: Any) -> None:
        async for msg in sub.messages:
            await self._answer(msg, orjson.dumps(self.state()))

    async def _answer(self, msg: Any, payload: bytes) -> None:
        """Reply if asked to; an answer nats-py cannot buffer while disconnected is
        lost like one lost on the wire (the asker asks again), never fatal."""
        if not msg.reply:
            return
        try:
            await self.agent.nc.publish(msg.reply, payload)
        except OutboundBufferLimitError:
            self.counters["replies_dropped"] += 1

    def state(self) -> dict[str, Any]:
        agent = self.agent
        by_nve: dict[str, list[Any]] = {}
        for nve in sorted(agent.nves()):

            def owns(vn: VnRef, nve: str = nve) -> bool:
                return agent.nve_for(vn) == nve

            by_nve[nve] = [v.model_dump(mode="json") for v in agent.desired.for_nve(owns)]
        return {"hypervisor": agent.hypervisor, "nves": by_nve}
