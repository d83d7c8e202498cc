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

import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as Nats

from ima.keys import DEFAULT_ROOT, KeyLayout
from ima.store import EtcdStore, TlsConfig
from nvo3.security import Credentials, Identity
from schemas.subjects import DEFAULT_SUBJECT_ROOT, Subjects

ErrorCallback = Callable[[Exception], Awaitable[None]]


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
    """Services reconnect forever; one-shot operator commands give up (exit code 3).

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
    if isinstance(error_cb, ErrorRelay):
        options["error_cb"] = error_cb.dispatch  # nats-py wants a coroutine function
    elif error_cb is not None:
        options["error_cb"] = error_cb
    return await nats.connect(
        servers=list(urls),
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1 if persistent else 2,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        pending_size=64 * 1024 * 1024,
        **options,
    )


async def open_store(
    endpoints: tuple[str, ...] | list[str],
    *,
    identity: Identity | None = None,
    tls: TlsConfig | None = None,
) -> EtcdStore:
    """``identity`` (or ``tls``): client certificate whose CN is the etcd RBAC user."""
    if tls is None and identity is not None:
        tls = identity.etcd_tls()
    store = EtcdStore(list(endpoints), tls=tls)
    await store.connect()
    return store
