"""Normalized scalar types shared by every message and record.

Normalizing at the edge (draft section 2 terminology) means the cores never
compare two spellings of the same MAC or prefix: a MAC is always lower-case
colon form, an IP entry always the canonical ``ipaddress`` text, a tag always
1-4094.  Identifiers that end up in NATS subjects or etcd keys are restricted
to a token alphabet so that no value can inject ``.``, ``*``, ``>``,
whitespace, ``/`` or ``..`` into a subject or key.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

MAX_TAG = 4094
MAX_VNI = (1 << 24) - 1
MAX_VN_ID = (1 << 32) - 1

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_TOKEN_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_ALIAS_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"


# Canonical spellings (fixed points of the normalizers below): the common case on the
# hot path, returned as they are without the general parsing (tests/test_schemas.py
# checks that the shortcut and the general path always agree).
_CANONICAL_MAC = re.compile(r"[0-9a-f][02468ace](?::[0-9a-f]{2}){5}")  # unicast
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_ZERO_MAC = "00:00:00:00:00:00"


def normalize_mac(value: Any) -> str:
    """Accept ``AA:BB..``, ``aa-bb-..`` or ``aabb..``; refuse group and zero MACs.

    A VNIC's address must be a unicast station address [3.1]: broadcast,
    multicast (I/G bit set) and all-zero MACs can never identify one VNIC.
    """
    if type(value) is str and _CANONICAL_MAC.fullmatch(value) and value != _ZERO_MAC:
        return value
    return _normalize_mac(value)


def _normalize_mac(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("MAC must be a string")
    text = value.strip().lower()
    if not _MAC_RE.match(text):
        raise ValueError(f"not a MAC address: {value!r}")
    digits = text.replace(":", "").replace("-", "")
    octets = [digits[i : i + 2] for i in range(0, 12, 2)]
    if int(octets[0], 16) & 1:
        raise ValueError(f"MAC {value!r} is a group (multicast/broadcast) address")
    if digits == "0" * 12:
        raise ValueError("the all-zero MAC is not a station address")
    return ":".join(octets)


def normalize_ip_entry(value: Any) -> str:
    """One IP entry: a host address (``10.0.0.5``) or a prefix (``10.1.0.0/24``).

    A prefix is one entry, not an expansion [3.1]: a load balancer's VIP range
    is signalled as a mask.  Host bits set in a prefix are refused rather than
    silently masked, so a typo cannot claim someone else's range.
    """
    if type(value) is str and _CANONICAL_IPV4.fullmatch(value):
        return value  # a host address, already as ``str(ip_network(value))`` spells it
    return _normalize_ip_entry(value)


def _normalize_ip_entry(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("IP entry must be a string")
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IP address or prefix: {value!r} ({exc})") from None
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def normalize_uuid(value: Any) -> str:
    if type(value) is str and _CANONICAL_UUID.fullmatch(value):
        return value
    return _normalize_uuid(value)


def _normalize_uuid(value: Any) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise ValueError("must be a UUID string")
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise ValueError(f"not a UUID: {value!r}") from None


def _strip_lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Mac = Annotated[str, BeforeValidator(normalize_mac)]
IpEntry = Annotated[str, BeforeValidator(normalize_ip_entry)]
Uuid = Annotated[str, BeforeValidator(normalize_uuid)]
VnName = Uuid
VnicName = Uuid
Token = Annotated[str, StringConstraints(pattern=_TOKEN_RE)]
HypervisorId = Token
NveId = Token
PortId = Token
Alias = Annotated[str, BeforeValidator(_strip_lower), StringConstraints(pattern=_ALIAS_RE)]
Tag = Annotated[int, Field(strict=True, ge=1, le=MAX_TAG)]
Vni = Annotated[int, Field(strict=True, ge=1, le=MAX_VNI)]
VnId = Annotated[int, Field(strict=True, ge=1, le=MAX_VN_ID)]
Seq = Annotated[int, Field(strict=True, ge=0, le=(1 << 63) - 1)]
TimestampNs = Annotated[int, Field(strict=True, ge=0)]
#: A trace id: 16 lower-case hex digits, chosen by the agent per event and carried
#: to the NVE's log, the IMA binding and the remote NVE's log ("" in a record: none).
TraceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
RecordTrace = Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{16})?$")]
NveEpoch = Annotated[int, Field(strict=True, ge=0, le=(1 << 63) - 1)]


def _host_ip(value: Any) -> str:
    text = normalize_ip_entry(value)
    if "/" in text:
        raise ValueError("an underlay address must be a host address, not a prefix")
    return text


UnderlayIp = Annotated[str, AfterValidator(_host_ip)]


def ip_key(entry: str) -> str:
    """Key-safe spelling of an IP entry: ``/`` is a path separator in etcd keys."""
    return entry.replace("/", "_")
