"""What the pure NVE core asks its service to do; the service does the I/O.

The core never touches etcd or NATS: it returns these values and the asyncio
service turns binding effects into IMA writes and watch effects into etcd
watches (draft 4.2-4.4: the NVE signals address bindings to the IMA).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.records import IpBinding, MacBinding


@dataclass(frozen=True, slots=True)
class BindMac:
    """Publish a binding.  ``claim``: take it over from whichever NVE holds it
    (a migration arrival), with the mobility rules of ``ima.mobility``."""

    binding: MacBinding
    claim: bool = False


@dataclass(frozen=True, slots=True)
class BindIp:
    binding: IpBinding
    claim: bool = False


@dataclass(frozen=True, slots=True)
class UnbindMac:
    vn: str
    mac: str


@dataclass(frozen=True, slots=True)
class UnbindIp:
    vn: str
    ip: str


@dataclass(frozen=True, slots=True)
class StartWatch:
    """First local VNIC joined the VN: learn its remote mappings."""

    vn: str


@dataclass(frozen=True, slots=True)
class StopWatch:
    """Last local VNIC left the VN: stop learning it and forget its remotes."""

    vn: str


ImaEffect = BindMac | BindIp | UnbindMac | UnbindIp
Effect = ImaEffect | StartWatch | StopWatch
