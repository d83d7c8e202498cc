"""Operator and IMA requests: the VN registry over NATS [2, 4.1, 4.5]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import PROTOCOL_VERSION, Strict
from schemas.messages import AddressEntry, ServiceType, VnRef
from schemas.profile import VnProfile
from schemas.records import Placement, VnMembers, VnRecord
from schemas.types import Alias, HypervisorId, PortId, VnicName, VnId, VnName


class VnCreate(Strict):
    """Create (or find, if an identical one exists) a VN and allocate its context."""

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["vn_create"] = "vn_create"
    alias: Alias
    name: VnName | None = None
    vn_id: VnId | None = None
    service: ServiceType = "l2"
    members: VnMembers = Field(default_factory=VnMembers)


class PlacementSet(Strict):
    """Record where a VNIC runs (orchestrator/operator); NVEs may enforce it [5]."""

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["placement_set"] = "placement_set"
    vnic: VnicName
    hypervisor: HypervisorId


class PlacementReply(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["placement"] = "placement"
    placement: Placement
    revision: int = 0


class VnGet(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["vn_get"] = "vn_get"
    vn: VnRef


class VnDelete(Strict):
    """Remove a VN from the registry (refused with vn_in_use while addresses are bound)."""

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["vn_delete"] = "vn_delete"
    vn: VnRef


class VnList(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["vn_list"] = "vn_list"


class VnReply(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["vn"] = "vn"
    vn: VnRecord
    created: bool = False


class VnListReply(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["vn_list"] = "vn_list"
    vns: list[VnRecord] = Field(default_factory=list)


class TablesQuery(Strict):
    """``nvo3 nve tables``; an empty payload is the same as the defaults."""

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["tables_query"] = "tables_query"
    #: Stage latencies (``stages_ms``) only over requests received after this time (ns,
    #: the NVE's clock); 0: its last 10 000 requests.
    stages_since_ns: int = Field(default=0, ge=0)


class ProfileSet(Strict):
    """Set a VN's profile [4.5]; NVEs serving the VN get it through their watch."""

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["profile_set"] = "profile_set"
    vn: VnRef
    profile: VnProfile


class ProfileGet(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["profile_get"] = "profile_get"
    vn: VnRef


class ProfileReply(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["profile"] = "profile"
    vn: VnName
    profile: VnProfile | None = None


class AgentCommand(Strict):
    """An operator's VNIC operation, executed by a hypervisor's agent (``nvo3 agent ctl``).

    The agent records it in its desired state and sends the protocol message
    itself, so the NVE still sees the hypervisor as the sender [4].
    """

    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["agent_command"] = "agent_command"
    op: Literal["connect", "disconnect", "associate", "disassociate", "shutdown", "startup",
                "remove", "depart", "prepare", "arrive"]
    vnic: VnicName
    port: PortId | None = None
    vn: VnRef | None = None
    entries: tuple[AddressEntry, ...] = Field(default=(), max_length=4096)
