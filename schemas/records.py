"""Records stored in etcd by the IMA (layout in docs/etcd-layout.md).

Values are JSON so that ``etcdctl get --prefix /nvo3/`` is a real inspection
tool.  Every record carries ``v`` so a later layout change can be detected.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import PROTOCOL_VERSION, Strict
from schemas.messages import ServiceType
from schemas.types import (
    Alias,
    HypervisorId,
    IpEntry,
    Mac,
    NveEpoch,
    NveId,
    RecordTrace,
    TimestampNs,
    UnderlayIp,
    Vni,
    VnicName,
    VnId,
    VnName,
)


class VnMembers(Strict):
    """Who may join a VN [5]; an empty tuple means "anyone" for that dimension."""

    hypervisors: tuple[HypervisorId, ...] = Field(default=(), max_length=4096)
    vnics: tuple[VnicName, ...] = Field(default=(), max_length=65536)

    def admits(self, hypervisor: str, vnic: str) -> bool:
        return (not self.hypervisors or hypervisor in self.hypervisors) and (
            not self.vnics or vnic in self.vnics
        )


class VnRecord(Strict):
    """The registry entry of a VN: Name <-> ID one-to-one, Alias, VN context [2, 4.1]."""

    v: Literal[1] = PROTOCOL_VERSION
    name: VnName
    vn_id: VnId
    alias: Alias
    vni: Vni
    service: ServiceType = "l2"
    created_ns: TimestampNs = 0
    members: VnMembers = Field(default_factory=VnMembers)


class Placement(Strict):
    """Where a VNIC runs, written by the orchestrator/operator [5].

    An NVE that enforces placement accepts a VNIC only from this hypervisor;
    a migration updates it before the VNIC arrives.
    """

    v: Literal[1] = PROTOCOL_VERSION
    vnic: VnicName
    hypervisor: HypervisorId


class VnPointer(Strict):
    """Secondary index value (by id, alias or VNI) pointing to the VN Name."""

    v: Literal[1] = PROTOCOL_VERSION
    name: VnName


class MacBinding(Strict):
    """(VN, MAC) -> the NVE (and its underlay address) that reaches it [4.2].

    Liveness and ownership are separate: the binding is attached to the NVE's
    etcd lease (it disappears with a dead NVE), and ``epoch`` names the NVE
    incarnation that wrote it.  Once an NVE has restarted (a newer epoch in its
    ``NveRecord``), remote NVEs ignore what an older incarnation left behind, and
    an old incarnation still running can never overwrite the new one's bindings.
    """

    v: Literal[1] = PROTOCOL_VERSION
    vn: VnName
    vni: Vni
    mac: Mac
    vnic: VnicName
    nve: NveId
    underlay: UnderlayIp
    epoch: NveEpoch = 0  # the owning NVE's incarnation (NveRecord.epoch) [issue 4]
    ts_ns: TimestampNs = 0  # the hypervisor's publish time, for propagation telemetry
    mobility_seq: int = Field(default=0, ge=0)  # EVPN MAC mobility (RFC 7432 s15)
    moves_ns: tuple[int, ...] = Field(default=(), max_length=16)  # recent move times
    trace: RecordTrace = ""  # trace id of the event that wrote it


class IpBinding(Strict):
    """(VN, IP or prefix) -> MAC and NVE; needed for an L3 service [3.1.2]."""

    v: Literal[1] = PROTOCOL_VERSION
    vn: VnName
    vni: Vni
    ip: IpEntry
    mac: Mac
    vnic: VnicName
    nve: NveId
    underlay: UnderlayIp
    epoch: NveEpoch = 0  # the owning NVE's incarnation (NveRecord.epoch) [issue 4]
    ts_ns: TimestampNs = 0
    mobility_seq: int = Field(default=0, ge=0)
    moves_ns: tuple[int, ...] = Field(default=(), max_length=16)
    trace: RecordTrace = ""


class VnAttachment(Strict):
    """An NVE serves this VN: at least one local VNIC is connected to it [4.1].

    Written when the first local VNIC joins, removed when the last leaves, and
    attached to the NVE's lease; ``nvo3 vn delete`` refuses while any exists,
    even if those VNICs have no address yet.
    """

    v: Literal[1] = PROTOCOL_VERSION
    vn: VnName
    nve: NveId
    epoch: NveEpoch = 0


class NveRecord(Strict):
    """Liveness of an NVE; held by its etcd lease, gone when the NVE dies."""

    v: Literal[1] = PROTOCOL_VERSION
    nve: NveId
    underlay: UnderlayIp
    epoch: NveEpoch
    started_ns: TimestampNs
