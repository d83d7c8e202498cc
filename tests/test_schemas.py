"""Schemas: normalization at the edge, bounds, token alphabet, closed and frozen models, wire."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import wire
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    AddrAssociate,
    AddressEntry,
    ConnectResult,
    VnConnect,
    VnicShutdown,
    VnRef,
)
from schemas.records import MacBinding, VnRecord
from schemas.types import MAX_TAG, MAX_VNI, normalize_ip_entry, normalize_mac

VN_NAME = "6f1c2f0e-7a1e-4f7e-9a43-1f2e3d4c5b6a"
VNIC = "0b0e6a3c-5d2f-4c1a-8e7b-9a8b7c6d5e4f"


def connect_result(**overrides: object) -> ConnectResult:
    fields: dict[str, object] = {
        "tag": 1,
        "vn_name": VN_NAME,
        "vn_id": 7,
        "vni": 5000,
        "service": "l2",
    }
    fields.update(overrides)
    return ConnectResult.model_validate(fields)


def connect_msg(**overrides: object) -> VnConnect:
    fields: dict[str, object] = {
        "sender": "hv1",
        "seq": 1,
        "vnic": VNIC,
        "port": "eth0",
        "vn": {"alias": "blue"},
    }
    fields.update(overrides)
    return VnConnect.model_validate(fields)


# ------------------------------------------------------------------ MACs


@pytest.mark.parametrize(
    "spelling",
    [
        "AA:BB:CC:DD:EE:F0",
        "aa:bb:cc:dd:ee:f0",
        "aa-bb-cc-dd-ee-f0",
        "AA-BB-CC-DD-EE-F0",
        "aabbccddeef0",
        "AABBCCDDEEF0",
        "  aa:bb:cc:dd:ee:f0 ",
    ],
)
def test_mac_spellings_normalize_to_lower_colon_form(spelling: str) -> None:
    assert normalize_mac(spelling) == "aa:bb:cc:dd:ee:f0"
    assert AddressEntry(mac=spelling).mac == "aa:bb:cc:dd:ee:f0"


@pytest.mark.parametrize(
    "bad",
    [
        "ff:ff:ff:ff:ff:ff",  # broadcast
        "01:00:5e:00:00:01",  # IPv4 multicast
        "33:33:00:00:00:01",  # IPv6 multicast
        "00:00:00:00:00:00",  # all-zero
        "000000000000",
        "aa:bb:cc:dd:ee",  # too short
        "aa:bb:cc:dd:ee:f0:11",  # too long
        "aa:bb-cc:dd:ee:f0",  # mixed separators
        "aa:bb:cc:dd:ee:fg",  # not hex
        "aa.bb.cc.dd.ee.f0",
        "",
    ],
)
def test_bad_macs_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        AddressEntry(mac=bad)


def test_mac_must_be_a_string() -> None:
    with pytest.raises(ValidationError):
        AddressEntry.model_validate({"mac": 0xAABBCCDDEEF0})


# ------------------------------------------------------------------ IPs


@pytest.mark.parametrize(
    ("given_text", "expected"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("10.0.0.5/32", "10.0.0.5"),
        ("10.1.0.0/24", "10.1.0.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:db8::1/128", "2001:db8::1"),
        ("2001:0DB8:0000::/32", "2001:db8::/32"),
    ],
)
def test_ip_entries_normalize(given_text: str, expected: str) -> None:
    assert normalize_ip_entry(given_text) == expected
    entry = AddressEntry(mac="02:00:00:00:00:01", ips=(given_text,))
    assert entry.ips == (expected,)


@pytest.mark.parametrize(
    "bad",
    ["10.1.0.1/24", "2001:db8::1/64", "10.0.0.256", "10.0.0.0/33", "host.example", ""],
)
def test_bad_ip_entries_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        AddressEntry(mac="02:00:00:00:00:01", ips=(bad,))


def test_duplicate_ips_under_one_mac_are_refused_after_normalization() -> None:
    with pytest.raises(ValidationError):
        AddressEntry(mac="02:00:00:00:00:01", ips=("10.0.0.5", "10.0.0.5/32"))


def test_duplicate_macs_in_one_message_are_refused_after_normalization() -> None:
    with pytest.raises(ValidationError):
        AddrAssociate(
            sender="hv1",
            seq=1,
            vnic=VNIC,
            vn=VnRef(alias="blue"),
            entries=(
                AddressEntry(mac="AA:BB:CC:DD:EE:F0"),
                AddressEntry(mac="aabbccddeef0"),
            ),
        )


def test_address_messages_need_at_least_one_entry() -> None:
    with pytest.raises(ValidationError):
        AddrAssociate(sender="hv1", seq=1, vnic=VNIC, vn=VnRef(alias="blue"), entries=())


def test_underlay_must_be_a_host_address() -> None:
    fields = {
        "vn": VN_NAME,
        "vni": 5000,
        "mac": "02:00:00:00:00:01",
        "vnic": VNIC,
        "nve": "nve1",
    }
    assert MacBinding.model_validate({**fields, "underlay": "192.0.2.1"}).underlay == "192.0.2.1"
    with pytest.raises(ValidationError):
        MacBinding.model_validate({**fields, "underlay": "192.0.2.0/24"})


# ------------------------------------------------------------ bounded ints


@pytest.mark.parametrize("tag", [1, 2, 4093, 4094])
def test_tags_in_range_are_accepted(tag: int) -> None:
    assert connect_result(tag=tag).tag == tag


@pytest.mark.parametrize("tag", [0, -1, 4095, 4096, MAX_TAG + 1])
def test_tags_out_of_range_are_refused(tag: int) -> None:
    with pytest.raises(ValidationError):
        connect_result(tag=tag)


@pytest.mark.parametrize("tag", ["5", 5.0, True])
def test_tags_are_strict_ints(tag: object) -> None:
    with pytest.raises(ValidationError):
        connect_result(tag=tag)


@pytest.mark.parametrize("vni", [0, 1 << 24, -1])
def test_vni_out_of_range_is_refused(vni: int) -> None:
    with pytest.raises(ValidationError):
        connect_result(vni=vni)
    with pytest.raises(ValidationError):
        VnRecord(name=VN_NAME, vn_id=1, alias="blue", vni=vni)


@pytest.mark.parametrize("vni", [1, MAX_VNI])
def test_vni_bounds_are_accepted(vni: int) -> None:
    assert connect_result(vni=vni).vni == vni
    assert VnRecord(name=VN_NAME, vn_id=1, alias="blue", vni=vni).vni == vni


@pytest.mark.parametrize("vn_id", [0, 1 << 32])
def test_vn_id_out_of_range_is_refused(vn_id: int) -> None:
    with pytest.raises(ValidationError):
        connect_result(vn_id=vn_id)


# ------------------------------------------------------------------ VnRef


@pytest.mark.parametrize(
    "fields",
    [{"name": VN_NAME}, {"id": 7}, {"alias": "blue"}],
)
def test_vnref_with_exactly_one_field(fields: dict[str, object]) -> None:
    ref = VnRef.model_validate(fields)
    assert str(ref)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"name": VN_NAME, "id": 7},
        {"name": VN_NAME, "alias": "blue"},
        {"id": 7, "alias": "blue"},
        {"name": VN_NAME, "id": 7, "alias": "blue"},
        {"name": None, "id": None, "alias": None},
    ],
)
def test_vnref_needs_exactly_one_field(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        VnRef.model_validate(fields)


def test_vnref_name_is_a_normalized_uuid() -> None:
    upper = VN_NAME.upper()
    assert VnRef(name=upper).name == VN_NAME
    assert VnRef.model_validate({"name": uuid.UUID(VN_NAME)}).name == VN_NAME
    with pytest.raises(ValidationError):
        VnRef(name="not-a-uuid")


def test_alias_is_lowered_and_stripped() -> None:
    assert VnRef(alias="  Blue-Net_1 ").alias == "blue-net_1"


# ----------------------------------------------------------------- tokens

INJECTIONS = ["a.b", "a*", "*", "a>", ">", "a b", " ab", "a\tb", "a\nb", "a/b", "..", "a..b", ""]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_hypervisor_id_refuses_subject_and_key_syntax(bad: str) -> None:
    with pytest.raises(ValidationError):
        connect_msg(sender=bad)


@pytest.mark.parametrize("bad", INJECTIONS)
def test_port_id_refuses_subject_and_key_syntax(bad: str) -> None:
    with pytest.raises(ValidationError):
        connect_msg(port=bad)


@pytest.mark.parametrize("bad", [b for b in INJECTIONS if b != " ab"])  # outer space is stripped
def test_alias_refuses_subject_and_key_syntax(bad: str) -> None:
    with pytest.raises(ValidationError):
        VnRef(alias=bad)


def test_token_length_is_bounded() -> None:
    assert connect_msg(sender="h" * 64).sender == "h" * 64
    with pytest.raises(ValidationError):
        connect_msg(sender="h" * 65)


@pytest.mark.parametrize("good", ["hv1", "HV-1", "rack3_host07", "0"])
def test_valid_tokens_are_accepted(good: str) -> None:
    msg = connect_msg(sender=good, port=good)
    assert (msg.sender, msg.port) == (good, good)


# ----------------------------------------------------- closed, frozen models


def test_extra_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        connect_msg(colour="blue")
    with pytest.raises(ValidationError):
        VnRef.model_validate({"alias": "blue", "extra": 1})
    with pytest.raises(ValidationError):
        AddressEntry.model_validate({"mac": "02:00:00:00:00:01", "vlan": 5})
    with pytest.raises(ValidationError):
        VnRecord.model_validate(
            {"name": VN_NAME, "vn_id": 1, "alias": "blue", "vni": 5, "owner": "x"}
        )


def test_models_are_frozen() -> None:
    msg = connect_msg()
    with pytest.raises(ValidationError):
        msg.seq = 2  # type: ignore[misc]
    entry = AddressEntry(mac="02:00:00:00:00:01")
    with pytest.raises(ValidationError):
        entry.mac = "02:00:00:00:00:02"  # type: ignore[misc]
    record = VnRecord(name=VN_NAME, vn_id=1, alias="blue", vni=5)
    with pytest.raises(ValidationError):
        record.vni = 6  # type: ignore[misc]
    assert msg.seq == 1
    assert hash(msg) == hash(connect_msg())


def test_wrong_version_in_model_is_refused() -> None:
    with pytest.raises(ValidationError):
        connect_msg(v=2)


# ------------------------------------------------------------------- wire


def _code(data: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        wire.decode_hypervisor(data)
    return info.value.code


def _payload(**overrides: object) -> bytes:
    obj: dict[str, object] = {
        "v": 1,
        "kind": "vnic_shutdown",
        "sender": "hv1",
        "seq": 3,
        "vnic": VNIC,
    }
    obj.update(overrides)
    return orjson.dumps({k: v for k, v in obj.items() if v is not None})


def test_decode_valid_message() -> None:
    msg = wire.decode_hypervisor(_payload())
    assert msg == VnicShutdown(sender="hv1", seq=3, vnic=VNIC)


def test_decode_version_defaults_to_current() -> None:
    obj = orjson.loads(_payload())
    del obj["v"]
    assert isinstance(wire.decode_hypervisor(orjson.dumps(obj)), VnicShutdown)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"v": 1, "kind": "vnic_shutdown"',
        b"{",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"42",
        b"null",
        b"\xff\xfe\x00{}",
        b'{"kind": "vnic_shutdown", "sender": "\xff"}',
    ],
)
def test_decode_bad_payload_is_bad_message(data: bytes) -> None:
    assert _code(data) == ErrorCode.BAD_MESSAGE


def test_decode_oversized_payload_is_bad_message() -> None:
    big = _payload(sender="h" * (wire.MAX_PAYLOAD + 1))
    assert len(big) > wire.MAX_PAYLOAD
    assert _code(big) == ErrorCode.BAD_MESSAGE


def test_decode_unsupported_version() -> None:
    assert _code(_payload(v=2)) == ErrorCode.UNSUPPORTED_VERSION
    assert _code(_payload(v=0)) == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("kind", ["vn_create", "ok", "error", "", "VN_CONNECT"])
def test_decode_unknown_kind(kind: str) -> None:
    assert _code(_payload(kind=kind)) == ErrorCode.UNKNOWN_KIND


def test_decode_missing_kind_is_unknown_kind() -> None:
    obj = orjson.loads(_payload())
    del obj["kind"]
    assert _code(orjson.dumps(obj)) == ErrorCode.UNKNOWN_KIND


def test_decode_version_checked_before_kind() -> None:
    assert _code(_payload(v=2, kind="bogus")) == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "overrides",
    [
        {"seq": "3"},
        {"seq": -1},
        {"seq": 1.5},
        {"sender": 5},
        {"vnic": "not-a-uuid"},
        {"vnic": None},
        {"ts_ns": -1},
        {"extra": True},
    ],
)
def test_decode_wrong_field_is_bad_message(overrides: dict[str, object]) -> None:
    assert _code(_payload(**overrides)) == ErrorCode.BAD_MESSAGE


def test_decode_connect_with_bad_vnref_is_bad_message() -> None:
    obj = {
        "kind": "vn_connect",
        "sender": "hv1",
        "seq": 1,
        "vnic": VNIC,
        "port": "eth0",
        "vn": {"alias": "blue", "id": 3},
    }
    assert _code(orjson.dumps(obj)) == ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "data",
    [
        # compact, as our own senders write (the fast path must catch it too)
        b'{"v":1,"kind":"vnic_shutdown","sender":"hv1","seq":3,"seq":4,"vnic":"' + VNIC.encode()
        + b'"}',
        # spaced, escaped, nested: the fallback parser
        b'{"v": 1, "kind": "vnic_shutdown", "sender": "hv1", "seq": 3, "vnic": "'
        + VNIC.encode() + b'", "sender": "hv2"}',
        b'{"v":1,"kind":"vnic_shutdown","sender":"hv1","s\\u0065q":3,"seq":3,"vnic":"'
        + VNIC.encode() + b'"}',
        b'{"v":1,"kind":"addr_associate","sender":"hv1","seq":3,"vnic":"' + VNIC.encode()
        + b'","vn":{"alias":"blue","alias":"red"},"entries":[{"mac":"02:00:00:00:00:01"}]}',
        b'{"v":1,"kind":"addr_associate","sender":"hv1","seq":3,"vnic":"' + VNIC.encode()
        + b'","vn":{"alias":"blue"},"entries":[{"mac":"02:00:00:00:00:01","ips":[],"ips":[]}]}',
    ],
)
def test_duplicate_keys_are_bad_message(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="duplicate key") as info:
        wire.decode_hypervisor(data)
    assert info.value.code == ErrorCode.BAD_MESSAGE


def test_payloads_without_duplicates_decode_on_both_paths() -> None:
    compact = _payload()
    spaced = orjson.dumps(orjson.loads(compact), option=orjson.OPT_INDENT_2)
    escaped = compact.replace(b'"hv1"', b'"h\\u00761"')
    assert spaced != compact
    for data in (compact, spaced, escaped):
        assert wire.decode_hypervisor(data) == VnicShutdown(sender="hv1", seq=3, vnic=VNIC)


@given(st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1),  # orjson's ints
                       min_size=1, max_size=6),
       st.booleans())
@settings(max_examples=200, deadline=None)
def test_duplicate_detection_agrees_with_a_pair_by_pair_parse(
    obj: dict[str, int], spaced: bool
) -> None:
    """Repeat one key (or not), in either spelling: refused exactly when repeated."""
    pairs = list(obj.items())
    for repeat in (False, True):
        items = [*pairs, pairs[0]] if repeat else pairs
        sep = ", " if spaced else ","
        text = "{" + sep.join(f"{orjson.dumps(k).decode()}:{v}" for k, v in items) + "}"
        if repeat:
            with pytest.raises(ProtocolError, match="duplicate key"):
                wire.loads_object(text.encode())
        else:
            assert wire.loads_object(text.encode()) == obj


# ------------------------------------------------------------ round trip


@st.composite
def unicast_macs(draw: st.DrawFn) -> str:
    """A unicast, non-zero MAC in any accepted spelling."""
    octets = [
        draw(st.integers(0, 255)) & 0xFE,
        *draw(st.lists(st.integers(0, 255), min_size=5, max_size=5)),
    ]
    if not any(octets):
        octets[-1] = 1
    text = draw(st.sampled_from([":", "-", ""])).join(f"{b:02x}" for b in octets)
    return text.upper() if draw(st.booleans()) else text


def _network(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, plen: int) -> str:
    plen = min(plen, addr.max_prefixlen)
    return str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))


ip_entries = st.one_of(
    st.ip_addresses().map(str),
    st.builds(_network, st.ip_addresses(), st.integers(0, 128)),
)

tokens = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
aliases = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
vn_refs = st.one_of(
    st.uuids().map(lambda u: VnRef(name=str(u))),
    st.integers(1, (1 << 32) - 1).map(lambda i: VnRef(id=i)),
    aliases.map(lambda a: VnRef(alias=a)),
)


@st.composite
def entry_lists(draw: st.DrawFn) -> tuple[AddressEntry, ...]:
    macs = draw(st.lists(unicast_macs(), min_size=1, max_size=5, unique_by=normalize_mac))
    return tuple(
        AddressEntry(
            mac=mac,
            ips=tuple(draw(st.lists(ip_entries, max_size=4, unique_by=normalize_ip_entry))),
        )
        for mac in macs
    )


associates = st.builds(
    AddrAssociate,
    sender=tokens,
    seq=st.integers(0, (1 << 63) - 1),
    ts_ns=st.integers(0, (1 << 63) - 1),
    vnic=st.uuids().map(str),
    vn=vn_refs,
    entries=entry_lists(),
)


@settings(max_examples=200, deadline=None)
@given(associates)
def test_addr_associate_round_trips_through_the_wire(msg: AddrAssociate) -> None:
    data = wire.dumps(msg)
    decoded = wire.decode_hypervisor(data)
    assert decoded == msg
    assert wire.dumps(decoded) == data


# ------------------------------------------- hot-path shortcuts of the normalizers


def _outcome(fn: Any, value: Any) -> tuple[str, str]:
    try:
        return ("ok", fn(value))
    except ValueError:
        return ("refused", "")


_HEX = "0123456789abcdefABCDEF"
_MAC_LIKE = st.one_of(
    st.lists(st.text(_HEX, min_size=2, max_size=2), min_size=6, max_size=6).flatmap(
        lambda octets: st.sampled_from([":", "-", ""]).map(lambda sep: sep.join(octets))),
    st.text(_HEX + ":-. ", max_size=20),
)
_UUID_LIKE = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                       st.uuids().map(lambda u: u.hex), st.text(_HEX + "-{} ", max_size=40))
_IP_LIKE = st.one_of(
    st.ip_addresses().map(str),
    st.lists(st.integers(0, 300), min_size=4, max_size=4).map(
        lambda o: ".".join(map(str, o))),
    st.lists(st.text("0123456789", min_size=1, max_size=4), min_size=4, max_size=4).map(
        ".".join),
    st.text("0123456789./: abcdef", max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(_MAC_LIKE)
def test_mac_shortcut_agrees_with_the_general_path(value: str) -> None:
    from schemas.types import _normalize_mac, normalize_mac

    assert _outcome(normalize_mac, value) == _outcome(_normalize_mac, value)


@settings(max_examples=400, deadline=None)
@given(_UUID_LIKE)
def test_uuid_shortcut_agrees_with_the_general_path(value: str) -> None:
    from schemas.types import _normalize_uuid, normalize_uuid

    assert _outcome(normalize_uuid, value) == _outcome(_normalize_uuid, value)


@settings(max_examples=400, deadline=None)
@given(_IP_LIKE)
def test_ip_shortcut_agrees_with_the_general_path(value: str) -> None:
    from schemas.types import _normalize_ip_entry, normalize_ip_entry

    assert _outcome(normalize_ip_entry, value) == _outcome(_normalize_ip_entry, value)
