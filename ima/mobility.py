"""MAC mobility and duplicate detection, as pure rules (EVPN, RFC 7432 s15).

When an NVE claims a binding another NVE holds (a VM arrived), the new
binding's ``mobility_seq`` is the old one plus one, and the claim is written
with a compare on the old binding's revision, so a late or stale write from
the old NVE can never win.  An address that moves more than ``max_moves``
times within ``window_ns`` is frozen (refused and reported) instead of being
flapped across the fabric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from schemas.errors import ErrorCode, ProtocolError
from schemas.records import IpBinding, MacBinding

B = TypeVar("B", MacBinding, IpBinding)
MOVES_KEPT = 16


@dataclass(frozen=True)
class MobilityPolicy:
    max_moves: int = 5
    window_ns: int = 180 * 10**9


def claim(current: B | None, new: B, now_ns: int, policy: MobilityPolicy) -> B:
    """The binding to write when ``new``'s NVE takes the address from ``current``."""
    if current is None:
        return new
    if current.nve == new.nve:
        return new.model_copy(
            update={"mobility_seq": current.mobility_seq, "moves_ns": current.moves_ns}
        )
    recent: tuple[int, ...] = tuple(t for t in current.moves_ns if now_ns - t < policy.window_ns)
    if len(recent) >= policy.max_moves:
        raise ProtocolError(
            ErrorCode.ADDRESS_FROZEN,
            f"address moved {len(recent)} times in {policy.window_ns / 1e9:.0f}s; frozen at "
            f"NVE {current.nve} (duplicate detection, RFC 7432 s15)",
            nve=current.nve,
        )
    return new.model_copy(
        update={
            "mobility_seq": current.mobility_seq + 1,
            "moves_ns": (*recent, now_ns)[-MOVES_KEPT:],
        }
    )
