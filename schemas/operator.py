"""Operator and IMA requests: the VN registry over NATS [2, 4.1, 4.5]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import PROTOCOL_VERSION, Strict
from schemas.messages import ServiceType, VnRef
from schemas.profile import VnProfile
from schemas.records import Placement, VnMembers, VnRecord
from schemas.types import Alias, HypervisorId, VnicName, VnId, VnName


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
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["tables_query"] = "tables_query"


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
