"""Do the etcd members hold the same data? Each one is read on its own.

etcd replicates one log, so after quiescence every member must hold the same
keys at the same revision.  etcd 3.5.0-3.5.2 can break that: a member killed
while applying a transaction may, once restarted, skip entries it had not yet
applied (etcd-io/etcd#13766, fixed in 3.5.3; 3.5.6+ is the recommended
minimum).  Such a member then answers reads and watches from different data,
and compare-and-swap transactions evaluate differently on it, so no client can
converge.  The chaos harness runs this after every round, so a divergence is
blamed on etcd, with the keys that differ, instead of on the control plane.

Each member is read with ``etcdctl --consistency=s`` (served from that
member's own store, not forwarded to the leader).
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from nvo3.servers import find_binary


@dataclass
class MemberView:
    name: str
    revision: int = 0
    keys: dict[str, int] = field(default_factory=dict)  # key -> mod revision
    error: str = ""


def read_member(name: str, url: str, prefix: str, flags: Sequence[str] = (),
                timeout: float = 10.0) -> MemberView:
    """Every key under ``prefix`` as ``url``'s member holds it (serializable read)."""
    argv = [find_binary("etcdctl"), f"--endpoints={url}", *flags, "--consistency=s",
            "-w", "json", "get", prefix, "--prefix", "--keys-only"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return MemberView(name, error="etcdctl timed out")
    if done.returncode != 0:
        return MemberView(name, error=done.stderr.decode(errors="replace").strip()[:200])
    doc = orjson.loads(done.stdout)
    keys = {base64.b64decode(kv["key"]).decode(): int(kv.get("mod_revision", 0))
            for kv in doc.get("kvs", ())}
    return MemberView(name, int(doc["header"]["revision"]), keys)


def divergence(views: Sequence[MemberView], show: int = 5, settled: bool = False) -> list[str]:
    """What the members disagree on, one line each (empty: they agree).

    Keys are compared when the members report the same revision (nothing written
    between the reads). A member at another revision is reported as lagging, or, when
    ``settled`` (the caller waited and nothing is being written), as diverged: a member
    that skipped an entry stays one revision behind its peers for good, with every
    later revision naming another write than on its peers (etcd-io/etcd#13766).
    """
    answered = [v for v in views if not v.error]
    unread = [f"etcd member {v.name} could not be read: {v.error}" for v in views if v.error]
    if len(answered) < 2:
        return unread
    newest = max(v.revision for v in answered)
    state = "diverged: member {} stays at revision {}" if settled else \
        "etcd member {} is at revision {}"
    out = unread + [state.format(v.name, v.revision) + f", another at {newest}"
                    for v in answered if v.revision != newest]
    if settled:
        out = [line if line.startswith("etcd member") else "etcd members " + line
               for line in out]
    if len(out) > len(unread):
        return out
    reference = answered[0]
    for other in answered[1:]:
        missing = sorted(set(reference.keys) - set(other.keys))
        extra = sorted(set(other.keys) - set(reference.keys))
        changed = sorted(k for k in set(reference.keys) & set(other.keys)
                         if reference.keys[k] != other.keys[k])
        for what, keys in (("lacks", missing), ("has extra", extra),
                           ("has other versions of", changed)):
            if keys:
                out.append(f"etcd members diverged at revision {newest}: {other.name} "
                           f"{what} {len(keys)} keys that {reference.name} "
                           f"{'has' if what != 'has extra' else 'lacks'}, "
                           f"e.g. {', '.join(keys[:show])}")
    return out


async def members_disagree(members: Sequence[tuple[str, str]], prefix: str,
                           flags: Sequence[str] = ()) -> list[str]:
    """Read every member, given as (name, client URL), and say what they disagree on.

    A member at another revision is read again for up to 3 s (it may still be applying
    the last entries); one that stays behind has diverged (``divergence(settled=True)``).
    """
    found: list[str] = []
    for attempt in range(10):
        views = [await asyncio.to_thread(read_member, name, url, prefix, flags)
                 for name, url in members]
        found = divergence(views, settled=attempt == 9)
        if not any(" is at revision " in line for line in found):
            break
        await asyncio.sleep(0.3)
    return found
