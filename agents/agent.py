"""The hypervisor sidecar: speaks the Hypervisor-to-NVE protocol to its NVE.

Every request is a NATS request/reply on a subject naming the NVE and this
hypervisor.  Sequence numbers start at the wall clock in microseconds and only
grow, so they stay unique across agent restarts; a request that times out is
retransmitted with the same sequence number, which the NVE answers from its
replay cache (idempotent) instead of applying twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from nats.aio.client import Client as Nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from agents.inventory import Inventory
from schemas.errors import ErrorCode
from schemas.messages import (
    AddrAssociate,
    AddrDisassociate,
    AddressEntry,
    ConnectResult,
    ErrorReply,
    OkReply,
    VnConnect,
    VnDisconnect,
    VnicDisassociate,
    VnicShutdown,
    VnicStartup,
    VnRef,
)
from schemas.subjects import Subjects
from schemas.wire import decode_reply, dumps

_log = logging.getLogger(__name__)


class AgentError(Exception):
    """The NVE refused a request; carries the typed error reply."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.reason}")
        self.reply = reply

    @property
    def code(self) -> ErrorCode:
        return self.reply.code


class NveUnreachable(Exception):
    pass


class HypervisorAgent:
    def __init__(
        self,
        hypervisor: str,
        nve: str,
        nc: Nats,
        *,
        subjects: Subjects | None = None,
        timeout: float = 2.0,
        attempts: int = 5,
    ) -> None:
        self.hypervisor = hypervisor
        self.nve = nve
        self.nc = nc
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.attempts = attempts
        self._seq = itertools.count(time.time_ns() // 1000)
        self.tags: dict[tuple[str, str], ConnectResult] = {}  # (vnic, vn name) -> result

    def _envelope(self) -> dict[str, Any]:
        return {"sender": self.hypervisor, "seq": next(self._seq), "ts_ns": time.time_ns()}

    async def send(self, message: Any) -> OkReply:
        """Send one request, retransmitting on timeout; raise AgentError on refusal."""
        subject = self.subjects.hv_request(self.nve, self.hypervisor, message.kind)
        payload = dumps(message)
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self.nc.request(subject, payload, timeout=self.timeout)
            except (NatsTimeout, NoRespondersError) as exc:
                if attempt == self.attempts:
                    raise NveUnreachable(
                        f"NVE {self.nve} did not answer {message.kind} after {attempt} tries"
                    ) from exc
                _log.warning("%s to %s: no answer (%s); retrying", message.kind, self.nve, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            reply = decode_reply(response.data)
            if isinstance(reply, ErrorReply):
                raise AgentError(reply)
            return reply
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ operations

    async def connect(self, vnic: str, port: str, vn: VnRef) -> ConnectResult:
        reply = await self.send(VnConnect(vnic=vnic, port=port, vn=vn, **self._envelope()))
        assert reply.result is not None
        self.tags[(vnic, reply.result.vn_name)] = reply.result
        return reply.result

    async def disconnect(self, vnic: str, vn: VnRef) -> OkReply:
        return await self.send(VnDisconnect(vnic=vnic, vn=vn, **self._envelope()))

    async def associate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> OkReply:
        return await self.send(
            AddrAssociate(vnic=vnic, vn=vn, entries=entries, **self._envelope())
        )

    async def disassociate(
        self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]
    ) -> OkReply:
        return await self.send(
            AddrDisassociate(vnic=vnic, vn=vn, entries=entries, **self._envelope())
        )

    async def remove_vnic(self, vnic: str) -> OkReply:
        return await self.send(VnicDisassociate(vnic=vnic, **self._envelope()))

    async def shutdown(self, vnic: str) -> OkReply:
        return await self.send(VnicShutdown(vnic=vnic, **self._envelope()))

    async def startup(self, vnic: str) -> OkReply:
        return await self.send(VnicStartup(vnic=vnic, **self._envelope()))

    async def apply_inventory(self, inventory: Inventory) -> None:
        """Bring the NVE to the inventory's state (idempotent, safe to repeat)."""
        for spec in inventory.vnics:
            for attachment in spec.vns:
                await self.connect(spec.name, spec.port, attachment.vn)
                if attachment.addresses:
                    await self.associate(spec.name, attachment.vn, attachment.addresses)
            if spec.state == "down":
                await self.shutdown(spec.name)
