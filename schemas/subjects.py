"""NATS subject names (documented in docs/protocol.md).

Each hypervisor request subject names both the NVE and the hypervisor,
``<root>.v1.nve.<nve>.hv.<hv>.<kind>``, so a per-hypervisor permission
(publish only ``<root>.v1.nve.<my-nve>.hv.<me>.>``) is one line of server
config, and the NVE can check the payload's sender against the subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SUBJECT_ROOT = "nvo3"
_ROOT_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class Subjects:
    root: str = DEFAULT_SUBJECT_ROOT

    def __post_init__(self) -> None:
        if not _ROOT_RE.match(self.root):
            raise ValueError(f"invalid subject root {self.root!r}")

    @property
    def base(self) -> str:
        return f"{self.root}.v1"

    def hv_request(self, nve: str, hv: str, kind: str) -> str:
        return f"{self.base}.nve.{nve}.hv.{hv}.{kind}"

    def nve_requests(self, nve: str) -> str:
        """Wildcard an NVE subscribes to for all its hypervisors' requests."""
        return f"{self.base}.nve.{nve}.hv.*.*"

    def parse_hv_request(self, subject: str) -> tuple[str, str, str] | None:
        """(nve, hypervisor, kind) of a request subject, or None."""
        prefix = f"{self.base}.nve."
        if not subject.startswith(prefix):
            return None
        parts = subject[len(prefix) :].split(".")
        if len(parts) != 4 or parts[1] != "hv":
            return None
        return parts[0], parts[2], parts[3]

    def nve_tables(self, nve: str) -> str:
        return f"{self.base}.nve.{nve}.ctl.tables"

    def nve_observed(self, nve: str) -> str:
        """The NVE's own data path reports source addresses it saw (gleaning)."""
        return f"{self.base}.nve.{nve}.dp.observed"

    def nve_epoch(self, nve: str) -> str:
        return f"{self.base}.nve.{nve}.epoch"

    def agent_state(self, hv: str) -> str:
        """An agent answers with the full state it wants (checker, operators)."""
        return f"{self.base}.agent.{hv}.state"

    def ima(self, op: str) -> str:
        return f"{self.base}.ima.vn.{op}"

    def agent_ctl(self, hv: str) -> str:
        return f"{self.base}.agent.{hv}.ctl"
