"""The agent's inventory: what VNICs this hypervisor has, and where they connect.

Loaded from a JSON or YAML file (or built by the demo).  It is the agent's
desired state; the agent turns it into protocol messages [4.1-4.4].
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import orjson
import yaml
from pydantic import Field

from schemas.base import Strict
from schemas.messages import AddressEntry, VnRef
from schemas.types import Alias, HypervisorId, NveId, PortId, VnicName


class VnicVn(Strict):
    vn: VnRef
    addresses: tuple[AddressEntry, ...] = ()


class VnicSpec(Strict):
    name: VnicName
    vm: str = ""
    port: PortId
    state: Literal["up", "down"] = "up"
    vns: tuple[VnicVn, ...] = Field(min_length=1)  # each VNIC attaches to >= 1 VN [3.1]


class Inventory(Strict):
    hypervisor: HypervisorId
    nve: NveId  # the default NVE
    # RFC 8394: other NVEs for some VNs, by VN alias (e.g. {"red": "nve2"}).
    routes: dict[Alias, NveId] = Field(default_factory=dict)
    vnics: tuple[VnicSpec, ...] = ()


def load_inventory(path: Path) -> Inventory:
    text = path.read_bytes()
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else orjson.loads(text)
    return Inventory.model_validate(data)
