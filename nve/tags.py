"""Locally significant 802.1Q tags, one space per port [3.1, 4].

A tag means something only on its link: the same VN may get different tags on
two ports and the same tag value on two ports may mean two different VNs.
Within one space a VN has exactly one tag while any VNIC on that port uses it,
so two VNICs of the same VN on one port share the tag.  Allocation is the
lowest free value, which keeps it deterministic for tests and replays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.errors import ErrorCode, Exhausted
from schemas.types import MAX_TAG


@dataclass
class TagSpace:
    scope: str
    max_tag: int = MAX_TAG
    tag_of: dict[str, int] = field(default_factory=dict)  # vn name -> tag
    vn_of: dict[int, str] = field(default_factory=dict)  # tag -> vn name
    users: dict[str, set[str]] = field(default_factory=dict)  # vn name -> vnic names
    _next_hint: int = 1

    def peek(self, vn: str) -> int:
        """The tag ``acquire`` would return, without changing anything."""
        if vn in self.tag_of:
            return self.tag_of[vn]
        tag = self._free_tag()
        if tag is None:
            raise Exhausted(
                ErrorCode.TAGS_EXHAUSTED,
                f"all {self.max_tag} 802.1Q tags of port {self.scope} are in use",
                port=self.scope,
            )
        return tag

    def acquire(self, vn: str, vnic: str) -> int:
        tag = self.peek(vn)
        if vn not in self.tag_of:
            self.tag_of[vn] = tag
            self.vn_of[tag] = vn
        self.users.setdefault(vn, set()).add(vnic)
        return tag

    def release(self, vn: str, vnic: str) -> None:
        users = self.users.get(vn)
        if users is None:
            return
        users.discard(vnic)
        if not users:
            del self.users[vn]
            tag = self.tag_of.pop(vn)
            del self.vn_of[tag]
            self._next_hint = min(self._next_hint, tag)

    def _free_tag(self) -> int | None:
        if len(self.vn_of) >= self.max_tag:
            return None
        tag = self._next_hint
        while tag in self.vn_of:
            tag += 1
        self._next_hint = tag
        return tag

    @property
    def empty(self) -> bool:
        return not self.tag_of
