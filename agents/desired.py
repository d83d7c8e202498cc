"""What the hypervisor wants its NVEs to hold: the agent's own source of truth.

Every operation first records its intent here, then is sent.  If the NVE is
unreachable the intent stays, and the next ``hv_sync`` (sent when the NVE
announces a new epoch, or when the agent restarts) delivers it: nothing an
agent emits while its NVE is down is lost.  A request the NVE refuses is
rolled back here, so the desired state never holds what the NVE said no to.
Pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from schemas.messages import AddressEntry, SyncVnic, VnAddresses, VnRef


@dataclass
class DesiredVn:
    macs: dict[str, set[str]] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()


@dataclass
class DesiredVnic:
    port: str
    state: Literal["up", "down"] = "up"
    vns: dict[VnRef, DesiredVn] = field(default_factory=dict)


#: Puts back what one change did, and only that (see ``DesiredState``).
Undo = Callable[[], None]


def _nothing() -> None:
    return None


@dataclass
class DesiredState:
    """The agent's intent, changed before each request is sent.

    Every change returns its ``Undo``, which the agent runs if the NVE refuses the
    request. An undo restores only the fields that change touched (the VN it
    connected, the MACs it named, the state it set), so it never erases another
    request for the same VNIC made while this one was in flight, which a restore of
    a whole-VNIC snapshot would.
    """

    vnics: dict[str, DesiredVnic] = field(default_factory=dict)

    def connect(self, vnic: str, port: str, vn: VnRef, allowed: tuple[str, ...]) -> Undo:
        created = vnic not in self.vnics
        entry = self.vnics.setdefault(vnic, DesiredVnic(port))
        if vn in entry.vns:
            return _nothing
        entry.vns[vn] = DesiredVn(allowed=allowed)

        def undo() -> None:
            now = self.vnics.get(vnic)
            if now is not None:
                now.vns.pop(vn, None)
                if created and not now.vns:
                    del self.vnics[vnic]

        return undo

    def disconnect(self, vnic: str, vn: VnRef) -> Undo:
        entry = self.vnics.get(vnic)
        if entry is None or vn not in entry.vns:
            return _nothing
        saved, port, state = entry.vns.pop(vn), entry.port, entry.state
        if not entry.vns:
            del self.vnics[vnic]

        def undo() -> None:
            now = self.vnics.setdefault(vnic, DesiredVnic(port, state))
            now.vns.setdefault(vn, saved)

        return undo

    def _macs(self, vnic: str, vn: VnRef) -> dict[str, set[str]] | None:
        entry = self.vnics.get(vnic)
        wanted = None if entry is None else entry.vns.get(vn)
        return None if wanted is None else wanted.macs

    def _keep_macs(self, vnic: str, vn: VnRef, names: Iterable[str]) -> Undo:
        """An undo that puts the named MACs of (vnic, vn) back as they are now.

        O(MACs named), not a copy of the VNIC (which may carry thousands of MACs)."""
        macs = self._macs(vnic, vn)
        if macs is None:
            return _nothing
        saved = {m: (set(macs[m]) if m in macs else None) for m in names}

        def undo() -> None:
            for mac, ips in saved.items():
                if ips is None:
                    macs.pop(mac, None)
                else:
                    macs[mac] = ips

        return undo

    def associate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> Undo:
        undo = self._keep_macs(vnic, vn, (e.mac for e in entries))
        macs = self._macs(vnic, vn)
        if macs is not None:
            for e in entries:
                macs.setdefault(e.mac, set()).update(e.ips)
        return undo

    def disassociate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> Undo:
        undo = self._keep_macs(vnic, vn, (e.mac for e in entries))
        macs = self._macs(vnic, vn)
        if macs is not None:
            for e in entries:
                if not e.ips:
                    macs.pop(e.mac, None)
                elif e.mac in macs:
                    macs[e.mac].difference_update(e.ips)
        return undo

    def replace(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> Undo:
        macs = self._macs(vnic, vn)
        if macs is None:
            return _nothing
        undo = self._keep_macs(vnic, vn, {*macs, *(e.mac for e in entries)})
        macs.clear()
        macs.update({e.mac: set(e.ips) for e in entries})
        return undo

    def remove(self, vnic: str) -> Undo:
        saved = self.vnics.pop(vnic, None)
        if saved is None:
            return _nothing

        def undo() -> None:
            self.vnics.setdefault(vnic, saved)  # unless re-created meanwhile

        return undo

    def set_state(self, vnic: str, state: Literal["up", "down"]) -> Undo:
        entry = self.vnics.get(vnic)
        if entry is None:
            return _nothing
        before, entry.state = entry.state, state

        def undo() -> None:
            now = self.vnics.get(vnic)
            if now is not None and now.state == state:
                now.state = before

        return undo

    def arrive(self, vnic: str, port: str, vns: tuple[VnAddresses, ...]) -> None:
        entry = self.vnics.get(vnic)
        if entry is None:
            entry = self.vnics[vnic] = DesiredVnic(port)
        entry.port = port
        entry.state = "up"
        for spec in vns:
            entry.vns[spec.vn] = DesiredVn(
                {e.mac: set(e.ips) for e in spec.entries}, spec.allowed
            )

    def for_nve(
        self, owns: Callable[[VnRef], bool], names: Iterable[str] | None = None
    ) -> list[SyncVnic]:
        """The ``hv_sync`` view for one NVE; ``owns(vn_ref) -> bool`` picks its VNs.

        ``names`` limits it to those VNICs (the ones still present), in that order.
        """
        out = []
        if names is None:
            items = sorted(self.vnics.items())
        else:
            items = [(n, self.vnics[n]) for n in names if n in self.vnics]
        for name, entry in items:
            vns = tuple(
                VnAddresses(
                    vn=vn,
                    entries=tuple(
                        AddressEntry(mac=m, ips=tuple(sorted(ips)))
                        for m, ips in sorted(d.macs.items())
                    ),
                    allowed=d.allowed,
                )
                for vn, d in entry.vns.items()
                if owns(vn)
            )
            if vns:
                out.append(SyncVnic(vnic=name, port=entry.port, state=entry.state, vns=vns))
        return out
