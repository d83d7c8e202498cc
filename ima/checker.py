"""The consistency checker: intended state versus what every NVE and etcd hold.

Pure comparison, no I/O.  The intended state comes from the agents (what
each hypervisor wants each NVE to hold) and the VN registry; the observed
state from each NVE's tables and the IMA's mapping keys.  After quiescence:

* lost  - in the intended state but missing somewhere (IMA, an NVE's local
  table, or the remote table of an NVE serving that VN);
* stale - present somewhere but not intended (or pointing at the wrong NVE);
* wrong_vni - a binding whose VN context differs from the registry's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.types import ip_key

Binding = tuple[str, str, str]  # (vn name, "mac" | "ip", address key)


@dataclass
class CheckReport:
    lost: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    wrong_vni: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stale or self.wrong_vni)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lost": len(self.lost),
            "stale": len(self.stale),
            "wrong_vni": len(self.wrong_vni),
            "differences": {"lost": self.lost, "stale": self.stale, "wrong_vni": self.wrong_vni},
        }


def _fmt(b: Binding, nve: str, where: str) -> str:
    return f"{where}: {b[0]} {b[1]}/{b[2]} @ {nve}"


def intended(
    agents: Iterable[Mapping[str, Any]], resolve: Mapping[str, str]
) -> tuple[dict[Binding, str], dict[str, set[str]]]:
    """(binding -> owning NVE, NVE -> VNs it serves) from the agents' states.

    ``resolve`` maps ``str(VnRef)``-style keys ("alias=blue", "name=..", "id=7")
    to VN names.
    """
    owner: dict[Binding, str] = {}
    serves: dict[str, set[str]] = {}
    for agent in agents:
        for nve, vnics in agent["nves"].items():
            for vnic in vnics:
                for spec in vnic["vns"]:
                    ref = spec["vn"]
                    key = next(f"{k}={v}" for k, v in ref.items() if v is not None)
                    vn = resolve.get(key, f"<unknown VN {key}>")  # e.g. deleted meanwhile
                    serves.setdefault(nve, set()).add(vn)
                    if vnic.get("state", "up") != "up":
                        continue
                    for entry in spec.get("entries", ()):
                        owner[(vn, "mac", entry["mac"])] = nve
                        for ip in entry.get("ips", ()):
                            owner[(vn, "ip", ip_key(ip))] = nve
    return owner, serves


def check(
    want: Mapping[Binding, str],
    serves: Mapping[str, set[str]],
    ima: Mapping[Binding, tuple[str, int]],
    tables: Mapping[str, Mapping[str, Any]],
    vnis: Mapping[str, int],
) -> CheckReport:
    """Compare; ``ima`` maps binding -> (nve, vni), ``tables`` is NVE -> its tables."""
    report = CheckReport()
    for b, nve in sorted(want.items()):
        held = ima.get(b)
        if held is None or held[0] != nve:
            report.lost.append(_fmt(b, nve, "ima"))
    for b, (nve, vni) in sorted(ima.items()):
        if want.get(b) != nve:
            report.stale.append(_fmt(b, nve, "ima"))
        if vnis.get(b[0]) not in (None, vni):
            report.wrong_vni.append(_fmt(b, nve, "ima") + f" vni={vni}")
    for nve_id, snap in sorted(tables.items()):
        local = _local(snap)
        mine = {b for b, n in want.items() if n == nve_id}
        report.lost.extend(_fmt(b, nve_id, f"{nve_id}.local") for b in sorted(mine - local))
        report.stale.extend(_fmt(b, nve_id, f"{nve_id}.local") for b in sorted(local - mine))
        remote = _remote(snap)
        served = serves.get(nve_id, set())
        expected = {b: n for b, n in want.items() if n != nve_id and b[0] in served}
        for b, n in sorted(expected.items()):
            if remote.get(b, (None, 0))[0] != n:
                report.lost.append(_fmt(b, n, f"{nve_id}.remote"))
        for b, (n, vni) in sorted(remote.items()):
            if expected.get(b) != n:
                report.stale.append(_fmt(b, n, f"{nve_id}.remote"))
            if vnis.get(b[0]) not in (None, vni):
                report.wrong_vni.append(_fmt(b, n, f"{nve_id}.remote") + f" vni={vni}")
    return report


def _local(snap: Mapping[str, Any]) -> set[Binding]:
    out: set[Binding] = set()
    for vnic in snap["vnics"].values():
        if not vnic.get("published", vnic["state"] == "up"):
            continue
        for vn, att in vnic["vns"].items():
            for mac, ips in att["macs"].items():
                out.add((vn, "mac", mac))
                out.update((vn, "ip", ip_key(ip)) for ip in ips)
    return out


def _remote(snap: Mapping[str, Any]) -> dict[Binding, tuple[str, int]]:
    out: dict[Binding, tuple[str, int]] = {}
    for vn, r in snap["remote"].items():
        for entry, b in r["entries"].items():
            kind, _, addr = entry.partition("/")
            out[(vn, kind, addr)] = (b["nve"], b["vni"])
    return out
