"""Opening the two transports from endpoint lists (clusters, failover).

Several NATS URLs and several etcd endpoints may be given; the clients
reconnect to the survivors when one goes away.  Defaults come from
``NVO3_NATS`` and ``NVO3_ETCD`` (comma separated) so operator commands need
no flags on a configured host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nats
from nats.aio.client import Client as Nats

from ima.keys import DEFAULT_ROOT, KeyLayout
from ima.store import EtcdStore
from schemas.subjects import DEFAULT_SUBJECT_ROOT, Subjects


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass(frozen=True)
class Endpoints:
    nats: tuple[str, ...]
    etcd: tuple[str, ...]
    key_root: str = DEFAULT_ROOT
    subject_root: str = DEFAULT_SUBJECT_ROOT

    @classmethod
    def from_env(
        cls,
        nats_urls: str | None = None,
        etcd: str | None = None,
        key_root: str | None = None,
        subject_root: str | None = None,
    ) -> Endpoints:
        return cls(
            nats=tuple(split_list(nats_urls or os.environ.get("NVO3_NATS", "nats://127.0.0.1:4222"))),
            etcd=tuple(split_list(etcd or os.environ.get("NVO3_ETCD", "127.0.0.1:2379"))),
            key_root=key_root or os.environ.get("NVO3_KEY_ROOT", DEFAULT_ROOT),
            subject_root=subject_root or os.environ.get("NVO3_SUBJECT_ROOT", DEFAULT_SUBJECT_ROOT),
        )

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(self.key_root)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_root)


async def connect_nats(
    urls: tuple[str, ...] | list[str], name: str, *, persistent: bool = True
) -> Nats:
    """Services reconnect forever; one-shot operator commands give up (exit code 3)."""
    return await nats.connect(
        servers=list(urls),
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1 if persistent else 2,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        pending_size=64 * 1024 * 1024,
    )


async def open_store(endpoints: tuple[str, ...] | list[str]) -> EtcdStore:
    store = EtcdStore(list(endpoints))
    await store.connect()
    return store
