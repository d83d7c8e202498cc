"""NveCore under random protocol traffic: a stateful model check.

The machine drives connect / disconnect / associate / disassociate /
vnic_disassociate / shutdown / startup / depart / prepare / arrive (same-NVE
migrations and aborted ones) / gleaning / timer expiry from three hypervisors
over a small universe, replays earlier messages, reuses sequence numbers for
different content and makes conflicting claims.  It keeps a model of the IMA fed only
from the effects the core returns and checks, after every step, that the
tables and that model agree with the draft's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nve.core import NveCore, Outcome
from nve.effects import BindIp, BindMac, StartWatch, StopWatch, UnbindIp, UnbindMac
from nve.remote import mac_entry
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    AddrAssociate,
    AddrDisassociate,
    AddressEntry,
    AddrObserved,
    HypervisorMessage,
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
from schemas.records import IpBinding, MacBinding, VnRecord
from schemas.types import MAX_TAG

NVE = "nve1"
UNDERLAY = "192.0.2.1"
HYPERVISORS = ("hv1", "hv2", "hv3")
PORTS = ("eth0", "eth1")
VNICS = tuple(f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 7))
VNS = (
    VnRecord(name="11111111-1111-4111-8111-111111111111", vn_id=1, alias="blue", vni=101),
    VnRecord(name="22222222-2222-4222-8222-222222222222", vn_id=2, alias="green", vni=102),
    VnRecord(
        name="33333333-3333-4333-8333-333333333333",
        vn_id=3,
        alias="red",
        vni=103,
        service="l3",
    ),
)
VN_BY_NAME = {vn.name: vn for vn in VNS}
MACS = tuple(f"02:00:00:00:00:{i:02x}" for i in range(1, 9))
IPS = (
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.0.4",
    "10.1.0.0/24",
    "10.2.0.0/16",
    "2001:db8::1",
    "2001:db8:1::/64",
)
OTHER_VNIC = "99999999-0000-4000-8000-999999999999"  # lives behind nve2

entry_specs = st.lists(
    st.tuples(st.sampled_from(MACS), st.lists(st.sampled_from(IPS), max_size=2, unique=True)),
    min_size=1,
    max_size=3,
    unique_by=lambda e: e[0],
)

IMA = dict[tuple[str, str, str], MacBinding | IpBinding]


@dataclass(frozen=True)
class Sent:
    msg: HypervisorMessage
    vn: VnRecord | None
    outcome: Outcome
    vns: dict[VnRef, VnRecord] | None = None


def _entries(specs: list[tuple[str, list[str]]]) -> tuple[AddressEntry, ...]:
    return tuple(AddressEntry(mac=mac, ips=tuple(ips)) for mac, ips in specs)


class NveMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = NveCore(NVE, UNDERLAY)
        self.seq = dict.fromkeys(HYPERVISORS, 0)
        self.ima: IMA = {}
        self.watched: set[str] = set()
        self.applied: list[Sent] = []
        self.remote_rev = 0
        self.last_refusal: ProtocolError | None = None
        self.now = 0
        self.accepted_seq = dict.fromkeys(HYPERVISORS, -1)

    # -------------------------------------------------------------- plumbing

    def next_seq(self, sender: str) -> int:
        self.seq[sender] += 1
        return self.seq[sender]

    def pick_vnic(self, data: st.DataObject) -> tuple[str, str]:
        """(vnic, sender): mostly an existing VNIC and its owner, sometimes anything."""
        existing = sorted(self.core.vnics)
        if existing and data.draw(st.integers(0, 4), label="existing vnic") > 0:
            vnic = data.draw(st.sampled_from(existing), label="vnic")
        else:
            vnic = data.draw(st.sampled_from(VNICS), label="vnic")
        return vnic, self.pick_sender(data, vnic)

    def pick_attachment(self, data: st.DataObject) -> tuple[str, VnRecord, str]:
        """(vnic, vn, sender): mostly an existing attachment, sometimes any pair."""
        attachments = [
            (name, vn) for name, vnic in sorted(self.core.vnics.items()) for vn in sorted(vnic.vns)
        ]
        if attachments and data.draw(st.integers(0, 4), label="existing attachment") > 0:
            vnic, vn_name = data.draw(st.sampled_from(attachments), label="attachment")
            vn = VN_BY_NAME[vn_name]
        else:
            vnic = data.draw(st.sampled_from(VNICS), label="vnic")
            vn = data.draw(st.sampled_from(VNS), label="vn")
        return vnic, vn, self.pick_sender(data, vnic)

    def pick_sender(self, data: st.DataObject, vnic: str) -> str:
        """The VNIC's owner four times in five, else any hypervisor (maybe a stranger)."""
        owner = self.core.vnics.get(vnic)
        if owner is not None and data.draw(st.integers(0, 4), label="owner") > 0:
            return owner.hypervisor
        return data.draw(st.sampled_from(HYPERVISORS), label="sender")

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused message must leave alone (tables() is built fresh)."""
        core = self.core
        return {
            "tables": core.tables(),
            "mac_owner": dict(core.mac_owner),
            "ip_owner": dict(core.ip_owner),
            "vn_members": {vn: set(m) for vn, m in core.vn_members.items()},
            "vn_records": dict(core.vn_records),
            "tags": {
                scope: (
                    dict(s.tag_of),
                    dict(s.vn_of),
                    {vn: set(u) for vn, u in s.users.items()},
                )
                for scope, s in core.tag_spaces.items()
            },
            "since": {name: (v.state, v.published, v.since_ns, v.hold_until_ns,
                             v.hypervisor, v.port, v.pending)
                      for name, v in core.vnics.items()},
        }

    def send(
        self,
        msg: HypervisorMessage,
        vn: VnRecord | None,
        vns: dict[VnRef, VnRecord] | None = None,
    ) -> Outcome | None:
        before = self.snapshot()
        self.now += 1
        try:
            outcome = self.core.apply(msg, vn, now_ns=self.now, vns=vns)
        except ProtocolError as exc:
            refusal: ProtocolError | None = exc
        else:
            refusal = None
        if refusal is not None:
            assert refusal.code != ErrorCode.INTERNAL, refusal.reason
            assert self.snapshot() == before, f"refused ({refusal.code}) but the tables changed"
            self.last_refusal = refusal
            return None
        assert not outcome.replayed
        # Sequence numbers the NVE accepts from one sender only grow.
        assert msg.seq > self.accepted_seq[msg.sender]
        self.accepted_seq[msg.sender] = msg.seq
        self.absorb(outcome)
        self.applied.append(Sent(msg, vn, outcome, vns))
        if isinstance(msg, VnConnect):
            result = outcome.result
            assert result is not None
            assert vn is not None
            assert (result.vn_name, result.vn_id, result.vni, result.service) == (
                vn.name,
                vn.vn_id,
                vn.vni,
                vn.service,
            )
            att = self.core.vnics[msg.vnic].vns[vn.name]
            assert result.tag == att.tag
        elif not isinstance(msg, (VnicPrepare, VnicArrive)):
            assert outcome.result is None
        return outcome

    def absorb(self, outcome: Outcome) -> None:
        """Feed the effects into the IMA model and the watch model."""
        for effect in outcome.effects:
            if isinstance(effect, BindMac):
                b = effect.binding
                key = (b.vn, "mac", b.mac)
                assert key not in self.ima, f"re-bind of {key}"
                assert (b.nve, b.underlay) == (NVE, UNDERLAY)
                assert b.vni == VN_BY_NAME[b.vn].vni
                self.ima[key] = b
            elif isinstance(effect, BindIp):
                ib = effect.binding
                key = (ib.vn, "ip", ib.ip)
                assert key not in self.ima, f"re-bind of {key}"
                assert (ib.nve, ib.underlay) == (NVE, UNDERLAY)
                self.ima[key] = ib
            elif isinstance(effect, UnbindMac):
                key = (effect.vn, "mac", effect.mac)
                assert key in self.ima, f"unbind of unbound {key}"
                del self.ima[key]
            elif isinstance(effect, UnbindIp):
                key = (effect.vn, "ip", effect.ip)
                assert key in self.ima, f"unbind of unbound {key}"
                del self.ima[key]
            elif isinstance(effect, StartWatch):
                assert effect.vn not in self.watched
                self.watched.add(effect.vn)
            else:
                assert isinstance(effect, StopWatch)
                assert effect.vn in self.watched
                self.watched.discard(effect.vn)

    # ----------------------------------------------------------------- rules

    @initialize(
        plan=st.lists(
            st.tuples(
                st.sampled_from(VNICS),
                st.sampled_from(VNS),
                st.sampled_from(HYPERVISORS),
                st.sampled_from(PORTS),
            ),
            max_size=8,
        )
    )
    def populate(self, plan: list[tuple[str, VnRecord, str, str]]) -> None:
        """Start from a few connections so that most rules hit existing VNICs."""
        for vnic, vn, sender, port in plan:
            msg = VnConnect(
                sender=sender,
                seq=self.next_seq(sender),
                vnic=vnic,
                port=port,
                vn=VnRef(name=vn.name),
            )
            self.send(msg, vn)

    @rule(data=st.data(), vn=st.sampled_from(VNS), port=st.sampled_from(PORTS))
    def connect(self, data: st.DataObject, vn: VnRecord, port: str) -> None:
        vnic = data.draw(st.sampled_from(VNICS), label="vnic")
        sender = self.pick_sender(data, vnic)
        existing = self.core.vnics.get(vnic)
        if existing is not None and data.draw(st.booleans(), label="same port"):
            port = existing.port
        msg = VnConnect(
            sender=sender, seq=self.next_seq(sender), vnic=vnic, port=port, vn=VnRef(name=vn.name)
        )
        was_member = bool(self.core.vn_members.get(vn.name))
        outcome = self.send(msg, vn)
        if outcome is not None:
            starts = [e for e in outcome.effects if isinstance(e, StartWatch)]
            assert starts == ([] if was_member else [StartWatch(vn.name)])
            assert len(outcome.effects) == len(starts)

    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        vnic, vn, sender = self.pick_attachment(data)
        msg = VnDisconnect(
            sender=sender, seq=self.next_seq(sender), vnic=vnic, vn=VnRef(id=vn.vn_id)
        )
        self.send(msg, vn)

    @rule(data=st.data(), specs=entry_specs)
    def associate(self, data: st.DataObject, specs: list[tuple[str, list[str]]]) -> None:
        vnic, vn, sender = self.pick_attachment(data)
        msg = AddrAssociate(
            sender=sender,
            seq=self.next_seq(sender),
            vnic=vnic,
            vn=VnRef(alias=vn.alias),
            entries=_entries(specs),
        )
        outcome = self.send(msg, vn)
        if outcome is not None:
            att = self.core.vnics[vnic].vns[vn.name]
            for mac, ips in specs:
                assert self.core.mac_owner[(vn.name, mac)] == vnic
                assert set(ips) <= att.macs[mac]

    @rule(data=st.data())
    def associate_free(self, data: st.DataObject) -> None:
        """Claim addresses nobody holds in the VN (IPs drawn independently per entry)."""
        attachments = [
            (name, vn, vnic.hypervisor)
            for name, vnic in sorted(self.core.vnics.items())
            for vn in sorted(vnic.vns)
            if vnic.state != "departed"  # a departing VNIC's addresses wait for its arrival
        ]
        if not attachments:
            return
        vnic, vn_name, sender = data.draw(st.sampled_from(attachments), label="attachment")
        vn = VN_BY_NAME[vn_name]
        free_macs = [
            mac
            for mac in MACS
            if (vn_name, mac) not in self.core.mac_owner
            and self.core.remote.get(vn_name, mac_entry(mac)) is None
        ]
        free_ips = [ip for ip in IPS if (vn_name, ip) not in self.core.ip_owner]
        if not free_macs or (vn.service == "l3" and not free_ips):
            return
        macs = data.draw(
            st.lists(st.sampled_from(free_macs), min_size=1, max_size=3, unique=True),
            label="macs",
        )
        ip_lists = (
            st.lists(
                st.sampled_from(free_ips),
                min_size=1 if vn.service == "l3" else 0,
                max_size=2,
                unique=True,
            )
            if free_ips
            else st.just([])
        )
        specs = [(mac, data.draw(ip_lists, label="ips")) for mac in macs]
        claimed = [ip for _, ips in specs for ip in ips]
        shared = len(claimed) != len(set(claimed))  # one IP under two MACs [3.1]
        try:
            msg = AddrAssociate(
                sender=sender,
                seq=self.next_seq(sender),
                vnic=vnic,
                vn=VnRef(name=vn_name),
                entries=_entries(specs),
            )
        except ValueError:  # refused by the schema: acceptable for a shared IP only
            assert shared
            return
        outcome = self.send(msg, vn)
        if shared:
            assert outcome is None, "one IP was accepted under two MACs"
            assert self.last_refusal is not None
            assert self.last_refusal.code in (ErrorCode.IP_CONFLICT, ErrorCode.BAD_MESSAGE)
            return
        assert outcome is not None, f"claim of free addresses refused: {self.last_refusal}"
        expected = [("mac", mac) for mac, _ in specs] + [
            ("ip", ip) for _, ips in specs for ip in ips
        ]
        got = [("mac", e.binding.mac) for e in outcome.effects if isinstance(e, BindMac)] + [
            ("ip", e.binding.ip) for e in outcome.effects if isinstance(e, BindIp)
        ]
        if self.core.vnics[vnic].up:
            assert sorted(got) == sorted(expected)
        else:
            assert got == []

    @rule(data=st.data(), specs=entry_specs)
    def disassociate(self, data: st.DataObject, specs: list[tuple[str, list[str]]]) -> None:
        vnic, vn, sender = self.pick_attachment(data)
        owned = (
            sorted(self.core.vnics[vnic].vns[vn.name].macs)
            if (vnic in self.core.vnics and vn.name in self.core.vnics[vnic].vns)
            else []
        )
        if owned and data.draw(st.booleans(), label="aim at owned addresses"):
            # Rewrite the entries to name addresses this VNIC holds.
            specs = [(owned[i % len(owned)], ips) for i, (_, ips) in enumerate(specs[: len(owned)])]
        msg = AddrDisassociate(
            sender=sender,
            seq=self.next_seq(sender),
            vnic=vnic,
            vn=VnRef(alias=vn.alias),
            entries=_entries(specs),
        )
        outcome = self.send(msg, vn)
        if outcome is not None:
            att = self.core.vnics[vnic].vns[vn.name]
            for mac, ips in specs:
                if not ips:
                    assert mac not in att.macs
                    assert self.core.mac_owner.get((vn.name, mac)) != vnic
                elif mac in att.macs:
                    assert not set(ips) & att.macs[mac]

    @rule(data=st.data())
    def vnic_disassociate(self, data: st.DataObject) -> None:
        vnic, sender = self.pick_vnic(data)
        msg = VnicDisassociate(sender=sender, seq=self.next_seq(sender), vnic=vnic)
        if self.send(msg, None) is not None:
            assert vnic not in self.core.vnics

    @rule(data=st.data())
    def shutdown(self, data: st.DataObject) -> None:
        vnic, sender = self.pick_vnic(data)
        msg = VnicShutdown(sender=sender, seq=self.next_seq(sender), vnic=vnic)
        if self.send(msg, None) is not None:
            assert not self.core.vnics[vnic].up

    @rule(data=st.data())
    def startup(self, data: st.DataObject) -> None:
        vnic, sender = self.pick_vnic(data)
        msg = VnicStartup(sender=sender, seq=self.next_seq(sender), vnic=vnic)
        if self.send(msg, None) is not None:
            assert self.core.vnics[vnic].up

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """The same (sender, seq, content) again: the remembered answer, no effects."""
        sent = data.draw(st.sampled_from(self.applied))
        before = self.snapshot()
        outcome = self.core.apply(sent.msg, sent.vn, now_ns=self.now, vns=sent.vns)
        assert outcome.replayed
        assert outcome.effects == ()
        assert outcome.result == sent.outcome.result
        assert self.snapshot() == before

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def reuse_seq(self, data: st.DataObject) -> None:
        """Different content under a used (sender, seq) is a seq_conflict."""
        sent = data.draw(st.sampled_from(self.applied))
        other = sent.msg.model_copy(update={"ts_ns": sent.msg.ts_ns + 1})
        before = self.snapshot()
        with pytest.raises(ProtocolError) as info:
            self.core.apply(other, sent.vn, now_ns=self.now, vns=sent.vns)
        assert info.value.code == ErrorCode.SEQ_CONFLICT
        assert self.snapshot() == before

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def resend_with_new_seq(self, data: st.DataObject) -> None:
        """An earlier request, newly numbered: applied again against today's state."""
        sent = data.draw(st.sampled_from(self.applied))
        msg = sent.msg.model_copy(update={"seq": self.next_seq(sent.msg.sender)})
        self.send(msg, sent.vn, sent.vns)

    @rule(data=st.data())
    def depart(self, data: st.DataObject) -> None:
        vnic, sender = self.pick_vnic(data)
        msg = VnicDepart(sender=sender, seq=self.next_seq(sender), vnic=vnic)
        before = self.core.vnics.get(vnic)
        published = before.published if before else False
        if self.send(msg, None) is not None and vnic in self.core.vnics:
            v = self.core.vnics[vnic]
            if v.hypervisor == sender:
                assert v.state == "departed"
                assert v.published == published  # bindings held, not withdrawn [4.4]

    def _mapping(self, vnic: str) -> dict[VnRef, VnRecord]:
        v = self.core.vnics.get(vnic)
        names = sorted(v.vns) if v else [VNS[0].name]
        return {VnRef(name=n): VN_BY_NAME[n] for n in names}

    @rule(data=st.data(), port=st.sampled_from(PORTS))
    def prepare(self, data: st.DataObject, port: str) -> None:
        """Pre-arrival on this same NVE (another hypervisor/port): no IMA write."""
        vnic = data.draw(st.sampled_from(sorted(self.core.vnics) or VNICS), label="vnic")
        sender = data.draw(st.sampled_from(HYPERVISORS), label="dest")
        mapping = self._mapping(vnic)
        msg = VnicPrepare(sender=sender, seq=self.next_seq(sender), vnic=vnic, port=port,
                          vns=tuple(VnAddresses(vn=ref) for ref in mapping))
        outcome = self.send(msg, None, mapping)
        if outcome is not None:
            assert not [e for e in outcome.effects if not isinstance(e, StartWatch)]

    @rule(data=st.data(), port=st.sampled_from(PORTS))
    def arrive(self, data: st.DataObject, port: str) -> None:
        """Arrival of a known VNIC: a same-NVE move or an aborted migration [4.3]."""
        vnic = data.draw(st.sampled_from(sorted(self.core.vnics) or VNICS), label="vnic")
        existing = self.core.vnics.get(vnic)
        sender = data.draw(st.sampled_from(HYPERVISORS), label="dest")
        if existing is not None and data.draw(st.booleans(), label="back home"):
            sender, port = existing.hypervisor, existing.port
        published = existing.published if existing else False
        msg = VnicArrive(sender=sender, seq=self.next_seq(sender), vnic=vnic, port=port)
        outcome = self.send(msg, None, {})
        if outcome is not None and published:
            assert outcome.effects == ()  # the IMA is not touched by a local move
        if outcome is not None:
            v = self.core.vnics[vnic]
            assert (v.hypervisor, v.port, v.state) == (sender, port, "up")

    @rule(jump_s=st.integers(0, 400))
    def tick(self, jump_s: int) -> None:
        """Time passes: hold timers, pre-arrivals and gleaned addresses expire."""
        self.now += jump_s * 10**9
        self.absorb(Outcome(None, self.core.tick(self.now)))

    @rule(data=st.data(), mac=st.sampled_from(MACS), ip=st.sampled_from((None, *IPS)))
    def glean(self, data: st.DataObject, mac: str, ip: str | None) -> None:
        """The data path saw a source address on a port/tag [4.2]."""
        ups = [v for v in sorted(self.core.vnics.values(), key=lambda v: v.name)
               if v.state == "up"]
        if not ups:
            return
        vnic = data.draw(st.sampled_from(ups), label="vnic")
        vn = data.draw(st.sampled_from(sorted(vnic.vns)), label="vn")
        obs = AddrObserved(hypervisor=vnic.hypervisor, port=vnic.port,
                           tag=vnic.vns[vn].tag, mac=mac, ip=ip)
        before = self.snapshot()
        self.now += 1
        outcome: Outcome | None = None
        refusal: ProtocolError | None = None
        try:
            outcome = self.core.observe(obs, self.now)
        except ProtocolError as exc:
            refusal = exc
        if refusal is not None:
            assert refusal.code != ErrorCode.INTERNAL, refusal.reason
            assert self.snapshot() == before
            return
        assert outcome is not None
        self.absorb(outcome)

    @rule(vn=st.sampled_from(VNS), mac=st.sampled_from(MACS), delete=st.booleans())
    def remote_event(self, vn: VnRecord, mac: str, delete: bool) -> None:
        """Another NVE binds or drops a MAC; later local claims of it must conflict."""
        if not self.core.remote.serves(vn.name):
            return
        self.remote_rev += 1
        if delete:
            self.core.remote.delete(vn.name, mac_entry(mac), self.remote_rev)
            return
        binding = MacBinding(
            vn=vn.name, vni=vn.vni, mac=mac, vnic=OTHER_VNIC, nve="nve2", underlay="192.0.2.2"
        )
        self.core.remote.put(vn.name, mac_entry(mac), binding, self.remote_rev)

    # ------------------------------------------------------------ invariants

    @invariant()
    def containment(self) -> None:
        """(a) every IP under a MAC under a VNIC-VN attachment, indexes match the tree."""
        core = self.core
        macs: dict[tuple[str, str], str] = {}
        ips: dict[tuple[str, str], tuple[str, str]] = {}
        for name, vnic in core.vnics.items():
            assert vnic.name == name
            assert vnic.vns, f"VNIC {name} with no VN should be gone"
            for vn, att in vnic.vns.items():
                assert att.vn.name == vn
                for mac, mac_ips in att.macs.items():
                    # (b) MAC unique per VN
                    assert (vn, mac) not in macs, f"MAC {mac} twice in VN {vn}"
                    macs[(vn, mac)] = name
                    if att.vn.service == "l3":
                        assert mac_ips, f"L3 MAC {mac} without an IP"
                    for ip in mac_ips:
                        assert (vn, ip) not in ips, f"IP {ip} under two MACs in VN {vn}"
                        ips[(vn, ip)] = (name, mac)
        assert core.mac_owner == macs
        assert core.ip_owner == ips

    @invariant()
    def tags(self) -> None:
        """(c) one tag per (port scope, VN), consistent with the attachments."""
        core = self.core
        expected: dict[str, dict[str, set[str]]] = {}  # scope -> vn -> vnics
        for name, vnic in core.vnics.items():
            scope = core.scope_of(vnic.hypervisor, vnic.port)
            for vn, att in vnic.vns.items():
                expected.setdefault(scope, {}).setdefault(vn, set()).add(name)
                space = core.tag_spaces[scope]
                assert space.tag_of[vn] == att.tag
                assert space.vn_of[att.tag] == vn
            if vnic.pending is not None:  # tags held ahead on the new port
                pscope = core.scope_of(vnic.pending.hypervisor, vnic.pending.port)
                for vn, tag in vnic.pending.tags.items():
                    expected.setdefault(pscope, {}).setdefault(vn, set()).add(name)
                    assert core.tag_spaces[pscope].tag_of[vn] == tag
        assert set(core.tag_spaces) == set(expected)
        for scope, space in core.tag_spaces.items():
            assert space.users == expected[scope]
            assert {t: v for v, t in space.tag_of.items()} == space.vn_of
            assert all(1 <= t <= MAX_TAG for t in space.vn_of)
        ports = core.tables()["ports"]
        assert ports == {
            scope: {str(t): v for t, v in sorted(s.vn_of.items())}
            for scope, s in core.tag_spaces.items()
        }

    @invariant()
    def ima_matches_up_vnics(self) -> None:
        """(d) the IMA model holds exactly the bindings of up VNICs, with the right owners."""
        core = self.core
        expected = core.local_bindings()
        assert len(expected) == len(set(expected))
        assert set(self.ima) == set(expected)
        for (vn, kind, addr), binding in self.ima.items():
            if kind == "mac":
                assert isinstance(binding, MacBinding)
                owner = core.mac_owner[(vn, addr)]
                assert binding.vnic == owner
            else:
                assert isinstance(binding, IpBinding)
                assert (binding.vnic, binding.mac) == core.ip_owner[(vn, addr)]
            assert core.vnics[binding.vnic].published
        for vnic in core.vnics.values():
            if not vnic.published:
                assert not any(b.vnic == vnic.name for b in self.ima.values())

    @invariant()
    def watches(self) -> None:
        """(e) every VN with local members is watched, and only those."""
        core = self.core
        members: dict[str, set[str]] = {}
        for name, vnic in core.vnics.items():
            for vn in vnic.vns:
                members.setdefault(vn, set()).add(name)
        assert core.vn_members == members
        assert self.watched == set(members)
        assert set(core.vn_records) == set(members)
        for vn in VNS:
            assert core.remote.serves(vn.name) == (vn.name in members)


NveMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestNveMachine = NveMachine.TestCase
