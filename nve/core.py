"""The NVE's protocol state machine: no I/O, no clock, no asyncio.

``NveCore.apply(message, vn, now_ns)`` validates a hypervisor request against
the tables, and only if everything passes mutates them and returns the reply
result plus the effects (IMA writes, watch changes) for the service to run.
A refused request raises ``ProtocolError`` before any mutation, so it changes
nothing.  Replaying a message returns the same result with no effects.

Tables (draft 3.1): VNIC -> VN -> MAC -> IP containment, with the per-port
802.1Q tag spaces beside it.  Removing a parent removes its children with no
per-child message (3.1, 4.3).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from nve.effects import (
    BindIp,
    BindMac,
    Effect,
    StartWatch,
    StopWatch,
    UnbindIp,
    UnbindMac,
)
from nve.remote import RemoteTable, ip_entry, mac_entry
from nve.tags import TagSpace
from schemas.errors import Conflict, ErrorCode, ProtocolError
from schemas.messages import (
    AddrAssociate,
    AddrDisassociate,
    ConnectResult,
    HypervisorMessage,
    VnConnect,
    VnDisconnect,
    VnicDisassociate,
    VnicShutdown,
    VnicStartup,
)
from schemas.records import IpBinding, MacBinding, VnRecord

REPLAY_WINDOW = 512  # recent (sender, seq) remembered for idempotent replay


@dataclass
class Attachment:
    """One VNIC-VN pair: its tag and the MACs (with their IPs) behind it."""

    vn: VnRecord
    tag: int
    macs: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class Vnic:
    name: str
    hypervisor: str
    port: str
    up: bool = True
    since_ns: int = 0
    vns: dict[str, Attachment] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    result: ConnectResult | None
    effects: tuple[Effect, ...]
    replayed: bool = False


def port_scope(hypervisor: str, port: str) -> str:
    """A tag space is the hypervisor's link to this NVE [4]."""
    return f"{hypervisor}/{port}"


class NveCore:
    def __init__(self, nve_id: str, underlay: str) -> None:
        self.nve_id = nve_id
        self.underlay = underlay
        self.vnics: dict[str, Vnic] = {}
        self.tag_spaces: dict[str, TagSpace] = {}
        self.mac_owner: dict[tuple[str, str], str] = {}  # (vn, mac) -> vnic
        self.ip_owner: dict[tuple[str, str], tuple[str, str]] = {}  # (vn, ip) -> (vnic, mac)
        self.vn_members: dict[str, set[str]] = {}  # vn -> local vnics
        self.vn_records: dict[str, VnRecord] = {}
        self.remote = RemoteTable(nve_id)
        self._seen: dict[str, OrderedDict[int, tuple[HypervisorMessage, Outcome]]] = {}

    # ------------------------------------------------------------------ entry

    def apply(self, msg: HypervisorMessage, vn: VnRecord | None, now_ns: int) -> Outcome:
        """Apply one request; ``vn`` is the resolved VN for messages that name one."""
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
            return Outcome(old_outcome.result, (), replayed=True)
        outcome = self._dispatch(msg, vn, now_ns)
        seen[msg.seq] = (msg, outcome)
        if len(seen) > REPLAY_WINDOW:
            seen.popitem(last=False)
        return outcome

    def _dispatch(self, msg: HypervisorMessage, vn: VnRecord | None, now_ns: int) -> Outcome:
        if isinstance(msg, VnConnect):
            return self._connect(msg, _need(vn), now_ns)
        if isinstance(msg, VnDisconnect):
            return self._disconnect(msg.sender, msg.vnic, _need(vn).name)
        if isinstance(msg, AddrAssociate):
            return self._associate(msg, _need(vn))
        if isinstance(msg, AddrDisassociate):
            return self._disassociate(msg, _need(vn))
        if isinstance(msg, VnicDisassociate):
            return self._vnic_disassociate(msg)
        if isinstance(msg, VnicShutdown):
            return self._shutdown(msg, now_ns)
        if isinstance(msg, VnicStartup):
            return self._startup(msg, now_ns)
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unhandled kind {msg.kind}")

    # ------------------------------------------------------------ VN connect

    def _connect(self, msg: VnConnect, vn: VnRecord, now_ns: int) -> Outcome:
        vnic = self.vnics.get(msg.vnic)
        if vnic is not None:
            self._check_owner(vnic, msg.sender)
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
        scope = port_scope(msg.sender, msg.port)
        space = self.tag_spaces.get(scope) or TagSpace(scope)
        space.peek(vn.name)  # raises tags_exhausted before anything changes
        self.tag_spaces[scope] = space
        if vnic is None:
            vnic = Vnic(msg.vnic, msg.sender, msg.port, since_ns=now_ns)
            self.vnics[msg.vnic] = vnic
        tag = space.acquire(vn.name, msg.vnic)
        attachment = Attachment(vn, tag)
        vnic.vns[vn.name] = attachment
        self.vn_records[vn.name] = vn
        effects: list[Effect] = []
        members = self.vn_members.setdefault(vn.name, set())
        if not members:
            self.remote.start(vn.name)
            effects.append(StartWatch(vn.name))
        members.add(msg.vnic)
        return Outcome(self._connect_result(attachment), tuple(effects))

    @staticmethod
    def _connect_result(att: Attachment) -> ConnectResult:
        return ConnectResult(
            tag=att.tag,
            vn_name=att.vn.name,
            vn_id=att.vn.vn_id,
            vni=att.vn.vni,
            service=att.vn.service,
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

    def _detach(self, vnic: Vnic, vn: str) -> list[Effect]:
        """Remove one VNIC-VN pair and everything under it (3.1 cascade)."""
        att = vnic.vns.pop(vn)
        effects: list[Effect] = []
        for mac, ips in att.macs.items():
            effects.extend(self._drop_mac(vnic, att, mac, ips))
        scope = port_scope(vnic.hypervisor, vnic.port)
        space = self.tag_spaces[scope]
        space.release(vn, vnic.name)
        if space.empty:
            del self.tag_spaces[scope]
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

    def _drop_mac(self, vnic: Vnic, att: Attachment, mac: str, ips: set[str]) -> list[Effect]:
        vn = att.vn.name
        effects: list[Effect] = []
        for ip in sorted(ips):
            del self.ip_owner[(vn, ip)]
            if vnic.up:
                effects.append(UnbindIp(vn, ip))
        del self.mac_owner[(vn, mac)]
        if vnic.up:
            effects.append(UnbindMac(vn, mac))
        return effects

    # ------------------------------------------------------ address (dis)assoc

    def _associate(self, msg: AddrAssociate, vn: VnRecord) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        att = self._attachment(vnic, vn.name)
        # Validate everything first: a refused entry must leave no trace.
        claimed: dict[str, str] = {}  # ip -> mac within this message
        for entry in msg.entries:
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
            if vn.service == "l3" and not entry.ips and entry.mac not in att.macs:
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
        effects: list[Effect] = []
        for entry in msg.entries:
            ips = att.macs.get(entry.mac)
            if ips is None:
                ips = att.macs[entry.mac] = set()
                self.mac_owner[(vn.name, entry.mac)] = vnic.name
                if vnic.up:
                    effects.append(BindMac(self._mac_binding(vnic, vn, entry.mac, msg.ts_ns)))
            for ip in entry.ips:
                if ip in ips:
                    continue
                ips.add(ip)
                self.ip_owner[(vn.name, ip)] = (vnic.name, entry.mac)
                if vnic.up:
                    effects.append(
                        BindIp(self._ip_binding(vnic, vn, entry.mac, ip, msg.ts_ns))
                    )
        return Outcome(None, tuple(effects))

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
        if isinstance(remote, IpBinding) and (remote.vnic, remote.mac) != (vnic, mac):
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
        effects: list[Effect] = []
        for entry in msg.entries:
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
                    del self.ip_owner[(vn.name, ip)]
                    if vnic.up:
                        effects.append(UnbindIp(vn.name, ip))
        return Outcome(None, tuple(effects))

    # ----------------------------------------------------- VNIC-wide [4.3, 4.4]

    def _vnic_disassociate(self, msg: VnicDisassociate) -> Outcome:
        vnic = self.vnics.get(msg.vnic)
        if vnic is None:
            return Outcome(None, ())  # already gone
        self._check_owner(vnic, msg.sender)
        effects: list[Effect] = []
        for vn in list(vnic.vns):
            effects.extend(self._detach(vnic, vn))
        return Outcome(None, tuple(effects))

    def _shutdown(self, msg: VnicShutdown, now_ns: int) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        if not vnic.up:
            return Outcome(None, ())
        effects: list[Effect] = []
        for vn, att in vnic.vns.items():
            for mac, ips in att.macs.items():
                effects.extend(UnbindIp(vn, ip) for ip in sorted(ips))
                effects.append(UnbindMac(vn, mac))
        vnic.up = False
        vnic.since_ns = now_ns
        return Outcome(None, tuple(effects))

    def _startup(self, msg: VnicStartup, now_ns: int) -> Outcome:
        vnic = self._owned_vnic(msg.vnic, msg.sender)
        if vnic.up:
            return Outcome(None, ())
        vnic.up = True
        vnic.since_ns = now_ns
        effects: list[Effect] = []
        for att in vnic.vns.values():
            for mac, ips in att.macs.items():
                effects.append(BindMac(self._mac_binding(vnic, att.vn, mac, msg.ts_ns)))
                effects.extend(
                    BindIp(self._ip_binding(vnic, att.vn, mac, ip, msg.ts_ns))
                    for ip in sorted(ips)
                )
        return Outcome(None, tuple(effects))

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
        return att

    def _mac_binding(self, vnic: Vnic, vn: VnRecord, mac: str, ts_ns: int) -> MacBinding:
        return MacBinding(
            vn=vn.name,
            vni=vn.vni,
            mac=mac,
            vnic=vnic.name,
            nve=self.nve_id,
            underlay=self.underlay,
            ts_ns=ts_ns,
        )

    def _ip_binding(
        self, vnic: Vnic, vn: VnRecord, mac: str, ip: str, ts_ns: int
    ) -> IpBinding:
        return IpBinding(
            vn=vn.name,
            vni=vn.vni,
            ip=ip,
            mac=mac,
            vnic=vnic.name,
            nve=self.nve_id,
            underlay=self.underlay,
            ts_ns=ts_ns,
        )

    # ------------------------------------------------------------- snapshots

    def local_bindings(self) -> list[tuple[str, str, str]]:
        """(vn, kind, address) of every binding this NVE should hold in the IMA."""
        out: list[tuple[str, str, str]] = []
        for vnic in self.vnics.values():
            if not vnic.up:
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
                    "state": "up" if v.up else "down",
                    "vns": {
                        vn: {
                            "alias": att.vn.alias,
                            "vni": att.vn.vni,
                            "tag": att.tag,
                            "macs": {mac: sorted(ips) for mac, ips in sorted(att.macs.items())},
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
            "remote": {
                vn: {
                    "revision": r.revision,
                    "entries": {
                        key: b.model_dump(mode="json") for key, b in sorted(r.entries.items())
                    },
                }
                for vn, r in sorted(self.remote.vns.items())
            },
        }


def _need(vn: VnRecord | None) -> VnRecord:
    if vn is None:
        raise ProtocolError(ErrorCode.INTERNAL, "message names a VN but none was resolved")
    return vn
