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
        await ImaService(nc, store, layout=ep.layout, subjects=ep.subjects).run()
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
                           state_file=args.state_file,
                           reply_prefix=AGENT_REPLY_PREFIX if ep.secure else None)
        service = NveService(config, nc, store, layout=ep.layout, subjects=ep.subjects)
        relay.add(service.on_nats_error)
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
            await agent.apply_inventory(inventory)
            print(f"agent {inventory.hypervisor}: inventory applied "
                  f"({len(inventory.vnics)} VNICs) on NVE {inventory.nve}", flush=True)
            return EXIT_OK
        # As a sidecar: the inventory is the desired state; every NVE gets it as one
        # hv_sync now and again whenever it announces a new epoch (restart).
        agent.set_inventory(inventory)
        print(f"agent {inventory.hypervisor}: serving {len(inventory.vnics)} VNICs "
              f"for NVE(s) {', '.join(sorted(agent.nves()))}", flush=True)
        await AgentService(agent).run()
    finally:
        await nc.close()
    return EXIT_OK
