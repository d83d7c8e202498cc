"""VN profile [2, 4.5]: ACLs and QoS an NVE applies to a whole VN.

Stored by the IMA under ``<root>vn/profile/<vn name>``, returned with the VN
connect reply and pushed to every NVE serving the VN when it changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import PROTOCOL_VERSION, Strict
from schemas.types import IpEntry


class AclRule(Strict):
    action: Literal["permit", "deny"]
    protocol: Literal["any", "tcp", "udp", "icmp"] = "any"
    src: IpEntry | None = None
    dst: IpEntry | None = None
    dst_port: int | None = Field(default=None, ge=1, le=65535)


class Qos(Strict):
    rate_mbps: int | None = Field(default=None, ge=1, le=400_000)
    burst_kb: int | None = Field(default=None, ge=1, le=1_000_000)
    dscp: int | None = Field(default=None, ge=0, le=63)


class VnProfile(Strict):
    v: Literal[1] = PROTOCOL_VERSION
    acl: tuple[AclRule, ...] = Field(default=(), max_length=1024)
    qos: Qos = Field(default_factory=Qos)
    revision: int = 0  # etcd mod revision, filled in when read
