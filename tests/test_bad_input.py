"""Every bad or refused request gets its typed error and changes nothing.

Raw bytes go to the NVE over a real NATS connection; after each refusal the
NVE's tables and the etcd keys are compared with what they were before.

Every test runs twice (``cp`` is parametrized): on the plain stack, and on a secured
one (TLS, one NKey identity per process, etcd RBAC; ``tests/secured.py``), where each
request is sent by the hypervisor whose subject it uses (``hv:hv1``, ``hv:hv2``), the
IMA requests by ``op``, and the NVE answers only into the sender's own inbox. The
refusals happen in the NVE and the IMA on both stacks; on the secured one a request on
another hypervisor's subject does not even reach the NVE (the server refuses the
publish), which ``test_every_bad_input_...`` checks too.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import orjson
import pytest

from nvo3.security import hv_identity
from schemas.wire import MAX_PAYLOAD
from tests.secured import (
    STACKS,
    Violations,
    request_counters,
    settle,
    start_on_stack,
)
from tests.slice import Slice

pytestmark = pytest.mark.integration

VNIC = str(uuid.uuid5(uuid.NAMESPACE_URL, "bad/a"))
OTHER = str(uuid.uuid5(uuid.NAMESPACE_URL, "bad/b"))


@pytest.fixture(params=STACKS)
async def cp(request: pytest.FixtureRequest) -> AsyncIterator[Slice]:
    s = await start_on_stack(request, ("nve1",))
    try:
        assert s.client is not None
        await s.client.create("blue", service="l2")
        await s.client.create("red", service="l3")
        hv1 = await s.agent("hv1", "nve1")
        await hv1.connect(VNIC, "eth0", _ref("blue"))
        await hv1.associate(VNIC, _ref("blue"), (_entry("02:00:00:00:00:01"),))
        await hv1.connect(VNIC, "eth0", _ref("red"))
        yield s
    finally:
        await s.stop()


def _ref(alias: str) -> Any:
    from schemas.messages import VnRef

    return VnRef(alias=alias)


def _entry(mac: str, *ips: str) -> Any:
    from schemas.messages import AddressEntry

    return AddressEntry(mac=mac, ips=ips)


SEQ = 2**62  # above the agent's wall-clock-based numbers: never "stale"


def _msg(kind: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": kind, "sender": "hv1", "seq": fields.pop("seq", SEQ), **fields}


def _assoc(mac: str, vn: str = "blue", vnic: str = VNIC, **extra: Any) -> dict[str, Any]:
    return _msg("addr_associate", vnic=vnic, vn={"alias": vn},
                entries=[{"mac": mac, "ips": extra.pop("ips", [])}], **extra)


CASES: list[tuple[str, str, str, bytes]] = [
    ("empty", "hv1", "addr_associate", b""),
    ("truncated", "hv1", "addr_associate", orjson.dumps(_assoc("02:00:00:00:00:09"))[:-7]),
    ("not-an-object", "hv1", "addr_associate", b"[1, 2, 3]"),
    ("invalid-utf8", "hv1", "addr_associate", b'{"kind": "\xff\xfe"}'),
    ("nul-bytes", "hv1", "addr_associate", b"\x00\x00\x00"),
    ("deeply-nested", "hv1", "addr_associate", b"[" * 5000 + b"]" * 5000),
    # orjson would keep the last "seq"; the NVE refuses the payload instead
    ("duplicate-key", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09"))[:-1] + b',"seq":1}'),
    ("version-2", "hv1", "addr_associate", orjson.dumps({**_assoc("02:00:00:00:00:09"), "v": 2})),
    ("unknown-kind", "hv1", "teleport", orjson.dumps(_msg("teleport", vnic=VNIC))),
    ("extra-field", "hv1", "vnic_shutdown",
     orjson.dumps({**_msg("vnic_shutdown", vnic=VNIC), "evil": 1})),
    ("vnic-not-uuid", "hv1", "vnic_shutdown", orjson.dumps(_msg("vnic_shutdown", vnic="web-1"))),
    ("broadcast-mac", "hv1", "addr_associate", orjson.dumps(_assoc("ff:ff:ff:ff:ff:ff"))),
    ("multicast-mac", "hv1", "addr_associate", orjson.dumps(_assoc("01:00:5e:00:00:01"))),
    ("zero-mac", "hv1", "addr_associate", orjson.dumps(_assoc("00:00:00:00:00:00"))),
    ("bad-ip", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09", ips=["10.0.0.300"]))),
    ("prefix-host-bits", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09", ips=["10.0.0.1/24"]))),
    ("alias-injection", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09", vn="blue.*"))),
    ("alias-key-injection", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09", vn="../vn"))),
    ("vn-id-zero", "hv1", "vn_connect",
     orjson.dumps(_msg("vn_connect", vnic=VNIC, port="eth0", vn={"id": 0}))),
    ("port-injection", "hv1", "vn_connect",
     orjson.dumps(_msg("vn_connect", vnic=VNIC, port="eth0.>", vn={"alias": "blue"}))),
    ("sender-mismatch", "hv2", "addr_associate", orjson.dumps(_assoc("02:00:00:00:00:09"))),
    ("kind-mismatch", "hv1", "vnic_shutdown", orjson.dumps(_assoc("02:00:00:00:00:09"))),
    ("unknown-vn", "hv1", "addr_associate", orjson.dumps(_assoc("02:00:00:00:00:09", vn="green"))),
    ("unknown-vnic", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09", vnic=OTHER))),
    ("l3-without-ip", "hv1", "addr_associate",
     orjson.dumps(_assoc("02:00:00:00:00:09", vn="red"))),
    ("other-hypervisors-vnic", "hv2", "vnic_shutdown",
     orjson.dumps({**_msg("vnic_shutdown", vnic=VNIC), "sender": "hv2"})),
    ("not-connected", "hv1", "vn_disconnect",
     orjson.dumps(_msg("vn_disconnect", vnic=VNIC, vn={"alias": "green"}))),
]

EXPECTED = {
    "empty": "bad_message", "truncated": "bad_message", "not-an-object": "bad_message",
    "invalid-utf8": "bad_message", "nul-bytes": "bad_message", "deeply-nested": "bad_message",
    "duplicate-key": "bad_message",
    "version-2": "unsupported_version", "unknown-kind": "unknown_kind",
    "extra-field": "bad_message", "vnic-not-uuid": "bad_message",
    "broadcast-mac": "bad_message", "multicast-mac": "bad_message", "zero-mac": "bad_message",
    "bad-ip": "bad_message", "prefix-host-bits": "bad_message",
    "alias-injection": "bad_message", "alias-key-injection": "bad_message",
    "vn-id-zero": "bad_message", "port-injection": "bad_message",
    "sender-mismatch": "sender_mismatch", "kind-mismatch": "sender_mismatch",
    "unknown-vn": "unknown_vn", "unknown-vnic": "unknown_vnic", "l3-without-ip": "ip_required",
    "other-hypervisors-vnic": "vnic_owned_elsewhere", "not-connected": "unknown_vn",
}


def _local(cp: Slice) -> tuple[Any, Any]:
    tables = cp.nves["nve1"].core.tables()
    return tables["vnics"], tables["ports"]


async def _hv(cp: Slice, hv: str) -> Any:
    """The NATS connection of hypervisor ``hv`` (on the secured stack: as ``hv:<hv>``)."""
    for nc in cp._conns:
        if nc.options["name"] == hv:
            return nc
    return await cp.nats(hv, identity=hv_identity(hv))


async def _request(cp: Slice, hv: str, kind: str, payload: bytes) -> dict[str, Any]:
    nc = await _hv(cp, hv)
    subject = cp.ep.subjects.hv_request("nve1", hv, kind)
    msg = await nc.request(subject, payload, timeout=5)
    reply: dict[str, Any] = orjson.loads(msg.data)
    return reply


async def test_every_bad_input_gets_its_typed_error_and_changes_nothing(cp: Slice) -> None:
    before_tables = _local(cp)
    before_keys = await cp.keys()
    codes = {}
    for name, hv, kind, payload in CASES:
        reply = await _request(cp, hv, kind, payload)
        assert reply["kind"] == "error", (name, reply)
        assert reply["reason"]
        codes[name] = reply["code"]
    assert codes == EXPECTED
    assert _local(cp) == before_tables
    assert await cp.keys() == before_keys
    if cp.ep.secure:
        await _another_hypervisors_subject_is_refused_by_the_server(cp)


async def _another_hypervisors_subject_is_refused_by_the_server(cp: Slice) -> None:
    """Secured stack: hv1 cannot even send "sender-mismatch" on hv2's subject.

    On the plain stack any client may publish there and the NVE refuses the payload
    (``sender_mismatch`` above, sent here by ``hv:hv2`` itself); with auth on, nats-server
    refuses hv1's publish, the NVE never sees it and the request gets no answer.
    """
    errors = Violations()
    nc = await cp.nats("hv1-spoofing", errors.record, identity=hv_identity("hv1"))
    nve = cp.nves["nve1"]
    before = request_counters(nve)
    subject = cp.ep.subjects.hv_request("nve1", "hv2", "addr_associate")
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, orjson.dumps(_assoc("02:00:00:00:00:09")), timeout=0.5)
    await settle(nc)
    assert errors.publish() == [f'nats: permissions violation for publish to "{subject}"']
    assert request_counters(nve) == before


async def test_same_seq_with_different_content_is_refused(cp: Slice) -> None:
    first = await _request(cp, "hv1", "addr_associate",
                           orjson.dumps(_assoc("02:00:00:00:00:0b", seq=SEQ + 99)))
    assert first["kind"] == "ok"
    keys = await cp.keys()
    second = await _request(cp, "hv1", "addr_associate",
                            orjson.dumps(_assoc("02:00:00:00:00:0c", seq=SEQ + 99)))
    assert second["code"] == "seq_conflict"
    assert await cp.keys() == keys


async def test_oversize_payload_is_refused_before_parsing(cp: Slice) -> None:
    nc = await _hv(cp, "hv1")
    if nc.max_payload <= MAX_PAYLOAD:
        # The server refuses it for us: nats-py raises before anything is sent.
        from nats.errors import MaxPayloadError

        with pytest.raises(MaxPayloadError):
            await nc.request(cp.ep.subjects.hv_request("nve1", "hv1", "addr_associate"),
                             b"x" * (nc.max_payload + 1), timeout=2)
    from schemas.errors import BadMessage
    from schemas.wire import decode_hypervisor

    with pytest.raises(BadMessage):
        decode_hypervisor(b" " * (MAX_PAYLOAD + 1))


async def test_ima_refuses_bad_vn_create(cp: Slice) -> None:
    assert cp.client is not None
    nc = cp.client.nc  # the operator's connection (``op`` when secured)
    for payload, code in [
        (b"{}", "bad_message"),
        (orjson.dumps({"kind": "vn_create", "alias": "x", "vn_id": 0}), "bad_message"),
        (orjson.dumps({"kind": "vn_create", "alias": "a/../b"}), "bad_message"),
        (orjson.dumps({"kind": "vn_create", "alias": "blue", "service": "l3"}), "vn_exists"),
    ]:
        msg = await nc.request(cp.ep.subjects.ima("create"), payload, timeout=5)
        assert orjson.loads(msg.data)["code"] == code, payload


async def test_a_request_older_than_the_newest_applied_is_refused(cp: Slice) -> None:
    newer = await _request(cp, "hv1", "addr_associate",
                           orjson.dumps(_assoc("02:00:00:00:00:0d", seq=SEQ + 200)))
    assert newer["kind"] == "ok"
    keys = await cp.keys()
    older = await _request(cp, "hv1", "addr_disassociate", orjson.dumps(
        _msg("addr_disassociate", vnic=VNIC, vn={"alias": "blue"},
             entries=[{"mac": "02:00:00:00:00:0d"}], seq=SEQ + 150)))
    assert older["code"] == "stale_seq"  # delivered late: must not undo the newer one
    assert await cp.keys() == keys
