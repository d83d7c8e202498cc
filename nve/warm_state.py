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

import orjson

from nve.follower import decode_binding
from nve.remote import Binding, RemoteTable

Saved = dict[str, tuple[int, list[tuple[str, Binding]]]]  # vn -> (revision, entries)


def save(path: str, nve_id: str, remote: RemoteTable) -> None:
    state = {
        vn: {"revision": r.revision,
             "entries": {k: b.model_dump(mode="json") for k, b in r.entries.items()}}
        for vn, r in remote.vns.items() if r.revision
    }
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps({"v": 1, "nve": nve_id, "remote": state}))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str) -> Saved:
    """What ``save`` wrote; raises OSError/ValueError/KeyError/TypeError if unreadable.

    Every binding is validated again (``decode_binding``): the file is input.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as fh:
        data = orjson.loads(fh.read())
    out: Saved = {}
    for vn, saved in data["remote"].items():
        items = [(entry, decode_binding(entry.partition("/")[0], orjson.dumps(b)))
                 for entry, b in saved["entries"].items()]
        out[vn] = (int(saved["revision"]), items)
    return out
