"""Bytes <-> models with orjson, refusing bad input with a typed error.

The decode order matters for the error an agent sees: not JSON -> bad_message,
wrong ``v`` -> unsupported_version, unknown ``kind`` -> unknown_kind, and only
then field validation.  Nothing is applied before all of it passes.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.base import PROTOCOL_VERSION
from schemas.errors import BadMessage, ErrorCode, ProtocolError
from schemas.messages import HYPERVISOR_KINDS, HypervisorMessage, Reply

MAX_PAYLOAD = 1 << 20  # nats-server's default max_payload (1 MiB)

_HYPERVISOR = TypeAdapter[HypervisorMessage](HypervisorMessage)
_REPLY = TypeAdapter[Reply](Reply)

M = TypeVar("M", bound=BaseModel)


def dumps(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def loads_object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_PAYLOAD:
        raise BadMessage(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    if not data:
        raise BadMessage("empty payload")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadMessage("payload must be a JSON object")
    return obj


def _check_version(obj: dict[str, Any]) -> None:
    version = obj.get("v", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:  # true/1.0 are not 1
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
        )


def summarize(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def decode_hypervisor(data: bytes) -> HypervisorMessage:
    obj = loads_object(data)
    _check_version(obj)
    kind = obj.get("kind")
    if kind not in HYPERVISOR_KINDS:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {kind!r}")
    try:
        return _HYPERVISOR.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage(summarize(exc)) from None


def decode_model(data: bytes, model: type[M]) -> M:
    obj = loads_object(data)
    _check_version(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadMessage(summarize(exc)) from None


def decode_reply(data: bytes) -> Reply:
    try:
        return _REPLY.validate_json(data)
    except ValidationError as exc:
        raise BadMessage(f"unreadable reply: {summarize(exc)}") from None
