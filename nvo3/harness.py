"""A control plane inside one event loop: IMA + NVEs + agents (tests, benchmark).

Services run against real nats-server and etcd, namespaced by a key prefix
and subject root.  Each NVE's task is kept, so one can be stopped (gracefully:
its lease is revoked) and started again; ``stop()`` cancels exactly the tasks
and closes exactly the connections this control plane opened.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from agents.agent import HypervisorAgent
from ima.client import ImaClient
from ima.service import ImaService
from ima.store import EtcdStore
from nve.service import NveConfig, NveService
from nvo3.connect import Endpoints, ErrorRelay, connect_nats, open_store

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

    async def nats(self, name: str, error_cb: Any = None) -> Any:
        nc = await connect_nats(self.ep.nats, name, error_cb=error_cb)
        self._conns.append(nc)
        return nc

    async def new_store(self) -> EtcdStore:
        store = await open_store(self.ep.etcd)
        self._stores.append(store)
        return store

    async def start_ima(self) -> ImaService:
        ima = ImaService(await self.nats("ima"), await self.new_store(), layout=self.ep.layout,
                         subjects=self.ep.subjects)
        self._tasks.append(asyncio.create_task(ima.run()))
        await ima.ready.wait()
        return ima

    async def start_nve(self, nve_id: str, underlay: str, **config: Any) -> NveService:
        relay = ErrorRelay()
        nve = NveService(NveConfig(nve_id, underlay, **config),
                         await self.nats(nve_id, relay), await self.new_store(),
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
        return HypervisorAgent(hypervisor, nve, await self.nats(hypervisor),
                               subjects=self.ep.subjects, **options)

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
    **nve_config: Any,
) -> ControlPlane:
    ep = Endpoints(nats=tuple(nats_urls), etcd=tuple(etcd_endpoints), key_root=key_prefix,
                   subject_root=subject_root)
    s = ControlPlane(ep)
    s.store = await s.new_store()
    s.ima = await s.start_ima()
    for i, nve_id in enumerate(nve_ids, start=1):
        await s.start_nve(nve_id, f"192.0.2.{i}", **nve_config)
    s.client = ImaClient(await s.nats("operator"), ep.subjects)
    return s
