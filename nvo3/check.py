"""``nvo3 check``: gather the intended and observed state, then compare.

NVEs are found from their liveness keys in the IMA; hypervisors from the
NVEs' tables plus any named with ``--agents`` (an agent whose NVE lost
everything is only found if named).
"""

from __future__ import annotations

from typing import Any

import orjson
from nats.aio.client import Client as Nats

from ima.checker import Binding, CheckReport, check, intended
from ima.registry import VnRegistry
from ima.store import EtcdStore
from nvo3.connect import Endpoints


async def gather_and_check(
    nc: Nats, store: EtcdStore, ep: Endpoints, agents: list[str] | None = None,
    request_timeout: float = 5.0,
) -> CheckReport:
    layout, subjects = ep.layout, ep.subjects
    nve_items, _ = await store.get_prefix(layout.nves_prefix())
    nves = sorted(kv.key.rsplit("/", 1)[-1] for kv in nve_items)
    tables: dict[str, dict[str, Any]] = {}
    for nve in nves:
        msg = await nc.request(subjects.nve_tables(nve), b"{}", timeout=request_timeout)
        tables[nve] = orjson.loads(msg.data)
    hypervisors = set(agents or ())
    for snap in tables.values():
        hypervisors.update(v["hypervisor"] for v in snap["vnics"].values())
    states = []
    for hv in sorted(hypervisors):
        msg = await nc.request(subjects.agent_state(hv), b"{}", timeout=request_timeout)
        states.append(orjson.loads(msg.data))
    records = await VnRegistry(store, layout).list()
    resolve: dict[str, str] = {}
    for r in records:
        resolve[f"name={r.name}"] = r.name
        resolve[f"alias={r.alias}"] = r.name
        resolve[f"id={r.vn_id}"] = r.name
    want, serves = intended(states, resolve)
    items, _ = await store.get_prefix(layout.all_maps_prefix())
    ima: dict[Binding, tuple[str, int]] = {}
    for kv in items:
        parsed = layout.parse_map_key(kv.key)
        if parsed is None:
            continue
        value = orjson.loads(kv.value)
        ima[parsed] = (value["nve"], value["vni"])
    return check(want, serves, ima, tables, {r.name: r.vni for r in records})
