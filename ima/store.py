"""The single adapter between nvo3 and etcd.

Everything else in the project talks to etcd only through :class:`EtcdStore`, so the
quirks of etcd and of the ``etcd3aio`` client are handled (and tested) in one place:

* keys are ``str`` and values ``bytes`` at this API; etcd only knows bytes;
* etcd refuses transactions with more than 128 operations, or with the same key written
  twice, and gRPC refuses messages over 4 MiB, so big writes are split and big reads paged;
* ``etcd3aio``'s watch silently skips history after a compaction and, after a reconnect,
  may resume from the *current* revision instead of the last delivered one; both would
  make a cache miss events without noticing, so :class:`PrefixWatch` restarts streams
  itself from the revision it has actually delivered and surfaces compaction as
  :class:`WatchCompacted`;
* transport failures are retried within each call's ``timeout`` and then surface as
  :class:`StoreUnavailable`, so callers need not know about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeAlias, TypeVar

import grpc
import grpc.aio
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from etcd3aio.errors import EtcdConnectionError, EtcdTransientError
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

__all__ = [
    "CommitResult",
    "Compare",
    "Delete",
    "EtcdStore",
    "Get",
    "KeyMissing",
    "KeyValue",
    "LeaseLost",
    "ModRevisionEquals",
    "Op",
    "OpResult",
    "Page",
    "PrefixWatch",
    "Put",
    "RevisionCompacted",
    "StoreError",
    "StoreUnavailable",
    "TlsConfig",
    "TxnOp",
    "TxnResult",
    "TxnTooLarge",
    "ValueEquals",
    "VersionEquals",
    "WatchCompacted",
    "WatchEvent",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: etcd's default ``--max-txn-ops``; also the limit on compares per transaction.
MAX_TXN_OPS = 128
#: Budget per transaction request; etcd's default ``--max-request-bytes`` is 1.5 MiB and
#: the estimate below ignores protobuf framing, so stay well under it.
MAX_TXN_BYTES = 1 << 20
_OP_OVERHEAD_BYTES = 32


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base of every error this module raises, so callers can catch the store as a whole."""


class StoreUnavailable(StoreError):
    """etcd could not be reached (or did not answer in time) even after retries.

    Transient by nature: the right reaction is usually to back off and try again.
    """


class RevisionCompacted(StoreError):
    """A read or watch asked for history that etcd has already compacted away.

    Whoever keeps a cache must re-list (``get_prefix``) and watch from the new revision.
    """

    def __init__(self, revision: int, message: str | None = None) -> None:
        super().__init__(message or f"revision {revision} has been compacted")
        self.revision = revision


class WatchCompacted(RevisionCompacted):
    """The watch's start (or resume) revision is older than etcd's compaction point."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(
            compact_revision,
            f"watch start revision compacted (etcd compacted up to {compact_revision})",
        )
        self.compact_revision = compact_revision


class TxnTooLarge(StoreError):
    """A single transaction exceeds etcd's operation-count or request-size limit.

    Raised before sending when we can tell, so an oversized atomic change fails loudly
    instead of being split (which would silently lose atomicity).
    """


class LeaseLost(StoreError):
    """The lease expired or was revoked; keys attached to it are gone (or about to be)."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    #: ``b""`` for deletes: etcd does not send the old value unless asked (prev_kv).
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Page:
    """One chunk of a prefix listing; every page of one listing shares ``revision``."""

    kvs: list[KeyValue]
    revision: int


@dataclass(frozen=True)
class TlsConfig:
    ca_cert: bytes
    cert_chain: bytes | None = None
    key: bytes | None = None
    #: Needed for hostname verification because etcd3aio dials an ``ipv4:`` address list.
    server_name: str | None = None


# --------------------------------------------------------------------------- txn model


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    #: With ``prefix`` the key is a prefix and every key under it is deleted.
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    """Read inside a transaction, typically in ``failure`` to learn why a CAS lost."""

    key: str
    prefix: bool = False


@dataclass(frozen=True)
class KeyMissing:
    """True when the key does not exist (``create_revision == 0``)."""

    key: str


@dataclass(frozen=True)
class ValueEquals:
    key: str
    value: bytes


@dataclass(frozen=True)
class ModRevisionEquals:
    key: str
    revision: int


@dataclass(frozen=True)
class VersionEquals:
    """``version`` counts writes since creation; 0 means the key does not exist."""

    key: str
    version: int


Op: TypeAlias = Put | Delete
TxnOp: TypeAlias = Put | Delete | Get
Compare: TypeAlias = KeyMissing | ValueEquals | ModRevisionEquals | VersionEquals


@dataclass(frozen=True)
class OpResult:
    """Outcome of one operation of the branch that ran, in the order given."""

    kind: Literal["put", "delete", "get"]
    #: Number of keys removed (``delete`` only).
    deleted: int = 0
    #: Keys read (``get`` only).
    kvs: tuple[KeyValue, ...] = ()


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[OpResult, ...] = ()


@dataclass(frozen=True)
class CommitResult:
    revision: int
    #: How many transactions the batch was split into (for metrics and tests).
    txns: int


# --------------------------------------------------------------------------- helpers


def _enc(key: str) -> bytes:
    # surrogateescape keeps foreign non-UTF-8 keys round-trippable instead of poisoning
    # a whole listing with a decode error.
    return key.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=_dec(raw.key),
        value=bytes(raw.value),
        mod_revision=int(raw.mod_revision),
        create_revision=int(raw.create_revision),
        version=int(raw.version),
        lease=int(raw.lease),
    )


def _grpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    """Find the gRPC status behind an etcd3aio exception (etcd3aio chains it as cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen
        seen = seen.__cause__
    return None


#: Retried by callers.  INTERNAL included: gRPC's core reports a broken HTTP/2
#: connection that way ("Internal error from Core", seen on the lease keepalive
#: stream after the process was paused past its TTL); the NVE then died instead of
#: re-registering.  Which calls may be resent after such an error: see ``_ONCE``.
#: UNKNOWN too: gRPC reports a connection that went away with the call in flight as
#: UNKNOWN "No status received" or "Stream removed (Data frame with END_STREAM flag
#: received)" (seen when a hung etcd member's connection is dropped, chaos
#: `etcd_leader_kill`); taken for a refusal, it ended the NVE's writer or lease task,
#: and with it the NVE. etcd itself answers with specific codes, so an UNKNOWN is
#: treated as a broken transport: resent if the call may be, ambiguous otherwise.
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def _raise_mapped(exc: BaseException, what: str) -> NoReturn:
    """Translate etcd3aio / gRPC / timeout failures into this module's hierarchy.

    The original stays reachable as ``__cause__`` for logs and debugging.
    """
    if isinstance(exc, StoreError):
        raise exc
    if isinstance(exc, EtcdConnectionError | EtcdTransientError | TimeoutError):
        raise StoreUnavailable(f"{what}: {exc or type(exc).__name__}") from exc
    rpc = _grpc_error(exc)
    if rpc is not None:
        code, detail = rpc.code(), rpc.details() or ""
        if code in _TRANSIENT:
            raise StoreUnavailable(f"{what}: {code.name} {detail}".rstrip()) from exc
        if "too many operations in txn" in detail or "request is too large" in detail:
            raise TxnTooLarge(f"{what}: {detail}") from exc
        if "lease not found" in detail:
            raise LeaseLost(f"{what}: {detail}") from exc
        if "has been compacted" in detail:
            raise RevisionCompacted(0, f"{what}: {detail}") from exc
        raise StoreError(f"{what}: {code.name} {detail}".rstrip()) from exc
    raise StoreError(f"{what}: {exc}") from exc


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except (EtcdError, grpc.RpcError, grpc.aio.UsageError, TimeoutError) as exc:
        _raise_mapped(exc, what)
    except asyncio.CancelledError as exc:
        # gRPC cancels in-flight calls with a bare CancelledError when the channel is
        # closed; in a task nobody cancelled, that must not pass for a cancellation
        # (TaskGroup and asyncio.timeout would misread it).
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise StoreError(f"{what}: call aborted, store closed") from exc


#: etcd3aio retries every unary call on UNAVAILABLE/DEADLINE_EXCEEDED (3 attempts by
#: default), writes included. A write whose answer was lost may already be applied, and
#: its silent retry then fails its own compare: the writer saw ``succeeded=False`` for a
#: key it had just written and reported it lost to another NVE
#: (tests/test_store.py::test_an_ambiguous_txn_is_never_retried_into_a_false_refusal).
#: So every write goes out once, and ``EtcdStore._call`` decides: it resends reads and
#: unconditional writes (the same state either way), and a conditional txn only when
#: it provably never left; otherwise the caller gets ``StoreUnavailable`` and plans
#: again from what etcd holds.
_ONCE = 1

_NOT_SENT_MARKERS = (
    "failed to connect",
    "connections to all backends failing",
    "connection refused",
)


def _never_sent(exc: BaseException) -> bool:
    """True when gRPC failed before the request reached any etcd member.

    Only then is it safe to retry a write: otherwise etcd may have applied it.
    """
    rpc = _grpc_error(exc)
    if rpc is None or rpc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    detail = (rpc.details() or "").lower()
    return any(marker in detail for marker in _NOT_SENT_MARKERS)


def _tls_refused(exc: BaseException) -> bool:
    """Every member refused our TLS handshake (wrong CA, no or a foreign certificate)."""
    rpc = _grpc_error(exc)
    detail = "" if rpc is None else (rpc.details() or "").lower()
    return "handshake failed" in detail


#: Each attempt of a call gets a third of the store's budget, at least this (``_call``).
ATTEMPT_MIN_S = 1.5
KEEPALIVE_PING_MS = 6000
KEEPALIVE_WAIT_MS = 2000


def _tune_channel(client: Etcd3Client, max_receive_bytes: int) -> None:
    """Cap gRPC's reconnect backoff (default: 1 s growing to 120 s).

    Without this, a client that saw etcd down for a minute keeps failing for up to two
    more minutes after etcd is back. etcd3aio has no knob for it, so extend its channel
    options before connecting; if its internals change, keep the defaults.
    """
    manager = getattr(client, "_manager", None)
    options = getattr(manager, "grpc_options", None)
    if isinstance(options, list):
        # A connection to a member that hangs is only given up by gRPC's keepalive:
        # etcd3aio pings every 10 s and waits 5 s (15 s of calls routed to a dead end).
        # Ping every 6 s (etcd refuses pings more often than every 5 s,
        # --grpc-keepalive-min-time) and wait 2 s.
        options[:] = [(k, v) for k, v in options
                      if k not in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms")]
        options.extend(
            [
                ("grpc.keepalive_time_ms", KEEPALIVE_PING_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_WAIT_MS),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
                # Big pages make large listings fast (etcd 3.5 re-counts the rest of the
                # range per page, so many small pages cost quadratic time); allow 64 MiB.
                ("grpc.max_receive_message_length", max_receive_bytes),
            ]
        )


def _range_end(key: str, prefix: bool) -> bytes | None:
    return prefix_range_end(_enc(key)) if prefix else None


def _to_compare(c: Compare) -> Any:
    if isinstance(c, KeyMissing):
        return KVService.txn_compare_create_revision(_enc(c.key), 0)
    if isinstance(c, ValueEquals):
        return KVService.txn_compare_value(_enc(c.key), c.value)
    if isinstance(c, ModRevisionEquals):
        compare = KVService.txn_compare_create_revision(_enc(c.key), 0)
        # etcd3aio has no builder for MOD; reuse the message and retarget it.
        compare.target = type(compare).MOD
        compare.ClearField("create_revision")
        compare.mod_revision = c.revision
        return compare
    return KVService.txn_compare_version(_enc(c.key), c.version)


def _to_request_op(op: TxnOp) -> Any:
    if isinstance(op, Put):
        return KVService.txn_op_put(_enc(op.key), op.value, lease=op.lease)
    if isinstance(op, Delete):
        if op.prefix and not op.key:
            raise ValueError("refusing to delete with an empty prefix (would wipe etcd)")
        return KVService.txn_op_delete(_enc(op.key), range_end=_range_end(op.key, op.prefix))
    return KVService.txn_op_get(_enc(op.key), range_end=_range_end(op.key, op.prefix))


def _op_result(resp: Any) -> OpResult:
    which = resp.WhichOneof("response")
    if which == "response_put":
        return OpResult("put")
    if which == "response_delete_range":
        return OpResult("delete", deleted=int(resp.response_delete_range.deleted))
    return OpResult("get", kvs=tuple(_kv(kv) for kv in resp.response_range.kvs))


def _op_size(op: Op) -> int:
    value = len(op.value) if isinstance(op, Put) else 0
    return len(_enc(op.key)) + value + _OP_OVERHEAD_BYTES


def _conflicts(op: Op, puts: set[str], deletes: list[Delete]) -> bool:
    """Would etcd reject ``op`` next to what a txn already holds?

    etcd refuses a put to a key already put in the same txn, and a put overlapping a
    delete range (in either order); deletes overlapping deletes are fine.
    """
    if isinstance(op, Put):
        return op.key in puts or any(
            op.key.startswith(d.key) if d.prefix else op.key == d.key for d in deletes
        )
    if op.prefix:
        return any(k.startswith(op.key) for k in puts)
    return op.key in puts


def _chunk(ops: Sequence[Op], max_ops: int, max_bytes: int) -> list[list[Op]]:
    chunks: list[list[Op]] = []
    current: list[Op] = []
    size = 0
    puts: set[str] = set()
    deletes: list[Delete] = []
    for op in ops:
        op_size = _op_size(op)
        if current and (
            len(current) >= max_ops or size + op_size > max_bytes or _conflicts(op, puts, deletes)
        ):
            chunks.append(current)
            current, size, puts, deletes = [], 0, set(), []
        current.append(op)
        size += op_size
        if isinstance(op, Put):
            puts.add(op.key)
        else:
            deletes.append(op)
    if current:
        chunks.append(current)
    return chunks


async def _resolve(endpoints: Sequence[str]) -> tuple[list[str], str | None]:
    """Turn ``host:port`` endpoints into IPv4 literals.

    etcd3aio dials ``ipv4:a:p,b:p`` (for round-robin failover), which only accepts
    addresses, so DNS names must be resolved here. Returns the first hostname seen so
    TLS can verify against it.
    """
    loop = asyncio.get_running_loop()
    out: list[str] = []
    hostname: str | None = None
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
        host = host.strip("[]")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            hostname = hostname or host
            infos = await loop.getaddrinfo(
                host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM
            )
            for *_, sockaddr in infos:
                address = f"{sockaddr[0]}:{port}"
                if address not in out:
                    out.append(address)
        else:
            out.append(f"{host}:{port}")
    return out, hostname


# --------------------------------------------------------------------------- watch


#: Stream errors after which a watch resumes from its progress revision by itself.
_STREAM_BREAKS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
BROKEN_STREAMS_MAX = 8


class PrefixWatch:
    """Async iterator of event batches under a prefix, starting at a given revision.

    Delivery is gap-free: the stream is (re)started from ``progress_revision + 1``, i.e.
    just after the last batch actually handed to the caller. etcd3aio's internal
    reconnect is not trusted for that, because it resumes from the response *header*
    revision, which during catch-up is the cluster's current revision, not the last
    event delivered. Every fresh etcd3aio stream announces itself with a ``created``
    response; a second one on the same stream means etcd3aio reconnected on its own,
    and we replace it with a stream started where we know we are.

    Use ``async with`` (or ``aclose()``) so the gRPC stream is released promptly.
    """

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self.prefix = prefix
        #: Everything up to and including this revision has been delivered (events) or
        #: is known to hold nothing under the prefix (progress notifications). -1 until
        #: known when watching "from now".
        self.progress_revision = start_revision - 1 if start_revision > 0 else -1
        #: How many times a stream was (re)started; for tests and metrics.
        self.streams_started = 0
        #: Streams broken by the server since one was last created (``_next``).
        self.broken_streams = 0
        self._gen: AsyncGenerator[list[WatchEvent], None] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> list[WatchEvent]:
        if self._gen is None:
            self._gen = self._run()
        return await anext(self._gen)

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[list[WatchEvent], None]:
        backoff = 0.0
        while True:
            if backoff:
                await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, 0.25), 5.0)
            async with contextlib.aclosing(self._open()) as responses:
                created = False
                while (resp := await self._next(responses)) is not None:
                    if resp.created:
                        if created:
                            _log.info(
                                "watch %r: etcd3aio reconnected; restarting from %d",
                                self.prefix,
                                self.progress_revision + 1,
                            )
                            break
                        created = True
                        backoff = 0.0
                        self.broken_streams = 0
                        if self.progress_revision < 0:
                            # Started "from now": the creation header is the baseline.
                            self.progress_revision = int(resp.header.revision)
                    if resp.compact_revision > 0:
                        raise WatchCompacted(int(resp.compact_revision))
                    if resp.canceled:
                        raise StoreError(
                            f"watch {self.prefix!r} canceled by etcd: "
                            f"{resp.cancel_reason or 'no reason given'}"
                        )
                    if resp.events:
                        batch = [self._event(ev) for ev in resp.events]
                        self.progress_revision = batch[-1].mod_revision
                        yield batch
                    elif not resp.created and resp.header.revision > 0:
                        # Progress notifications are only sent to synced watchers, so
                        # their header revision is a safe resume point.
                        self.progress_revision = max(
                            self.progress_revision, int(resp.header.revision)
                        )
                else:
                    _log.info("watch %r: stream ended; restarting", self.prefix)

    def _open(self) -> AsyncGenerator[Any, None]:
        watch = self._store.client.watch
        if watch is None:
            raise StoreError("store is not connected")
        key = _enc(self.prefix)
        start = self.progress_revision + 1 if self.progress_revision >= 0 else 0
        self.streams_started += 1
        stream = watch.watch(
            key, range_end=prefix_range_end(key), start_revision=start, progress_notify=True
        )
        assert isinstance(stream, AsyncGenerator)  # declared AsyncIterator; need aclose()
        return stream

    async def _next(self, responses: AsyncGenerator[Any, None]) -> Any | None:
        """The next response; None when the stream ended.

        etcd3aio retries UNAVAILABLE itself (resuming from a header revision, which
        ``_run`` replaces). A stream the server tore down (INTERNAL: a member stopping
        with SIGTERM resets its streams) also just ends here: ``_run`` opens a new one
        from ``progress_revision + 1``, which is gap-free, where a re-list by the caller
        would cost a full listing of the prefix. After ``BROKEN_STREAMS_MAX`` such
        breaks with no stream created in between, the error reaches the caller.
        """
        try:
            with _mapped(f"watch {self.prefix!r}"):
                return await anext(responses, None)
        except StoreError as exc:
            rpc = _grpc_error(exc)
            if rpc is None or rpc.code() not in _STREAM_BREAKS:
                raise
            self.broken_streams += 1
            if self.broken_streams > BROKEN_STREAMS_MAX:
                raise
            _log.info("watch %r: stream broken (%s); resuming from %d", self.prefix,
                      rpc.code().name, self.progress_revision + 1)
            return None

    @staticmethod
    def _event(ev: Any) -> WatchEvent:
        # mvccpb.Event.EventType: PUT = 0, DELETE = 1.
        if int(ev.type) == 1:
            return WatchEvent("delete", _dec(ev.kv.key), b"", int(ev.kv.mod_revision))
        return WatchEvent("put", _dec(ev.kv.key), bytes(ev.kv.value), int(ev.kv.mod_revision))


# --------------------------------------------------------------------------- store


class EtcdStore:
    """Async key-value store on etcd with the semantics the control plane relies on.

    ``timeout`` is the budget of each call. etcd3aio fails fast while gRPC is still
    reconnecting (e.g. just after an etcd restart or member loss), so within that budget
    calls are retried: reads and unconditional writes always, a transaction with
    compares only when the request provably never left this process (applied once and
    sent again, it would fail its own compare). Only when the budget is spent, or the
    answer to a conditional transaction was lost, does :class:`StoreUnavailable` reach
    the caller.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        tls: TlsConfig | None = None,
        max_txn_ops: int = MAX_TXN_OPS,
        max_txn_bytes: int = MAX_TXN_BYTES,
        max_receive_bytes: int = 64 << 20,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self._endpoints = list(endpoints)
        self._timeout = timeout
        self._tls = tls
        self.max_txn_ops = max_txn_ops
        self.max_txn_bytes = max_txn_bytes
        self.max_receive_bytes = max_receive_bytes
        self._client: Etcd3Client | None = None
        # Read by nvo3.metrics: calls.<op> (get, list, put, txn, ...), retries, unavailable.
        self.counters: Counter[str] = Counter()

    # -- lifecycle

    async def connect(self) -> None:
        """Open the channel and prove etcd answers, so misconfiguration fails at startup."""
        if self._client is not None:
            return
        endpoints, hostname = await _resolve(self._endpoints)
        if self._tls is not None:
            client = Etcd3Client(
                endpoints,
                tls_server_name=self._tls.server_name or hostname,
                ca_cert=self._tls.ca_cert,
                cert_chain=self._tls.cert_chain,
                cert_key=self._tls.key,
            )
        else:
            client = Etcd3Client(endpoints)
        _tune_channel(client, self.max_receive_bytes)
        await client.connect()
        self._client = client
        try:
            # One try: a refused TLS handshake is a misconfiguration, not a member
            # restarting, and retrying it for the whole budget made a wrong
            # certificate take ~5 s to report (exit 4). Anything else is retried.
            await self._call(
                "current revision",
                lambda t: self._kv().get(b"\0", count_only=True, timeout=t, max_attempts=_ONCE),
                idempotent=True, give_up=_tls_refused,
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def client(self) -> Etcd3Client:
        """The raw etcd3aio client; for this module and its tests only."""
        if self._client is None:
            raise StoreError("store is not connected")
        return self._client

    def _kv(self) -> KVService:
        kv = self.client.kv
        if kv is None:
            raise StoreError("store is not connected")
        return kv

    def _lease(self) -> LeaseService:
        lease = self.client.lease
        if lease is None:
            raise StoreError("store is not connected")
        return lease

    async def _call(
        self, what: str, call: Callable[[float], Awaitable[_T]], *, idempotent: bool,
        give_up: Callable[[BaseException], bool] | None = None, whole_budget: bool = False,
    ) -> _T:
        """Run ``call(attempt_timeout)``, mapping errors and retrying within the budget
        (``give_up(error)``: do not retry this one).

        Each attempt gets a third of the budget (at least ``ATTEMPT_MIN_S``), not all of
        it: a member that hangs (paused, swapping, partitioned without a reset) answers
        nothing, and gRPC keeps routing to it until its keepalive gives up. With the
        whole budget on one attempt, every call that landed there failed after 5 s; now
        it is retried on the next member (round robin) within the budget. Conditional
        transactions are not retried (their answer may be lost, not their effect); the
        caller gets ``StoreUnavailable`` sooner. ``whole_budget``: a listing page, which
        may legitimately take long.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        per_attempt = self._timeout if whole_budget else max(ATTEMPT_MIN_S, self._timeout / 3)
        delay = 0.05
        self.counters["calls." + what.split(" ", 1)[0]] += 1
        while True:
            try:
                with _mapped(what):
                    return await call(max(min(deadline - loop.time(), per_attempt), 0.001))
            except StoreUnavailable as exc:
                if (not (idempotent or _never_sent(exc)) or loop.time() + delay >= deadline
                        or (give_up is not None and give_up(exc))):
                    self.counters["unavailable"] += 1
                    raise
                self.counters["retries"] += 1
                _log.debug("%s: %s; retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- reads

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(
            f"get {key!r}", lambda t: self._kv().get(_enc(key), timeout=t), idempotent=True
        )
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def server_version(self) -> str:
        """The etcd version of the member this client talks to, e.g. "3.5.1"."""
        maintenance = self.client.maintenance
        if maintenance is None:
            raise StoreError("store is not connected")
        resp = await self._call("status", lambda t: maintenance.status(timeout=t),
                                idempotent=True)
        return str(resp.version)

    async def current_revision(self) -> int:
        resp = await self._call(
            "current revision",
            lambda t: self._kv().get(b"\0", count_only=True, timeout=t),
            idempotent=True,
        )
        return int(resp.header.revision)

    async def iter_prefix(
        self, prefix: str, *, page_size: int = 1000, revision: int = 0
    ) -> AsyncIterator[Page]:
        """Page through a prefix as one consistent snapshot.

        The first page pins the revision (unless ``revision`` is given) and every later
        page reads at it, continuing after the last key; so concurrent writes never
        tear the listing. A page that would exceed the gRPC message limit is retried
        with half the page size. Raises :class:`RevisionCompacted` if the snapshot
        revision is compacted while paging.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        start = _enc(prefix)
        end = prefix_range_end(start)
        limit = page_size
        while True:
            try:
                resp = await self._range_page(prefix, start, end, revision, limit)
            except RevisionCompacted as exc:
                raise RevisionCompacted(revision, str(exc)) from exc.__cause__
            except StoreError as exc:
                rpc = _grpc_error(exc)
                if rpc is None or rpc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or limit == 1:
                    raise
                limit = max(1, limit // 2)
                continue
            if revision == 0:
                revision = int(resp.header.revision)
            yield Page([_kv(raw) for raw in resp.kvs], revision)
            if not resp.more or not resp.kvs:
                return
            start = bytes(resp.kvs[-1].key) + b"\0"

    async def _range_page(
        self, prefix: str, start: bytes, end: bytes, revision: int, limit: int
    ) -> Any:
        return await self._call(
            f"list {prefix!r}",
            lambda t: self._kv().get(
                start, range_end=end, revision=revision, limit=limit, timeout=t
            ),
            idempotent=True, whole_budget=True,
        )

    async def get_prefix(
        self, prefix: str, *, page_size: int = 1000, revision: int = 0
    ) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` at one revision, plus that revision.

        When the caller did not pin ``revision``, a compaction racing with the paging
        simply restarts the listing at a fresh revision (a few times at most).
        """
        attempts = 1 if revision else 3
        for attempt in range(1, attempts + 1):
            out: list[KeyValue] = []
            read_revision = revision
            try:
                async for page in self.iter_prefix(prefix, page_size=page_size, revision=revision):
                    out.extend(page.kvs)
                    read_revision = page.revision
            except RevisionCompacted:
                if attempt == attempts:
                    raise
                continue
            return out, read_revision
        raise AssertionError("unreachable")

    # -- writes

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        resp = await self._call(
            f"put {key!r}",
            lambda t: self._kv().put(_enc(key), value, lease=lease, timeout=t, max_attempts=_ONCE),
            idempotent=True,  # unconditional: sent again, it leaves the same state
        )
        return int(resp.header.revision)

    async def delete(self, key: str) -> int:
        resp = await self._call(
            f"delete {key!r}",
            lambda t: self._kv().delete(_enc(key), timeout=t, max_attempts=_ONCE),
            idempotent=True,
        )
        return int(resp.header.revision)

    async def delete_prefix(self, prefix: str) -> int:
        """Returns how many keys were deleted (by the attempt that answered: after a
        lost answer, the resend finds fewer)."""
        if not prefix:
            raise ValueError("refusing to delete with an empty prefix (would wipe etcd)")
        start = _enc(prefix)
        resp = await self._call(
            f"delete prefix {prefix!r}",
            lambda t: self._kv().delete(start, range_end=prefix_range_end(start), timeout=t,
                                        max_attempts=_ONCE),
            idempotent=True,
        )
        return int(resp.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        """One atomic compare-and-swap; never split (see :meth:`commit` for bulk writes)."""
        for name, items in (("compares", compares), ("success", success), ("failure", failure)):
            if len(items) > self.max_txn_ops:
                raise TxnTooLarge(f"txn has {len(items)} {name} (> {self.max_txn_ops})")
        pb_compares = [_to_compare(c) for c in compares]
        pb_success = [_to_request_op(op) for op in success]
        pb_failure = [_to_request_op(op) for op in failure]
        resp = await self._call(
            "txn",
            lambda t: self._kv().txn(pb_compares, pb_success, pb_failure, timeout=t,
                                     max_attempts=_ONCE),
            # Without compares the success branch always runs: unconditional puts,
            # deletes and reads, which a resend leaves as they were. With compares, a
            # resend of an applied txn would fail its own compare: the caller decides.
            idempotent=not compares,
        )
        return TxnResult(
            succeeded=bool(resp.succeeded),
            revision=int(resp.header.revision),
            responses=tuple(_op_result(r) for r in resp.responses),
        )

    async def commit(self, ops: Sequence[Op]) -> CommitResult:
        """Apply many unconditional writes in order, as few transactions as etcd allows.

        Not atomic as a whole: each chunk (<= ``max_txn_ops`` ops, <= ``max_txn_bytes``,
        no key written twice) is atomic, and a failure leaves earlier chunks applied.
        Use it for idempotent bulk state (seeding, mirroring), not for invariants.
        """
        chunks = _chunk(ops, self.max_txn_ops, self.max_txn_bytes)
        if not chunks:
            return CommitResult(await self.current_revision(), 0)
        revision = 0
        for chunk in chunks:
            revision = (await self.txn((), chunk)).revision
        return CommitResult(revision, len(chunks))

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (tests use it to provoke WatchCompacted)."""
        # Already compacted at or past this revision: the goal is met.
        with contextlib.suppress(RevisionCompacted):
            await self._call(
                f"compact {revision}",
                lambda t: self._kv().compact(revision, physical=True, timeout=t),
                idempotent=True,
            )

    # -- watch

    def watch_prefix(self, prefix: str, start_revision: int) -> PrefixWatch:
        """Watch ``prefix`` from ``start_revision`` (inclusive; ``<= 0`` means from now).

        Yields one ``list[WatchEvent]`` per etcd response (all events of a revision
        arrive together), skipping empty progress responses. Raises
        :class:`WatchCompacted` instead of skipping history. Transient disconnects are
        retried forever with backoff, so a down cluster blocks rather than raises;
        wrap in a timeout if liveness matters.
        """
        return PrefixWatch(self, prefix, start_revision)

    # -- leases

    async def grant_lease(self, ttl: int) -> int:
        """Returns the lease id; etcd may round the TTL up (minimum ~2 s by default)."""
        resp = await self._call(
            "grant lease", lambda t: self._lease().grant(ttl, timeout=t, max_attempts=_ONCE),
            idempotent=True,  # a resend may leave an unused lease: it expires after its TTL
        )
        return int(resp.ID)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke and delete attached keys; revoking an already-gone lease is a no-op."""
        with contextlib.suppress(LeaseLost):
            await self._call(
                f"revoke lease {lease_id:x}",
                lambda t: self._lease().revoke(lease_id, timeout=t),
                idempotent=True,
            )

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh the lease once; returns the TTL granted, or 0 if the lease is gone."""

        async def once(budget: float) -> int:
            async with asyncio.timeout(budget):
                call = self._lease().keep_alive(lease_id)
                try:
                    async for resp in call:
                        return max(0, int(resp.TTL))
                finally:
                    call.cancel()
            raise StoreUnavailable(f"keepalive lease {lease_id:x}: stream ended unanswered")

        return await self._call(f"keepalive lease {lease_id:x}", once, idempotent=True)

    async def run_keepalive(self, lease_id: int, ttl: int, on_lost: Callable[[], None]) -> NoReturn:
        """Keep a lease alive until cancelled; call ``on_lost`` and raise if it dies.

        Refreshes every ttl/3. When etcd is unreachable, retries quickly until the
        lease's expiry as last confirmed by etcd; past that it is presumed lost, since
        etcd will have expired it (or will, once reachable). Meant to run as a task in
        the caller's TaskGroup, so :class:`LeaseLost` tears down the work that needed
        the lease.
        """
        loop = asyncio.get_running_loop()
        interval = max(ttl / 3, 0.1)
        expires_at = loop.time() + ttl
        while True:
            await asyncio.sleep(max(0.0, min(interval, expires_at - loop.time())))
            sent_at = loop.time()
            try:
                remaining = await self.keepalive_once(lease_id)
            except StoreUnavailable as exc:
                if loop.time() >= expires_at:
                    on_lost()
                    raise LeaseLost(f"lease {lease_id:x}: not refreshed before expiry") from exc
                _log.warning("lease %x: keepalive failed (%s); retrying", lease_id, exc)
                interval = min(interval, 0.5)
                continue
            if remaining <= 0:
                on_lost()
                raise LeaseLost(f"lease {lease_id:x} expired or was revoked")
            expires_at = sent_at + remaining
            interval = max(min(ttl, remaining) / 3, 0.1)
