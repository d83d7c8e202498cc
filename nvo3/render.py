"""Readable text for operators; ``--json`` callers get the raw structures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.records import VnRecord


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def vn_table(vns: Sequence[VnRecord]) -> str:
    rows = [(v.alias, v.name, v.vn_id, v.vni, v.service) for v in vns]
    return table(("ALIAS", "NAME", "VN ID", "VNI", "SERVICE"), rows)


def nve_tables(snapshot: dict[str, Any]) -> str:
    out = [f"NVE {snapshot['nve']} (underlay {snapshot['underlay']})"]
    if "truncated" in snapshot:
        out.append(f"  {snapshot['truncated']} (sizes: {snapshot.get('sizes')})")
        return "\n".join(out)
    local_rows = []
    for vnic, v in snapshot["vnics"].items():
        for att in v["vns"].values():
            macs = att["macs"] or {"-": []}
            for mac, ips in macs.items():
                local_rows.append((vnic[:8], v["hypervisor"], v["port"], v["state"],
                                   att["alias"], att["vni"], att["tag"], mac,
                                   ",".join(ips) or "-"))
    out.append("  local (VNIC -> VN -> MAC -> IP):")
    out.append(_indent(table(("VNIC", "HV", "PORT", "STATE", "VN", "VNI", "TAG", "MAC", "IPS"),
                             local_rows)))
    port_rows = [(scope, tag, vn[:8]) for scope, tags in snapshot["ports"].items()
                 for tag, vn in tags.items()]
    out.append("  802.1Q tags per port:")
    out.append(_indent(table(("PORT", "TAG", "VN"), port_rows)))
    remote_rows = []
    for r in snapshot["remote"].values():
        for entry, b in r["entries"].items():
            remote_rows.append((b["vni"], entry, b.get("mac", "-"), b["nve"], b["underlay"]))
    out.append("  remote (learned from the IMA):")
    out.append(_indent(table(("VNI", "ENTRY", "MAC", "NVE", "UNDERLAY"), remote_rows)))
    counters = snapshot.get("counters", {})
    if counters:
        out.append("  counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    return "\n".join(out)


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())
