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
    AddrReplace,
    ConnectResult,
    ErrorReply,
    OkReply,
    VnAddresses,
    VnConnect,
    VnDisconnect,
    VnicArrive,
    VnicDepart,
    VnicDisassociate,
    VnicPrepare,
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
        routes: dict[str, str] | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.nve = nve
        # RFC 8394: a hypervisor may use different external NVEs for different VNs.
        # ``routes`` maps a VN reference (``str(VnRef)``, e.g. "alias=red") to its NVE.
        self.routes = dict(routes or {})
        self.vnic_nves: dict[str, set[str]] = {}
        self.nc = nc
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.attempts = attempts
        self._seq = itertools.count(time.time_ns() // 1000)
        self.tags: dict[tuple[str, str], ConnectResult] = {}  # (vnic, vn name) -> result

    def _envelope(self) -> dict[str, Any]:
        return {"sender": self.hypervisor, "seq": next(self._seq), "ts_ns": time.time_ns()}

    def nve_for(self, vn: VnRef) -> str:
        return self.routes.get(str(vn), self.nve)

    def _nves_of(self, vnic: str) -> list[str]:
        return sorted(self.vnic_nves.get(vnic) or {self.nve})

    async def send(self, message: Any, nve: str | None = None) -> OkReply:
        """Send one request, retransmitting on timeout; raise AgentError on refusal."""
        nve = nve or self.nve
        subject = self.subjects.hv_request(nve, self.hypervisor, message.kind)
        payload = dumps(message)
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self.nc.request(subject, payload, timeout=self.timeout)
            except (NatsTimeout, NoRespondersError) as exc:
                if attempt == self.attempts:
                    raise NveUnreachable(
                        f"NVE {nve} did not answer {message.kind} after {attempt} tries"
                    ) from exc
                _log.warning("%s to %s: no answer (%s); retrying", message.kind, nve, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            reply = decode_reply(response.data)
            if isinstance(reply, ErrorReply):
                raise AgentError(reply)
            return reply
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ operations

    async def connect(
        self, vnic: str, port: str, vn: VnRef, allowed: tuple[str, ...] = ()
    ) -> ConnectResult:
        nve = self.nve_for(vn)
        reply = await self.send(
            VnConnect(vnic=vnic, port=port, vn=vn, allowed=allowed, **self._envelope()), nve
        )
        assert reply.result is not None
        self.tags[(vnic, reply.result.vn_name)] = reply.result
        self.vnic_nves.setdefault(vnic, set()).add(nve)
        return reply.result

    async def disconnect(self, vnic: str, vn: VnRef) -> OkReply:
        return await self.send(VnDisconnect(vnic=vnic, vn=vn, **self._envelope()),
                               self.nve_for(vn))

    async def associate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> OkReply:
        return await self.send(
            AddrAssociate(vnic=vnic, vn=vn, entries=entries, **self._envelope()),
            self.nve_for(vn),
        )

    async def disassociate(
        self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]
    ) -> OkReply:
        return await self.send(
            AddrDisassociate(vnic=vnic, vn=vn, entries=entries, **self._envelope()),
            self.nve_for(vn),
        )

    async def replace(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> OkReply:
        """Make the NVE's address set for (vnic, vn) exactly ``entries`` [4.2]."""
        return await self.send(
            AddrReplace(vnic=vnic, vn=vn, entries=entries, **self._envelope()),
            self.nve_for(vn),
        )

    async def _each_nve(self, vnic: str, make: Any) -> OkReply:
        reply: OkReply | None = None
        for nve in self._nves_of(vnic):
            reply = await self.send(make(), nve)
        assert reply is not None
        return reply

    async def remove_vnic(self, vnic: str) -> OkReply:
        reply = await self._each_nve(
            vnic, lambda: VnicDisassociate(vnic=vnic, **self._envelope()))
        self.vnic_nves.pop(vnic, None)
        return reply

    async def shutdown(self, vnic: str) -> OkReply:
        return await self._each_nve(vnic, lambda: VnicShutdown(vnic=vnic, **self._envelope()))

    async def startup(self, vnic: str) -> OkReply:
        return await self._each_nve(vnic, lambda: VnicStartup(vnic=vnic, **self._envelope()))

    async def depart(self, vnic: str) -> OkReply:
        """Migration departure [4.4]: the NVE holds the bindings for its hold time."""
        return await self._each_nve(vnic, lambda: VnicDepart(vnic=vnic, **self._envelope()))

    async def prepare(self, vnic: str, port: str, vns: tuple[VnAddresses, ...]) -> OkReply:
        """Pre-arrival handshake [4.4]: announce a VNIC that is about to move here."""
        reply = await self.send(
            VnicPrepare(vnic=vnic, port=port, vns=vns, **self._envelope()),
            self.nve_for(vns[0].vn),
        )
        self.vnic_nves.setdefault(vnic, set()).add(self.nve_for(vns[0].vn))
        return reply

    async def arrive(
        self, vnic: str, port: str, vns: tuple[VnAddresses, ...] = (), nve: str | None = None
    ) -> OkReply:
        """Migration arrival [4.4]; ``vns`` may be empty after a prepare."""
        target = nve or (self.nve_for(vns[0].vn) if vns else self.nve)
        reply = await self.send(VnicArrive(vnic=vnic, port=port, vns=vns, **self._envelope()),
                                target)
        self.vnic_nves.setdefault(vnic, set()).add(target)
        return reply

    async def apply_inventory(self, inventory: Inventory) -> None:
        """Bring the NVE to the inventory's state (idempotent, safe to repeat)."""
        for spec in inventory.vnics:
            for attachment in spec.vns:
                await self.connect(spec.name, spec.port, attachment.vn)
                if attachment.addresses:
                    await self.associate(spec.name, attachment.vn, attachment.addresses)
            if spec.state == "down":
                await self.shutdown(spec.name)
