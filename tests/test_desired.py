"""The agent's desired state: every change can be undone, and only that change.

A refused request is undone in the desired state. Requests for one VNIC can be
in flight together (the operator's ``agent ctl``, libvirt events, pipelined
associations), so an undo must restore exactly what its change touched, never
a snapshot of the whole VNIC that would also erase the others.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agents.desired import DesiredState, Undo
from schemas.messages import AddressEntry, VnRef

VNICS = ("a", "b")
VNS = (VnRef(alias="blue"), VnRef(alias="red"))
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03")
IPS = ("10.0.0.1", "10.0.0.2")

entries = st.lists(
    st.builds(lambda mac, ips: AddressEntry(mac=mac, ips=tuple(ips)),
              st.sampled_from(MACS), st.sets(st.sampled_from(IPS), max_size=2)),
    max_size=3, unique_by=lambda e: e.mac,
).map(tuple)

Change = Callable[[DesiredState], Undo]

changes: st.SearchStrategy[Change] = st.one_of(
    st.builds(lambda v, vn: lambda d: d.connect(v, "eth0", vn, ()),
              st.sampled_from(VNICS), st.sampled_from(VNS)),
    st.builds(lambda v, vn: lambda d: d.disconnect(v, vn),
              st.sampled_from(VNICS), st.sampled_from(VNS)),
    st.builds(lambda v, vn, e: lambda d: d.associate(v, vn, e),
              st.sampled_from(VNICS), st.sampled_from(VNS), entries),
    st.builds(lambda v, vn, e: lambda d: d.disassociate(v, vn, e),
              st.sampled_from(VNICS), st.sampled_from(VNS), entries),
    st.builds(lambda v, vn, e: lambda d: d.replace(v, vn, e),
              st.sampled_from(VNICS), st.sampled_from(VNS), entries),
    st.builds(lambda v: lambda d: d.remove(v), st.sampled_from(VNICS)),
    st.builds(lambda v, s: lambda d: d.set_state(v, s),
              st.sampled_from(VNICS), st.sampled_from(("up", "down"))),
)


def _view(d: DesiredState) -> Any:
    return {name: (e.port, e.state, {vn: ({m: sorted(ips) for m, ips in dv.macs.items()},
                                          dv.allowed) for vn, dv in e.vns.items()})
            for name, e in d.vnics.items()}


@given(st.lists(changes, max_size=8), changes)
def test_a_change_then_its_undo_is_no_change(history: list[Change], change: Change) -> None:
    d = DesiredState()
    for earlier in history:
        earlier(d)
    before = copy.deepcopy(_view(d))
    change(d)()
    assert _view(d) == before


def test_undoing_a_shutdown_keeps_an_address_added_meanwhile() -> None:
    d = DesiredState()
    d.connect("a", "eth0", VNS[0], ())
    undo_shutdown = d.set_state("a", "down")  # in flight ...
    d.associate("a", VNS[0], (AddressEntry(mac=MACS[0]),))  # ... while this is applied
    undo_shutdown()  # the NVE refused the shutdown
    assert d.vnics["a"].state == "up"
    assert MACS[0] in d.vnics["a"].vns[VNS[0]].macs


def test_undoing_a_connect_keeps_the_other_vn_and_its_addresses() -> None:
    d = DesiredState()
    undo_blue = d.connect("a", "eth0", VNS[0], ())
    d.connect("a", "eth0", VNS[1], ())
    d.associate("a", VNS[1], (AddressEntry(mac=MACS[1]),))
    undo_blue()
    assert list(d.vnics["a"].vns) == [VNS[1]]
    assert MACS[1] in d.vnics["a"].vns[VNS[1]].macs


def test_undoing_a_remove_does_not_replace_a_vnic_created_again() -> None:
    d = DesiredState()
    d.connect("a", "eth0", VNS[0], ())
    undo_remove = d.remove("a")
    d.connect("a", "eth1", VNS[1], ())
    undo_remove()
    assert d.vnics["a"].port == "eth1"
    assert list(d.vnics["a"].vns) == [VNS[1]]


def test_undoing_a_disconnect_of_the_last_vn_brings_the_vnic_back() -> None:
    d = DesiredState()
    d.connect("a", "eth0", VNS[0], ())
    d.associate("a", VNS[0], (AddressEntry(mac=MACS[0], ips=(IPS[0],)),))
    d.set_state("a", "down")
    undo = d.disconnect("a", VNS[0])
    assert "a" not in d.vnics
    undo()
    assert d.vnics["a"].state == "down"
    assert d.vnics["a"].vns[VNS[0]].macs == {MACS[0]: {IPS[0]}}
