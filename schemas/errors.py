"""The error vocabulary of the protocol: one code per way a request can fail.

Every refused request gets exactly one of these codes in an ``error`` reply
and changes nothing; operators and agents branch on the code, humans read the
reason.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BAD_MESSAGE = "bad_message"  # not JSON, wrong shape, invalid field
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    SENDER_MISMATCH = "sender_mismatch"  # payload sender differs from the subject
    SEQ_CONFLICT = "seq_conflict"  # same (sender, seq) with different content
    STALE_SEQ = "stale_seq"  # older than the sender's newest applied request: reordered
    UNKNOWN_VN = "unknown_vn"
    VN_EXISTS = "vn_exists"  # create with a name/alias/id already bound differently
    VN_IN_USE = "vn_in_use"  # delete of a VN that still has address bindings
    UNKNOWN_VNIC = "unknown_vnic"
    NOT_CONNECTED = "not_connected"  # VNIC is not connected to that VN
    PORT_MISMATCH = "port_mismatch"  # VNIC is bound to another port
    VNIC_OWNED_ELSEWHERE = "vnic_owned_elsewhere"  # another hypervisor announced it
    TAGS_EXHAUSTED = "tags_exhausted"
    MAC_CONFLICT = "mac_conflict"
    IP_CONFLICT = "ip_conflict"
    IP_REQUIRED = "ip_required"  # L3 VN [3.1.2]
    VNI_EXHAUSTED = "vni_exhausted"
    INVALID_TRANSITION = "invalid_transition"  # lifecycle event not allowed in this state
    ADDRESS_FROZEN = "address_frozen"  # moved too often: duplicate detection (EVPN)
    NOT_AUTHORIZED = "not_authorized"  # outside what the VNIC may use
    AMBIGUOUS = "ambiguous"  # a gleaned address matches no single VNIC
    RATE_LIMITED = "rate_limited"  # this hypervisor sent more than its share
    IMA_UNAVAILABLE = "ima_unavailable"
    NVE_UNREACHABLE = "nve_unreachable"  # an agent could not reach its NVE (will resync)
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A refusal that becomes a typed ``error`` reply.

    Raised by the pure cores before they mutate anything, so raising one is
    always safe: the request had no effect.
    """

    def __init__(self, code: ErrorCode, reason: str, **fields: Any) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.fields = fields


class BadMessage(ProtocolError):
    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(ErrorCode.BAD_MESSAGE, reason, **fields)


class UnknownVn(ProtocolError):
    def __init__(self, ref: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_VN, f"no VN {ref} in the IMA registry", vn=ref)


class Conflict(ProtocolError):
    """A claim on something (MAC, IP, VNIC, name) already held by someone else."""


class Exhausted(ProtocolError):
    """A finite space (802.1Q tags on a port, 24-bit VN contexts) has run out."""
