"""What the hypervisor wants its NVEs to hold: the agent's own source of truth.

Every operation first records its intent here, then is sent.  If the NVE is
unreachable the intent stays, and the next ``hv_sync`` (sent when the NVE
announces a new epoch, or when the agent restarts) delivers it: nothing an
agent emits while its NVE is down is lost.  A request the NVE refuses is
rolled back here, so the desired state never holds what the NVE said no to.
Pure data, no I/O.
"""

from __future__ import annotations

import copy
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


@dataclass
class DesiredState:
    vnics: dict[str, DesiredVnic] = field(default_factory=dict)

    def snapshot(self, vnic: str) -> DesiredVnic | None:
        current = self.vnics.get(vnic)
        return None if current is None else copy.deepcopy(current)

    def restore(self, vnic: str, saved: DesiredVnic | None) -> None:
        if saved is None:
            self.vnics.pop(vnic, None)
        else:
            self.vnics[vnic] = saved

    def connect(self, vnic: str, port: str, vn: VnRef, allowed: tuple[str, ...]) -> None:
        entry = self.vnics.setdefault(vnic, DesiredVnic(port))
        entry.vns.setdefault(vn, DesiredVn(allowed=allowed))

    def disconnect(self, vnic: str, vn: VnRef) -> None:
        entry = self.vnics.get(vnic)
        if entry is not None:
            entry.vns.pop(vn, None)
            if not entry.vns:
                del self.vnics[vnic]

    def associate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> None:
        entry = self.vnics.get(vnic)
        if entry is None or vn not in entry.vns:
            return
        macs = entry.vns[vn].macs
        for e in entries:
            macs.setdefault(e.mac, set()).update(e.ips)

    def disassociate(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> None:
        entry = self.vnics.get(vnic)
        if entry is None or vn not in entry.vns:
            return
        macs = entry.vns[vn].macs
        for e in entries:
            if not e.ips:
                macs.pop(e.mac, None)
            elif e.mac in macs:
                macs[e.mac].difference_update(e.ips)

    def replace(self, vnic: str, vn: VnRef, entries: tuple[AddressEntry, ...]) -> None:
        entry = self.vnics.get(vnic)
        if entry is not None and vn in entry.vns:
            entry.vns[vn].macs = {e.mac: set(e.ips) for e in entries}

    def remove(self, vnic: str) -> None:
        self.vnics.pop(vnic, None)

    def set_state(self, vnic: str, state: Literal["up", "down"]) -> None:
        entry = self.vnics.get(vnic)
        if entry is not None:
            entry.state = state

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
