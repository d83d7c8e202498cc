"""A control plane inside one event loop: IMA + NVEs + agents (tests, benchmark).

Services run against real nats-server and etcd, namespaced by a key prefix
and subject root.  Each NVE's task is kept, so one can be stopped (gracefully:
its lease is revoked) and started again; ``stop()`` cancels exactly the tasks
and closes exactly the connections this control plane opened.

On a secured stack (``Endpoints.credentials`` set, e.g. ``start_control_plane(...,
credentials=servers.credentials)``) every connection uses TLS and the identity of the
process it stands for, as ``nvo3 demo`` does: the IMA ``ima``, an NVE ``nve:<id>``
(answering hypervisors only into their own inbox, ``AGENT_REPLY_PREFIX``, unless the
caller sets ``reply_prefix``), an agent ``hv:<hv>``, the operator client and the
control plane's own store ``op``. A secured stack's permissions are tied to the roots
in its credentials, so the key prefix and subject root must be those.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from agents.agent import HypervisorAgent
from agents.service import AgentService
from ima.client import ImaClient
from ima.service import ImaService
from ima.store import EtcdStore
from nve.service import NveConfig, NveService
from nvo3.connect import Endpoints, ErrorRelay, connect_nats, open_store
from nvo3.security import (
    AGENT_REPLY_PREFIX,
    ROLE_IMA,
    ROLE_OP,
    Credentials,
    Identity,
    hv_identity,
    nve_identity,
)

WAIT = 10.0


@dataclass
class ControlPlane:
    ep: Endpoints
    ima: ImaService | None = None
    nves: dict[str, NveService] = field(default_factory=dict)
    client: ImaClient | None = None
    store: EtcdStore | None = None
    _conns: list[Any] = field(default_factory=list)
    _stores: list[EtcdStore] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _nve_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def identity(self, name: str | None) -> Identity | None:
        """The secured stack's identity ``name`` (KeyError lists the known ones); None on
        the plain stack."""
        if not self.ep.secure:
            return None
        if name is None:
            raise ValueError("a secured control plane needs an identity for each connection")
        return self.ep.identity(name)

    async def nats(self, name: str, error_cb: Any = None, *, identity: str | None = None,
                   inbox_prefix: str | None = None) -> Any:
        """A NATS connection named ``name``; on a secured stack as ``identity``
        (default: ``name``, e.g. ``op``). ``inbox_prefix`` overrides the identity's."""
        nc = await connect_nats(self.ep.nats, name, error_cb=error_cb,
                                identity=self.identity(identity or name),
                                inbox_prefix=inbox_prefix)
        self._conns.append(nc)
        return nc

    async def new_store(self, identity: str | None = ROLE_OP) -> EtcdStore:
        """An etcd client; on a secured stack as ``identity`` (default ``op``: read-only)."""
        store = await open_store(self.ep.etcd, identity=self.identity(identity))
        self._stores.append(store)
        return store

    async def start_ima(self) -> ImaService:
        ima = ImaService(await self.nats("ima", identity=ROLE_IMA),
                         await self.new_store(ROLE_IMA), layout=self.ep.layout,
                         subjects=self.ep.subjects)
        self._tasks.append(asyncio.create_task(ima.run()))
        await ima.ready.wait()
        return ima

    async def start_nve(self, nve_id: str, underlay: str, **config: Any) -> NveService:
        if self.ep.secure:
            config.setdefault("reply_prefix", AGENT_REPLY_PREFIX)
        relay = ErrorRelay()
        nve = NveService(NveConfig(nve_id, underlay, **config),
                         await self.nats(nve_id, relay, identity=nve_identity(nve_id)),
                         await self.new_store(nve_identity(nve_id)),
                         layout=self.ep.layout, subjects=self.ep.subjects)
        relay.add(nve.on_nats_error)
        task = asyncio.create_task(nve.run())
        ready = asyncio.create_task(nve.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # surface a failed start
        self.nves[nve_id] = nve
        self._nve_tasks[nve_id] = task
        return nve

    async def stop_nve(self, nve_id: str) -> NveService:
        """Stop one NVE gracefully (its lease is revoked, its tables are gone)."""
        task = self._nve_tasks.pop(nve_id)
        nve = self.nves.pop(nve_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return nve

    async def crash_nve(self, nve_id: str) -> NveService:
        """Stop one NVE like kill -9: its lease is left to expire, nothing is saved.

        Its connections are closed too, so nothing of it keeps the lease alive.
        """
        self.nves[nve_id].crashed = True
        nve = await self.stop_nve(nve_id)
        with contextlib.suppress(Exception):
            await nve.nc.close()
        with contextlib.suppress(Exception):
            await nve.store.close()
        return nve

    async def agent(self, hypervisor: str, nve: str, **options: Any) -> HypervisorAgent:
        nc = await self.nats(hypervisor, identity=hv_identity(hypervisor))
        return HypervisorAgent(hypervisor, nve, nc, subjects=self.ep.subjects, **options)

    async def agent_service(self, hypervisor: str, nve: str, **options: Any) -> AgentService:
        """An agent sidecar (resyncs on NVE epochs, answers state queries), running
        until ``stop()``."""
        service = AgentService(await self.agent(hypervisor, nve, **options))
        self._tasks.append(asyncio.create_task(service.run()))
        await service.ready.wait()
        return service

    async def wait(self, nve: str, predicate: Any) -> None:
        async with asyncio.timeout(WAIT):
            await self.nves[nve].wait_until(predicate)

    async def keys(self) -> dict[str, bytes]:
        assert self.store is not None
        items, _ = await self.store.get_prefix(self.ep.key_root)
        return {kv.key: kv.value for kv in items}

    async def stop(self) -> None:
        for nve_id in list(self._nve_tasks):
            with contextlib.suppress(Exception):
                await self.stop_nve(nve_id)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for nc in self._conns:
            with contextlib.suppress(Exception):
                await nc.close()
        for store in self._stores:
            with contextlib.suppress(Exception):
                await store.close()


async def start_control_plane(
    nats_urls: list[str],
    etcd_endpoints: list[str],
    key_prefix: str,
    subject_root: str,
    nve_ids: tuple[str, ...] = ("nve1", "nve2"),
    *,
    credentials: Credentials | None = None,
    **nve_config: Any,
) -> ControlPlane:
    """``credentials``: a secured stack's (``LocalServers.credentials``); its key root and
    subject root must be ``key_prefix`` and ``subject_root``, which its permissions name."""
    if credentials is not None and (key_prefix, subject_root) != (
        credentials.key_root, credentials.subject_root
    ):
        raise ValueError(
            f"a secured stack's permissions are tied to key root {credentials.key_root!r} "
            f"and subject root {credentials.subject_root!r}, not {key_prefix!r} and "
            f"{subject_root!r}"
        )
    ep = Endpoints(nats=tuple(nats_urls), etcd=tuple(etcd_endpoints), key_root=key_prefix,
                   subject_root=subject_root, credentials=credentials)
    s = ControlPlane(ep)
    s.store = await s.new_store()
    s.ima = await s.start_ima()
    for i, nve_id in enumerate(nve_ids, start=1):
        await s.start_nve(nve_id, f"192.0.2.{i}", **nve_config)
    s.client = ImaClient(await s.nats("operator", identity=ROLE_OP), ep.subjects)
    return s
