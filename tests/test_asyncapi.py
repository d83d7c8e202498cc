"""docs/asyncapi.yaml: generated from the models, covering every subject that is really used."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from ima.service import QUEUE_GROUP
from nvo3.servers import LocalServers
from schemas.asyncapi import (
    IMA_QUEUE_GROUP,
    SUBJECT_METHODS,
    asyncapi_document,
    hypervisor_models,
    kind_of,
    render,
)
from schemas.subjects import Subjects
from tests.slice import start_slice

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMMITTED = DOCS / "asyncapi.yaml"
REGENERATE = "run: nvo3 asyncapi export docs/asyncapi.yaml"
# Keywords of JSON Schema 2020-12 that a draft-07 reader (AsyncAPI's default schema
# format) would silently ignore; pydantic must not have produced any.
NEWER_KEYWORDS = {"prefixItems", "$dynamicRef", "$dynamicAnchor", "unevaluatedProperties",
                  "unevaluatedItems", "dependentSchemas", "dependentRequired"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(COMMITTED.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_committed_document_matches_the_models() -> None:
    assert COMMITTED.read_text() == render(asyncapi_document("schemas")), REGENERATE


def test_it_is_an_asyncapi_3_request_reply_document(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"].startswith("3.")
    assert {s["protocol"] for s in doc["servers"].values()} == {"nats"}
    for name, op in doc["operations"].items():
        assert op["messages"], name
        if op["action"] == "receive":
            assert op["reply"]["messages"], f"{name}: every request gets a reply"
        else:
            assert op["action"] == "send", name
            assert "reply" not in op, name


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = _refs({k: v for k, v in doc.items() if k != "components"})
    refs += _refs(doc["components"]["messages"])
    files = set()
    for ref in refs:
        if ref.startswith("#/"):
            _resolve(doc, ref)
        else:
            files.add(ref)
    assert files, "payloads should refer to docs/schemas/*.json"
    for ref in sorted(files):
        schema_file = DOCS / ref
        assert schema_file.is_file(), f"{ref} missing; run: nvo3 schema export docs/schemas"
        text = schema_file.read_text()
        used = {k for k in NEWER_KEYWORDS if f'"{k}"' in text}
        assert not used, f"{ref} uses JSON Schema 2020-12 keywords {used}"


def test_operations_refer_to_their_own_channels_messages(doc: dict[str, Any]) -> None:
    for name, op in doc["operations"].items():
        channel = op["channel"]["$ref"]
        for msg in op["messages"]:
            assert msg["$ref"].startswith(channel + "/messages/"), name
        if "reply" not in op:
            continue
        reply = op["reply"]["channel"]["$ref"]
        assert _resolve(doc, reply)["address"] is None, f"{name}: replies go to an inbox"
        for msg in op["reply"]["messages"]:
            assert msg["$ref"].startswith(reply + "/messages/"), name


def test_every_subject_method_is_described() -> None:
    public = {name for name in vars(Subjects)
              if not name.startswith("_") and callable(getattr(Subjects, name))
              and not name.startswith("parse_")}
    missing = public - set(SUBJECT_METHODS)
    assert not missing, (f"schemas/subjects.py has subjects without a channel: {missing}; "
                         "add them to schemas/asyncapi.py (SUBJECT_METHODS and a channel)")


def test_one_channel_per_hypervisor_kind(doc: dict[str, Any]) -> None:
    s = Subjects()
    addresses = {c["address"] for c in doc["channels"].values()}
    for model in hypervisor_models():
        assert s.hv_request("{nve}", "{hv}", kind_of(model)) in addresses, model.__name__
    assert s.nve_tables("{nve}") in addresses
    assert s.nve_observed("{nve}") in addresses
    assert s.agent_ctl("{hv}") in addresses
    assert s.agent_state("{hv}") in addresses
    assert s.nve_epoch("{nve}") in addresses
    for name, channel in doc["channels"].items():
        for param in re.findall(r"\{(\w+)\}", channel["address"] or ""):
            assert param in channel.get("parameters", {}), f"{name}: {param} undeclared"


def test_queue_group_is_the_ima_services() -> None:
    assert IMA_QUEUE_GROUP == QUEUE_GROUP


def _subscriptions(monitor_url: str) -> list[dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{monitor_url}/connz?subs=detail&limit=1024", timeout=5) as response:
        connz = json.loads(response.read())
    return [sub for conn in connz.get("connections", [])
            for sub in conn.get("subscriptions_list_detail") or []]


def _rooted(address: str, root: str) -> str:
    assert address.startswith("nvo3.v1."), address
    return root + address[len("nvo3"):]


def _matches(subscription: str, pattern: str) -> bool:
    """A subscription (maybe with * wildcards) falls within a channel address pattern."""
    want = subscription.split(".")
    have = pattern.split(".")
    return len(want) == len(have) and all(
        w == "*" or h.startswith("{") or w == h for w, h in zip(want, have, strict=True))


@pytest.mark.integration
async def test_running_services_subscribe_only_to_documented_subjects(
    servers: LocalServers, key_prefix: str, subject_root: str, doc: dict[str, Any]
) -> None:
    """The IMA and an NVE, running: each subject they listen on has a channel, and back."""
    assert servers.nats is not None
    s = await start_slice(servers.nats_urls, servers.etcd_endpoints, key_prefix, subject_root,
                          ("nve1",))
    try:
        subs = [sub for sub in _subscriptions(servers.nats.members[0].monitor_url)
                if sub["subject"].startswith(subject_root + ".")]
    finally:
        await s.stop()
    addresses = {name: _rooted(c["address"], subject_root)
                 for name, c in doc["channels"].items() if c["address"]}
    assert subs
    for sub in subs:
        hits = [n for n, a in addresses.items() if _matches(sub["subject"], a)]
        assert hits, (f"{sub['subject']} is subscribed to but not in docs/asyncapi.yaml: "
                      "describe it in schemas/asyncapi.py (IMA_OPS for an IMA operation), "
                      f"then {REGENERATE}")
        if sub["subject"].startswith(f"{subject_root}.v1.ima."):
            assert sub.get("qgroup") == QUEUE_GROUP
    subscribed = {sub["subject"] for sub in subs}
    served = {op["channel"]["$ref"].rsplit("/", 1)[-1] for op in doc["operations"].values()
              if op["action"] == "receive"}
    for name in served:
        if name.startswith(("ima_", "nve_", "hv_")):  # the agents' are not running here
            concrete = addresses[name].replace("{nve}", "nve1")
            assert any(_matches(sub, concrete) for sub in subscribed), (
                f"channel {name} ({addresses[name]}) has no subscriber")
