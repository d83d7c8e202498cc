"""The VNIC lifecycle as data: one transition table [4.3, 4.4].

The core consults ``TRANSITIONS`` for every lifecycle event, so a move the
table does not list is refused with ``invalid_transition``; the state diagram
in docs/protocol.md is generated from this same table (``mermaid()``), so the
picture cannot drift from the code.

``published`` says whether the VNIC's bindings are in the IMA in that state:
a departed VNIC keeps them there during its hold time, so remote NVEs see no
gap while the VM moves (make-before-break).
"""

from __future__ import annotations

from enum import StrEnum


class VnicState(StrEnum):
    ABSENT = "absent"
    PREPARED = "prepared"  # pre-arrival handshake done, VM not here yet
    UP = "up"
    DOWN = "down"  # shut down: bindings withdrawn, tree kept for startup
    DEPARTED = "departed"  # migrating away: bindings held for the hold time


S = VnicState

#: (state, event) -> (next state, what the NVE does)
TRANSITIONS: dict[tuple[VnicState, str], tuple[VnicState, str]] = {
    (S.ABSENT, "vn_connect"): (S.UP, "allocate tag; watch VN"),
    (S.ABSENT, "vnic_prepare"): (S.PREPARED, "allocate tags; watch VNs; no IMA write"),
    (S.ABSENT, "vnic_arrive"): (S.UP, "claim bindings in one IMA txn (mobility seq + 1)"),
    (S.PREPARED, "vnic_arrive"): (S.UP, "claim bindings in one IMA txn (mobility seq + 1)"),
    (S.PREPARED, "vnic_prepare"): (S.PREPARED, "refresh the hold timer"),
    (S.PREPARED, "hold_expired"): (S.ABSENT, "release tags; no IMA write"),
    (S.PREPARED, "vnic_disassociate"): (S.ABSENT, "release tags; no IMA write"),
    (S.UP, "vn_connect"): (S.UP, "allocate tag on the same port (trunk)"),
    (S.UP, "vnic_shutdown"): (S.DOWN, "withdraw every binding"),
    (S.UP, "vnic_depart"): (S.DEPARTED, "keep bindings; start hold timer"),
    (S.UP, "vnic_prepare"): (S.UP, "same NVE: pre-allocate tags on the new port"),
    (S.UP, "vnic_arrive"): (S.UP, "same NVE: rebind port and tags; 0 IMA writes"),
    (S.UP, "vnic_disassociate"): (S.ABSENT, "withdraw every binding"),
    (S.UP, "taken_over"): (S.UP, "an address claimed by another NVE is dropped locally"),
    (S.DOWN, "vn_connect"): (S.DOWN, "allocate tag on the same port (trunk)"),
    (S.DOWN, "vnic_startup"): (S.UP, "re-publish every binding"),
    (S.DOWN, "vnic_depart"): (S.DEPARTED, "nothing published; start hold timer"),
    (S.DOWN, "vnic_disassociate"): (S.ABSENT, "drop the tree; no IMA write"),
    (S.DOWN, "vnic_shutdown"): (S.DOWN, "already down"),
    (S.UP, "vnic_startup"): (S.UP, "already up"),
    (S.DEPARTED, "vnic_arrive"): (S.UP, "aborted or same-NVE migration: rebind; 0 IMA writes"),
    (S.DEPARTED, "vnic_depart"): (S.DEPARTED, "already departing"),
    (S.DEPARTED, "hold_expired"): (S.ABSENT, "withdraw bindings still ours"),
    (S.DEPARTED, "taken_over"): (S.ABSENT, "bindings claimed by the new NVE; 0 IMA writes"),
    (S.DEPARTED, "vnic_disassociate"): (S.ABSENT, "withdraw bindings still ours"),
}


def next_state(state: VnicState, event: str) -> VnicState | None:
    hit = TRANSITIONS.get((state, event))
    return None if hit is None else hit[0]


def mermaid() -> str:
    """The lifecycle as a Mermaid state diagram, generated from ``TRANSITIONS``."""
    lines = ["stateDiagram-v2", "    [*] --> absent"]
    for (state, event), (target, _) in TRANSITIONS.items():
        lines.append(f"    {state} --> {target}: {event}")
    return "\n".join(lines) + "\n"


def transition_table_markdown() -> str:
    rows = ["| state | event | next state | NVE action |", "|---|---|---|---|"]
    for (state, event), (target, action) in TRANSITIONS.items():
        rows.append(f"| {state} | `{event}` | {target} | {action} |")
    return "\n".join(rows) + "\n"
