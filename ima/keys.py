"""The etcd key layout, in one place (documented in docs/etcd-layout.md).

Every key lives under one root (``/nvo3/`` by default) so that
``etcdctl get --prefix /nvo3/`` shows the whole system.  All variable parts
are validated tokens (UUIDs, integers, normalized MACs and IPs) so no input
can inject ``/`` or ``..`` into a key; an IP prefix's ``/`` is spelled ``_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.types import ip_key

DEFAULT_ROOT = "/nvo3/"


@dataclass(frozen=True)
class KeyLayout:
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not (self.root.startswith("/") and self.root.endswith("/")):
            raise ValueError(f"key root must start and end with '/': {self.root!r}")

    # VN registry [2, 4.1]
    def vn_name(self, name: str) -> str:
        return f"{self.root}vn/name/{name}"

    def vn_names_prefix(self) -> str:
        return f"{self.root}vn/name/"

    def vn_id(self, vn_id: int) -> str:
        return f"{self.root}vn/id/{vn_id}"

    def vn_alias(self, alias: str) -> str:
        return f"{self.root}vn/alias/{alias}"

    def vn_vni(self, vni: int) -> str:
        return f"{self.root}vn/vni/{vni}"

    def vn_profile(self, name: str) -> str:
        return f"{self.root}vn/profile/{name}"

    def vn_profiles_prefix(self) -> str:
        return f"{self.root}vn/profile/"

    # Which NVEs serve a VN (have a local VNIC in it), held by each NVE's lease [4.1]
    def vn_attached(self, name: str, nve_id: str) -> str:
        return f"{self.root}vn/attached/{name}/{nve_id}"

    def vn_attached_prefix(self, name: str) -> str:
        return f"{self.root}vn/attached/{name}/"

    # Placement of VNICs on hypervisors [5]
    def placement(self, vnic: str) -> str:
        return f"{self.root}placement/{vnic}"

    def placements_prefix(self) -> str:
        return f"{self.root}placement/"

    # Address mappings [4.2]
    def map_prefix(self, vn: str) -> str:
        return f"{self.root}map/{vn}/"

    def all_maps_prefix(self) -> str:
        return f"{self.root}map/"

    def mac(self, vn: str, mac: str) -> str:
        return f"{self.root}map/{vn}/mac/{mac}"

    def ip(self, vn: str, ip: str) -> str:
        return f"{self.root}map/{vn}/ip/{ip_key(ip)}"

    def parse_map_key(self, key: str) -> tuple[str, Literal["mac", "ip"], str] | None:
        """(vn, kind, address-key) of a mapping key, or None if it is not one."""
        prefix = self.all_maps_prefix()
        if not key.startswith(prefix):
            return None
        parts = key[len(prefix) :].split("/")
        if len(parts) != 3 or parts[1] not in ("mac", "ip"):
            return None
        kind: Literal["mac", "ip"] = "mac" if parts[1] == "mac" else "ip"
        return parts[0], kind, parts[2]

    # NVE liveness
    def nve(self, nve_id: str) -> str:
        return f"{self.root}nve/{nve_id}"

    def nves_prefix(self) -> str:
        return f"{self.root}nve/"
