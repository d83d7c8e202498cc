"""JSON Schema for every message and record, generated from the models.

``nvo3 schema export docs/schemas`` writes them; a test fails when the
committed files drift from the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter

from schemas import messages, operator, profile, records

MODELS: tuple[type[BaseModel], ...] = (
    messages.VnConnect,
    messages.VnDisconnect,
    messages.AddrAssociate,
    messages.AddrDisassociate,
    messages.VnicDisassociate,
    messages.VnicShutdown,
    messages.VnicStartup,
    messages.VnicPrepare,
    messages.VnicArrive,
    messages.VnicDepart,
    messages.AddrReplace,
    messages.AddrObserved,
    messages.OkReply,
    messages.ErrorReply,
    operator.VnCreate,
    operator.VnGet,
    operator.VnList,
    operator.VnDelete,
    operator.AgentCommand,
    operator.VnReply,
    operator.VnListReply,
    operator.PlacementSet,
    operator.PlacementReply,
    operator.ProfileSet,
    operator.ProfileGet,
    operator.ProfileReply,
    profile.VnProfile,
    records.VnRecord,
    records.VnPointer,
    records.MacBinding,
    records.IpBinding,
    records.NveRecord,
    records.Placement,
)


def all_schemas() -> dict[str, dict[str, Any]]:
    out = {model.__name__: model.model_json_schema() for model in MODELS}
    out["HypervisorMessage"] = TypeAdapter(messages.HypervisorMessage).json_schema()
    return out


def render(schema: dict[str, Any]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def lifecycle_doc() -> str:
    """docs/lifecycle.md, generated from ``nve.lifecycle.TRANSITIONS``."""
    from nve.lifecycle import mermaid, transition_table_markdown

    return (
        "# VNIC lifecycle (generated)\n\n"
        "Generated from `nve/lifecycle.py` by `nvo3 schema export docs/schemas`; "
        "a test fails if this file drifts from the code's transition table.  "
        "Draft sections 4.3 and 4.4.\n\n"
        "```mermaid\n" + mermaid() + "```\n\n" + transition_table_markdown()
    )


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in all_schemas().items():
        path = directory / f"{name}.json"
        path.write_bytes(render(schema))
        paths.append(path)
    lifecycle = directory.parent / "lifecycle.md"
    lifecycle.write_text(lifecycle_doc())
    paths.append(lifecycle)
    return paths
