"""``nvo3 check``: gather the intended and observed state, then compare.

NVEs are found from their liveness keys in the IMA; hypervisors from the
NVEs' tables plus any named with ``--agents`` (an agent whose NVE lost
everything is only found if named).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.client import Client as Nats

from ima.checker import Binding, CheckReport, check, intended
from ima.keys import KeyLayout
from ima.registry import VnRegistry
from ima.store import EtcdStore
from nvo3.connect import Endpoints


@dataclass
class Gathered:
    """Everything the checker compared, as read (for ``check`` and post-mortems)."""

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # NVE -> its tables
    states: list[dict[str, Any]] = field(default_factory=list)  # each agent's state
    vns: list[dict[str, Any]] = field(default_factory=list)  # the VN registry
    #: every mapping key in etcd: key -> (value, mod revision, lease)
    mappings: dict[str, tuple[dict[str, Any], int, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "agents": self.states, "vns": self.vns,
                "mappings": self.mappings}


async def gather(
    nc: Nats, store: EtcdStore, ep: Endpoints, agents: list[str] | None = None,
    request_timeout: float = 5.0,
) -> Gathered:
    """Read the NVEs' tables, the agents' states, the registry and the mappings."""
    layout, subjects = ep.layout, ep.subjects
    got = Gathered()
    nve_items, _ = await store.get_prefix(layout.nves_prefix())
    nves = sorted(kv.key.rsplit("/", 1)[-1] for kv in nve_items)
    for nve in nves:
        msg = await nc.request(subjects.nve_tables(nve), b"{}", timeout=request_timeout)
        got.tables[nve] = orjson.loads(msg.data)
    hypervisors = set(agents or ())
    for snap in got.tables.values():
        hypervisors.update(v["hypervisor"] for v in snap["vnics"].values())
    for hv in sorted(hypervisors):
        msg = await nc.request(subjects.agent_state(hv), b"{}", timeout=request_timeout)
        got.states.append(orjson.loads(msg.data))
    got.vns = [r.model_dump(mode="json") for r in await VnRegistry(store, layout).list()]
    items, _ = await store.get_prefix(layout.all_maps_prefix())
    for kv in items:
        if layout.parse_map_key(kv.key) is not None:
            got.mappings[kv.key] = (orjson.loads(kv.value), kv.mod_revision, kv.lease)
    return got


def check_gathered(got: Gathered, layout: KeyLayout) -> CheckReport:
    resolve: dict[str, str] = {}
    for r in got.vns:
        resolve[f"name={r['name']}"] = r["name"]
        resolve[f"alias={r['alias']}"] = r["name"]
        resolve[f"id={r['vn_id']}"] = r["name"]
    want, serves = intended(got.states, resolve)
    ima: dict[Binding, tuple[str, int]] = {}
    for key, (value, _, _) in got.mappings.items():
        parsed = layout.parse_map_key(key)
        if parsed is not None:
            ima[parsed] = (value["nve"], value["vni"])
    return check(want, serves, ima, got.tables, {r["name"]: r["vni"] for r in got.vns})


async def gather_and_check(
    nc: Nats, store: EtcdStore, ep: Endpoints, agents: list[str] | None = None,
    request_timeout: float = 5.0,
) -> CheckReport:
    got = await gather(nc, store, ep, agents, request_timeout)
    return check_gathered(got, ep.layout)
