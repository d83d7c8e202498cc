"""The long-running processes of ``nvo3``: ``ima run``, ``nve run``, ``agent run``.

All three have the same shape: connect to NATS (and etcd), build the service,
optionally expose ``/metrics``, run until cancelled, close what was opened.
``_connected`` and ``_announce_metrics`` hold that shape once, so each command
only says what is specific to it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

from nvo3.exit_codes import EXIT_OK
from nvo3.operator_commands import endpoints

if TYPE_CHECKING:
    from nats.aio.client import Client as Nats

    from ima.store import EtcdStore
    from nvo3.connect import Endpoints, ErrorRelay

S = TypeVar("S")


@asynccontextmanager
async def _connected(
    ep: Endpoints, name: str, identity: str, *, etcd: bool = True,
    error_cb: ErrorRelay | None = None,
) -> AsyncIterator[tuple[Nats, EtcdStore | None]]:
    """NATS (and etcd if asked) for one process, closed on the way out."""
    from nvo3.connect import connect_nats, open_store

    nc = await connect_nats(ep.nats, name, identity=ep.identity(identity), error_cb=error_cb)
    try:
        store = await open_store(ep.etcd, identity=ep.identity(identity)) if etcd else None
        try:
            yield nc, store
        finally:
            if store is not None:
                await store.close()
    finally:
        await nc.close()


def _announce_metrics(label: str, serve: Callable[[S, int], int], service: S,
                      port: int) -> None:
    """Serve ``/metrics`` when ``--metrics-port`` is not negative, and say where."""
    if port >= 0:
        bound = serve(service, port)
        print(f"{label}: metrics on http://127.0.0.1:{bound}/metrics", flush=True)


async def run_ima(args: argparse.Namespace) -> int:
    from ima.service import ImaService
    from nvo3.metrics import serve_ima_metrics

    ep = endpoints(args)
    async with _connected(ep, "ima", "ima") as (nc, store):
        assert store is not None
        service = ImaService(nc, store, layout=ep.layout, subjects=ep.subjects)
        _announce_metrics("ima", serve_ima_metrics, service, args.metrics_port)
        await service.run()
    return EXIT_OK


async def run_nve(args: argparse.Namespace) -> int:
    from nve.service import NveConfig, NveService
    from nvo3.connect import ErrorRelay
    from nvo3.gc_watch import watch_gc
    from nvo3.metrics import serve_metrics
    from nvo3.security import AGENT_REPLY_PREFIX

    ep = endpoints(args)
    relay = ErrorRelay()  # slow-consumer drops reach the NVE, which asks for a resync
    async with _connected(ep, args.id, f"nve:{args.id}", error_cb=relay) as (nc, store):
        assert store is not None
        config = NveConfig(args.id, args.underlay, lease_ttl=args.lease_ttl,
                           hold_s=args.hold_s, announce_s=args.announce_s,
                           state_file=args.state_file, state_save_s=args.state_save_s,
                           relist_s=args.relist_s,
                           enforce_placement=args.enforce_placement,
                           rate_per_s=args.rate_per_s, burst=args.burst,
                           reply_prefix=AGENT_REPLY_PREFIX if ep.secure else None)
        service = NveService(config, nc, store, layout=ep.layout, subjects=ep.subjects)
        relay.add(service.on_nats_error)
        watch_gc(service.counters)
        _announce_metrics(f"nve {args.id}", serve_metrics, service, args.metrics_port)
        await service.run()
    return EXIT_OK


async def run_agent(args: argparse.Namespace) -> int:
    from agents.agent import HypervisorAgent
    from agents.inventory import load_inventory
    from agents.service import AgentService
    from nvo3.metrics import serve_agent_metrics

    ep = endpoints(args)
    inventory = load_inventory(args.inventory)
    hv = inventory.hypervisor
    async with _connected(ep, hv, f"hv:{hv}", etcd=False) as (nc, _):
        routes = {f"alias={alias}": nve for alias, nve in inventory.routes.items()}
        agent = HypervisorAgent(hv, inventory.nve, nc, subjects=ep.subjects, routes=routes)
        if args.once:
            from nvo3.progress import Progress

            with Progress(f"agent {hv}: VNICs", len(inventory.vnics)) as bar:
                await agent.apply_inventory(inventory, on_vnic=bar.advance)
            if args.libvirt:
                from agents.libvirt_source import apply_running_domains

                n = await apply_running_domains(agent, args.libvirt,
                                                default_port=args.libvirt_port)
                print(f"agent {hv}: {n} running libvirt domains applied", flush=True)
            print(f"agent {hv}: inventory applied "
                  f"({len(inventory.vnics)} VNICs) on NVE {inventory.nve}", flush=True)
            return EXIT_OK
        # As a sidecar: the inventory is the desired state; every NVE gets it as one
        # hv_sync now and again whenever it announces a new epoch (restart).
        agent.set_inventory(inventory)
        print(f"agent {hv}: serving {len(inventory.vnics)} VNICs "
              f"for NVE(s) {', '.join(sorted(agent.nves()))}", flush=True)
        service = AgentService(agent)
        _announce_metrics(f"agent {hv}", serve_agent_metrics, service, args.metrics_port)
        if args.libvirt:  # VNICs also from libvirt domain events (agents/libvirt_source.py)
            from agents.libvirt_source import run_with_libvirt

            await run_with_libvirt(service, args.libvirt, default_port=args.libvirt_port)
        else:
            await service.run()
    return EXIT_OK
