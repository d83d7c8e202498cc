"""The NVE's protocol state machine: no I/O, no clock, no asyncio.

``NveCore.apply(message, vn, now_ns)`` validates a hypervisor request against
the tables, and only if everything passes mutates them and returns the reply
result plus the effects (IMA writes, watch changes) for the service to run.
A refused request raises ``ProtocolError`` before any mutation, so it changes
nothing.  Replaying a message returns the same result with no effects.
Time only enters as ``now_ns`` arguments; ``tick(now_ns)`` expires hold
timers and gleaned addresses.

Tables (draft 3.1): VNIC -> VN -> MAC -> IP containment, with the 802.1Q tag
spaces beside it.  Removing a parent removes its children with no per-child
message (3.1, 4.3).  The VNIC lifecycle follows ``nve.lifecycle.TRANSITIONS``.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from nve.construct import construct_unchecked
from nve.effects import (
    BindIp,
    BindMac,
    Effect,
    StartWatch,
    StopWatch,
    UnbindIp,
    UnbindMac,
)
from nve.lifecycle import VnicState, next_state
from nve.remote import RemoteTable, ip_entry, mac_entry
from nve.tags import TagSpace
from schemas.errors import Conflict, ErrorCode, Exhausted, ProtocolError
from schemas.messages import (
    AddrAssociate,
    AddrDisassociate,
    AddressEntry,
    AddrObserved,
    AddrReplace,
    ConnectResult,
    HvSync,
    HypervisorMessage,
    SyncVnic,
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
from schemas.profile import VnProfile
from schemas.records import IpBinding, MacBinding, VnRecord
from schemas.types import NveId, UnderlayIp

_UNDERLAY: TypeAdapter[str] = TypeAdapter(UnderlayIp)
_NVE_ID: TypeAdapter[str] = TypeAdapter(NveId)
REPLAY_WINDOW = 512  # recent (sender, seq) remembered for idempotent replay
SECOND = 10**9


@dataclass
class Attachment:
    """One VNIC-VN pair: its tag and the MACs (with their IPs) behind it."""

    vn: VnRecord
    tag: int
    macs: dict[str, set[str]] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()  # prefixes gleaning may learn; () = any
    gleaned: dict[tuple[str, str | None], int] = field(default_factory=dict)  # -> expiry


@dataclass
class PendingMove:
    """A pre-announced same-NVE move: tags already held on the new port."""

    hypervisor: str
    port: str
    tags: dict[str, int]
    expires_ns: int


@dataclass
class Vnic:
    name: str
    hypervisor: str
    port: str
    state: VnicState = VnicState.UP
    published: bool = True  # are its bindings in the IMA?
    since_ns: int = 0
    hold_until_ns: int = 0
    vns: dict[str, Attachment] = field(default_factory=dict)
    pending: PendingMove | None = None
    previous_hypervisor: str | None = None  # before a same-NVE move (late departures)

    @property
    def up(self) -> bool:
        return self.state is VnicState.UP


@dataclass(frozen=True)
class Outcome:
    result: ConnectResult | None
    effects: tuple[Effect, ...]
    replayed: bool = False
    results: tuple[ConnectResult, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()  # hv_sync: (vnic, "code: reason")


@dataclass(frozen=True)
class Timers:
    hold_ns: int = 30 * SECOND  # departure without handshake [4.3]
    prepare_ns: int = 120 * SECOND  # pre-arrival that never arrives
    glean_ns: int = 300 * SECOND  # gleaned address age-out


def _within(ip: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    net = ipaddress.ip_network(ip)
    for prefix in allowed:
        outer = ipaddress.ip_network(prefix)
        if net.version == outer.version and net.subnet_of(outer):  # type: ignore[arg-type]
            return True
    return False


class NveCore:
    def __init__(
        self,
        nve_id: str,
        underlay: str,
        *,
        timers: Timers | None = None,
        port_scopes: Mapping[str, str] | None = None,
    ) -> None:
        self.nve_id = nve_id
        self.underlay = _UNDERLAY.validate_python(underlay)
        _NVE_ID.validate_python(nve_id)
        self.timers = timers or Timers()
        self.port_scopes: dict[str, str] = dict(port_scopes or {})
        self.vnics: dict[str, Vnic] = {}
        self.tag_spaces: dict[str, TagSpace] = {}
        self.mac_owner: dict[tuple[str, str], str] = {}  # (vn, mac) -> vnic
        self.ip_owner: dict[tuple[str, str], tuple[str, str]] = {}  # (vn, ip) -> (vnic, mac)
        self.vn_members: dict[str, set[str]] = {}  # vn -> local vnics
        self.vn_records: dict[str, VnRecord] = {}
        self.profiles: dict[str, VnProfile] = {}
        self.placements: dict[str, str] = {}  # vnic -> hypervisor (from the IMA) [5]
        self.enforce_placement = False
        self.remote = RemoteTable(nve_id)
        self.events: dict[str, int] = {}  # lifecycle/glean counters
        self._seen: dict[str, OrderedDict[int, tuple[HypervisorMessage, Outcome]]] = {}
        self._syncs: dict[str, tuple[int, set[str]]] = {}  # sender -> (sync id, vnics seen)
        self._newest: dict[str, int] = {}  # sender -> newest applied seq (only grows)
        #: This incarnation's epoch, written into every binding (set by the service).
        self.epoch = 0
        self._trace = ""  # trace id of the message being applied, copied into bindings

    # ------------------------------------------------------------------ entry

    def apply(
        self,
        msg: HypervisorMessage,
        vn: VnRecord | None = None,
        now_ns: int = 0,
        *,
        vns: Mapping[VnRef, VnRecord] | None = None,
    ) -> Outcome:
        """Apply one request; ``vn``/``vns`` are the VNs it names, already resolved."""
        seen = self._seen.setdefault(msg.sender, OrderedDict())
        previous = seen.get(msg.seq)
        if previous is not None:
            old_msg, old_outcome = previous
            if old_msg != msg:
                raise ProtocolError(
                    ErrorCode.SEQ_CONFLICT,
                    f"sequence number {msg.seq} from {msg.sender} was already used "
                    "for a different message",
                    seq=str(msg.seq),
                )
            return old_outcome
        newest = self._newest.get(msg.sender, -1)
        if msg.seq < newest:
            # Delivered out of order: applying it now could undo a later request.
            raise ProtocolError(
                ErrorCode.STALE_SEQ,
                f"sequence number {msg.seq} from {msg.sender} is older than {newest}, "
                "already applied; resend with a new sequence number",
                seq=str(msg.seq),
            )
        self._trace = msg.trace or ""
        try:
            outcome = self._dispatch(msg, vn, now_ns, vns or {})
        finally:
            self._trace = ""
        self._newest[msg.sender] = msg.seq
        # Kept as its replay answer: no effects, so the window does not hold every
        # binding of the last 512 requests per sender alive (each one more object for
        # every full garbage collection to walk).
        seen[msg.seq] = (msg, Outcome(outcome.result, (), True, outcome.results))
        if len(seen) > REPLAY_WINDOW:
            seen.popitem(last=False)
        return outcome

    def _dispatch(
        self,
        msg: HypervisorMessage,
        vn: VnRecord | None,
        now_ns: int,
        vns: Mapping[VnRef, VnRecord],
    ) -> Outcome:
        if isinstance(msg, VnConnect):
            return self._connect(msg, _need(vn), now_ns)
        if isinstance(msg, VnDisconnect):
            return self._disconnect(msg.sender, msg.vnic, _need(vn).name)
        if isinstance(msg, AddrAssociate):
            return self._associate(msg, _need(vn))
        if isinstance(msg, AddrDisassociate):
            return self._disassociate(msg, _need(vn))
        if isinstance(msg, AddrReplace):
            return self._replace(msg, _need(vn))
        if isinstance(msg, VnicDisassociate):
            return self._vnic_disassociate(msg)
        if isinstance(msg, VnicShutdown):
            return self._shutdown(msg, now_ns)
        if isinstance(msg, VnicStartup):
            return self._startup(msg, now_ns)
        if isinstance(msg, VnicDepart):
            return self._depart(msg, now_ns)
        if isinstance(msg, VnicPrepare):
            return self._prepare(msg, vns, now_ns)
        if isinstance(msg, VnicArrive):
            return self._arrive(msg, vns, now_ns)
        if isinstance(msg, HvSync):
            return self._sync(msg, vns, now_ns)
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unhandled kind {msg.kind}")

    def _count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def _transition(self, vnic: Vnic, event: str) -> VnicState:
        """The state ``event`` leads to, or ``invalid_transition`` before any change."""
        target = next_state(vnic.state, event)
        if target is None:
            raise ProtocolError(
                ErrorCode.INVALID_TRANSITION,
                f"{event} is not allowed for VNIC {vnic.name} in state {vnic.state}",
                vnic=vnic.name,
                state=str(vnic.state),
            )
        return target

    # ------------------------------------------------------------ tag scopes

    def scope_of(self, hypervisor: str, port: str) -> str:
        """The tag space of a port [4]: its own link, or a declared shared scope."""
        link = f"{hypervisor}/{port}"
        return self.port_scopes.get(link, link)

    def set_port_scopes(self, scopes: Mapping[str, str]) -> None:
        """Change the declared scopes; refused if two VNs would share a tag in one scope."""
        merged: dict[str, dict[int, str]] = {}
        for vnic in self.vnics.values():
            link = f"{vnic.hypervisor}/{vnic.port}"
            scope = scopes.get(link, link)
            for vn, att in vnic.vns.items():
                holder = merged.setdefault(scope, {}).setdefault(att.tag, vn)
                if holder != vn:
                    raise Conflict(
                        ErrorCode.TAGS_EXHAUSTED,
                        f"scope {scope} would map tag {att.tag} to both VN {holder} and VN {vn}",
                        scope=scope,
                        tag=str(att.tag),
                    )
        self.port_scopes = dict(scopes)
        self.tag_spaces = {}
        for vnic in self.vnics.values():
            space = self._space(vnic.hypervisor, vnic.port)
            for vn, att in vnic.vns.items():
                space.tag_of[vn] = att.tag
                space.vn_of[att.tag] = vn
                space.users.setdefault(vn, set()).add(vnic.name)

    def _space(self, hypervisor: str, port: str) -> TagSpace:
        scope = self.scope_of(hypervisor, port)
        space = self.tag_spaces.get(scope)
        if space is None:
            space = self.tag_spaces[scope] = TagSpace(scope)
        return space

    def _release_tag(self, hypervisor: str, port: str, vn: str, vnic: str) -> None:
        scope = self.scope_of(hypervisor, port)
        space = self.tag_spaces.get(scope)
        if space is None:
            return
        space.release(vn, vnic)
        if space.empty:
            del self.tag_spaces[scope]

    def _peek_tags(self, hypervisor: str, port: str, vns: Iterable[str]) -> None:
        """Raise tags_exhausted now if the port cannot take every VN."""
        scope = self.scope_of(hypervisor, port)
        space = self.tag_spaces.get(scope) or TagSpace(scope)
        needed = [vn for vn in vns if vn not in space.tag_of]
        if len(space.vn_of) + len(needed) > space.max_tag:
            raise Exhausted(
                ErrorCode.TAGS_EXHAUSTED,
                f"port {scope} has {space.max_tag - len(space.vn_of)} free 802.1Q tags, "
                f"{len(needed)} needed",
                port=scope,
            )

    # --------------------------------------------------------- authorization

    def _authorize(self, vnic: str, sender: str, vns: Iterable[VnRecord]) -> None:
        """Draft 5: only authorized tenant systems join a VN, checked against the IMA.

        The hypervisor's claim is not trusted: the VNIC must be placed on it
        (when placement is enforced) and every VN's membership must admit it.
        """
        if self.enforce_placement:
            placed = self.placements.get(vnic)
            if placed != sender:
                where = f"is placed on {placed}" if placed else "has no placement in the IMA"
                raise ProtocolError(
                    ErrorCode.NOT_AUTHORIZED,
                    f"VNIC {vnic} {where}: hypervisor {sender} may not claim it",
                    vnic=vnic,
                )
        for vn in vns:
            if not vn.members.admits(sender, vnic):
                raise ProtocolError(
                    ErrorCode.NOT_AUTHORIZED,
                    f"VN {vn.alias} ({vn.name}) does not admit VNIC {vnic} "
                    f"from hypervisor {sender}",
                    vnic=vnic,
                    vn=vn.name,
                )

    # ------------------------------------------------------------ VN connect

    def _connect(self, msg: VnConnect, vn: VnRecord, now_ns: int) -> Outcome:
        self._authorize(msg.vnic, msg.sender, [vn])
        vnic = self.vnics.get(msg.vnic)
        if vnic is not None:
            self._check_owner(vnic, msg.sender)
            self._transition(vnic, "vn_connect")
            if vnic.port != msg.port:
                raise Conflict(
                    ErrorCode.PORT_MISMATCH,
                    f"VNIC {msg.vnic} is connected on port {vnic.port}, not {msg.port}",
                    vnic=msg.vnic,
                    port=vnic.port,
                )
            existing = vnic.vns.get(vn.name)
            if existing is not None:
                return Outcome(self._connect_result(existing), ())
        self._peek_tags(msg.sender, msg.port, [vn.name])
        if vnic is None:
            vnic = Vnic(msg.vnic, msg.sender, msg.port, since_ns=now_ns)
            self.vnics[msg.vnic] = vnic
        effects: list[Effect] = []
        att = self._attach(vnic, vn, msg.allowed, effects)
        return Outcome(self._connect_result(att), tuple(effects))

    def _attach(
        self, vnic: Vnic, vn: VnRecord, allowed: tuple[str, ...], effects: list[Effect]
    ) -> Attachment:
        tag = self._space(vnic.hypervisor, vnic.port).acquire(vn.name, vnic.name)
        att = Attachment(vn, tag, allowed=allowed)
        vnic.vns[vn.name] = att
        self.vn_records[vn.name] = vn
        members = self.vn_members.setdefault(vn.name, set())
        if not members:
            self.remote.start(vn.name)
            effects.append(StartWatch(vn.name))
        members.add(vnic.name)
        return att

    def _connect_result(self, att: Attachment) -> ConnectResult:
        return ConnectResult(
            tag=att.tag,
            vn_name=att.vn.name,
            vn_id=att.vn.vn_id,
            vni=att.vn.vni,
            service=att.vn.service,
            profile=self.profiles.get(att.vn.name),
        )

    def _disconnect(self, sender: str, vnic_name: str, vn: str) -> Outcome:
        vnic = self._owned_vnic(vnic_name, sender)
        if vn not in vnic.vns:
            raise ProtocolError(
                ErrorCode.NOT_CONNECTED,
                f"VNIC {vnic_name} is not connected to VN {vn}",
                vnic=vnic_name,
                vn=vn,
            )
        return Outcome(None, tuple(self._detach(vnic, vn)))

    def _detach(self, vnic: Vnic, vn: str, *, withdraw: bool = True) -> list[Effect]:
        """Remove one VNIC-VN pair and everything under it (3.1 cascade)."""
        att = vnic.vns.pop(vn)
        effects: list[Effect] = []
        for mac, ips in att.macs.items():
            effects.extend(self._drop_mac(vnic, att, mac, ips, withdraw=withdraw))
        self._release_tag(vnic.hypervisor, vnic.port, vn, vnic.name)
        if vnic.pending is not None and vn in vnic.pending.tags:
            del vnic.pending.tags[vn]
            if not self._same_scope(vnic, vnic.pending.hypervisor, vnic.pending.port):
                self._release_tag(vnic.pending.hypervisor, vnic.pending.port, vn, vnic.name)
        members = self.vn_members[vn]
        members.discard(vnic.name)
        if not members:
            del self.vn_members[vn]
            self.vn_records.pop(vn, None)
            self.remote.stop(vn)
            effects.append(StopWatch(vn))
        if not vnic.vns:
            del self.vnics[vnic.name]
        return effects

    def _remove_vnic(self, vnic: Vnic, *, withdraw: bool = True) -> list[Effect]:
        effects: list[Effect] = []
        for vn in list(vnic.vns):
            effects.extend(self._detach(vnic, vn, withdraw=withdraw))
        self.vnics.pop(vnic.name, None)
        return effects

    def _drop_mac(
        self, vnic: Vnic, att: Attachment, mac: str, ips: set[str], *, withdraw: bool = True
    ) -> list[Effect]:
        vn = att.vn.name
        effects: list[Effect] = []
        publish = vnic.published and withdraw
        for ip in sorted(ips):
            del self.ip_owner[(vn, ip)]
            att.gleaned.pop((mac, ip), None)
            if publish:
                effects.append(UnbindIp(vn, ip))
        del self.mac_owner[(vn, mac)]
        att.gleaned.pop((mac, None), None)
        if publish:
            effects.append(UnbindMac(vn, mac))
        return effects

    # ------------------------------------------------------ address (dis)assoc

    def _validate_entries(
        self, vnic: Vnic, vn: VnRecord, entries: Iterable[AddressEntry], known: Container[str]
    ) -> None:
        """Raise before any change if an entry conflicts (3.1: MAC unique per VN).

        ``known``: the MACs the VNIC already has in the VN (the live dict, not a copy:
        copying it made every request O(MACs of the VNIC))."""
        claimed: dict[str, str] = {}  # ip -> mac within this message
        for entry in entries:
            owner = self.mac_owner.get((vn.name, entry.mac))
            if owner is not None and owner != vnic.name:
                raise Conflict(
                    ErrorCode.MAC_CONFLICT,
                    f"MAC {entry.mac} is already bound to VNIC {owner} in VN {vn.name}",
                    mac=entry.mac,
                    vnic=owner,
                )
            remote = self.remote.get(vn.name, mac_entry(entry.mac))
            if remote is not None and remote.vnic != vnic.name:
                raise Conflict(
                    ErrorCode.MAC_CONFLICT,
                    f"MAC {entry.mac} is already bound to VNIC {remote.vnic} "
                    f"behind NVE {remote.nve} in VN {vn.name}",
                    mac=entry.mac,
                    vnic=remote.vnic,
                    nve=remote.nve,
                )
            if vn.service == "l3" and not entry.ips and entry.mac not in known:
                raise ProtocolError(
                    ErrorCode.IP_REQUIRED,
                    f"VN {vn.name} provides L3 service: MAC {entry.mac} needs an IP [3.1.2]",
                    mac=entry.mac,
                )
            for ip in entry.ips:
                self._check_ip_free(vn.name, ip, vnic.name, entry.mac)
                other = claimed.setdefault(ip, entry.mac)
                if other != entry.mac:
                    raise Conflict(
                        ErrorCode.IP_CONFLICT,
                        f"IP {ip} is claimed for both MAC {other} and MAC {entry.mac}",
                        ip=ip,
                    )

    def _add_entries(
        self, vnic: Vnic, att: Attachment, entries: Iterable[AddressEntry], ts_ns: int
    ) -> list[Effect]:
        vn = att.vn
        effects: list[Effect] = []
        for entry in entries:
            ips = att.macs.get(entry.mac)
            att.gleaned.pop((entry.mac, None), None)  # explicit association wins
            if ips is None:
                ips = att.macs[entry.mac] = set()
                self.mac_owner[(vn.name, entry.mac)] = vnic.name
                if vnic.published:
                    effects.append(BindMac(self._mac_binding(vnic, vn, entry.mac, ts_ns)))
            for ip in entry.ips:
                att.gleaned.pop((entry.mac, ip), None)
                if ip in ips:
                    continue
                ips.add(ip)
                self.ip_owner[(vn.name, ip)] = (vnic.name, entry.mac)
                if vnic.published:
                    effects.append(BindIp(self._ip_binding(vnic, vn, entry.mac, ip, ts_ns)))
        return effects

    def _associate(self, msg: AddrAssociate, vn: VnRecord) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        att = self._attachment(vnic, vn.name)
        self._validate_entries(vnic, vn, msg.entries, att.macs)
        return Outcome(None, tuple(self._add_entries(vnic, att, msg.entries, msg.ts_ns)))

    def _check_ip_free(self, vn: str, ip: str, vnic: str, mac: str) -> None:
        owner = self.ip_owner.get((vn, ip))
        if owner is not None and owner != (vnic, mac):
            raise Conflict(
                ErrorCode.IP_CONFLICT,
                f"IP {ip} is already bound to MAC {owner[1]} of VNIC {owner[0]} in VN {vn}",
                ip=ip,
                vnic=owner[0],
            )
        remote = self.remote.get(vn, ip_entry(ip))
        if remote is not None and remote.vnic != vnic:
            raise Conflict(
                ErrorCode.IP_CONFLICT,
                f"IP {ip} is already bound to MAC {remote.mac} behind NVE {remote.nve}",
                ip=ip,
                nve=remote.nve,
            )

    def _disassociate(self, msg: AddrDisassociate, vn: VnRecord) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        att = self._attachment(vnic, vn.name)
        for entry in msg.entries:
            ips = att.macs.get(entry.mac)
            if ips is None or not entry.ips:
                continue
            if vn.service == "l3" and ips and ips <= set(entry.ips):
                raise ProtocolError(
                    ErrorCode.IP_REQUIRED,
                    f"VN {vn.name} provides L3 service: removing every IP of MAC {entry.mac} "
                    "would leave it without one; disassociate the MAC instead [3.1.2]",
                    mac=entry.mac,
                )
        return Outcome(None, tuple(self._remove_entries(vnic, att, msg.entries)))

    def _remove_entries(
        self, vnic: Vnic, att: Attachment, entries: Iterable[AddressEntry]
    ) -> list[Effect]:
        vn = att.vn.name
        effects: list[Effect] = []
        for entry in entries:
            ips = att.macs.get(entry.mac)
            if ips is None:
                continue  # already gone: disassociation is idempotent
            if not entry.ips:
                del att.macs[entry.mac]
                effects.extend(self._drop_mac(vnic, att, entry.mac, ips))
                continue
            for ip in entry.ips:
                if ip in ips:
                    ips.discard(ip)
                    del self.ip_owner[(vn, ip)]
                    att.gleaned.pop((entry.mac, ip), None)
                    if vnic.published:
                        effects.append(UnbindIp(vn, ip))
        return effects

    def _replace(self, msg: AddrReplace, vn: VnRecord) -> Outcome:
        """Make the VNIC's set in ``vn`` exactly ``entries``; only the diff is written."""
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        att = self._attachment(vnic, vn.name)
        return Outcome(None, tuple(self._replace_entries(vnic, att, msg.entries, msg.ts_ns)))

    def _replace_entries(
        self, vnic: Vnic, att: Attachment, entries: tuple[AddressEntry, ...], ts_ns: int
    ) -> list[Effect]:
        vn = att.vn
        wanted = {e.mac: set(e.ips) for e in entries}
        self._validate_entries(vnic, vn, entries, att.macs)
        removals: list[AddressEntry] = []
        for mac, ips in att.macs.items():
            if mac not in wanted:
                removals.append(AddressEntry(mac=mac))
            elif ips - wanted[mac]:
                removals.append(AddressEntry(mac=mac, ips=tuple(sorted(ips - wanted[mac]))))
        effects = self._remove_entries(vnic, att, removals)
        effects.extend(self._add_entries(vnic, att, entries, ts_ns))
        return effects

    # ----------------------------------------------------- VNIC-wide [4.3, 4.4]

    def _vnic_disassociate(self, msg: VnicDisassociate) -> Outcome:
        vnic = self.vnics.get(msg.vnic)
        if vnic is None:
            return Outcome(None, ())  # already gone
        self._check_owner(vnic, msg.sender)
        self._transition(vnic, "vnic_disassociate")
        return Outcome(None, tuple(self._remove_vnic(vnic)))

    def _shutdown(self, msg: VnicShutdown, now_ns: int) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        target = self._transition(vnic, "vnic_shutdown")
        effects = self._unpublish(vnic) if vnic.published else []
        vnic.state = target
        vnic.since_ns = now_ns
        return Outcome(None, tuple(effects))

    def _unpublish(self, vnic: Vnic) -> list[Effect]:
        effects: list[Effect] = []
        for vn, att in vnic.vns.items():
            for mac, ips in att.macs.items():
                effects.extend(UnbindIp(vn, ip) for ip in sorted(ips))
                effects.append(UnbindMac(vn, mac))
        vnic.published = False
        return effects

    def _publish(self, vnic: Vnic, ts_ns: int, *, claim: bool = False) -> list[Effect]:
        effects: list[Effect] = []
        for att in vnic.vns.values():
            for mac, ips in att.macs.items():
                effects.append(BindMac(self._mac_binding(vnic, att.vn, mac, ts_ns), claim))
                effects.extend(
                    BindIp(self._ip_binding(vnic, att.vn, mac, ip, ts_ns), claim)
                    for ip in sorted(ips)
                )
        vnic.published = True
        return effects

    def republish(self, vn: str | None = None) -> tuple[Effect, ...]:
        """Every published binding again (the IMA lost them with our lease); with
        ``vn``, only the VNICs attached to it (they may bring bindings of their other
        VNs along: the caller filters), so a per-VN check costs that VN, not all."""
        effects: list[Effect] = []
        names = self.vnics if vn is None else self.vn_members.get(vn, ())
        for name in names:
            vnic = self.vnics.get(name)
            if vnic is not None and vnic.published:
                effects.extend(self._publish(vnic, 0))
        return tuple(effects)

    def _startup(self, msg: VnicStartup, now_ns: int) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        target = self._transition(vnic, "vnic_startup")
        effects = [] if vnic.published else self._publish(vnic, msg.ts_ns)
        vnic.state = target
        vnic.since_ns = now_ns
        return Outcome(None, tuple(effects))

    # ------------------------------------------------------- migration [4.4]

    def _depart(self, msg: VnicDepart, now_ns: int) -> Outcome:
        """Keep the bindings (make-before-break) and start the hold timer."""
        known = self.vnics.get(msg.vnic)
        if known is not None and known.previous_hypervisor == msg.sender != known.hypervisor:
            self._count("late_departures")
            return Outcome(None, ())  # it already arrived on another port of this NVE
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        target = self._transition(vnic, "vnic_depart")
        if vnic.state is not VnicState.DEPARTED:
            vnic.hold_until_ns = now_ns + self.timers.hold_ns
        vnic.state = target
        vnic.since_ns = now_ns
        self._count("departures")
        return Outcome(None, ())

    def _resolved(
        self, specs: tuple[VnAddresses, ...], vns: Mapping[VnRef, VnRecord]
    ) -> list[tuple[VnRecord, VnAddresses]]:
        out = []
        for spec in specs:
            record = vns.get(spec.vn)
            if record is None:
                raise ProtocolError(ErrorCode.INTERNAL, f"VN {spec.vn} was not resolved")
            out.append((record, spec))
        return out

    def _prepare(
        self, msg: VnicPrepare, vns: Mapping[VnRef, VnRecord], now_ns: int
    ) -> Outcome:
        specs = self._resolved(msg.vns, vns)
        self._authorize(msg.vnic, msg.sender, [r for r, _ in specs])
        vnic = self.vnics.get(msg.vnic)
        if vnic is not None and vnic.state is not VnicState.PREPARED:
            return self._prepare_local_move(vnic, msg, specs, now_ns)
        if vnic is not None:
            self._check_owner(vnic, msg.sender)
            vnic.hold_until_ns = now_ns + self.timers.prepare_ns
            return Outcome(None, (), results=self._results(vnic))
        probe = Vnic(msg.vnic, msg.sender, msg.port, VnicState.PREPARED, published=False)
        for record, spec in specs:
            self._validate_entries(probe, record, spec.entries, set())
        self._peek_tags(msg.sender, msg.port, [r.name for r, _ in specs])
        probe.since_ns = now_ns
        probe.hold_until_ns = now_ns + self.timers.prepare_ns
        self.vnics[msg.vnic] = probe
        effects: list[Effect] = []
        for record, spec in specs:
            att = self._attach(probe, record, spec.allowed, effects)
            effects.extend(self._add_entries(probe, att, spec.entries, msg.ts_ns))
        self._count("prepares")
        return Outcome(None, tuple(effects), results=self._results(probe))

    def _prepare_local_move(
        self,
        vnic: Vnic,
        msg: VnicPrepare,
        specs: list[tuple[VnRecord, VnAddresses]],
        now_ns: int,
    ) -> Outcome:
        """Same-NVE move announced ahead: hold tags on the new port, no IMA write."""
        self._transition(vnic, "vnic_prepare")
        missing = [r.name for r, _ in specs if r.name not in vnic.vns]
        if missing:
            raise ProtocolError(
                ErrorCode.NOT_CONNECTED,
                f"VNIC {vnic.name} is not connected to VN {missing[0]} here",
                vnic=vnic.name,
            )
        if (msg.sender, msg.port) == (vnic.hypervisor, vnic.port):
            return Outcome(None, (), results=self._results(vnic))
        self._peek_tags(msg.sender, msg.port, list(vnic.vns))
        if vnic.pending is not None:
            self._drop_pending(vnic)
        if self._same_scope(vnic, msg.sender, msg.port):
            tags = {vn: att.tag for vn, att in vnic.vns.items()}
        else:
            space = self._space(msg.sender, msg.port)
            tags = {vn: space.acquire(vn, vnic.name) for vn in vnic.vns}
        vnic.pending = PendingMove(msg.sender, msg.port, tags,
                                   now_ns + self.timers.prepare_ns)
        self._count("prepares")
        results = tuple(
            self._connect_result(Attachment(att.vn, tags[vn])) for vn, att in vnic.vns.items()
        )
        return Outcome(None, (), results=results)

    def _drop_pending(self, vnic: Vnic) -> None:
        pending = vnic.pending
        if pending is None:
            return
        vnic.pending = None
        if self._same_scope(vnic, pending.hypervisor, pending.port):
            return
        for vn in pending.tags:
            self._release_tag(pending.hypervisor, pending.port, vn, vnic.name)

    def _same_scope(self, vnic: Vnic, hypervisor: str, port: str) -> bool:
        return self.scope_of(hypervisor, port) == self.scope_of(vnic.hypervisor, vnic.port)

    def _arrive(self, msg: VnicArrive, vns: Mapping[VnRef, VnRecord], now_ns: int) -> Outcome:
        specs = self._resolved(msg.vns, vns)
        vnic = self.vnics.get(msg.vnic)
        if vnic is None:
            if not specs:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_VNIC,
                    f"VNIC {msg.vnic} arrived unannounced and without its VNs",
                    vnic=msg.vnic,
                )
            prepared = self._prepare(
                VnicPrepare(vnic=msg.vnic, port=msg.port, vns=msg.vns, sender=msg.sender,
                            seq=msg.seq, ts_ns=msg.ts_ns),
                vns,
                now_ns,
            )
            vnic = self.vnics[msg.vnic]
            effects = list(prepared.effects)
        else:
            effects = []
        if vnic.state is VnicState.PREPARED:
            self._check_owner(vnic, msg.sender)
            if vnic.port != msg.port:
                raise Conflict(
                    ErrorCode.PORT_MISMATCH,
                    f"VNIC {vnic.name} was prepared on port {vnic.port}, not {msg.port}",
                    vnic=vnic.name,
                )
            for record, spec in specs:
                att = vnic.vns.get(record.name)
                if att is None:
                    raise ProtocolError(ErrorCode.NOT_CONNECTED,
                                        f"VN {record.name} was not prepared", vnic=vnic.name)
                effects.extend(self._replace_entries(vnic, att, spec.entries, msg.ts_ns))
            vnic.state = VnicState.UP
            vnic.since_ns = now_ns
            effects.extend(self._publish(vnic, msg.ts_ns, claim=True))
            self._count("arrivals_cross_nve")
            return Outcome(None, tuple(effects), results=self._results(vnic))
        return self._arrive_local(vnic, msg, specs, now_ns)

    def _arrive_local(
        self,
        vnic: Vnic,
        msg: VnicArrive,
        specs: list[tuple[VnRecord, VnAddresses]],
        now_ns: int,
    ) -> Outcome:
        """The VNIC is already ours: an aborted migration or a same-NVE move [4.3]."""
        target = self._transition(vnic, "vnic_arrive")
        self._authorize(vnic.name, msg.sender, [att.vn for att in vnic.vns.values()])
        for record, _ in specs:
            if record.name not in vnic.vns:
                raise ProtocolError(ErrorCode.NOT_CONNECTED,
                                    f"VNIC {vnic.name} is not connected to VN {record.name}",
                                    vnic=vnic.name)
        moving = (msg.sender, msg.port) != (vnic.hypervisor, vnic.port)
        pending = vnic.pending
        if pending is not None and (pending.hypervisor, pending.port) != (msg.sender, msg.port):
            pending = None  # announced for elsewhere: not this arrival's
        held = pending.tags if pending is not None else {}
        if moving and not self._same_scope(vnic, msg.sender, msg.port):
            self._peek_tags(msg.sender, msg.port, [vn for vn in vnic.vns if vn not in held])
        for record, spec in specs:
            self._validate_entries(vnic, record, spec.entries, vnic.vns[record.name].macs)
        # -- validated: mutate from here on
        if moving and self._same_scope(vnic, msg.sender, msg.port):
            self._drop_pending(vnic)  # same tag space: the tags stay as they are
            vnic.previous_hypervisor = vnic.hypervisor
            vnic.hypervisor, vnic.port = msg.sender, msg.port
            self._count("moves_same_nve")
        elif moving:
            if pending is not None:
                vnic.pending = None  # its tags are ours now
            else:
                self._drop_pending(vnic)
            space = self._space(msg.sender, msg.port)
            for vn in vnic.vns:
                if vn not in held:  # connected after the pre-arrival, or none was made
                    space.acquire(vn, vnic.name)
            for vn in vnic.vns:
                self._release_tag(vnic.hypervisor, vnic.port, vn, vnic.name)
            vnic.previous_hypervisor = vnic.hypervisor
            vnic.hypervisor, vnic.port = msg.sender, msg.port
            space = self._space(msg.sender, msg.port)
            for vn, att in vnic.vns.items():
                att.tag = space.tag_of[vn]
            self._count("moves_same_nve")
        else:
            self._drop_pending(vnic)
            self._count("migrations_aborted" if vnic.state is VnicState.DEPARTED
                        else "arrivals_in_place")
        effects: list[Effect] = []
        for record, spec in specs:
            if spec.entries:
                att = vnic.vns[record.name]
                effects.extend(self._replace_entries(vnic, att, spec.entries, msg.ts_ns))
        if not vnic.published:
            effects.extend(self._publish(vnic, msg.ts_ns))
        vnic.state = target
        vnic.since_ns = now_ns
        vnic.hold_until_ns = 0
        return Outcome(None, tuple(effects), results=self._results(vnic))

    def _results(self, vnic: Vnic) -> tuple[ConnectResult, ...]:
        return tuple(self._connect_result(att) for att in vnic.vns.values())

    # ------------------------------------------------ full-state resync [4]

    def _sync(self, msg: HvSync, vns: Mapping[VnRef, VnRecord], now_ns: int) -> Outcome:
        """Reconcile with the hypervisor's full state; only differences cause writes.

        Each VNIC is reconciled on its own: one that cannot be applied (a
        conflict) is reported in ``refused`` and left as it was, the rest go on.
        """
        sync_id, seen = self._syncs.get(msg.sender, (msg.sync_id, set()))
        if sync_id != msg.sync_id:
            seen = set()
        effects: list[Effect] = []
        refused: list[tuple[str, str]] = []
        for spec in msg.vnics:
            seen.add(spec.vnic)
            try:
                effects.extend(self._sync_vnic(msg.sender, spec, vns, msg.ts_ns, now_ns))
            except ProtocolError as exc:
                refused.append((spec.vnic, f"{exc.code}: {exc.reason}"))
        if msg.last:
            self._syncs.pop(msg.sender, None)
            for vnic in list(self.vnics.values()):
                if vnic.hypervisor == msg.sender and vnic.name not in seen and (
                    vnic.state not in (VnicState.PREPARED, VnicState.DEPARTED)
                ):  # a migrating VNIC is settled by its hold timer or the new NVE
                    self._count("sync_removed")
                    effects.extend(self._remove_vnic(vnic))
        else:
            self._syncs[msg.sender] = (msg.sync_id, seen)
        self._count("syncs")
        return Outcome(None, tuple(effects), refused=tuple(refused))

    def _sync_vnic(
        self,
        sender: str,
        spec: SyncVnic,
        vns: Mapping[VnRef, VnRecord],
        ts_ns: int,
        now_ns: int,
    ) -> list[Effect]:
        wanted = self._resolved(spec.vns, vns)
        self._authorize(spec.vnic, sender, [r for r, _ in wanted])
        vnic = self.vnics.get(spec.vnic)
        if vnic is not None:
            self._check_owner(vnic, sender)
        probe = vnic or Vnic(spec.vnic, sender, spec.port, published=False)
        for record, addrs in wanted:
            att = probe.vns.get(record.name)
            self._validate_entries(probe, record, addrs.entries,
                                   () if att is None else att.macs)
        moving = vnic is not None and vnic.port != spec.port
        new_vns = [r.name for r, _ in wanted if vnic is None or moving or r.name not in vnic.vns]
        self._peek_tags(sender, spec.port, new_vns)
        # -- validated: mutate from here on
        effects: list[Effect] = []
        if vnic is None:
            vnic = Vnic(spec.vnic, sender, spec.port, published=False, since_ns=now_ns)
            self.vnics[spec.vnic] = vnic
            self._count("sync_added")
        elif moving:
            for vn in vnic.vns:
                self._release_tag(vnic.hypervisor, vnic.port, vn, vnic.name)
            vnic.port = spec.port
            space = self._space(sender, spec.port)
            for vn, att in vnic.vns.items():
                att.tag = space.acquire(vn, vnic.name)
        keep = {r.name for r, _ in wanted}
        for vn in [vn for vn in vnic.vns if vn not in keep]:
            effects.extend(self._detach(vnic, vn))
        if vnic.name not in self.vnics:  # detaching emptied it: start again
            self.vnics[vnic.name] = vnic
        for record, addrs in wanted:
            att = vnic.vns.get(record.name)
            if att is None:
                att = self._attach(vnic, record, addrs.allowed, effects)
            effects.extend(self._replace_entries(vnic, att, addrs.entries, ts_ns))
        if spec.state == "up" and not vnic.published:
            effects.extend(self._publish(vnic, ts_ns))
        elif spec.state == "down" and vnic.published:
            effects.extend(self._unpublish(vnic))
        vnic.state = VnicState.UP if spec.state == "up" else VnicState.DOWN
        vnic.pending = None
        vnic.hold_until_ns = 0
        return effects

    # --------------------------------------------------- learned from the IMA

    def taken_over(self, vn: str, entry: str, nve: str) -> tuple[Effect, ...]:
        """Another NVE claimed an address we hold (it won the IMA compare).

        We drop it locally with no IMA write; a departed VNIC whose addresses
        have all moved is gone (its migration completed elsewhere).
        """
        kind, _, addr = entry.partition("/")
        holder = self._local_holder(vn, kind, addr)
        if holder is None or not holder.published:
            return ()  # not ours, or a prepared VNIC expecting exactly this holder
        if kind == "mac":
            vnic = holder
            att = vnic.vns[vn]
            ips = att.macs.pop(addr)
            self._drop_mac(vnic, att, addr, ips, withdraw=False)
        else:
            ip = addr.replace("_", "/")
            held = self.ip_owner.pop((vn, ip))
            vnic = holder
            att = vnic.vns[vn]
            att.macs[held[1]].discard(ip)
            att.gleaned.pop((held[1], ip), None)
        self._count("taken_over")
        del nve
        if vnic.state is VnicState.DEPARTED and not any(a.macs for a in vnic.vns.values()):
            self._count("migrations_completed_elsewhere")
            return tuple(self._remove_vnic(vnic, withdraw=False))
        return ()

    def _local_holder(self, vn: str, kind: str, addr: str) -> Vnic | None:
        if kind == "mac":
            owner = self.mac_owner.get((vn, addr))
        else:
            held = self.ip_owner.get((vn, addr.replace("_", "/")))
            owner = None if held is None else held[0]
        return None if owner is None else self.vnics.get(owner)

    # ------------------------------------------------------------- gleaning

    def observe(self, obs: AddrObserved, now_ns: int) -> Outcome:
        """Learn a source address seen on a port/tag [4.2 way 1], within authorization."""
        space = self.tag_spaces.get(self.scope_of(obs.hypervisor, obs.port))
        vn = None if space is None else space.vn_of.get(obs.tag)
        if vn is None:
            raise ProtocolError(
                ErrorCode.NOT_CONNECTED,
                f"no VN uses tag {obs.tag} on port {obs.hypervisor}/{obs.port}",
            )
        candidates = [
            v for v in self.vnics.values()
            if (v.hypervisor, v.port) == (obs.hypervisor, obs.port) and vn in v.vns
        ]
        if len(candidates) != 1:
            raise ProtocolError(
                ErrorCode.AMBIGUOUS,
                f"{len(candidates)} VNICs use tag {obs.tag} on {obs.hypervisor}/{obs.port}",
            )
        vnic = candidates[0]
        if vnic.state is not VnicState.UP:
            raise ProtocolError(ErrorCode.INVALID_TRANSITION,
                                f"VNIC {vnic.name} is {vnic.state}: not gleaning")
        att = vnic.vns[vn]
        if obs.ip is not None and not _within(obs.ip, att.allowed):
            raise ProtocolError(
                ErrorCode.NOT_AUTHORIZED,
                f"gleaned IP {obs.ip} is outside VNIC {vnic.name}'s prefixes {att.allowed}",
                ip=obs.ip,
            )
        entry = AddressEntry(mac=obs.mac, ips=(obs.ip,) if obs.ip else ())
        self._validate_entries(vnic, att.vn, [entry], att.macs)
        expiry = now_ns + self.timers.glean_ns
        ips = att.macs.get(obs.mac)
        new_mac = ips is None
        new_ip = obs.ip is not None and (ips is None or obs.ip not in ips)
        keys: list[tuple[str, str | None]] = []
        if new_mac or (obs.mac, None) in att.gleaned:
            keys.append((obs.mac, None))
        if new_ip or (obs.ip is not None and (obs.mac, obs.ip) in att.gleaned):
            keys.append((obs.mac, obs.ip))
        effects = self._add_entries(vnic, att, [entry], obs.ts_ns)
        for key in keys:
            att.gleaned[key] = expiry  # (re)armed; explicit entries are never aged
        self._count("gleaned" if effects else "glean_refreshed")
        return Outcome(None, tuple(effects))

    # ---------------------------------------------------------------- timers

    def tick(self, now_ns: int) -> tuple[Effect, ...]:
        """Expire hold timers, unfinished pre-arrivals and gleaned addresses."""
        effects: list[Effect] = []
        for vnic in list(self.vnics.values()):
            if vnic.pending is not None and vnic.pending.expires_ns <= now_ns:
                self._drop_pending(vnic)
            if vnic.state in (VnicState.DEPARTED, VnicState.PREPARED) and (
                vnic.hold_until_ns <= now_ns
            ):
                self._count(f"hold_expired_{vnic.state}")
                effects.extend(self._remove_vnic(vnic))
                continue
            for att in vnic.vns.values():
                for (mac, ip), expiry in sorted(att.gleaned.items(), key=str):
                    if expiry > now_ns or mac not in att.macs:
                        continue
                    del att.gleaned[(mac, ip)]
                    removal = AddressEntry(mac=mac, ips=(ip,) if ip else ())
                    if ip is None and att.macs[mac]:
                        continue  # the MAC still carries explicit or live IPs
                    self._count("glean_aged_out")
                    effects.extend(self._remove_entries(vnic, att, [removal]))
        return tuple(effects)

    # ---------------------------------------------------------------- helpers

    def _owned_vnic(self, name: str, sender: str) -> Vnic:
        vnic = self.vnics.get(name)
        if vnic is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_VNIC, f"VNIC {name} is not connected to any VN", vnic=name
            )
        self._check_owner(vnic, sender)
        return vnic

    @staticmethod
    def _check_owner(vnic: Vnic, sender: str) -> None:
        if vnic.hypervisor != sender:
            raise Conflict(
                ErrorCode.VNIC_OWNED_ELSEWHERE,
                f"VNIC {vnic.name} was announced by hypervisor {vnic.hypervisor}, not {sender}",
                vnic=vnic.name,
                hypervisor=vnic.hypervisor,
            )

    @staticmethod
    def _attachment(vnic: Vnic, vn: str) -> Attachment:
        att = vnic.vns.get(vn)
        if att is None:
            raise ProtocolError(
                ErrorCode.NOT_CONNECTED,
                f"VNIC {vnic.name} is not connected to VN {vn}: send vn_connect first [4.1]",
                vnic=vnic.name,
                vn=vn,
            )
        if vnic.state is VnicState.DEPARTED:
            raise ProtocolError(
                ErrorCode.INVALID_TRANSITION,
                f"VNIC {vnic.name} is departing: address changes wait for its arrival",
                vnic=vnic.name,
            )
        return att

    # Bindings are built from already-validated parts (the underlay is checked once
    # in __init__), so they skip validation (it was a fifth of the NVE's CPU time), with
    # every field in model order: ``orjson.dumps(vars(b))`` is then the canonical record.
    def _mac_binding(self, vnic: Vnic, vn: VnRecord, mac: str, ts_ns: int) -> MacBinding:
        binding: MacBinding = construct_unchecked(MacBinding, {
            "v": 1, "vn": vn.name, "vni": vn.vni, "mac": mac, "vnic": vnic.name,
            "nve": self.nve_id, "underlay": self.underlay, "epoch": self.epoch,
            "ts_ns": ts_ns, "mobility_seq": 0, "moves_ns": (), "trace": self._trace,
        }, _MAC_FIELDS)
        return binding

    def _ip_binding(
        self, vnic: Vnic, vn: VnRecord, mac: str, ip: str, ts_ns: int
    ) -> IpBinding:
        binding: IpBinding = construct_unchecked(IpBinding, {
            "v": 1, "vn": vn.name, "vni": vn.vni, "ip": ip, "mac": mac, "vnic": vnic.name,
            "nve": self.nve_id, "underlay": self.underlay, "epoch": self.epoch,
            "ts_ns": ts_ns, "mobility_seq": 0, "moves_ns": (), "trace": self._trace,
        }, _IP_FIELDS)
        return binding

    # ------------------------------------------------------------- snapshots

    def local_bindings(self) -> list[tuple[str, str, str]]:
        """(vn, kind, address) of every binding this NVE should hold in the IMA."""
        out: list[tuple[str, str, str]] = []
        for vnic in self.vnics.values():
            if not vnic.published:
                continue
            for vn, att in vnic.vns.items():
                for mac, ips in att.macs.items():
                    out.append((vn, "mac", mac))
                    out.extend((vn, "ip", ip) for ip in ips)
        return out

    def tables(self) -> dict[str, Any]:
        """The operator's view (``nvo3 nve tables``): JSON-ready."""
        return {
            "nve": self.nve_id,
            "underlay": self.underlay,
            "vnics": {
                name: {
                    "hypervisor": v.hypervisor,
                    "port": v.port,
                    "state": str(v.state),
                    "published": v.published,
                    "vns": {
                        vn: {
                            "alias": att.vn.alias,
                            "vni": att.vn.vni,
                            "tag": att.tag,
                            "macs": {mac: sorted(ips) for mac, ips in sorted(att.macs.items())},
                            "gleaned": sorted(
                                f"{m}/{i}" if i else m for m, i in att.gleaned
                            ),
                        }
                        for vn, att in v.vns.items()
                    },
                }
                for name, v in sorted(self.vnics.items())
            },
            "ports": {
                scope: {str(tag): vn for tag, vn in sorted(space.vn_of.items())}
                for scope, space in sorted(self.tag_spaces.items())
            },
            "profiles": {
                vn: p.model_dump(mode="json") for vn, p in sorted(self.profiles.items())
                if vn in self.vn_members
            },
            "events": dict(sorted(self.events.items())),
            "remote": {
                vn: {
                    "revision": r.revision,
                    "entries": {
                        key: b.as_json(key) for key, b in sorted(r.entries.items())
                    },
                }
                for vn, r in sorted(self.remote.vns.items())
            },
        }


_MAC_FIELDS = set(MacBinding.model_fields)
_IP_FIELDS = set(IpBinding.model_fields)


def _need(vn: VnRecord | None) -> VnRecord:
    if vn is None:
        raise ProtocolError(ErrorCode.INTERNAL, "message names a VN but none was resolved")
    return vn
