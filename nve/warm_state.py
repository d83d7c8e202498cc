"""The warm-restart file: an NVE's remote tables and the etcd revision of each.

Issue 4: "if the NVE saved its tables and last etcd revision, it resumes
watches from that revision instead of re-listing".  A state saved at revision
R stays correct however old it is: the watch resumes at R+1 and replays what
happened since, or etcd says R was compacted and the VN is re-listed (counted).
So the file is written on a graceful stop and periodically while running,
always by an atomic rename after fsync: a crash leaves the previous file whole.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from nve.follower import decode_binding
from nve.remote import Binding, RemoteEntry, RemoteTable

Saved = dict[str, tuple[int, list[tuple[str, Binding]]]]  # vn -> (revision, entries)


def encode(nve_id: str, remote: RemoteTable) -> bytes:
    """The file's content, taken on the event loop so it is one consistent state.

    Each entry is written as the binding record it came from (minus the telemetry
    fields, which the table does not keep), so ``load`` validates it like any record.
    """
    state = {
        vn: {"revision": r.revision,
             "entries": {k: _record(vn, k, e) for k, e in r.entries.items()}}
        for vn, r in remote.vns.items() if r.revision
    }
    return orjson.dumps({"v": 2, "nve": nve_id, "remote": state})


def _record(vn: str, key: str, e: RemoteEntry) -> dict[str, Any]:
    kind, _, addr = key.partition("/")
    record: dict[str, Any] = {"v": 1, "vn": vn, "vni": e.vni, "mac": e.mac or addr,
                              "vnic": e.vnic, "nve": e.nve, "underlay": e.underlay,
                              "epoch": e.epoch}
    if kind == "ip":
        record["ip"] = addr.replace("_", "/")
    return record


def write(path: str, data: bytes) -> None:
    """Replace the file atomically (may run in a thread: it only touches the disk)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(path: str, nve_id: str, remote: RemoteTable) -> None:
    write(path, encode(nve_id, remote))


def load(path: str) -> Saved:
    """What ``save`` wrote; raises OSError/ValueError/KeyError/TypeError if unreadable.

    Every entry is validated again as a binding record (``decode_binding``): the
    file is input.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as fh:
        data = orjson.loads(fh.read())
    if data.get("v") != 2:
        raise ValueError(f"warm state version {data.get('v')!r}: this NVE writes 2")
    out: Saved = {}
    for vn, saved in data["remote"].items():
        items = [(entry, decode_binding(entry.partition("/")[0], orjson.dumps(b)))
                 for entry, b in saved["entries"].items()]
        out[vn] = (int(saved["revision"]), items)
    return out
