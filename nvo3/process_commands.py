"""The long-running processes of ``nvo3``: ``ima run``, ``nve run``, ``agent run``."""

from __future__ import annotations

import argparse

from nvo3.exit_codes import EXIT_OK
from nvo3.operator_commands import endpoints


async def run_ima(args: argparse.Namespace) -> int:
    from ima.service import ImaService
    from nvo3.connect import connect_nats, open_store

    ep = endpoints(args)
    nc = await connect_nats(ep.nats, "ima", identity=ep.identity("ima"))
    store = await open_store(ep.etcd, identity=ep.identity("ima"))
    try:
        service = ImaService(nc, store, layout=ep.layout, subjects=ep.subjects)
        if args.metrics_port >= 0:
            from nvo3.metrics import serve_ima_metrics

            port = serve_ima_metrics(service, args.metrics_port)
            print(f"ima: metrics on http://127.0.0.1:{port}/metrics", flush=True)
        await service.run()
    finally:
        await nc.close()
        await store.close()
    return EXIT_OK


async def run_nve(args: argparse.Namespace) -> int:
    from nve.service import NveConfig, NveService
    from nvo3.connect import ErrorRelay, connect_nats, open_store

    ep = endpoints(args)
    relay = ErrorRelay()  # slow-consumer drops reach the NVE, which asks for a resync
    nc = await connect_nats(ep.nats, args.id, identity=ep.identity(f"nve:{args.id}"),
                            error_cb=relay)
    store = await open_store(ep.etcd, identity=ep.identity(f"nve:{args.id}"))
    try:
        from nvo3.security import AGENT_REPLY_PREFIX

        config = NveConfig(args.id, args.underlay, lease_ttl=args.lease_ttl,
                           hold_s=args.hold_s, announce_s=args.announce_s,
                           state_file=args.state_file, state_save_s=args.state_save_s,
                           enforce_placement=args.enforce_placement,
                           rate_per_s=args.rate_per_s, burst=args.burst,
                           reply_prefix=AGENT_REPLY_PREFIX if ep.secure else None)
        service = NveService(config, nc, store, layout=ep.layout, subjects=ep.subjects)
        relay.add(service.on_nats_error)
        from nvo3.gc_watch import watch_gc

        watch_gc(service.counters)
        if args.metrics_port >= 0:
            from nvo3.metrics import serve_metrics

            port = serve_metrics(service, args.metrics_port)
            print(f"nve {args.id}: metrics on http://127.0.0.1:{port}/metrics", flush=True)
        await service.run()
    finally:
        await nc.close()
        await store.close()
    return EXIT_OK


async def run_agent(args: argparse.Namespace) -> int:
    from agents.agent import HypervisorAgent
    from agents.inventory import load_inventory
    from agents.service import AgentService
    from nvo3.connect import connect_nats

    ep = endpoints(args)
    inventory = load_inventory(args.inventory)
    nc = await connect_nats(ep.nats, inventory.hypervisor,
                            identity=ep.identity(f"hv:{inventory.hypervisor}"))
    try:
        routes = {f"alias={alias}": nve for alias, nve in inventory.routes.items()}
        agent = HypervisorAgent(inventory.hypervisor, inventory.nve, nc, subjects=ep.subjects,
                                routes=routes)
        if args.once:
            from nvo3.progress import Progress

            with Progress(f"agent {inventory.hypervisor}: VNICs", len(inventory.vnics)) as bar:
                await agent.apply_inventory(inventory, on_vnic=bar.advance)
            if args.libvirt:
                from agents.libvirt_source import apply_running_domains

                n = await apply_running_domains(agent, args.libvirt,
                                                default_port=args.libvirt_port)
                print(f"agent {inventory.hypervisor}: {n} running libvirt domains applied",
                      flush=True)
            print(f"agent {inventory.hypervisor}: inventory applied "
                  f"({len(inventory.vnics)} VNICs) on NVE {inventory.nve}", flush=True)
            return EXIT_OK
        # As a sidecar: the inventory is the desired state; every NVE gets it as one
        # hv_sync now and again whenever it announces a new epoch (restart).
        agent.set_inventory(inventory)
        print(f"agent {inventory.hypervisor}: serving {len(inventory.vnics)} VNICs "
              f"for NVE(s) {', '.join(sorted(agent.nves()))}", flush=True)
        service = AgentService(agent)
        if args.metrics_port >= 0:
            from nvo3.metrics import serve_agent_metrics

            port = serve_agent_metrics(service, args.metrics_port)
            print(f"agent {inventory.hypervisor}: metrics on http://127.0.0.1:{port}/metrics",
                  flush=True)
        if args.libvirt:  # VNICs also from libvirt domain events (agents/libvirt_source.py)
            from agents.libvirt_source import run_with_libvirt

            await run_with_libvirt(service, args.libvirt, default_port=args.libvirt_port)
        else:
            await service.run()
    finally:
        await nc.close()
    return EXIT_OK
