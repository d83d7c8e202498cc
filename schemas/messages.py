"""Hypervisor-to-NVE protocol messages (draft section 4) and their replies.

Every request carries the same envelope: ``v`` (protocol version), ``kind``
(the discriminator), ``sender`` (hypervisor id, also a token of the NATS
subject), ``seq`` (per-sender sequence number, for idempotent replay) and
``ts_ns`` (publish time, for propagation telemetry) and optionally ``trace`` (a
trace id the agent chose; the NVE logs it, writes it into the bindings the
event creates, and the remote NVE logs it when it learns them).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.base import PROTOCOL_VERSION, Strict
from schemas.errors import ErrorCode
from schemas.profile import VnProfile
from schemas.types import (
    Alias,
    HypervisorId,
    IpEntry,
    Mac,
    NveId,
    PortId,
    Seq,
    Tag,
    TimestampNs,
    TraceId,
    Vni,
    VnicName,
    VnId,
    VnName,
)

ServiceType = Literal["l2", "l3"]


class VnRef(Strict):
    """A VN named by exactly one of Name (UUID), VN ID or Alias [2, 4.1]."""

    name: VnName | None = None
    id: VnId | None = None
    alias: Alias | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VnRef:
        given = [f for f in ("name", "id", "alias") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("a VN reference needs exactly one of name, id, alias")
        return self

    def __str__(self) -> str:
        if self.name is not None:
            return f"name={self.name}"
        if self.id is not None:
            return f"id={self.id}"
        return f"alias={self.alias}"


class AddressEntry(Strict):
    """One MAC and the IPs (hosts or prefixes) reachable behind it [3.1, 4.2]."""

    mac: Mac
    ips: tuple[IpEntry, ...] = Field(default=(), max_length=1024)

    @model_validator(mode="after")
    def _unique_ips(self) -> AddressEntry:
        if len(set(self.ips)) != len(self.ips):
            raise ValueError(f"duplicate IP entries for MAC {self.mac}")
        return self


class Envelope(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    sender: HypervisorId
    seq: Seq
    ts_ns: TimestampNs = 0
    trace: TraceId | None = None  # follows the event to the remote NVE's log


class VnConnect(Envelope):
    """Attach a VNIC on a port to a VN; the reply carries the local tag [4.1].

    ``allowed`` lists the prefixes this VNIC may use in the VN; gleaned
    addresses outside them are refused (an empty tuple means no restriction).
    """

    kind: Literal["vn_connect"] = "vn_connect"
    vnic: VnicName
    port: PortId
    vn: VnRef
    allowed: tuple[IpEntry, ...] = Field(default=(), max_length=256)


class VnDisconnect(Envelope):
    """Detach a VNIC from one VN; everything under it goes too [3.1, 4.1]."""

    kind: Literal["vn_disconnect"] = "vn_disconnect"
    vnic: VnicName
    vn: VnRef


def _entries_unique(entries: tuple[AddressEntry, ...]) -> tuple[AddressEntry, ...]:
    macs = [e.mac for e in entries]
    if len(set(macs)) != len(macs):
        raise ValueError("a MAC may appear only once per message")
    return entries


Entries = Annotated[tuple[AddressEntry, ...], Field(min_length=1, max_length=4096)]


class AddrAssociate(Envelope):
    """Associate MACs (and IPs under them) with a VNIC in a VN [4.2]."""

    kind: Literal["addr_associate"] = "addr_associate"
    vnic: VnicName
    vn: VnRef
    entries: Entries

    @model_validator(mode="after")
    def _check(self) -> AddrAssociate:
        _entries_unique(self.entries)
        return self


class AddrDisassociate(Envelope):
    """Remove addresses [4.3]: an entry with no IPs removes the MAC and its IPs."""

    kind: Literal["addr_disassociate"] = "addr_disassociate"
    vnic: VnicName
    vn: VnRef
    entries: Entries

    @model_validator(mode="after")
    def _check(self) -> AddrDisassociate:
        _entries_unique(self.entries)
        return self


class VnicDisassociate(Envelope):
    """Remove a whole VNIC, all its VNs and addresses, in one message [4.3]."""

    kind: Literal["vnic_disassociate"] = "vnic_disassociate"
    vnic: VnicName


class VnicShutdown(Envelope):
    """The VNIC stopped: withdraw its bindings from the IMA, keep its tree [4.4]."""

    kind: Literal["vnic_shutdown"] = "vnic_shutdown"
    vnic: VnicName


class VnicStartup(Envelope):
    """The VNIC is back: re-publish the bindings kept since shutdown [4.4]."""

    kind: Literal["vnic_startup"] = "vnic_startup"
    vnic: VnicName


class VnAddresses(Strict):
    """One VN of a VNIC and the addresses behind it (migration messages)."""

    vn: VnRef
    entries: tuple[AddressEntry, ...] = Field(default=(), max_length=4096)
    allowed: tuple[IpEntry, ...] = Field(default=(), max_length=256)


class VnicPrepare(Envelope):
    """Pre-arrival handshake [4.4]: the destination announces a VNIC before it moves.

    The NVE allocates tags on the new port and starts learning the VNs, but
    writes nothing to the IMA until ``vnic_arrive``.
    """

    kind: Literal["vnic_prepare"] = "vnic_prepare"
    vnic: VnicName
    port: PortId
    vns: tuple[VnAddresses, ...] = Field(min_length=1, max_length=64)


class VnicArrive(Envelope):
    """Migration arrival [4.4]; ``vns`` may be empty after a prepare or a departure."""

    kind: Literal["vnic_arrive"] = "vnic_arrive"
    vnic: VnicName
    port: PortId
    vns: tuple[VnAddresses, ...] = Field(default=(), max_length=64)


class VnicDepart(Envelope):
    """Migration departure [4.3, 4.4]: unlike shutdown, the bindings are held."""

    kind: Literal["vnic_depart"] = "vnic_depart"
    vnic: VnicName


class AddrReplace(Envelope):
    """Set a VNIC's whole address set in a VN; the NVE writes only the diff [4.2]."""

    kind: Literal["addr_replace"] = "addr_replace"
    vnic: VnicName
    vn: VnRef
    entries: tuple[AddressEntry, ...] = Field(default=(), max_length=4096)

    @model_validator(mode="after")
    def _check(self) -> AddrReplace:
        _entries_unique(self.entries)
        return self


class SyncVnic(Strict):
    """One VNIC as the hypervisor has it now (for ``hv_sync``)."""

    vnic: VnicName
    port: PortId
    state: Literal["up", "down"] = "up"
    vns: tuple[VnAddresses, ...] = Field(min_length=1, max_length=64)


class HvSync(Envelope):
    """The hypervisor's full state for this NVE, in parts (after an NVE restart).

    The NVE reconciles: adds what is missing, removes what the hypervisor no
    longer has (once the ``last`` part of ``sync_id`` arrives), and writes to
    the IMA only what differs.
    """

    kind: Literal["hv_sync"] = "hv_sync"
    sync_id: int = Field(ge=0)
    last: bool = True
    vnics: tuple[SyncVnic, ...] = Field(default=(), max_length=2000)


HypervisorMessage = Annotated[
    VnConnect
    | VnDisconnect
    | AddrAssociate
    | AddrDisassociate
    | VnicDisassociate
    | VnicShutdown
    | VnicStartup
    | VnicPrepare
    | VnicArrive
    | VnicDepart
    | AddrReplace
    | HvSync,
    Field(discriminator="kind"),
]

HYPERVISOR_KINDS: tuple[str, ...] = (
    "vn_connect",
    "vn_disconnect",
    "addr_associate",
    "addr_disassociate",
    "vnic_disassociate",
    "vnic_shutdown",
    "vnic_startup",
    "vnic_prepare",
    "vnic_arrive",
    "vnic_depart",
    "addr_replace",
    "hv_sync",
)


class AddrObserved(Strict):
    """A source MAC (and IP) seen by the NVE's data path on a port/tag [4.2, way 1].

    Not a hypervisor request: the NVE's own data path reports it, on
    ``<root>.v1.nve.<nve>.dp.observed``.
    """

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["addr_observed"] = "addr_observed"
    hypervisor: HypervisorId
    port: PortId
    tag: Tag
    mac: Mac
    ip: IpEntry | None = None
    ts_ns: TimestampNs = 0


class ConnectResult(Strict):
    """What a hypervisor needs to send frames for a VN: the local tag [4.1]."""

    tag: Tag
    vn_name: VnName
    vn_id: VnId
    vni: Vni
    service: ServiceType
    profile: VnProfile | None = None


class OkReply(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["ok"] = "ok"
    seq: Seq | None = None
    op: str
    result: ConnectResult | None = None
    results: tuple[ConnectResult, ...] = ()  # one per VN (vnic_prepare, vnic_arrive)
    ima_ops: int = 0  # IMA writes this request caused (signalling, counted)
    refused: dict[str, str] = Field(default_factory=dict)  # hv_sync: vnic -> "code: reason"
    epoch: int = 0  # the answering NVE's epoch: a change means it restarted


class EpochAnnounce(Strict):
    """An NVE (re)started: agents answer a new epoch with ``hv_sync``."""

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["epoch"] = "epoch"
    nve: NveId
    epoch: int
    resync: int = 0  # changes when the NVE lost requests (slow consumer): resync too


class ErrorReply(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["error"] = "error"
    seq: Seq | None = None
    code: ErrorCode
    reason: str
    details: dict[str, str] = Field(default_factory=dict)


Reply = Annotated[OkReply | ErrorReply, Field(discriminator="kind")]
