"""Opening the two transports from endpoint lists (clusters, failover).

Several NATS URLs and several etcd endpoints may be given; the clients
reconnect to the survivors when one goes away.  Defaults come from
``NVO3_NATS`` and ``NVO3_ETCD`` (comma separated) so operator commands need
no flags on a configured host.

Security is optional and off by default. A secured process passes its
:class:`~nvo3.security.Identity` (``identity=``), or the parts one by one
(``tls=``, ``nkey_seed=``, ``inbox_prefix=`` for NATS; ``tls=`` for etcd).
``Endpoints.credentials`` carries a whole :class:`~nvo3.security.Credentials`
(``NVO3_CREDS`` names its directory) so one process can pick the identity of
each connection it opens with ``ep.identity(name)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as Nats

from ima.keys import DEFAULT_ROOT, KeyLayout
from ima.store import EtcdStore, StoreError, TlsConfig
from nvo3.etcd_versions import etcd_version, kill9_corrupts
from nvo3.security import Credentials, Identity
from schemas.subjects import DEFAULT_SUBJECT_ROOT, Subjects

ErrorCallback = Callable[[Exception], Awaitable[None]]

_log = logging.getLogger(__name__)


class ConnectError(Exception):
    """A one-shot client (``persistent=False``) could not open its session.

    ``refused`` is true when a server answered but would not accept us: the TLS
    handshake failed (another CA, no or a foreign client certificate) or the server
    refused the identity (an unknown NKey: ``Authorization Violation``; an etcd
    certificate without an RBAC user). Otherwise nothing usable answered (connection
    refused, timeout). ``failures`` holds one (endpoint, error) per endpoint tried.
    """

    def __init__(self, service: str, refused: bool,
                 failures: list[tuple[str, BaseException]]) -> None:
        self.service = service
        self.refused = refused
        self.failures = failures
        verb = "refused the credentials" if refused else "did not answer"
        detail = "; ".join(f"{where}: {_describe(exc)}" for where, exc in failures)
        super().__init__(f"{service} {verb} ({detail})")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, nats.errors.Error) else f"{type(exc).__name__}: {text}"


# nats-py's -ERR, gRPC's TLS failures (etcd), etcd's RBAC answer for a CN without a user
_REFUSAL_MARKERS = ("authorization violation", "handshake failed", "certificate",
                    "permission denied")


class HungUp(Exception):
    """The server spoke NATS, asked for a client certificate or credentials, and then
    closed the connection during the handshake: with TLS 1.3 that is how a refused
    client certificate usually shows on the client side (a reset, not an alert)."""


def _is_refusal(exc: BaseException) -> bool:
    """A TLS or authentication refusal, as opposed to nothing answering."""
    if isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError | HungUp):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _REFUSAL_MARKERS)


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass(frozen=True)
class Endpoints:
    nats: tuple[str, ...]
    etcd: tuple[str, ...]
    key_root: str = DEFAULT_ROOT
    subject_root: str = DEFAULT_SUBJECT_ROOT
    #: None: the plain stack. Otherwise every connection needs an identity from here.
    credentials: Credentials | None = field(default=None, compare=False)

    @classmethod
    def from_env(
        cls,
        nats_urls: str | None = None,
        etcd: str | None = None,
        key_root: str | None = None,
        subject_root: str | None = None,
        creds_dir: str | None = None,
    ) -> Endpoints:
        """``creds_dir`` (or ``NVO3_CREDS``): a directory written by ``secure_stack``."""
        creds_dir = creds_dir or os.environ.get("NVO3_CREDS") or None
        return cls(
            nats=tuple(split_list(nats_urls or os.environ.get("NVO3_NATS", "nats://127.0.0.1:4222"))),
            etcd=tuple(split_list(etcd or os.environ.get("NVO3_ETCD", "127.0.0.1:2379"))),
            key_root=key_root or os.environ.get("NVO3_KEY_ROOT", DEFAULT_ROOT),
            subject_root=subject_root or os.environ.get("NVO3_SUBJECT_ROOT", DEFAULT_SUBJECT_ROOT),
            credentials=Credentials.load(creds_dir) if creds_dir else None,
        )

    @property
    def secure(self) -> bool:
        return self.credentials is not None

    def identity(self, name: str) -> Identity | None:
        """The named identity (``hv:hv1``, ``nve:nve1``, ``ima``, ``op``, ``inspector``),
        or None on the plain stack; a KeyError names the known ones."""
        return None if self.credentials is None else self.credentials.identity(name)

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(self.key_root)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_root)


class ErrorRelay:
    """An ``error_cb`` that fans asynchronous NATS errors out to services.

    nats-py reports a slow consumer (messages dropped for a subscription that
    fell behind) only through the connection's error callback; a service that
    must turn such a drop into a resync registers a handler here.
    """

    def __init__(self) -> None:
        self.handlers: list[Callable[[Exception], None]] = []

    def add(self, handler: Callable[[Exception], None]) -> None:
        self.handlers.append(handler)

    async def dispatch(self, exc: Exception) -> None:
        for handler in self.handlers:
            handler(exc)


async def connect_nats(
    urls: tuple[str, ...] | list[str],
    name: str,
    *,
    persistent: bool = True,
    identity: Identity | None = None,
    tls: ssl.SSLContext | None = None,
    nkey_seed: str | None = None,
    inbox_prefix: str | None = None,
    error_cb: ErrorCallback | ErrorRelay | None = None,
) -> Nats:
    """Services reconnect forever; one-shot operator commands (``persistent=False``)
    try each URL once and raise :class:`ConnectError` (the CLI's exit 3 or 4).
    A service with credentials first probes once, so refused credentials are a
    :class:`ConnectError` (exit 4) instead of an endless retry.

    ``identity`` supplies ``tls``, ``nkey_seed`` and ``inbox_prefix`` (explicit
    arguments win). On a secured server the inbox prefix must be the identity's
    own: the server only lets it subscribe there, so requests would get no reply.
    ``error_cb`` sees asynchronous server errors such as permission violations.
    """
    if identity is not None:
        tls = tls or identity.nats_tls()
        nkey_seed = nkey_seed or identity.nkey_seed
        inbox_prefix = inbox_prefix or identity.inbox_prefix
    options: dict[str, object] = {}
    if tls is not None:
        options["tls"] = tls
    if nkey_seed is not None:
        options["nkeys_seed_str"] = nkey_seed
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    callback = error_cb.dispatch if isinstance(error_cb, ErrorRelay) else error_cb
    if not persistent:
        return await _connect_one_shot(list(urls), name, callback, options)
    if tls is not None or nkey_seed is not None:
        await _refuse_fast(list(urls), name, options)
    if callback is not None:
        options["error_cb"] = callback  # nats-py wants a coroutine function
    return await nats.connect(
        servers=list(urls),
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        pending_size=64 * 1024 * 1024,
        **options,
    )


async def _refuse_fast(urls: list[str], name: str, options: dict[str, Any]) -> None:
    """A service started with credentials the servers refuse stops at once (exit 4).

    Its own connection retries forever (servers may still be starting), and after
    a refused TLS handshake nats-py would wait forever; so one probing round over
    the URLs comes first.  Nothing answering is not an error here: the retrying
    connection that follows waits for the servers.
    """
    try:
        probe = await _connect_one_shot(urls, name, None, options)
    except ConnectError as exc:
        if exc.refused:
            raise
        return
    await probe.close()


async def _connect_one_shot(
    urls: list[str], name: str, error_cb: ErrorCallback | None, options: dict[str, Any]
) -> Nats:
    """One round over ``urls``, each on its own, then :class:`ConnectError`.

    nats-py's own retry loop cannot do this: after a failed TLS upgrade its
    ``close()`` waits forever for the socket (so ``allow_reconnect=True`` hangs on a
    wrong CA), and with ``allow_reconnect=False`` it tries only one server. Each URL
    therefore gets its own client without reconnects (nats-py still makes two TCP
    attempts per URL); the first that connects gets reconnects back (2 attempts, as
    before) for the rest of the command.
    """
    failures: list[tuple[str, BaseException]] = []
    seen: list[BaseException] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected:
            seen.append(exc)  # reported once, in the ConnectError
        elif error_cb is not None:
            await error_cb(exc)
        else:
            _log.warning("nats: %s", _describe(exc))

    for url in urls:
        seen.clear()
        nc = Nats()
        try:
            await nc.connect(
                servers=[url],
                name=name,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=2,
                pending_size=64 * 1024 * 1024,
                error_cb=on_error,
                **options,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            await _abandon(nc)
            errors = [*seen, exc]
            worst = next((e for e in errors if _is_refusal(e)),
                         next((e for e in errors if not isinstance(e, nats.errors.NoServersError)),
                              errors[-1]))
            info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
            if (not _is_refusal(worst) and (info.get("tls_verify") or info.get("auth_required"))
                    and isinstance(worst, ConnectionResetError | BrokenPipeError
                                   | nats.errors.UnexpectedEOF)):
                worst = HungUp(f"closed by the server during the TLS/authentication handshake "
                               f"(client certificate refused?): {_describe(worst)}")
            failures.append((url, worst))
            continue
        connected = True
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = 2
        nc.options["reconnect_time_wait"] = 0.25
        return nc
    raise ConnectError("NATS", any(_is_refusal(e) for _, e in failures), failures)


async def _abandon(nc: Nats) -> None:
    """Drop a client whose connect failed without ``close()``, which can hang after a
    failed TLS upgrade; close its socket ourselves (or Python warns of a leak)."""
    transport = getattr(nc, "_transport", None)
    if transport is None:
        return
    transport.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(0.2):
            await transport.wait_closed()


async def open_store(
    endpoints: tuple[str, ...] | list[str],
    *,
    identity: Identity | None = None,
    tls: TlsConfig | None = None,
    persistent: bool = True,
) -> EtcdStore:
    """``identity`` (or ``tls``): client certificate whose CN is the etcd RBAC user.

    ``persistent=False`` (one-shot commands): a failed connect raises
    :class:`ConnectError` instead of the ``StoreError``, with ``refused`` set when
    etcd refused the TLS handshake or the certificate's user.
    """
    if tls is None and identity is not None:
        tls = identity.etcd_tls()
    store = EtcdStore(list(endpoints), tls=tls)
    try:
        await store.connect()
    except StoreError as exc:
        if persistent:
            raise
        where = ",".join(endpoints)
        raise ConnectError("etcd", _is_refusal(exc), [(where, exc)]) from exc
    if persistent:
        await warn_if_unsafe_etcd(store)
    return store


_warned_versions: set[str] = set()


async def warn_if_unsafe_etcd(store: EtcdStore) -> bool:
    """Log a warning if etcd is a version that kill -9 can leave inconsistent.

    A member of etcd 3.5.0-3.5.5 that crashes under load may come back holding other
    data than its peers (etcd-io/etcd#13766 and later fixes; 3.5.6 is etcd's
    recommended minimum). No client can converge on such a cluster: reads and
    compare-and-swap answers then depend on the member asked. Best effort: a member
    that does not say is not warned about. True if the warning was logged (once per
    process and version).
    """
    try:
        raw = await store.server_version()
    except StoreError:
        return False
    if not kill9_corrupts(etcd_version(raw)) or raw in _warned_versions:
        return False
    _warned_versions.add(raw)  # once per process, not per connection
    _log.warning("etcd %s: a member killed under load can diverge from its peers "
                 "(etcd-io/etcd#13766); run etcd 3.5.6 or later in production "
                 "(docs/operations.md)", raw)
    return True
