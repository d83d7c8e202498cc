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
import os
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

from nats.aio.client import Client as Nats
from nats.errors import NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeout

from agents.desired import DesiredState, Undo
from agents.inventory import Inventory
from schemas.errors import ErrorCode
from schemas.messages import (
    AddrAssociate,
    AddrDisassociate,
    AddressEntry,
    AddrReplace,
    ConnectResult,
    ErrorReply,
    HvSync,
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


#: A request that got no answer, to be sent again: a timeout, nobody subscribed (the NVE
#: restarting), or nats-py's reconnect buffer full while the server is away.
_NO_ANSWER = (NatsTimeout, NoRespondersError, OutboundBufferLimitError)


RTT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RttHistogram:
    """Request round trips (request published -> reply received), counted per bucket.

    One ``bisect`` and two additions per answered request; ``nvo3.metrics`` turns
    the counts into a cumulative Prometheus histogram at scrape time.
    """

    def __init__(self, bounds: tuple[float, ...] = RTT_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds


def raise_if_cancelled() -> None:
    """Honour a cancellation that a NATS request swallowed.

    Python 3.11's ``asyncio.wait_for`` (inside nats-py's ``request``) can return
    the reply and drop a cancellation that arrives together with it; a loop
    that makes requests (the sync loop, operator commands, libvirt events)
    would then go on, and a stopping agent would hang.  The task still counts
    the cancellation (``cancelling()``), so it is raised again here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
        self.unsynced: set[str] = set()  # NVEs that missed a request: resync when back
        self._prepared: dict[str, tuple[VnAddresses, ...]] = {}  # pre-arrival announcements
        self.resend_extra: Callable[[], int] | None = None  # chaos: duplicate publishes
        self.nc = nc
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.attempts = attempts
        self._seq = itertools.count(time.time_ns() // 1000)
        self.tags: dict[tuple[str, str], ConnectResult] = {}  # (vnic, vn name) -> result
        self.desired = DesiredState()
        # Read by nvo3.metrics: requests.<kind>, retransmits.<kind>, replies.<ok|code>,
        # unreachable.<nve>; requests waiting for their answer; answered round trips.
        self.counters: Counter[str] = Counter()
        self.inflight = 0
        self.rtt = RttHistogram()

    def _envelope(self) -> dict[str, Any]:
        return {"sender": self.hypervisor, "seq": next(self._seq), "ts_ns": time.time_ns(),
                "trace": os.urandom(8).hex()}

    def nve_for(self, vn: VnRef) -> str:
        return self.routes.get(str(vn), self.nve)

    def _nves_of(self, vnic: str) -> list[str]:
        return sorted(self.vnic_nves.get(vnic) or {self.nve})

    async def send(self, message: Any, nve: str | None = None) -> OkReply:
        """Send one request, retransmitting on timeout; raise AgentError on refusal."""
        self.counters[f"requests.{message.kind}"] += 1
        self.inflight += 1
        try:
            return await self._send(message, nve)
        finally:
            self.inflight -= 1

    async def _send(self, message: Any, nve: str | None) -> OkReply:
        nve = nve or self.nve
        subject = self.subjects.hv_request(nve, self.hypervisor, message.kind)
        payload = dumps(message)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("publish %s seq=%d to NVE %s", message.kind, message.seq, nve,
                       extra={"trace": message.trace, "hypervisor": self.hypervisor})
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            sent = time.perf_counter()
            try:
                response = await self.nc.request(subject, payload, timeout=self.timeout)
                raise_if_cancelled()
            except _NO_ANSWER as exc:
                if attempt == self.attempts:
                    self.unsynced.add(nve)
                    self.counters[f"unreachable.{nve}"] += 1
                    raise NveUnreachable(
                        f"NVE {nve} did not answer {message.kind} after {attempt} tries"
                    ) from exc
                _log.warning("%s to %s: no answer (%s); retrying", message.kind, nve, exc)
                self.counters[f"retransmits.{message.kind}"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.rtt.observe(time.perf_counter() - sent)
            reply = decode_reply(response.data)
            if self.resend_extra is not None:
                await self._duplicates(subject, payload, self.resend_extra())
            if isinstance(reply, ErrorReply):
                self.counters[f"replies.{reply.code}"] += 1
                if reply.code == ErrorCode.STALE_SEQ:
                    # Overtaken by a newer request of ours: same content, new number.
                    # Applied now, it lands after that newer request, which it may undo
                    # (a shutdown after the startup that overtook it, or an hv_sync's
                    # older snapshot), so the NVE also gets a full resync from the
                    # desired state at its next epoch announcement (agents.service).
                    self.unsynced.add(nve)
                    self.counters["resyncs_after_stale_seq"] += 1
                    if attempt == self.attempts:
                        # Not a refusal of the content: the newer request may even
                        # carry it (an hv_sync read after the intent was recorded), so
                        # the intent stays and the resync delivers it. Rolling it back
                        # here left the NVE holding what the agent no longer wanted,
                        # with nothing to repair it.
                        self.counters[f"unreachable.{nve}"] += 1
                        raise NveUnreachable(
                            f"{message.kind} to NVE {nve} was overtaken by a newer request "
                            f"on every try; kept for the next resync")
                    message = message.model_copy(update={"seq": next(self._seq)})
                    payload = dumps(message)
                    self.counters[f"retransmits.{message.kind}"] += 1
                    continue
                raise AgentError(reply)
            self.counters["replies.ok"] += 1
            return reply
        raise AssertionError("unreachable")

    async def _duplicates(self, subject: str, payload: bytes, n: int) -> None:
        """Publish an answered request ``n`` more times (chaos: at-least-once delivery).

        The NVE must answer them from its replay cache and change nothing. Their
        answers do not matter: one that does not come in time (the NVE restarting, a
        NATS server going away) is counted, never raised, since the request itself
        was already answered.
        """
        for _ in range(n):
            try:
                await self.nc.request(subject, payload, timeout=self.timeout)
            except _NO_ANSWER:
                self.counters["duplicates_unanswered"] += 1

    # ------------------------------------------------------------ operations

    async def _intended(self, change: Callable[[], Undo], message: Any, nve: str) -> OkReply:
        """Record the intent, send it; a refusal undoes that change (and only it)."""
        undo = change()
        try:
            return await self.send(message, nve)
        except AgentError:
            undo()
            raise

    async def connect(
        self, vnic: str, port: str, vn: VnRef, allowed: tuple[str, ...] = ()
    ) -> ConnectResult:
        nve = self.nve_for(vn)
        reply = await self._intended(
            lambda: self.desired.connect(vnic, port, vn, allowed),
            VnConnect(vnic=vnic, port=port, vn=vn, allowed=allowed, **self._envelope()), nve)
        assert reply.result is not None
        self.tags[(vnic, reply.result.vn_name)] = reply.result
        self.vnic_nves.setdefault(vnic, set()).add(nve)
        return reply.result

    async def disconnect(self, vnic: str, vn: VnRef) -> OkReply:
        return await self._intended(
            lambda: self.desired.disconnect(vnic, vn),
            VnDisconnect(vnic=vnic, vn=vn, **self._envelope()), self.nve_for(vn))

    async def associate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> OkReply:
        return await self._intended(
            lambda: self.desired.associate(vnic, vn, entries),
            AddrAssociate(vnic=vnic, vn=vn, entries=entries, **self._envelope()),
            self.nve_for(vn))

    async def associate_many(
        self,
        items: Iterable[tuple[str, VnRef, tuple[AddressEntry, ...]]],
        *,
        window: int = 64,
        max_entries: int = 256,
    ) -> list[OkReply | AgentError]:
        """Associate many addresses: coalesced per (VNIC, VN) and pipelined [4.2].

        The entries of each (VNIC, VN) are merged (one entry per MAC, its IPs united)
        into ``addr_associate`` messages of at most ``max_entries`` entries, and up to
        ``window`` of them are in flight at once.  A hypervisor that has many
        addresses to announce (boot, a host full of containers) so pays the per-message
        costs (NATS round trip, decode, IMA transaction share) per batch, not per
        address, and does not wait for one reply before sending the next request.
        Returns one reply per message sent, in order; a refusal is returned as its
        ``AgentError`` and does not stop the others.  Requests leave in sequence order
        (nats-py queues a publish before it yields), so pipelining does not trip the
        NVE's ``stale_seq`` check; one overtaken anyway is renumbered by ``send``.
        """
        if window < 1 or max_entries < 1:
            raise ValueError("window and max_entries must be >= 1")
        groups: dict[tuple[str, VnRef], dict[str, dict[str, None]]] = {}
        for vnic, vn, entries in items:
            macs = groups.setdefault((vnic, vn), {})
            for entry in entries:
                macs.setdefault(entry.mac, {}).update(dict.fromkeys(entry.ips))
        messages: list[tuple[str, VnRef, tuple[AddressEntry, ...]]] = []
        for (vnic, vn), macs in groups.items():
            merged = [AddressEntry(mac=mac, ips=tuple(ips)) for mac, ips in macs.items()]
            messages.extend((vnic, vn, tuple(merged[i : i + max_entries]))
                            for i in range(0, len(merged), max_entries))
        return await self._pipelined([partial(self.associate, *m) for m in messages], window)

    @staticmethod
    async def _pipelined(
        calls: list[Callable[[], Awaitable[OkReply]]], window: int
    ) -> list[OkReply | AgentError]:
        """Run ``calls`` with at most ``window`` in flight; results in call order."""
        results: list[OkReply | AgentError | None] = [None] * len(calls)
        pending = iter(enumerate(calls))

        async def worker() -> None:
            for i, call in pending:
                try:
                    results[i] = await call()
                except AgentError as exc:
                    results[i] = exc

        workers = [asyncio.ensure_future(worker()) for _ in range(min(window, len(calls)))]
        try:
            await asyncio.gather(*workers)  # NveUnreachable etc. propagate as they are
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return [r for r in results if r is not None]

    async def disassociate(
        self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]
    ) -> OkReply:
        return await self._intended(
            lambda: self.desired.disassociate(vnic, vn, entries),
            AddrDisassociate(vnic=vnic, vn=vn, entries=entries, **self._envelope()),
            self.nve_for(vn))

    async def replace(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> OkReply:
        """Make the NVE's address set for (vnic, vn) exactly ``entries`` [4.2]."""
        return await self._intended(
            lambda: self.desired.replace(vnic, vn, entries),
            AddrReplace(vnic=vnic, vn=vn, entries=entries, **self._envelope()),
            self.nve_for(vn))

    async def _each_nve(
        self, vnic: str, change: Callable[[], Undo], make: Callable[[], Any]
    ) -> OkReply:
        undo = change()
        reply: OkReply | None = None
        try:
            for nve in self._nves_of(vnic):
                reply = await self.send(make(), nve)
        except AgentError:
            undo()
            raise
        assert reply is not None
        return reply

    async def remove_vnic(self, vnic: str) -> OkReply:
        reply = await self._each_nve(
            vnic, lambda: self.desired.remove(vnic),
            lambda: VnicDisassociate(vnic=vnic, **self._envelope()))
        self.vnic_nves.pop(vnic, None)
        return reply

    async def shutdown(self, vnic: str) -> OkReply:
        return await self._each_nve(vnic, lambda: self.desired.set_state(vnic, "down"),
                                    lambda: VnicShutdown(vnic=vnic, **self._envelope()))

    async def startup(self, vnic: str) -> OkReply:
        return await self._each_nve(vnic, lambda: self.desired.set_state(vnic, "up"),
                                    lambda: VnicStartup(vnic=vnic, **self._envelope()))

    async def depart(self, vnic: str) -> OkReply:
        """Migration departure [4.4]: the NVE holds the bindings for its hold time."""
        reply = await self._each_nve(vnic, lambda: self.desired.remove(vnic),
                                     lambda: VnicDepart(vnic=vnic, **self._envelope()))
        self.vnic_nves.pop(vnic, None)
        return reply

    async def prepare(self, vnic: str, port: str, vns: tuple[VnAddresses, ...]) -> OkReply:
        """Pre-arrival handshake [4.4]: announce a VNIC that is about to move here."""
        nve = self.nve_for(vns[0].vn)
        reply = await self.send(
            VnicPrepare(vnic=vnic, port=port, vns=vns, **self._envelope()), nve)
        self.vnic_nves.setdefault(vnic, set()).add(nve)
        self._prepared[vnic] = vns  # what the VNIC will hold here once it arrives
        return reply

    async def arrive(
        self, vnic: str, port: str, vns: tuple[VnAddresses, ...] = (), nve: str | None = None
    ) -> OkReply:
        """Migration arrival [4.4]; ``vns`` may be empty after a prepare."""
        target = nve or (self.nve_for(vns[0].vn) if vns else self.nve)
        reply = await self.send(VnicArrive(vnic=vnic, port=port, vns=vns, **self._envelope()),
                                target)
        self.vnic_nves.setdefault(vnic, set()).add(target)
        known = {r.vn_name: r for r in reply.results}
        prepared = self._prepared.pop(vnic, ())
        self.desired.arrive(vnic, port, vns or prepared or tuple(
            VnAddresses(vn=VnRef(name=name)) for name in known))
        for name, result in known.items():
            self.tags[(vnic, name)] = result
        return reply

    # -------------------------------------------------------------- resync

    def nves(self) -> set[str]:
        return {self.nve, *self.routes.values()}

    async def sync(self, nve: str, chunk: int = 500) -> OkReply:
        """Send this hypervisor's full state for ``nve`` (after it restarted) [4].

        The NVE reconciles and writes only differences; sending it when
        nothing changed costs no IMA write. A big state goes in parts of
        ``chunk`` VNICs, and each part is read from the desired state when it is
        numbered, not when the sync began: a request made while an earlier part
        was in flight has a lower ``seq`` than the next part, which must already
        carry its effect or it would roll it back. The last part also names
        every VNIC created meanwhile, so the NVE's end-of-sync sweep keeps them.
        """
        def owns(vn: VnRef) -> bool:
            return self.nve_for(vn) == nve

        names = sorted(self.desired.vnics)
        sync_id = next(self._seq)
        reply: OkReply | None = None
        start = 0
        while True:
            last = start + chunk >= len(names)
            part_names = names[start : start + chunk]
            if last:
                known = set(names)
                part_names = [*part_names, *sorted(n for n in self.desired.vnics
                                                   if n not in known)]
            part = self.desired.for_nve(owns, part_names)
            reply = await self.send(
                HvSync(sync_id=sync_id, last=last, vnics=tuple(part), **self._envelope()), nve)
            for vnic in part:
                self.vnic_nves.setdefault(vnic.vnic, set()).add(nve)
            if last:
                return reply
            start += chunk

    def set_inventory(self, inventory: Inventory) -> None:
        """Make the inventory the desired state (then ``sync`` each NVE)."""
        for spec in inventory.vnics:
            self.desired.arrive(spec.name, spec.port, tuple(
                VnAddresses(vn=v.vn, entries=v.addresses) for v in spec.vns))
            self.desired.set_state(spec.name, spec.state)

    async def apply_inventory(
        self, inventory: Inventory, on_vnic: Callable[[], None] | None = None
    ) -> None:
        """Bring the NVE to the inventory's state (idempotent, safe to repeat).

        ``on_vnic`` is called after each VNIC (a progress bar).
        """
        for spec in inventory.vnics:
            for attachment in spec.vns:
                await self.connect(spec.name, spec.port, attachment.vn)
                if attachment.addresses:
                    await self.associate(spec.name, attachment.vn, attachment.addresses)
            if spec.state == "down":
                await self.shutdown(spec.name)
            if on_vnic is not None:
                on_vnic()
