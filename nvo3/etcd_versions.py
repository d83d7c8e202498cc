"""Which etcd versions are known to corrupt when a member is killed (kill -9).

Used by the chaos harness (how it kills members) and by long-running services
(a warning at connect, ``nvo3.connect.warn_if_unsafe_etcd``).
"""

from __future__ import annotations


def etcd_version(raw: str) -> tuple[int, ...] | None:
    """"3.5.1" -> (3, 5, 1); None for anything else."""
    parts = raw.strip().lstrip("v").split("-")[0].split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def kill9_corrupts(version: tuple[int, ...] | None) -> bool:
    """etcd 3.5.0-3.5.5 can leave a member with data that differs from its peers after
    a kill -9 during load: 3.5.0-3.5.2 saved the consistent index apart from the data
    (etcd-io/etcd#13766, fixed in 3.5.3), 3.5.5 had another such bug (3.5.6 is etcd's
    recommended minimum). The chaos harness does not kill members of such a version
    with kill -9 (``nvo3.chaos``: the leader hangs, then stops cleanly); operators
    should run 3.5.6 or later."""
    return version is not None and (3, 5, 0) <= version[:3] < (3, 5, 6)
