"""Fuzzing the NVE's and the IMA's handlers through real, secured NATS connections.

One secured stack for the module (TLS, NKeys, etcd RBAC; ``tests/secured.py``), one
IMA and one NVE (``nve1``, answering only into the sender's inbox), each as its own
identity (``start_secured``: nvo3.harness). Hypothesis builds requests from the real
message models and mutates them (a dropped field, a wrong type, out-of-range numbers,
invalid MAC/IP/prefix/tag, unicode and NUL junk, duplicate keys, deep nesting,
truncation, spliced bytes, payloads near and over ``max_payload``, unknown kinds and
versions, unknown VNs, replayed and stale sequence numbers), or sends raw bytes, as
``hv:hv1`` (NVE), ``op`` (IMA) or the NVE's data path (``nve:nve1``, gleaning).

The oracle is the decoder itself plus what the NVE checks next: a payload the local
decoder refuses must be refused with the same code; a well-formed one must be
refused for its sender, its unknown VN or its sequence number (the generator never
makes an acceptable request: every sequence number is stale or already used), and a
byte-identical replay must get its original ``ok`` with no IMA write. For every
message: the reply is typed (or, without a reply subject, the drop is counted); the
NVE's tables and every etcd key are unchanged; a well-formed request of ``hv2`` sent
at the same time succeeds; and the services are still running.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import nats.errors
import orjson
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as Nats
from pydantic import BaseModel

from ima.client import ImaClient
from ima.service import ImaService
from ima.store import EtcdStore
from nve.service import NveService
from nvo3.connect import Endpoints
from nvo3.security import hv_identity, nve_identity
from nvo3.servers import LocalServers
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    HYPERVISOR_KINDS,
    AddrAssociate,
    AddrDisassociate,
    AddressEntry,
    AddrObserved,
    AddrReplace,
    ErrorReply,
    HvSync,
    OkReply,
    SyncVnic,
    VnAddresses,
    VnConnect,
    VnDisconnect,
    VnicArrive,
    VnicDepart,
    VnicDisassociate,
    VnicPrepare,
    VnicShutdown,
    VnicStartup,
    VnRef,
)
from schemas.operator import (
    PlacementSet,
    ProfileGet,
    ProfileSet,
    VnCreate,
    VnDelete,
    VnGet,
    VnList,
)
from schemas.profile import AclRule, Qos, VnProfile
from schemas.types import normalize_ip_entry, normalize_mac
from schemas.wire import decode_hypervisor, decode_model, decode_reply, dumps
from tests.secured import quiet, start_secured

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NVE = "nve1"
VNIC_A = str(uuid.uuid5(uuid.NAMESPACE_URL, "fuzz/hv1/a"))  # hv1's
VNIC_B = str(uuid.uuid5(uuid.NAMESPACE_URL, "fuzz/hv2/b"))  # hv2's
MAC_A, MAC_R, MAC_B = "02:00:00:00:0a:01", "02:00:00:00:0a:02", "02:00:00:00:0b:01"
BASE_SEQ = 1 << 62  # hv1's set-up requests use BASE_SEQ + i; fuzzed ones are below or equal
WAIT = 5.0
EXAMPLES = {"nve": 300, "ima": 150, "glean": 100}


def _setup_requests() -> list[Any]:
    """hv1's state before fuzzing: VNIC A on eth0 in blue (L2) and red (L3), one MAC each."""
    blue, red = VnRef(alias="blue"), VnRef(alias="red")
    models: list[Any] = [
        VnConnect(sender="hv1", seq=0, vnic=VNIC_A, port="eth0", vn=blue),
        AddrAssociate(sender="hv1", seq=0, vnic=VNIC_A, vn=blue,
                      entries=(AddressEntry(mac=MAC_A),)),
        VnConnect(sender="hv1", seq=0, vnic=VNIC_A, port="eth0", vn=red,
                  allowed=("10.9.0.0/24",)),
        AddrAssociate(sender="hv1", seq=0, vnic=VNIC_A, vn=red,
                      entries=(AddressEntry(mac=MAC_R, ips=("10.9.0.1",)),)),
    ]
    return [m.model_copy(update={"seq": BASE_SEQ + i}) for i, m in enumerate(models)]


SETUP = _setup_requests()
SETUP_SEQS = [BASE_SEQ + i for i in range(len(SETUP))]


# ------------------------------------------------------------------ the running system


@dataclass(repr=False)  # hypothesis prints the arguments of a failing example
class World:
    stack: LocalServers
    ep: Endpoints
    nve: NveService
    ima: ImaService
    tasks: dict[str, asyncio.Task[None]]
    hv1: Nats  # the fuzzer, as hv:hv1
    hv2: Nats  # the other hypervisor, well-formed requests only
    op: Nats  # the operator: IMA requests
    dp: Nats  # the NVE's data path (nve:nve1): gleaning observations
    inspector: EtcdStore
    blue: str = ""  # blue's VN Name
    known: set[VnRef] = field(default_factory=set)  # every ref naming blue or red
    hv2_seq: int = 0
    hv2_bound: bool = False
    outcomes: Counter[str] = field(default_factory=Counter)

    def assert_running(self) -> None:
        for name, task in self.tasks.items():
            assert not task.done(), f"{name} stopped: {task}"

    async def state(self) -> dict[str, Any]:
        """What a refused message must not change.

        hv2's MAC_B comes and goes (hv2 toggles it during every example); it is
        left out here and checked on its own.
        """
        tables = self.nve.core.tables()
        vnics = copy.deepcopy(tables["vnics"])
        for attachment in vnics.get(VNIC_B, {}).get("vns", {}).values():
            attachment["macs"].pop(MAC_B, None)
        items, _ = await self.inspector.get_prefix(self.ep.key_root)
        keys = {kv.key: kv.value for kv in items if not kv.key.endswith(f"/mac/{MAC_B}")}
        return {"vnics": vnics, "ports": tables["ports"], "profiles": tables["profiles"],
                "newest_hv1": self.nve.core._newest.get("hv1"), "keys": keys}

    async def hv2_binding(self) -> bool:
        return await self.inspector.get(self.ep.layout.mac(self.blue, MAC_B)) is not None

    async def hv2_step(self) -> None:
        """A well-formed request of the other hypervisor, interleaved with the fuzz."""
        self.hv2_seq += 1
        cls = AddrDisassociate if self.hv2_bound else AddrAssociate
        request = cls(sender="hv2", seq=self.hv2_seq, vnic=VNIC_B, vn=VnRef(alias="blue"),
                      entries=(AddressEntry(mac=MAC_B),))
        subject = self.ep.subjects.hv_request(NVE, "hv2", request.kind)
        msg = await self.hv2.request(subject, dumps(request), timeout=WAIT)
        reply = decode_reply(msg.data)
        assert isinstance(reply, OkReply), reply
        assert reply.ima_ops == 1, reply
        self.hv2_bound = not self.hv2_bound


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(secured: LocalServers) -> AsyncIterator[World]:
    s = await start_secured(secured, (NVE,))
    try:
        assert s.ima is not None
        assert s.client is not None
        ep = s.ep
        w = World(secured, ep, s.nves[NVE], s.ima,
                  {"ima": s._tasks[0], "nve": s._nve_tasks[NVE]},  # the IMA's task is first
                  hv1=await s.nats("hv1", quiet, identity=hv_identity("hv1")),
                  hv2=await s.nats("hv2", quiet, identity=hv_identity("hv2")),
                  op=s.client.nc, dp=await s.nats("dp", quiet, identity=nve_identity(NVE)),
                  inspector=await s.new_store("inspector"))
        vns: list[tuple[str, Literal["l2", "l3"]]] = [("blue", "l2"), ("red", "l3")]
        for alias, service in vns:
            vn = (await s.client.create(alias, service=service)).vn
            w.known |= {VnRef(alias=alias), VnRef(name=vn.name), VnRef(id=vn.vn_id)}
            w.blue = w.blue or vn.name
        for request in SETUP:
            reply = await _request(w.hv1, ep, "hv1", request.kind, dumps(request))
            assert isinstance(reply, OkReply), reply
        connect_b = VnConnect(sender="hv2", seq=0, vnic=VNIC_B, port="eth0",
                              vn=VnRef(alias="blue"))
        reply = await _request(w.hv2, ep, "hv2", "vn_connect", dumps(connect_b))
        assert isinstance(reply, OkReply), reply
        yield w
        print(f"fuzz outcomes: {dict(sorted(w.outcomes.items()))}")
    finally:
        await s.stop()


async def _request(nc: Nats, ep: Endpoints, hv: str, kind: str, payload: bytes) -> Any:
    msg = await nc.request(ep.subjects.hv_request(NVE, hv, kind), payload, timeout=WAIT)
    return decode_reply(msg.data)


# ------------------------------------------------------------------ strategies: models

#: Strings that are invalid in every string slot of every message (token, alias, UUID,
#: MAC, IP entry, literal, trace id): subject and key injection, NUL, bidi, group MACs.
JUNK = [
    "", " ", "hv1\x00", "\x00", "blue.*", "a>b", "nve1.hv.hv2", "../vn", "a/b", " eth0",
    "eth0 ", "eth\t0", "\u202eeth0", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
    "00:00:00:00:00:00", "02:00:00:00:00", "02:00:00:00:00:01:02", "10.0.0.300",
    "10.0.0.1/24", "1.2.3.4/33", "::g", "fe80::1%eth0", "not-a-uuid", "é", "\x7f",
    "0" * 100, "\ud800", "\U0001f600",
]
junk_text = st.one_of(
    st.sampled_from(JUNK),
    st.text(max_size=12).map(lambda s: s + "\x00"),
    st.text(max_size=12).map(lambda s: "." + s),
)
json_scalars = st.one_of(
    st.none(), st.booleans(),
    # never a fresh sequence number: >= 2**63 is out of range, below BASE_SEQ is stale
    st.integers(-(2**70), BASE_SEQ - 1), st.integers(2**63, 2**70),
    st.floats(allow_nan=False, allow_infinity=False), junk_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)

unknown_aliases = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,20}\Z").filter(
    lambda a: a not in ("blue", "red"))
vn_refs = st.one_of(
    st.sampled_from([VnRef(alias="blue"), VnRef(alias="red")]),
    unknown_aliases.map(lambda a: VnRef(alias=a)),
    st.uuids().map(lambda u: VnRef(name=str(u))),
    st.integers(1, (1 << 32) - 1).map(lambda i: VnRef(id=i)),
)
unknown_refs = st.one_of(
    unknown_aliases.map(lambda a: VnRef(alias=a)),
    st.uuids().map(lambda u: VnRef(name=str(u))),
)
tokens = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,10}\Z")
vnics = st.one_of(st.sampled_from([VNIC_A, VNIC_B]), st.uuids().map(str))
ports = st.one_of(st.sampled_from(["eth0", "eth1"]), tokens)


@st.composite
def macs(draw: st.DrawFn) -> str:
    known = draw(st.sampled_from([MAC_A, MAC_R, MAC_B, None]))
    if known is not None:
        return known
    octets = [draw(st.integers(0, 255)) & 0xFE, *draw(st.lists(st.integers(0, 255),
                                                                min_size=5, max_size=5))]
    octets[-1] |= 1  # never all-zero
    return ":".join(f"{b:02x}" for b in octets)


ip_entries = st.one_of(
    st.sampled_from(["10.9.0.1", "10.9.0.0/24", "10.9.0.77", "2001:db8::1", "192.0.2.0/28"]),
    st.ip_addresses().map(str),
)
ip_lists = st.lists(ip_entries, max_size=3, unique_by=normalize_ip_entry).map(tuple)
entries = st.builds(AddressEntry, mac=macs(), ips=ip_lists)
entry_lists = st.lists(entries, min_size=1, max_size=4,
                       unique_by=lambda e: normalize_mac(e.mac)).map(tuple)
vn_addresses = st.builds(VnAddresses, vn=vn_refs,
                         entries=st.lists(entries, max_size=2).map(tuple), allowed=ip_lists)
seqs = st.one_of(st.integers(0, BASE_SEQ - 1), st.sampled_from(SETUP_SEQS))
envelope: dict[str, Any] = {"sender": st.just("hv1"), "seq": seqs,
                            "ts_ns": st.integers(0, 2**62)}

hypervisor_messages = st.one_of(
    st.builds(VnConnect, vnic=vnics, port=ports, vn=vn_refs, allowed=ip_lists, **envelope),
    st.builds(VnDisconnect, vnic=vnics, vn=vn_refs, **envelope),
    st.builds(AddrAssociate, vnic=vnics, vn=vn_refs, entries=entry_lists, **envelope),
    st.builds(AddrDisassociate, vnic=vnics, vn=vn_refs, entries=entry_lists, **envelope),
    st.builds(AddrReplace, vnic=vnics, vn=vn_refs,
              entries=st.lists(entries, max_size=3,
                               unique_by=lambda e: normalize_mac(e.mac)).map(tuple),
              **envelope),
    st.builds(VnicDisassociate, vnic=vnics, **envelope),
    st.builds(VnicShutdown, vnic=vnics, **envelope),
    st.builds(VnicStartup, vnic=vnics, **envelope),
    st.builds(VnicDepart, vnic=vnics, **envelope),
    st.builds(VnicPrepare, vnic=vnics, port=ports,
              vns=st.lists(vn_addresses, min_size=1, max_size=2).map(tuple), **envelope),
    st.builds(VnicArrive, vnic=vnics, port=ports,
              vns=st.lists(vn_addresses, max_size=2).map(tuple), **envelope),
    st.builds(HvSync, sync_id=st.integers(0, 5), last=st.booleans(),
              vnics=st.lists(st.builds(SyncVnic, vnic=vnics, port=ports,
                                       vns=st.lists(vn_addresses, min_size=1,
                                                    max_size=2).map(tuple)),
                             max_size=2).map(tuple), **envelope),
    st.sampled_from(SETUP),  # an old request again: replay or (mutated) seq_conflict
)


# ------------------------------------------------------------------ strategies: mutations


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    children = (obj.items() if isinstance(obj, dict)
                else enumerate(obj) if isinstance(obj, list) else ())
    for key, value in children:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _parent(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        obj = obj[key]
    return obj


def _json_type(value: Any) -> str:
    return "number" if type(value) in (int, float) else type(value).__name__


@st.composite
def mutated_objects(draw: st.DrawFn, obj: dict[str, Any], how: str) -> tuple[dict[str, Any], str]:
    """One structural mutation of a message (as a JSON object); returns it and a label."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    if how == "drop":
        path = draw(st.sampled_from([p for p in paths if isinstance(p[-1], str)]))
        del _parent(obj, path)[path[-1]]
        return obj, f"drop {path[-1]}"
    if how == "wrong_type":
        path = draw(st.sampled_from(paths))
        current = _parent(obj, path)[path[-1]]
        value = draw(json_values.filter(lambda v: _json_type(v) != _json_type(current)))
        _parent(obj, path)[path[-1]] = value
        return obj, f"wrong type {path[-1]}"
    if how == "junk_string":
        strings = [p for p in paths if isinstance(_parent(obj, p)[p[-1]], str)]
        path = draw(st.sampled_from(strings))
        _parent(obj, path)[path[-1]] = draw(junk_text)
        return obj, f"junk {path[-1]}"
    if how == "out_of_range":
        ints = [p for p in paths if type(_parent(obj, p)[p[-1]]) is int]
        if not ints:
            return obj, "none"
        path = draw(st.sampled_from(ints))
        _parent(obj, path)[path[-1]] = draw(st.sampled_from(
            [-1, -(2**63) - 1, 2**63, 2**64, 2**128, 4095, 4096, 1 << 24, 1 << 32]))
        return obj, f"range {path[-1]}"
    if how == "bad_address":
        macs_at = [p for p in paths if p[-1] == "mac"]
        ips_at = [p for p in paths if p[-1] in ("ips", "allowed")]
        bad_mac = st.sampled_from(["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
                                   "00:00:00:00:00:00", "02:00:00:00:00", "02-00-00-00-00-0g",
                                   "0200.0000.0001", "02:00:00:00:00:01/48"])
        bad_ip = st.sampled_from(["10.0.0.300", "10.0.0.1/24", "1.2.3.4/33", "::g",
                                  "2001:db8::1/129", "10.0.0.0/-1", "fe80::1%eth0",
                                  "10.9.0.1 ", "0x0a.0.0.1", "10.9.0.1/24"])
        if macs_at and (not ips_at or draw(st.booleans())):
            path = draw(st.sampled_from(macs_at))
            _parent(obj, path)[path[-1]] = draw(bad_mac)
            return obj, "bad mac"
        if ips_at:
            path = draw(st.sampled_from(ips_at))
            _parent(obj, path)[path[-1]] = [*_parent(obj, path)[path[-1]], draw(bad_ip)]
            return obj, "bad ip/prefix"
        return obj, "none"
    if how == "kind":
        obj["kind"] = draw(st.one_of(st.sampled_from(HYPERVISOR_KINDS),
                                     st.sampled_from(["vn_create", "ok", "error", "", "VN_CONNECT",
                                                      "addr_observed"]), junk_text))
        return obj, "kind"
    if how == "version":
        obj["v"] = draw(st.sampled_from([0, 2, -1, 1.0, True, "1", None, [1], 2**64, 1.5]))
        return obj, "version"
    if how == "extra_field":
        dicts = [()] + [p for p in paths if isinstance(_parent(obj, p)[p[-1]], dict)]
        path = draw(st.sampled_from(dicts))
        target = obj if not path else _parent(obj, path)[path[-1]]
        name = draw(st.text(max_size=8).filter(lambda k: k not in target))
        target[name] = draw(json_values)
        return obj, "extra field"
    if how == "sender":
        obj["sender"] = draw(st.one_of(st.sampled_from(["hv2", "hv3", "HV1", "nve1"]), tokens,
                                       junk_text))
        return obj, "sender"
    if how == "unknown_vn":
        refs = [p for p in paths if p[-1] == "vn"]
        if not refs:
            return obj, "none"
        path = draw(st.sampled_from(refs))
        _parent(obj, path)[path[-1]] = draw(st.one_of(
            unknown_refs.map(lambda r: r.model_dump(mode="json", exclude_none=True)),
            st.sampled_from([{}, {"alias": "blue", "id": 1}, {"id": 0}, {"id": 1 << 32},
                             {"alias": "blue.*"}, {"name": "blue"}, {"alias": None}]),
        ))
        return obj, "vn ref"
    return obj, "none"


STRUCTURAL = ["drop", "wrong_type", "junk_string", "out_of_range", "bad_address", "kind",
              "version", "extra_field", "sender", "unknown_vn", "none"]
ENCODINGS = ["compact", "compact", "spaced", "ascii", "duplicate_key", "truncate", "splice",
             "deep", "huge"]


def _encode_dup(value: Any, path: tuple[Any, ...], here: tuple[Any, ...] = ()) -> str:
    """JSON text of ``value`` in which the object at ``path`` repeats its first key."""
    if isinstance(value, dict):
        pairs = [f"{json.dumps(k)}:{_encode_dup(v, path, (*here, k))}" for k, v in value.items()]
        if here == path and pairs:
            pairs.append(pairs[0])
        return "{" + ",".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode_dup(v, path, (*here, i)) for i, v in enumerate(value)) + "]"
    return json.dumps(value)


@st.composite
def encoded(draw: st.DrawFn, obj: dict[str, Any], max_payload: int) -> tuple[bytes, str]:
    how = draw(st.sampled_from(ENCODINGS))
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8", "surrogatepass")
    if how == "spaced":
        return json.dumps(obj, indent=draw(st.sampled_from([None, 1]))).encode(), how
    if how == "ascii":
        return json.dumps(obj, separators=(",", ":")).encode(), how
    if how == "duplicate_key":
        dicts = [()] + [p for p in _paths(obj) if isinstance(_parent(obj, p)[p[-1]], dict)
                        and _parent(obj, p)[p[-1]]]
        path = draw(st.sampled_from(dicts))
        return _encode_dup(obj, path).encode("utf-8", "surrogatepass"), how
    if how == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))], how
    if how == "splice":
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 8)))
        return data[:start] + draw(st.binary(min_size=1, max_size=8)) + data[end:], how
    if how == "deep":
        depth = draw(st.sampled_from([64, 1000, 1100, 5000, 200_000]))
        if draw(st.booleans()):
            inner = b"[" * depth + b"]" * depth
        else:
            inner = b'{"a":' * depth + b"0" + b"}" * depth
        if len(data) > 2 and data.endswith(b"}") and draw(st.booleans()):
            return data[:-1] + b',"deep":' + inner + b"}", how
        return inner, how
    if how == "huge":
        size = draw(st.sampled_from([1 << 16, 1 << 19, max_payload - 2048, max_payload + 1]))
        filler = draw(st.sampled_from(["x", "\x00", "\x7f", "\x85", "é", ":"]))
        width = len(json.dumps(filler)) - 2  # bytes per character once encoded
        strings = [p for p in _paths(obj) if isinstance(_parent(obj, p)[p[-1]], str)]
        big = copy.deepcopy(obj)
        in_a_field: bool = bool(strings) and draw(st.booleans())
        if in_a_field:
            path = draw(st.sampled_from(strings))
            _parent(big, path)[path[-1]] = filler * (size // width)
        else:
            big["pad"] = [filler * (64 // width)] * (size // 67)
        return json.dumps(big, separators=(",", ":")).encode(), how
    return data, how


# ------------------------------------------------------------------ the oracle


def _refs(msg: Any) -> list[VnRef]:
    refs = [msg.vn] if getattr(msg, "vn", None) is not None else []
    refs += [spec.vn for spec in getattr(msg, "vns", ())]
    for vnic in getattr(msg, "vnics", ()):
        refs += [spec.vn for spec in vnic.vns]
    return refs


def expected_nve(w: World, subject_kind: str, payload: bytes) -> ErrorCode | None:
    """The error code the NVE must answer with, or None for an exact replay (ok)."""
    try:
        msg = decode_hypervisor(payload)
    except ProtocolError as exc:
        return exc.code
    if msg.sender != "hv1" or msg.kind != subject_kind:
        return ErrorCode.SENDER_MISMATCH
    if any(ref not in w.known for ref in _refs(msg)):
        return ErrorCode.UNKNOWN_VN
    old = {m.seq: m for m in SETUP}.get(msg.seq)
    if old is not None:
        return None if old == msg else ErrorCode.SEQ_CONFLICT
    assert msg.seq < BASE_SEQ, f"the generator made an acceptable request: {msg!r}"
    return ErrorCode.STALE_SEQ


def _events(label: str, op: str = "") -> None:
    """Hypothesis statistics (``--hypothesis-show-statistics``): what was generated."""
    mutation, _, encoding = label.partition(" / ")
    event(f"mutation: {op + ': ' if op else ''}{mutation.split(' ')[0]}")
    event(f"encoding: {encoding or 'raw'}")


async def _checked(w: World, send: Any) -> None:
    """Run one fuzz send next to one hv2 request; nothing but hv2's MAC may change."""
    before = await w.state()
    await asyncio.gather(send(), w.hv2_step())
    after = await w.state()
    assert after == before
    assert await w.hv2_binding() is w.hv2_bound
    w.assert_running()


# ------------------------------------------------------------------ the NVE


@st.composite
def nve_inputs(draw: st.DrawFn, max_payload: int) -> tuple[str, bytes, str]:
    """(subject kind, payload, label) for hv1's subject."""
    if draw(st.integers(0, 9)) == 0:  # raw bytes
        return draw(st.sampled_from(HYPERVISOR_KINDS)), draw(st.binary(max_size=256)), "raw bytes"
    model = draw(hypervisor_messages)
    obj = orjson.loads(dumps(model))
    if model in SETUP and draw(st.booleans()):
        return model.kind, dumps(model), "replay"
    obj, label = draw(mutated_objects(obj, draw(st.sampled_from(STRUCTURAL))))
    payload, encoding = draw(encoded(obj, max_payload))
    kind: str = model.kind
    if draw(st.integers(0, 19)) == 0:  # the subject names another kind than the payload
        kind = draw(st.sampled_from(HYPERVISOR_KINDS))
    return kind, payload, f"{label} / {encoding}"


@settings(max_examples=EXAMPLES["nve"], deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_nve_refuses_fuzzed_requests_and_keeps_serving(
    world: World, data: st.DataObject
) -> None:
    w = world
    max_payload = w.hv1.max_payload
    kind, payload, label = data.draw(nve_inputs(max_payload), label="input")
    with_reply = data.draw(st.integers(0, 4), label="reply") > 0
    expected = expected_nve(w, kind, payload)
    subject = w.ep.subjects.hv_request(NVE, "hv1", kind)
    _events(label)

    async def send() -> None:
        if len(payload) > max_payload:
            # nats-py refuses before sending; the server would too. The NVE never sees it.
            with pytest.raises(nats.errors.MaxPayloadError):
                await w.hv1.publish(subject, payload)
            w.outcomes["over max_payload"] += 1
            return
        if expected is not None and not with_reply:
            counters = w.nve.counters
            dropped = counters["dropped_no_reply_subject"]
            await w.hv1.publish(subject, payload)
            async with asyncio.timeout(WAIT):
                await w.nve.wait_until(lambda: counters["dropped_no_reply_subject"] > dropped)
            w.outcomes["dropped"] += 1
            return
        msg = await w.hv1.request(subject, payload, timeout=WAIT)
        reply = decode_reply(msg.data)
        if expected is None:
            assert isinstance(reply, OkReply), (label, reply)
            assert reply.ima_ops == 0
            w.outcomes["replayed"] += 1
        else:
            assert isinstance(reply, ErrorReply), (label, payload[:200], reply)
            assert reply.code == expected, (label, payload[:300], reply)
            assert reply.reason
            w.outcomes[str(reply.code)] += 1

    await _checked(w, send)


# ------------------------------------------------------------------ the NVE's gleaning


@st.composite
def observations(draw: st.DrawFn, max_payload: int) -> tuple[bytes, str]:
    """An AddrObserved that can never be learned: hypervisor hv9 has no VNICs here."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256)), "raw bytes"
    model = AddrObserved(hypervisor="hv9", port=draw(ports), tag=draw(st.integers(1, 4094)),
                         mac=draw(macs()), ip=draw(st.none() | ip_entries))
    obj = orjson.loads(dumps(model))
    how = draw(st.sampled_from(["none", "tag", "drop", "wrong_type", "junk_string",
                                "bad_address", "version", "extra_field"]))
    if how == "tag":
        obj["tag"] = draw(st.sampled_from([0, 4095, 4096, -1, 1 << 16, "1", 1.5, True, None]))
        label = "bad tag"
    else:
        obj, label = draw(mutated_objects(obj, how))
    payload, encoding = draw(encoded(obj, max_payload))
    return payload, f"{label} / {encoding}"


@settings(max_examples=EXAMPLES["glean"], deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_nve_gleaning_refuses_fuzzed_observations(world: World, data: st.DataObject) -> None:
    w = world
    max_payload = w.dp.max_payload
    payload, label = data.draw(observations(max_payload), label="input")
    _events(label)
    try:
        decode_model(payload, AddrObserved)
        expected = ErrorCode.NOT_CONNECTED  # well-formed, but nothing uses that port
    except ProtocolError as exc:
        expected = exc.code
    subject = w.ep.subjects.nve_observed(NVE)

    async def send() -> None:
        if len(payload) > max_payload:
            with pytest.raises(nats.errors.MaxPayloadError):
                await w.dp.publish(subject, payload)
            return
        msg = await w.dp.request(subject, payload, timeout=WAIT)
        reply = decode_reply(msg.data)
        assert isinstance(reply, ErrorReply), (label, reply)
        assert reply.code == expected, (label, payload[:300], reply)

    await _checked(w, send)


# ------------------------------------------------------------------ the IMA

IMA_MODELS: dict[str, type[BaseModel]] = {
    "create": VnCreate, "get": VnGet, "list": VnList, "delete": VnDelete,
    "profile_set": ProfileSet, "profile_get": ProfileGet, "placement_set": PlacementSet,
}
profiles = st.builds(
    VnProfile,
    acl=st.lists(st.builds(AclRule, action=st.sampled_from(["permit", "deny"]),
                           dst=st.none() | ip_entries,
                           dst_port=st.none() | st.integers(1, 65535)),
                 max_size=2).map(tuple),
    qos=st.builds(Qos, dscp=st.none() | st.integers(0, 63)),
)
# Requests that change nothing even when well-formed: create repeats blue (idempotent) or
# conflicts with it, delete names an unknown VN or blue (in use), profile_set an unknown
# VN. placement_set is always mutated into a refusal (a well-formed one would be applied).
ima_requests = st.one_of(
    st.builds(VnCreate, alias=st.just("blue"),
              service=st.sampled_from(["l2", "l3"]),
              vn_id=st.none() | st.integers(1, 1 << 20)),
    st.builds(VnGet, vn=vn_refs),
    st.just(VnList()),
    st.builds(VnDelete, vn=st.one_of(unknown_refs, st.just(VnRef(alias="blue")))),
    st.builds(ProfileSet, vn=unknown_refs, profile=profiles),
    st.builds(ProfileGet, vn=vn_refs),
    st.builds(PlacementSet, vnic=vnics, hypervisor=tokens),
)
OP_OF: dict[type[BaseModel], str] = {model: op for op, model in IMA_MODELS.items()}
REFUSING = ["drop", "wrong_type", "junk_string", "version", "extra_field"]


@st.composite
def ima_inputs(draw: st.DrawFn, max_payload: int) -> tuple[str, bytes, str]:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(sorted(IMA_MODELS))), draw(st.binary(max_size=256)), "raw"
    model = draw(ima_requests)
    op = OP_OF[type(model)]
    obj = orjson.loads(dumps(model))
    for _ in range(5):  # placement_set: until the mutation makes it invalid
        mutated, label = draw(mutated_objects(obj, draw(st.sampled_from(
            REFUSING if op == "placement_set" else ["none", *REFUSING, "out_of_range",
                                                    "unknown_vn"]))))
        payload, encoding = draw(encoded(mutated, max_payload))
        if op != "placement_set" or _ima_error(op, payload) is not None:
            return op, payload, f"{label} / {encoding}"
    return op, b"{\"v\": 2}", "version / fallback"


def _ima_error(op: str, payload: bytes) -> ErrorCode | None:
    try:
        decode_model(payload, IMA_MODELS[op])
    except ProtocolError as exc:
        return exc.code
    return None


@settings(max_examples=EXAMPLES["ima"], deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_ima_refuses_fuzzed_requests_and_keeps_serving(
    world: World, data: st.DataObject
) -> None:
    w = world
    max_payload = w.op.max_payload
    op, payload, label = data.draw(ima_inputs(max_payload), label="input")
    _events(label, op)
    expected = _ima_error(op, payload)
    subject = w.ep.subjects.ima(op)
    client = ImaClient(w.op, w.ep.subjects)

    async def send() -> None:
        if len(payload) > max_payload:
            with pytest.raises(nats.errors.MaxPayloadError):
                await w.op.publish(subject, payload)
            return
        msg, blue = await asyncio.gather(w.op.request(subject, payload, timeout=WAIT),
                                         client.get(VnRef(alias="blue")))
        assert blue.alias == "blue"  # the IMA keeps answering others meanwhile
        reply = orjson.loads(msg.data)
        if expected is not None:
            error = ErrorReply.model_validate(reply)
            assert error.code == expected, (label, payload[:300], error)
        elif op == "create":
            assert reply["kind"] == "error" or reply["created"] is False, reply
        elif op in ("delete", "profile_set"):
            assert ErrorReply.model_validate(reply).code in (ErrorCode.UNKNOWN_VN,
                                                             ErrorCode.VN_IN_USE), reply
        else:
            assert op != "placement_set", reply
            assert reply["kind"] in ("vn", "vn_list", "profile", "error"), reply

    await _checked(w, send)


@pytest.mark.parametrize("where", ["mac", "ip", "vnic", "kind", "v", "key", "duplicate", "ima"])
async def test_a_huge_bad_value_gets_an_error_reply_that_fits(world: World, where: str) -> None:
    """Reasons quote bad values, and a repr grows \\x7f fourfold: a 600 KB request once
    made a 2.4 MB error reply, NATS refused it, and the NVE's request loop died."""
    w = world
    junk = "\x7f" * (w.hv1.max_payload // 3)
    obj = orjson.loads(dumps(SETUP[1]))
    obj["seq"] = 7
    if where == "mac":
        obj["entries"] = [{"mac": junk}, {"mac": "02:00:00:00:00:09", "ips": [junk]}]
    elif where == "ip":
        obj["entries"] = [{"mac": "02:00:00:00:00:09", "ips": [junk]}]
    elif where in ("vnic", "kind", "v"):
        obj[where] = junk
    elif where == "key":
        obj[junk] = 1
    payload = orjson.dumps(obj)
    if where == "duplicate":
        payload = b'{"' + junk.encode() + b'":1,' + payload[1:-1] + b',"' + junk.encode() + b'":2}'
    nc, subject = w.hv1, w.ep.subjects.hv_request(NVE, "hv1", "addr_associate")
    if where == "ima":
        nc, subject = w.op, w.ep.subjects.ima("create")
        payload = orjson.dumps({"kind": "vn_create", "alias": "blue", "name": junk})

    async def send() -> None:
        assert len(payload) < w.hv1.max_payload
        msg = await nc.request(subject, payload, timeout=WAIT)
        reply = decode_reply(msg.data)
        assert isinstance(reply, ErrorReply)
        assert reply.code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_KIND,
                              ErrorCode.UNSUPPORTED_VERSION)
        assert len(msg.data) < 4096, reply.reason[:200]

    await _checked(w, send)


async def test_services_survived_the_fuzzing(world: World) -> None:
    """Last in the module: the NVE and the IMA still run and still serve hv2."""
    world.assert_running()
    reply = await _request(world.hv2, world.ep, "hv2", "vnic_shutdown",
                           dumps(VnicShutdown(sender="hv2", seq=world.hv2_seq + 1, vnic=VNIC_B)))
    assert isinstance(reply, OkReply), reply
