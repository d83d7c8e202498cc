"""Fuzzing the agent sidecar's operator handler (``<root>.v1.agent.<hv>.ctl``).

The NVE's and the IMA's handlers are fuzzed in ``test_fuzz_secured.py``; the
agent's command handler (``nvo3 agent ctl``) takes input from operators and
scripts too.  Hypothesis sends raw bytes and mutated ``AgentCommand`` objects
that can never be executed (wrong types, unknown ops and kinds, bad VNIC ids,
MACs and IPs, missing port or VN, versions, extra fields, junk).  For every
one: the reply is a typed ``ErrorReply``; the agent's desired state is
unchanged; the sidecar is still running; and a valid command sent right after
is executed.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agents.service import AgentService
from nvo3.harness import ControlPlane, start_control_plane
from nvo3.servers import LocalServers
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ErrorReply, OkReply, VnRef
from schemas.operator import AgentCommand
from schemas.wire import decode_model, decode_reply, dumps

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

VNIC = "6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e01"
TYPED = {str(c) for c in ErrorCode}


@pytest.fixture(scope="module")
def plain() -> Any:
    with LocalServers() as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(plain: LocalServers) -> AsyncIterator[tuple[ControlPlane, AgentService]]:
    root = f"fa{uuid.uuid4().hex[:8]}"
    cp = await start_control_plane(plain.nats_urls, plain.etcd_endpoints, f"/{root}/", root,
                                   ("nve1",))
    try:
        assert cp.client is not None
        await cp.client.create("blue")
        svc = await cp.agent_service("hv1", "nve1")
        await svc.agent.connect(VNIC, "eth0", VnRef(alias="blue"))
        yield cp, svc
    finally:
        await cp.stop()


_VALID = orjson.loads(dumps(AgentCommand(op="shutdown", vnic=VNIC)))
_INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
_JUNK = st.one_of(st.none(), st.booleans(), _INT64, st.floats(allow_nan=False),
                  st.text(max_size=20), st.lists(_INT64, max_size=3),
                  st.dictionaries(st.text(max_size=5), _INT64, max_size=2))


@st.composite
def bad_commands(draw: st.DrawFn) -> bytes:
    """A payload the handler must refuse (never an executable command)."""
    how = draw(st.sampled_from(["raw", "field", "drop", "extra", "needs_vn", "needs_port",
                                "version", "kind", "deep"]))
    obj = dict(_VALID)
    if how == "raw":
        return draw(st.binary(max_size=200))
    if how == "field":  # a wrong value in one field
        name = draw(st.sampled_from(["op", "vnic", "port", "vn", "entries"]))
        obj[name] = draw(_JUNK.filter(lambda v: v is not None or name in ("op", "vnic")))
    elif how == "drop":
        del obj[draw(st.sampled_from(["op", "vnic"]))]
    elif how == "extra":
        obj[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in _VALID))] = 1
    elif how == "needs_vn":  # these ops name a VN
        obj["op"] = draw(st.sampled_from(["disconnect", "associate", "disassociate"]))
        obj["port"] = "eth0"
    elif how == "needs_port":
        obj["op"] = draw(st.sampled_from(["connect", "prepare"]))
        obj["vn"] = {"alias": "blue"}
    elif how == "version":
        obj["v"] = draw(st.sampled_from([0, 2, "1", 1.0, None]))
    elif how == "kind":
        obj["kind"] = draw(st.text(max_size=12).filter(lambda k: k != "agent_command"))
    else:  # deeply nested JSON (deeper than orjson itself would write)
        depth = draw(st.integers(100, 5000))
        obj.pop("entries", None)
        head = orjson.dumps(obj)[:-1]
        return head + b',"entries":' + b"[" * depth + b"]" * depth + b"}"
    payload = orjson.dumps(obj)
    if how not in ("needs_vn", "needs_port"):
        assume(not _decodes(payload))  # a mutation may happen to be valid: not a refusal
    return payload


def _decodes(payload: bytes) -> bool:
    try:
        decode_model(payload, AgentCommand)
    except ProtocolError:
        return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=bad_commands())
async def test_agent_ctl_refuses_fuzzed_commands_and_keeps_serving(
    world: tuple[ControlPlane, AgentService], payload: bytes
) -> None:
    cp, svc = world
    subject = cp.ep.subjects.agent_ctl("hv1")
    nc = cp._conns[0]
    before = copy.deepcopy(svc.agent.desired.vnics.get(VNIC))
    msg = await nc.request(subject, payload, timeout=5)
    reply = decode_reply(msg.data)
    assert isinstance(reply, ErrorReply), (payload[:200], reply)
    assert str(reply.code) in TYPED
    assert reply.reason
    assert svc.agent.desired.vnics.get(VNIC) == before
    assert all(not t.done() for t in cp._tasks), "a service stopped"
    # ... and a valid command right after is still executed.
    ok = await nc.request(subject, dumps(AgentCommand(op="startup", vnic=VNIC)), timeout=5)
    assert isinstance(decode_reply(ok.data), OkReply)
