"""NveCore: the pure hypervisor-to-NVE state machine, with concrete VN records."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from nve.core import NveCore, Outcome
from nve.effects import BindIp, BindMac, Effect, StartWatch, StopWatch, UnbindIp, UnbindMac
from nve.remote import RemoteTable, ip_entry, mac_entry
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    AddrAssociate,
    AddrDisassociate,
    AddressEntry,
    HypervisorMessage,
    VnConnect,
    VnDisconnect,
    VnicDisassociate,
    VnicShutdown,
    VnicStartup,
    VnRef,
)
from schemas.records import IpBinding, MacBinding, VnRecord

NVE = "nve1"
UNDERLAY = "192.0.2.1"

L2 = VnRecord(name="11111111-1111-4111-8111-111111111111", vn_id=100, alias="blue", vni=5000)
L3 = VnRecord(
    name="33333333-3333-4333-8333-333333333333",
    vn_id=300,
    alias="red",
    vni=6000,
    service="l3",
)

VNIC_A = "aaaaaaaa-0000-4000-8000-00000000000a"
VNIC_B = "bbbbbbbb-0000-4000-8000-00000000000b"
VNIC_C = "cccccccc-0000-4000-8000-00000000000c"
VNIC_REMOTE = "dddddddd-0000-4000-8000-00000000000d"

MAC1 = "02:00:00:00:00:01"
MAC2 = "02:00:00:00:00:02"
MAC3 = "02:00:00:00:00:03"

Entry = tuple[str, tuple[str, ...]]


def entries(*items: str | Entry) -> tuple[AddressEntry, ...]:
    out = []
    for item in items:
        mac, ips = (item, ()) if isinstance(item, str) else item
        out.append(AddressEntry(mac=mac, ips=ips))
    return tuple(out)


class Hv:
    """A hypervisor's side of the protocol: numbered messages, sent to one core."""

    def __init__(self, core: NveCore, name: str, port: str = "eth0") -> None:
        self.core = core
        self.name = name
        self.port = port
        self._seq = itertools.count(1)

    def send(self, msg: HypervisorMessage, vn: VnRecord | None = None) -> Outcome:
        return self.core.apply(msg, vn, now_ns=1_000)

    def connect(self, vnic: str, vn: VnRecord, port: str | None = None) -> Outcome:
        return self.send(self.connect_msg(vnic, vn, port), vn)

    def connect_msg(self, vnic: str, vn: VnRecord, port: str | None = None) -> VnConnect:
        return VnConnect(
            sender=self.name,
            seq=next(self._seq),
            vnic=vnic,
            port=port or self.port,
            vn=VnRef(name=vn.name),
        )

    def disconnect(self, vnic: str, vn: VnRecord) -> Outcome:
        msg = VnDisconnect(sender=self.name, seq=next(self._seq), vnic=vnic, vn=VnRef(id=vn.vn_id))
        return self.send(msg, vn)

    def assoc_msg(self, vnic: str, vn: VnRecord, *items: str | Entry) -> AddrAssociate:
        return AddrAssociate(
            sender=self.name,
            seq=next(self._seq),
            vnic=vnic,
            vn=VnRef(alias=vn.alias),
            entries=entries(*items),
        )

    def associate(self, vnic: str, vn: VnRecord, *items: str | Entry) -> Outcome:
        return self.send(self.assoc_msg(vnic, vn, *items), vn)

    def disassociate(self, vnic: str, vn: VnRecord, *items: str | Entry) -> Outcome:
        msg = AddrDisassociate(
            sender=self.name,
            seq=next(self._seq),
            vnic=vnic,
            vn=VnRef(alias=vn.alias),
            entries=entries(*items),
        )
        return self.send(msg, vn)

    def vnic_disassociate(self, vnic: str) -> Outcome:
        return self.send(VnicDisassociate(sender=self.name, seq=next(self._seq), vnic=vnic))

    def shutdown(self, vnic: str) -> Outcome:
        return self.send(VnicShutdown(sender=self.name, seq=next(self._seq), vnic=vnic))

    def startup(self, vnic: str) -> Outcome:
        return self.send(VnicStartup(sender=self.name, seq=next(self._seq), vnic=vnic))


@pytest.fixture
def core() -> NveCore:
    return NveCore(NVE, UNDERLAY)


@pytest.fixture
def hv1(core: NveCore) -> Hv:
    return Hv(core, "hv1")


@pytest.fixture
def hv2(core: NveCore) -> Hv:
    return Hv(core, "hv2")


def state(core: NveCore) -> dict[str, Any]:
    """Everything observable, deep-copied: tables plus the indexes beside them."""
    return copy.deepcopy(
        {
            "tables": core.tables(),
            "mac_owner": core.mac_owner,
            "ip_owner": core.ip_owner,
            "vn_members": core.vn_members,
            "vn_records": sorted(core.vn_records),
            "tags": {scope: (s.tag_of, s.vn_of, s.users) for scope, s in core.tag_spaces.items()},
            "bindings": sorted(core.local_bindings()),
        }
    )


def refused(core: NveCore, code: ErrorCode, call: Callable[[], object]) -> ProtocolError:
    before = state(core)
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.code == code, info.value.reason
    assert state(core) == before, "a refused request must leave no trace"
    return info.value


def keys(effects: tuple[Effect, ...]) -> list[tuple[str, ...]]:
    """Effects as comparable tuples."""
    out: list[tuple[str, ...]] = []
    for e in effects:
        if isinstance(e, BindMac):
            out.append(("bind_mac", e.binding.vn, e.binding.mac))
        elif isinstance(e, BindIp):
            out.append(("bind_ip", e.binding.vn, e.binding.ip, e.binding.mac))
        elif isinstance(e, UnbindMac):
            out.append(("unbind_mac", e.vn, e.mac))
        elif isinstance(e, UnbindIp):
            out.append(("unbind_ip", e.vn, e.ip))
        elif isinstance(e, StartWatch):
            out.append(("start", e.vn))
        else:
            assert isinstance(e, StopWatch)
            out.append(("stop", e.vn))
    return out


def remote_mac(vn: VnRecord, mac: str, nve: str = "nve2", vnic: str = VNIC_REMOTE) -> MacBinding:
    return MacBinding(vn=vn.name, vni=vn.vni, mac=mac, vnic=vnic, nve=nve, underlay="192.0.2.2")


def remote_ip(vn: VnRecord, ip: str, mac: str, nve: str = "nve2") -> IpBinding:
    return IpBinding(
        vn=vn.name, vni=vn.vni, ip=ip, mac=mac, vnic=VNIC_REMOTE, nve=nve, underlay="192.0.2.2"
    )


# ------------------------------------------------------------------ connect


def test_connect_returns_tag_and_vn_and_starts_watch_once(core: NveCore, hv1: Hv) -> None:
    out = hv1.connect(VNIC_A, L2)
    assert out.result is not None
    assert (out.result.tag, out.result.vn_name, out.result.vn_id, out.result.vni) == (
        1,
        L2.name,
        100,
        5000,
    )
    assert out.result.service == "l2"
    assert out.effects == (StartWatch(L2.name),)
    assert not out.replayed
    assert core.remote.serves(L2.name)

    second = hv1.connect(VNIC_B, L2)
    assert second.result is not None
    assert second.result.tag == 1  # same VN on the same port shares the tag
    assert second.effects == ()

    l3 = hv1.connect(VNIC_A, L3)
    assert l3.result is not None
    assert (l3.result.tag, l3.result.vni, l3.result.service) == (2, 6000, "l3")
    assert l3.effects == (StartWatch(L3.name),)
    tables = core.tables()
    assert tables["ports"] == {"hv1/eth0": {"1": L2.name, "2": L3.name}}
    assert set(tables["vnics"][VNIC_A]["vns"]) == {L2.name, L3.name}
    assert tables["vnics"][VNIC_A]["state"] == "up"


def test_connect_again_is_idempotent(core: NveCore, hv1: Hv) -> None:
    first = hv1.connect(VNIC_A, L2)
    again = hv1.connect(VNIC_A, L2)  # new seq, same request
    assert again.result == first.result
    assert again.effects == ()
    assert not again.replayed


def test_tags_are_local_to_a_port(core: NveCore, hv1: Hv, hv2: Hv) -> None:
    assert hv1.connect(VNIC_A, L2).result.tag == 1  # type: ignore[union-attr]
    assert hv1.connect(VNIC_A, L3).result.tag == 2  # type: ignore[union-attr]
    # The same VN on another hypervisor's port gets a different tag value ...
    out = hv2.connect(VNIC_B, L3)
    assert out.result is not None
    assert out.result.tag == 1
    assert out.effects == ()  # L3 is already watched
    # ... and tag 1 means L2 on hv1/eth0 but L3 on hv2/eth0.
    assert core.tables()["ports"] == {
        "hv1/eth0": {"1": L2.name, "2": L3.name},
        "hv2/eth0": {"1": L3.name},
    }
    # Two ports of one hypervisor are two tag spaces as well.
    out = hv1.connect(VNIC_C, L3, port="eth1")
    assert out.result is not None
    assert out.result.tag == 1
    assert core.tables()["ports"]["hv1/eth1"] == {"1": L3.name}


def test_connect_on_another_port_is_port_mismatch(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    refused(core, ErrorCode.PORT_MISMATCH, lambda: hv1.connect(VNIC_A, L3, port="eth1"))


def test_connect_refused_when_tags_exhausted(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    core.tag_spaces["hv1/eth0"].max_tag = 1
    err = refused(core, ErrorCode.TAGS_EXHAUSTED, lambda: hv1.connect(VNIC_B, L3))
    assert err.fields["port"] == "hv1/eth0"
    assert VNIC_B not in core.vnics
    # The VN that already has a tag on that port can still be joined.
    assert hv1.connect(VNIC_B, L2).result.tag == 1  # type: ignore[union-attr]


# ---------------------------------------------------------------- associate


def test_associate_binds_only_new_addresses(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    out = hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)), MAC2)
    assert keys(out.effects) == [
        ("bind_mac", L2.name, MAC1),
        ("bind_ip", L2.name, "10.0.0.1", MAC1),
        ("bind_mac", L2.name, MAC2),
    ]
    bind = out.effects[0]
    assert isinstance(bind, BindMac)
    assert bind.binding == MacBinding(
        vn=L2.name, vni=5000, mac=MAC1, vnic=VNIC_A, nve=NVE, underlay=UNDERLAY, ts_ns=0
    )
    # Built without validation, every field in model order: the field dict is the
    # canonical record the NVE writes, and reading it back gives the same binding.
    for effect in out.effects:
        assert isinstance(effect, BindMac | BindIp)
        b = effect.binding
        record = orjson.dumps(vars(b))
        assert record == orjson.dumps(b.model_dump(mode="json"))
        assert type(b).model_validate_json(record) == b
    out = hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1", "10.0.0.2")), (MAC2, ("10.9.0.0/16",)))
    assert keys(out.effects) == [
        ("bind_ip", L2.name, "10.0.0.2", MAC1),
        ("bind_ip", L2.name, "10.9.0.0/16", MAC2),
    ]
    assert core.tables()["vnics"][VNIC_A]["vns"][L2.name]["macs"] == {
        MAC1: ["10.0.0.1", "10.0.0.2"],
        MAC2: ["10.9.0.0/16"],
    }
    assert sorted(core.local_bindings()) == [
        (L2.name, "ip", "10.0.0.1"),
        (L2.name, "ip", "10.0.0.2"),
        (L2.name, "ip", "10.9.0.0/16"),
        (L2.name, "mac", MAC1),
        (L2.name, "mac", MAC2),
    ]


def test_replay_of_same_message_has_no_effects(core: NveCore, hv1: Hv) -> None:
    connect = hv1.connect_msg(VNIC_A, L2)
    first = core.apply(connect, L2, 1)
    replay = core.apply(connect, L2, 2)
    assert replay.replayed
    assert replay.effects == ()
    assert replay.result == first.result

    msg = hv1.assoc_msg(VNIC_A, L2, (MAC1, ("10.0.0.1",)))
    assert len(core.apply(msg, L2, 3).effects) == 2
    before = state(core)
    again = core.apply(msg, L2, 4)
    assert again == Outcome(None, (), replayed=True)
    assert state(core) == before

    # The replay is answered from memory even after the state moved on.
    hv1.disassociate(VNIC_A, L2, MAC1)
    late = core.apply(msg, L2, 5)
    assert late.replayed
    assert late.effects == ()
    assert MAC1 not in core.tables()["vnics"][VNIC_A]["vns"][L2.name]["macs"]


def test_same_seq_different_content_is_seq_conflict(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    msg = hv1.assoc_msg(VNIC_A, L2, MAC1)
    core.apply(msg, L2, 1)
    other = msg.model_copy(update={"entries": entries(MAC2)})
    err = refused(core, ErrorCode.SEQ_CONFLICT, lambda: core.apply(other, L2, 2))
    assert err.fields["seq"] == str(msg.seq)
    different_kind = VnicShutdown(sender="hv1", seq=msg.seq, vnic=VNIC_A)
    refused(core, ErrorCode.SEQ_CONFLICT, lambda: core.apply(different_kind, None, 3))
    # The same seq from another sender is a different message.
    hv2 = Hv(core, "hv2")
    hv2.connect(VNIC_B, L2)
    out = core.apply(
        AddrAssociate(
            sender="hv2", seq=msg.seq, vnic=VNIC_B, vn=VnRef(alias="blue"), entries=entries(MAC2)
        ),
        L2,
        4,
    )
    assert not out.replayed
    assert keys(out.effects) == [("bind_mac", L2.name, MAC2)]


def test_refused_message_is_not_remembered(core: NveCore, hv1: Hv) -> None:
    msg = hv1.assoc_msg(VNIC_A, L2, MAC1)
    refused(core, ErrorCode.UNKNOWN_VNIC, lambda: core.apply(msg, L2, 1))
    hv1.connect(VNIC_A, L2)
    # The same seq is now older than the connect that was applied after it: stale.
    refused(core, ErrorCode.STALE_SEQ, lambda: core.apply(msg, L2, 2))
    renumbered = msg.model_copy(update={"seq": hv1.assoc_msg(VNIC_A, L2, MAC1).seq})
    out = core.apply(renumbered, L2, 3)  # the agent resends it with a new number
    assert not out.replayed
    assert keys(out.effects) == [("bind_mac", L2.name, MAC1)]


def test_identical_request_with_new_seq_is_idempotent(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)))
    before = state(core)
    out = hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)))
    assert out == Outcome(None, (), replayed=False)
    assert state(core) == before


def test_mac_unique_within_vn(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.connect(VNIC_B, L2)
    hv1.associate(VNIC_A, L2, MAC1)
    # A multi-entry message whose last entry conflicts leaves no trace at all.
    err = refused(
        core,
        ErrorCode.MAC_CONFLICT,
        lambda: hv1.associate(VNIC_B, L2, (MAC2, ("10.0.0.2",)), MAC3, MAC1),
    )
    assert err.fields == {"mac": MAC1, "vnic": VNIC_A}
    assert core.tables()["vnics"][VNIC_B]["vns"][L2.name]["macs"] == {}
    # The same MAC in another VN is a different address.
    hv1.connect(VNIC_B, L3)
    out = hv1.associate(VNIC_B, L3, (MAC1, ("10.3.0.1",)))
    assert keys(out.effects)[0] == ("bind_mac", L3.name, MAC1)


def test_ip_unique_within_vn(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.connect(VNIC_B, L2)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)), MAC3)
    refused(core, ErrorCode.IP_CONFLICT, lambda: hv1.associate(VNIC_B, L2, (MAC2, ("10.0.0.1",))))
    # Also within one VNIC: an IP cannot move to another MAC implicitly.
    refused(core, ErrorCode.IP_CONFLICT, lambda: hv1.associate(VNIC_A, L2, (MAC3, ("10.0.0.1",))))


def test_same_ip_under_two_macs_in_one_message_is_refused(core: NveCore, hv1: Hv) -> None:
    """One IP must belong to one MAC (3.1 containment), also within one message."""
    hv1.connect(VNIC_A, L2)
    before = state(core)
    try:
        msg = hv1.assoc_msg(VNIC_A, L2, (MAC1, ("10.0.0.1",)), (MAC2, ("10.0.0.1",)))
    except ValueError:  # pydantic.ValidationError: refused by the schema, fine
        return
    with pytest.raises(ProtocolError) as info:
        core.apply(msg, L2, 1)
    assert info.value.code in (ErrorCode.IP_CONFLICT, ErrorCode.BAD_MESSAGE)
    assert state(core) == before


def test_l3_vn_requires_an_ip_per_mac(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L3)
    err = refused(core, ErrorCode.IP_REQUIRED, lambda: hv1.associate(VNIC_A, L3, MAC1))
    assert err.fields["mac"] == MAC1
    refused(
        core,
        ErrorCode.IP_REQUIRED,
        lambda: hv1.associate(VNIC_A, L3, (MAC1, ("10.3.0.1",)), MAC2),
    )
    out = hv1.associate(VNIC_A, L3, (MAC1, ("10.3.0.1",)))
    assert len(out.effects) == 2
    # An existing MAC may be re-announced without IPs: it already has one.
    assert hv1.associate(VNIC_A, L3, MAC1).effects == ()
    # Removing its last IP would leave it without one.
    refused(
        core,
        ErrorCode.IP_REQUIRED,
        lambda: hv1.disassociate(VNIC_A, L3, (MAC1, ("10.3.0.1",))),
    )


def test_associate_needs_connection(core: NveCore, hv1: Hv) -> None:
    refused(core, ErrorCode.UNKNOWN_VNIC, lambda: hv1.associate(VNIC_A, L2, MAC1))
    hv1.connect(VNIC_A, L2)
    err = refused(core, ErrorCode.NOT_CONNECTED, lambda: hv1.associate(VNIC_A, L3, MAC1))
    assert err.fields == {"vnic": VNIC_A, "vn": L3.name}


def test_message_naming_a_vn_without_a_record_is_internal_error(core: NveCore, hv1: Hv) -> None:
    refused(core, ErrorCode.INTERNAL, lambda: core.apply(hv1.connect_msg(VNIC_A, L2), None, 1))


# ------------------------------------------------------------- disassociate


def test_disassociate_whole_mac_removes_its_ips(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.2", "10.0.0.1")), (MAC2, ("10.0.0.3",)))
    out = hv1.disassociate(VNIC_A, L2, MAC1)
    assert keys(out.effects) == [
        ("unbind_ip", L2.name, "10.0.0.1"),
        ("unbind_ip", L2.name, "10.0.0.2"),
        ("unbind_mac", L2.name, MAC1),
    ]
    assert (L2.name, MAC1) not in core.mac_owner
    assert (L2.name, "10.0.0.1") not in core.ip_owner
    assert core.tables()["vnics"][VNIC_A]["vns"][L2.name]["macs"] == {MAC2: ["10.0.0.3"]}
    # Removing one IP keeps the MAC.
    out = hv1.disassociate(VNIC_A, L2, (MAC2, ("10.0.0.3", "10.0.0.99")))
    assert keys(out.effects) == [("unbind_ip", L2.name, "10.0.0.3")]
    assert core.tables()["vnics"][VNIC_A]["vns"][L2.name]["macs"] == {MAC2: []}
    # Disassociating what is gone is idempotent.
    assert hv1.disassociate(VNIC_A, L2, MAC1, MAC3).effects == ()
    # The freed addresses can be claimed by another VNIC.
    hv1.connect(VNIC_B, L2)
    out = hv1.associate(VNIC_B, L2, (MAC1, ("10.0.0.1",)))
    assert len(out.effects) == 2


# --------------------------------------------------------------- disconnect


def test_vn_disconnect_cascades(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.connect(VNIC_B, L2)
    hv1.connect(VNIC_A, L3)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)), MAC2)
    hv1.associate(VNIC_B, L2, MAC3)
    hv1.associate(VNIC_A, L3, (MAC1, ("10.3.0.1",)))

    out = hv1.disconnect(VNIC_A, L2)
    assert out.result is None
    assert sorted(keys(out.effects)) == sorted(
        [
            ("unbind_ip", L2.name, "10.0.0.1"),
            ("unbind_mac", L2.name, MAC1),
            ("unbind_mac", L2.name, MAC2),
        ]
    )  # VNIC_B still serves L2: no StopWatch
    assert core.remote.serves(L2.name)
    assert L2.name not in core.tables()["vnics"][VNIC_A]["vns"]
    assert core.tables()["ports"]["hv1/eth0"] == {"1": L2.name, "2": L3.name}

    out = hv1.disconnect(VNIC_B, L2)
    assert keys(out.effects) == [("unbind_mac", L2.name, MAC3), ("stop", L2.name)]
    assert not core.remote.serves(L2.name)
    assert VNIC_B not in core.vnics  # no VN left: the VNIC is gone
    assert core.tables()["ports"]["hv1/eth0"] == {"2": L3.name}

    out = hv1.disconnect(VNIC_A, L3)
    assert keys(out.effects) == [
        ("unbind_ip", L3.name, "10.3.0.1"),
        ("unbind_mac", L3.name, MAC1),
        ("stop", L3.name),
    ]
    assert core.vnics == {}
    assert core.tag_spaces == {}
    assert core.mac_owner == {}
    assert core.ip_owner == {}
    assert core.vn_members == {}
    assert core.local_bindings() == []
    # The tag is free again.
    assert hv1.connect(VNIC_C, L3).result.tag == 1  # type: ignore[union-attr]


def test_disconnect_refusals(core: NveCore, hv1: Hv) -> None:
    refused(core, ErrorCode.UNKNOWN_VNIC, lambda: hv1.disconnect(VNIC_A, L2))
    hv1.connect(VNIC_A, L2)
    refused(core, ErrorCode.NOT_CONNECTED, lambda: hv1.disconnect(VNIC_A, L3))


def test_vnic_disassociate_removes_everything_in_one_message(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.connect(VNIC_A, L3)
    hv1.connect(VNIC_B, L3)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)))
    hv1.associate(VNIC_A, L3, (MAC2, ("10.3.0.2",)))
    hv1.associate(VNIC_B, L3, (MAC3, ("10.3.0.3",)))
    out = hv1.vnic_disassociate(VNIC_A)
    assert sorted(keys(out.effects)) == sorted(
        [
            ("unbind_ip", L2.name, "10.0.0.1"),
            ("unbind_mac", L2.name, MAC1),
            ("stop", L2.name),
            ("unbind_ip", L3.name, "10.3.0.2"),
            ("unbind_mac", L3.name, MAC2),
        ]
    )
    assert VNIC_A not in core.vnics
    assert sorted(core.local_bindings()) == [(L3.name, "ip", "10.3.0.3"), (L3.name, "mac", MAC3)]
    assert core.tables()["ports"] == {"hv1/eth0": {"2": L3.name}}
    # Already gone: nothing to do.
    assert hv1.vnic_disassociate(VNIC_A).effects == ()


# --------------------------------------------------------- shutdown/startup


def test_shutdown_unbinds_and_keeps_tree_startup_rebinds(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.connect(VNIC_A, L3)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1", "10.0.0.2")), MAC2)
    hv1.associate(VNIC_A, L3, (MAC3, ("10.3.0.3",)))
    bound = sorted(core.local_bindings())
    tree = core.tables()["vnics"][VNIC_A]["vns"]

    down = hv1.shutdown(VNIC_A)
    unbinds = keys(down.effects)
    assert sorted(unbinds) == sorted(
        [("unbind_mac" if k == "mac" else "unbind_ip", vn, a) for vn, k, a in bound]
    )
    assert not any(isinstance(e, (StartWatch, StopWatch)) for e in down.effects)
    tables = core.tables()
    assert tables["vnics"][VNIC_A]["state"] == "down"
    assert tables["vnics"][VNIC_A]["vns"] == tree
    assert core.local_bindings() == []
    assert core.remote.serves(L2.name)
    assert hv1.shutdown(VNIC_A).effects == ()  # already down

    # While down, changes go into the tree but not into the IMA.
    assert hv1.associate(VNIC_A, L2, MAC3).effects == ()
    assert hv1.disassociate(VNIC_A, L2, MAC3).effects == ()
    # ... and a down VNIC's MAC is still its own.
    hv1.connect(VNIC_B, L2)
    refused(core, ErrorCode.MAC_CONFLICT, lambda: hv1.associate(VNIC_B, L2, MAC1))

    up = hv1.startup(VNIC_A)
    rebinds = []
    for e in up.effects:
        if isinstance(e, BindMac):
            rebinds.append((e.binding.vn, "mac", e.binding.mac))
            assert e.binding.vnic == VNIC_A
        else:
            assert isinstance(e, BindIp)
            rebinds.append((e.binding.vn, "ip", e.binding.ip))
    assert sorted(rebinds) == bound
    assert len(rebinds) == len(bound)
    assert sorted(core.local_bindings()) == bound
    assert core.tables()["vnics"][VNIC_A]["state"] == "up"
    assert hv1.startup(VNIC_A).effects == ()  # already up


def test_disconnect_of_down_vnic_emits_no_unbinds(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.associate(VNIC_A, L2, (MAC1, ("10.0.0.1",)))
    hv1.shutdown(VNIC_A)
    out = hv1.disconnect(VNIC_A, L2)
    assert keys(out.effects) == [("stop", L2.name)]
    assert core.mac_owner == {}
    assert core.ip_owner == {}


# ------------------------------------------------------------------ owners


def test_operations_from_another_hypervisor_are_refused(core: NveCore, hv1: Hv, hv2: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    hv1.associate(VNIC_A, L2, MAC1)
    for call in (
        lambda: hv2.connect(VNIC_A, L2),
        lambda: hv2.connect(VNIC_A, L3),
        lambda: hv2.disconnect(VNIC_A, L2),
        lambda: hv2.associate(VNIC_A, L2, MAC2),
        lambda: hv2.disassociate(VNIC_A, L2, MAC1),
        lambda: hv2.vnic_disassociate(VNIC_A),
        lambda: hv2.shutdown(VNIC_A),
        lambda: hv2.startup(VNIC_A),
    ):
        err = refused(core, ErrorCode.VNIC_OWNED_ELSEWHERE, call)
        assert err.fields["hypervisor"] == "hv1"


def test_unknown_vnic(core: NveCore, hv1: Hv) -> None:
    for call in (
        lambda: hv1.disconnect(VNIC_A, L2),
        lambda: hv1.associate(VNIC_A, L2, MAC1),
        lambda: hv1.disassociate(VNIC_A, L2, MAC1),
        lambda: hv1.shutdown(VNIC_A),
        lambda: hv1.startup(VNIC_A),
    ):
        refused(core, ErrorCode.UNKNOWN_VNIC, call)


def test_not_connected(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    for call in (
        lambda: hv1.disconnect(VNIC_A, L3),
        lambda: hv1.associate(VNIC_A, L3, (MAC1, ("10.3.0.1",))),
        lambda: hv1.disassociate(VNIC_A, L3, MAC1),
    ):
        refused(core, ErrorCode.NOT_CONNECTED, call)


# ------------------------------------------------------------------ remote


def test_remote_binding_makes_local_claim_a_conflict(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    core.remote.start(L2.name)  # already started by the connect; idempotent
    assert core.remote.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1), 10)
    err = refused(core, ErrorCode.MAC_CONFLICT, lambda: hv1.associate(VNIC_A, L2, MAC2, MAC1))
    assert err.fields["nve"] == "nve2"
    assert err.fields["vnic"] == VNIC_REMOTE
    # A remote IP binding blocks a local claim of the IP.
    assert core.remote.put(L2.name, ip_entry("10.0.0.9"), remote_ip(L2, "10.0.0.9", MAC1), 11)
    refused(core, ErrorCode.IP_CONFLICT, lambda: hv1.associate(VNIC_A, L2, (MAC2, ("10.0.0.9",))))
    # Once the remote goes away, the MAC is free.
    assert core.remote.delete(L2.name, mac_entry(MAC1), 12)
    assert len(hv1.associate(VNIC_A, L2, MAC1).effects) == 1


def test_remote_binding_of_same_vnic_is_not_a_conflict(core: NveCore, hv1: Hv) -> None:
    """A VNIC moving in from another NVE keeps its MAC."""
    hv1.connect(VNIC_A, L2)
    core.remote.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1, vnic=VNIC_A), 5)
    assert len(hv1.associate(VNIC_A, L2, MAC1).effects) == 1


def test_remote_state_is_dropped_when_last_member_leaves(core: NveCore, hv1: Hv) -> None:
    hv1.connect(VNIC_A, L2)
    core.remote.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1), 3)
    assert core.tables()["remote"][L2.name]["revision"] == 3
    hv1.disconnect(VNIC_A, L2)
    assert not core.remote.serves(L2.name)
    assert core.tables()["remote"] == {}
    hv1.connect(VNIC_A, L2)
    assert core.remote.get(L2.name, mac_entry(MAC1)) is None
    assert len(hv1.associate(VNIC_A, L2, MAC1).effects) == 1


# ------------------------------------------------------------- RemoteTable


def test_remote_table_ignores_stale_events() -> None:
    table = RemoteTable(NVE)
    table.start(L2.name)
    assert table.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1), 10)
    assert table.revision(L2.name) == 10
    # Older than the last applied revision: ignored and counted.
    assert not table.put(L2.name, mac_entry(MAC2), remote_mac(L2, MAC2), 9)
    assert not table.delete(L2.name, mac_entry(MAC1), 5)
    assert table.stale_events == 2
    assert table.get(L2.name, mac_entry(MAC1)) == table.entry(remote_mac(L2, MAC1))
    assert table.get(L2.name, mac_entry(MAC2)) is None
    assert table.revision(L2.name) == 10
    # Same revision: another event of the same transaction, applied.
    assert table.put(L2.name, mac_entry(MAC2), remote_mac(L2, MAC2), 10)
    assert table.delete(L2.name, mac_entry(MAC1), 10)
    assert table.get(L2.name, mac_entry(MAC1)) is None
    assert table.get(L2.name, mac_entry(MAC2)) == table.entry(remote_mac(L2, MAC2))
    assert table.stale_events == 2
    assert table.size() == 1


def test_remote_table_does_not_store_own_bindings() -> None:
    table = RemoteTable(NVE)
    table.start(L2.name)
    assert table.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1), 1)
    # Our own binding for the same key (e.g. the VNIC moved here) evicts the remote one.
    assert table.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1, nve=NVE), 2)
    assert table.get(L2.name, mac_entry(MAC1)) is None
    assert table.put(L2.name, mac_entry(MAC2), remote_mac(L2, MAC2, nve=NVE), 3)
    assert table.size() == 0
    assert table.revision(L2.name) == 3


def test_remote_table_ignores_unserved_vns() -> None:
    table = RemoteTable(NVE)
    assert not table.serves(L2.name)
    assert not table.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1), 1)
    assert not table.delete(L2.name, mac_entry(MAC1), 1)
    table.load_snapshot(L2.name, [(mac_entry(MAC1), remote_mac(L2, MAC1))], 1)
    assert table.size() == 0
    assert table.get(L2.name, mac_entry(MAC1)) is None
    assert table.revision(L2.name) == 0
    assert table.stale_events == 0


def test_remote_table_load_snapshot_replaces() -> None:
    table = RemoteTable(NVE)
    table.start(L2.name)
    table.put(L2.name, mac_entry(MAC1), remote_mac(L2, MAC1), 4)
    table.load_snapshot(
        L2.name,
        [
            (mac_entry(MAC2), remote_mac(L2, MAC2)),
            (mac_entry(MAC3), remote_mac(L2, MAC3, nve=NVE)),  # own: dropped
            (ip_entry("10.0.0.0/24"), remote_ip(L2, "10.0.0.0/24", MAC2)),
        ],
        20,
    )
    assert table.get(L2.name, mac_entry(MAC1)) is None
    assert table.get(L2.name, mac_entry(MAC2)) == table.entry(remote_mac(L2, MAC2))
    assert table.get(L2.name, mac_entry(MAC3)) is None
    assert table.get(L2.name, "ip/10.0.0.0_24") == table.entry(remote_ip(L2, "10.0.0.0/24", MAC2))
    assert table.revision(L2.name) == 20
    assert table.size() == 2
    # Events from before the snapshot are now stale.
    assert not table.delete(L2.name, mac_entry(MAC2), 19)
    assert table.get(L2.name, mac_entry(MAC2)) is not None
    table.stop(L2.name)
    assert not table.serves(L2.name)
    assert table.size() == 0
    table.stop(L2.name)  # idempotent
