"""AsyncAPI 3.0 document for every NATS subject, generated from the models.

``nvo3 asyncapi export docs/asyncapi.yaml`` writes it; tests/test_asyncapi.py
fails when the committed file drifts from the models, when a subject of
``schemas/subjects.py`` has no channel, or when a running IMA or NVE
subscribes to a subject the document does not describe.

Channel addresses come from :class:`schemas.subjects.Subjects` itself, called
with ``{nve}``/``{hv}`` placeholders; the hypervisor channels come from the
``HypervisorMessage`` union, one per kind.  Message payloads ``$ref`` the JSON
Schema files that ``nvo3 schema export`` writes (``docs/schemas/``); a model
that is not exported there is inlined under ``components.schemas``.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from schemas import messages, operator
from schemas.base import PROTOCOL_VERSION
from schemas.export import all_schemas
from schemas.subjects import DEFAULT_SUBJECT_ROOT, Subjects

ASYNCAPI_VERSION = "3.0.0"
IMA_QUEUE_GROUP = "nvo3-ima"  # ima/service.py:QUEUE_GROUP (checked by the test)
NATS_BINDING_VERSION = "0.1.0"
HEADER = (
    "# Generated from schemas/ by `nvo3 asyncapi export docs/asyncapi.yaml`; do not edit.\n"
    "# tests/test_asyncapi.py fails when this file drifts from the models.\n"
)

# IMA operations: the last subject token -> (request model, reply model).
IMA_OPS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "create": (operator.VnCreate, operator.VnReply),
    "get": (operator.VnGet, operator.VnReply),
    "list": (operator.VnList, operator.VnListReply),
    "profile_set": (operator.ProfileSet, operator.ProfileReply),
    "profile_get": (operator.ProfileGet, operator.ProfileReply),
    "placement_set": (operator.PlacementSet, operator.PlacementReply),
    "delete": (operator.VnDelete, operator.VnReply),
}

# The Subjects methods each channel family covers (the test checks that every
# public method of Subjects is listed here).
SUBJECT_METHODS = {
    "hv_request": "one channel per hypervisor message kind",
    "nve_requests": "the NVE's wildcard subscription over the hv_request channels",
    "nve_tables": "nve_tables",
    "nve_observed": "nve_observed",
    "nve_epoch": "nve_epoch",
    "ima": "one channel per IMA operation",
    "agent_state": "agent_state",
    "agent_ctl": "agent_ctl (reserved)",
}

_TOKEN = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_PARAMETERS = {
    "nve": {"description": f"NVE id, a token ({_TOKEN}).", "examples": ["nve1"]},
    "hv": {
        "description": f"Hypervisor id, a token ({_TOKEN}); must equal the payload's `sender`.",
        "examples": ["hv1"],
    },
}

# Summaries for models without a docstring.
_SUMMARIES = {
    "OkReply": "Success; `result` is set for vn_connect only. Sent after the etcd commit.",
    "ErrorReply": "A typed refusal: nothing was changed (schemas/errors.py:ErrorCode).",
    "VnGet": "Look up one VN by name, id or alias.",
    "VnList": "List every VN.",
    "VnReply": "One VN record; `created` tells whether this request created it.",
    "VnListReply": "Every VN record.",
    "TablesQuery": "Ask an NVE for its tables (the payload is not checked).",
    "ProfileGet": "Read a VN's profile [4.5].",
    "ProfileReply": "A VN's profile, or null if it has none.",
}

# Examples, round-tripped through their models when the document is built.
_VNIC = "3d1e5a36-5b1f-4c55-9b0e-6a2a4f7c9e10"
_VN = "054a8366-7ae4-4ac4-8c64-d677fe2e8e75"
_EXAMPLES: dict[str, dict[str, Any]] = {
    "VnConnect": {"kind": "vn_connect", "sender": "hv1", "seq": 100,
                  "ts_ns": 1795734400000000000, "vnic": _VNIC, "port": "eth0",
                  "vn": {"alias": "blue"}},
    "AddrAssociate": {"kind": "addr_associate", "sender": "hv1", "seq": 101,
                      "ts_ns": 1795734400000000000, "vnic": _VNIC, "vn": {"alias": "blue"},
                      "entries": [{"mac": "02:00:00:00:09:01", "ips": ["10.1.0.99"]}]},
    "VnicShutdown": {"kind": "vnic_shutdown", "sender": "hv1", "seq": 104,
                     "ts_ns": 1795734400000000000, "vnic": _VNIC},
    "OkReply": {"kind": "ok", "seq": 100, "op": "vn_connect", "ima_ops": 0,
                "result": {"tag": 100, "vn_name": _VN, "vn_id": 1117716895,
                           "vni": 12818933, "service": "l2"}},
    "ErrorReply": {"kind": "error", "seq": 102, "code": "mac_conflict",
                   "reason": "MAC 02:00:00:00:01:01 is already bound to another VNIC",
                   "details": {"mac": "02:00:00:00:01:01"}},
    "VnCreate": {"kind": "vn_create", "alias": "blue", "service": "l2"},
    "VnReply": {"kind": "vn", "created": True,
                "vn": {"name": _VN, "vn_id": 1117716895, "alias": "blue", "vni": 12818933,
                       "service": "l2", "created_ns": 1795734300807092821}},
}


def hypervisor_models() -> list[type[BaseModel]]:
    """The members of the ``HypervisorMessage`` union, in declaration order."""
    union = typing.get_args(messages.HypervisorMessage)[0]
    return [typing.cast(type[BaseModel], m) for m in typing.get_args(union)]


def kind_of(model: type[BaseModel]) -> str:
    kind = model.model_fields["kind"].default
    assert isinstance(kind, str), model
    return kind


def _summary(model: type[BaseModel]) -> str | None:
    doc = model.__doc__ or ""
    # pydantic gives undocumented models BaseModel's docstring; that is not theirs.
    if doc and doc != BaseModel.__doc__:
        return " ".join(doc.strip().split("\n\n")[0].split())
    return _SUMMARIES.get(model.__name__)


def _free_form(name: str, title: str, summary: str) -> dict[str, Any]:
    """A JSON object message without a model: operator views, not contracts."""
    return {"name": name, "title": title, "summary": summary,
            "contentType": "application/json", "payload": {"type": "object"}}


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)}


class _Builder:
    def __init__(self, schema_ref: str) -> None:
        self.schema_ref = schema_ref.rstrip("/")
        self.exported = set(all_schemas())
        self.messages: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}

    def message(self, model: type[BaseModel]) -> dict[str, str]:
        name = model.__name__
        if name not in self.messages:
            if name in self.exported:
                payload: dict[str, Any] = {"$ref": f"{self.schema_ref}/{name}.json"}
            else:
                self.schemas[name] = model.model_json_schema(
                    ref_template="#/components/schemas/" + name + "/$defs/{model}")
                payload = _ref("components", "schemas", name)
            msg: dict[str, Any] = {"name": kind_of(model), "title": name}
            summary = _summary(model)
            if summary:
                msg["summary"] = summary
            msg["contentType"] = "application/json"
            msg["payload"] = payload
            if name in _EXAMPLES:
                parsed = model.model_validate(_EXAMPLES[name])
                example = {"v": PROTOCOL_VERSION, "kind": kind_of(model),
                           **parsed.model_dump(mode="json", exclude_defaults=True)}
                msg["examples"] = [{"name": kind_of(model), "payload": example}]
            self.messages[name] = msg
        return _ref("components", "messages", name)

    def channel(self, key: str, address: str | None, description: str,
                models: list[type[BaseModel]] | None = None,
                extra: dict[str, Any] | None = None) -> None:
        channel: dict[str, Any] = {"address": address, "description": description}
        params = {p: _ref("components", "parameters", p)
                  for p in _PARAMETERS if address and "{" + p + "}" in address}
        if params:
            channel["parameters"] = params
        if models:
            channel["messages"] = {m.__name__: self.message(m) for m in models}
        channel.update(extra or {})
        self.channels[key] = channel

    def operation(self, key: str, channel: str, summary: str, reply_channel: str | None,
                  bindings: dict[str, Any] | None = None) -> None:
        """A request served with a reply or, without ``reply_channel``, a publication."""
        op: dict[str, Any] = {
            "action": "receive" if reply_channel else "send",
            "channel": _ref("channels", channel),
            "summary": summary,
            "messages": [_ref("channels", channel, "messages", name)
                         for name in self.channels[channel].get("messages", {})],
        }
        if reply_channel:
            op["reply"] = {
                "channel": _ref("channels", reply_channel),
                "messages": [_ref("channels", reply_channel, "messages", name)
                             for name in self.channels[reply_channel].get("messages", {})],
            }
        if bindings:
            op["bindings"] = bindings
        self.operations[key] = op


def asyncapi_document(schema_ref: str = "schemas") -> dict[str, Any]:
    """The document as a dict; ``schema_ref`` is the JSON Schema directory, relative to it."""
    s = Subjects(DEFAULT_SUBJECT_ROOT)
    b = _Builder(schema_ref)
    reply_models: list[type[BaseModel]] = [messages.OkReply, messages.ErrorReply]

    # NVE: the hypervisor-to-NVE protocol [4.1-4.4], one channel per kind.
    b.channel("nve_reply", None,
              "The requester's NATS inbox (the reply subject of its request). The NVE answers "
              "only after the request's etcd writes have committed.", reply_models)
    for model in hypervisor_models():
        kind = kind_of(model)
        b.channel(f"hv_{kind}", s.hv_request("{nve}", "{hv}", kind),
                  f"`{kind}` from hypervisor `{{hv}}` to its NVE `{{nve}}`.", [model])
        b.operation(f"nve_{kind}", f"hv_{kind}", _summary(model) or kind, "nve_reply")

    b.channel("nve_observed", s.nve_observed("{nve}"),
              "Source addresses seen by the NVE's own data path (gleaning, 4.2 way 1). "
              "A reply is sent only if the publisher asked for one.", [messages.AddrObserved])
    b.operation("nve_addr_observed", "nve_observed", "Glean an observed address.", "nve_reply")

    b.channel("nve_tables_reply", None, "The requester's NATS inbox.")
    b.channels["nve_tables_reply"]["messages"] = {"NveTables": _free_form(
        "nve_tables", "NveTables",
        "The NVE's tables as `nvo3 nve tables --json` prints them: local VNICs, tags per "
        "port, remote bindings, counters. For operators; not a stable contract.")}
    b.channel("nve_tables", s.nve_tables("{nve}"), "Operator query of one NVE's tables.",
              [operator.TablesQuery])
    b.operation("nve_tables", "nve_tables", "Answer with the NVE's tables.", "nve_tables_reply")

    b.channel("nve_epoch", s.nve_epoch("{nve}"),
              "The NVE announces its epoch when it starts (and restarts); the agents it serves "
              "subscribe and answer a new epoch with `hv_sync`.", [messages.EpochAnnounce])
    b.operation("nve_epoch", "nve_epoch", "Announce this NVE's epoch.", None)

    # IMA: the VN registry [2, 4.1, 4.5], served by every replica in one queue group.
    queue = {"nats": {"queue": IMA_QUEUE_GROUP, "bindingVersion": NATS_BINDING_VERSION}}
    ima_replies: dict[str, type[BaseModel]] = {}
    for _request, reply in IMA_OPS.values():
        ima_replies[reply.__name__] = reply
    b.channel("ima_reply", None, "The requester's NATS inbox.",
              [*ima_replies.values(), messages.ErrorReply])
    for op, (request, _reply) in IMA_OPS.items():
        b.channel(f"ima_{op}", s.ima(op),
                  f"`{kind_of(request)}` to the IMA replicas (queue group `{IMA_QUEUE_GROUP}`).",
                  [request])
        b.operation(f"ima_{op}", f"ima_{op}", _summary(request) or op, "ima_reply",
                    bindings=queue)

    # Agents: the hypervisor side answers for its desired state.
    b.channel("agent_state_reply", None, "The requester's NATS inbox.")
    b.channels["agent_state_reply"]["messages"] = {"AgentState": _free_form(
        "agent_state", "AgentState",
        "The hypervisor's desired state per NVE (`hypervisor`, `nves`), which the "
        "consistency checker compares with the NVEs' tables and the IMA.")}
    b.channel("agent_state", s.agent_state("{hv}"),
              "Ask the agent of hypervisor `{hv}` for the state it wants; the request payload "
              "is ignored.")
    b.channels["agent_state"]["messages"] = {"AgentStateQuery": {
        "name": "agent_state_query", "title": "AgentStateQuery",
        "summary": "Any payload; it is not read.", "payload": {}}}
    b.operation("agent_state", "agent_state", "Answer with the agent's desired state.",
                "agent_state_reply")

    b.channel("agent_ctl", s.agent_ctl("{hv}"),
              "Reserved for control of a hypervisor agent; nothing publishes or subscribes "
              "to it yet.")

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "nvo3 split-NVE control plane",
            "version": f"{PROTOCOL_VERSION}.0.0",
            "description": (
                "NATS subjects of draft-kreeger-nvo3-hypervisor-nve-cp-01 (RFC 8394) as "
                "implemented by nvo3: hypervisor agents ask their external NVE, operators ask "
                "the IMA and the NVEs. Every message is one JSON object. Operations are NATS "
                "request/reply, described from the serving side (NVE, IMA, agent), except the "
                "NVE's epoch announcement, a plain publication. "
                f"An NVE subscribes to `{s.nve_requests('{nve}')}` for all its hypervisors and "
                "refuses a payload whose `sender` or `kind` differs from the subject's `{hv}` "
                "or kind token (`sender_mismatch`). "
                f"Addresses use the default subject root `{DEFAULT_SUBJECT_ROOT}` "
                "(`--subject-root`/`NVO3_SUBJECT_ROOT` replaces it) and the protocol version "
                f"token `v{PROTOCOL_VERSION}`. Payload schemas are the JSON Schema files "
                "generated from the pydantic models; see docs/protocol.md for the semantics."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "servers": {
            "compose": {
                "host": "nats1:4222",
                "protocol": "nats",
                "description": "compose.yaml's cluster: nats1, nats2, nats3, port 4222 each.",
            },
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "A single local nats-server (README, running by hand).",
            },
        },
        "defaultContentType": "application/json",
        "channels": b.channels,
        "operations": b.operations,
        "components": {
            "messages": b.messages,
            "parameters": _PARAMETERS,
            **({"schemas": b.schemas} if b.schemas else {}),
        },
    }


class _Dumper(yaml.SafeDumper):
    """Spells repeated objects out instead of YAML anchors, which readers trip over."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(document: dict[str, Any]) -> str:
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def export_asyncapi(path: Path, schema_dir: Path | None = None) -> Path:
    """Write the document; payloads refer to ``schema_dir`` (default: ``schemas/`` beside it)."""
    schema_dir = schema_dir if schema_dir is not None else path.parent / "schemas"
    ref = Path(os.path.relpath(schema_dir.resolve(), path.parent.resolve())).as_posix()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(asyncapi_document(ref)))
    return path
