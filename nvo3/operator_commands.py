"""Operator commands of ``nvo3`` (VN registry, NVE tables, agent control, checker).

Each talks to the running system as the operator identity and returns an exit
code (``nvo3.cli`` documents them).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from nvo3.exit_codes import EXIT_OK, EXIT_REFUSED

if TYPE_CHECKING:
    from nvo3.connect import Endpoints


def endpoints(args: argparse.Namespace) -> Any:
    from nvo3.connect import Endpoints

    return Endpoints.from_env(args.nats, args.etcd, args.key_root, args.subject_root,
                              args.creds)


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _vn_ref(text: str) -> Any:
    from schemas.messages import VnRef

    if text.isdigit():
        return VnRef(id=int(text))
    if len(text) == 36 and text.count("-") == 4:
        return VnRef(name=text)
    return VnRef(alias=text)


async def _profile(client: Any, args: argparse.Namespace) -> int:
    import yaml

    from schemas.profile import VnProfile

    if args.profile_action == "set":
        data = yaml.safe_load(args.file.read_text())
        reply = await client.set_profile(_vn_ref(args.ref), VnProfile.model_validate(data))
    else:
        reply = await client.get_profile(_vn_ref(args.ref))
    if args.json:
        print_json(reply.model_dump(mode="json"))
    elif reply.profile is None:
        print(f"VN {reply.vn}: no profile")
    else:
        p = reply.profile
        print(f"VN {reply.vn} profile (revision {p.revision}): qos "
              f"{p.qos.model_dump(exclude_none=True)}")
        for rule in p.acl:
            print("  acl " + " ".join(f"{k}={v}" for k, v in
                                      rule.model_dump(exclude_none=True).items()))
    return EXIT_OK


@contextlib.asynccontextmanager
async def _operator(args: argparse.Namespace, name: str = "nvo3-cli") -> AsyncIterator[Any]:
    """(endpoints, NATS connection) as the operator identity, closed on the way out."""
    from nvo3.connect import connect_nats

    ep = endpoints(args)
    nc = await connect_nats(ep.nats, name, persistent=False, identity=ep.identity("op"))
    try:
        yield ep, nc
    finally:
        await nc.close()


async def vn_command(args: argparse.Namespace) -> int:
    from ima.client import ImaClient
    from nvo3.render import vn_table

    async with _operator(args) as (ep, nc):
        client = ImaClient(nc, ep.subjects)
        if args.action == "create":
            from schemas.records import VnMembers

            members = VnMembers(hypervisors=tuple(args.member_hv),
                                vnics=tuple(args.member_vnic))
            reply = await client.create(args.alias, service=args.service, name=args.name,
                                        vn_id=args.vn_id, members=members)
            vns = [reply.vn]
        elif args.action == "list":
            vns = await client.list()
        elif args.action == "profile":
            return await _profile(client, args)
        elif args.action == "delete":
            vns = [await client.delete(_vn_ref(args.ref))]
        else:
            vns = [await client.get(_vn_ref(args.ref))]
        if args.json:
            print_json([v.model_dump(mode="json") for v in vns])
        else:
            print(vn_table(vns))
        return EXIT_OK


async def tables_command(args: argparse.Namespace) -> int:
    from nvo3.render import nve_tables

    async with _operator(args) as (ep, nc):
        msg = await nc.request(ep.subjects.nve_tables(args.nve_id), b"{}", timeout=5)
    snapshot = orjson.loads(msg.data)
    if args.json:
        print_json(snapshot)
    else:
        print(nve_tables(snapshot))
    return EXIT_OK


async def agent_ctl_command(args: argparse.Namespace) -> int:
    from schemas.messages import AddressEntry, ErrorReply
    from schemas.operator import AgentCommand
    from schemas.wire import decode_reply, dumps

    entries = []
    for spec in args.addr:
        mac, _, ips = spec.partition("=")
        entries.append(AddressEntry(mac=mac, ips=tuple(i for i in ips.split(",") if i)))
    cmd = AgentCommand(op=args.op, vnic=args.vnic, port=args.port,
                       vn=_vn_ref(args.vn) if args.vn else None, entries=tuple(entries))
    async with _operator(args) as (ep, nc):
        msg = await nc.request(ep.subjects.agent_ctl(args.hypervisor), dumps(cmd), timeout=10)
    reply = decode_reply(msg.data)
    if args.json:
        print_json(reply.model_dump(mode="json"))
    elif isinstance(reply, ErrorReply):
        print(f"refused: {reply.code}: {reply.reason}", file=sys.stderr)
    else:
        tag = f" tag={reply.result.tag} vni={reply.result.vni}" if reply.result else ""
        print(f"ok: {reply.op}{tag} ima_ops={reply.ima_ops}")
    return EXIT_REFUSED if isinstance(reply, ErrorReply) else EXIT_OK


async def placement_command(args: argparse.Namespace) -> int:
    from ima.client import ImaClient

    async with _operator(args) as (ep, nc):
        reply = await ImaClient(nc, ep.subjects).place(args.vnic, args.hypervisor)
    if args.json:
        print_json(reply.model_dump(mode="json"))
        return EXIT_OK
    print(f"VNIC {reply.placement.vnic} placed on {reply.placement.hypervisor} "
          f"(revision {reply.revision})")
    return EXIT_OK


async def check_command(args: argparse.Namespace) -> int:
    from nvo3.check import gather_and_check
    from nvo3.connect import open_store

    async with _operator(args, "nvo3-check") as (ep, nc):
        store = await open_store(ep.etcd, identity=ep.identity("op"), persistent=False)
        try:
            agents = [a for a in (args.agents or "").split(",") if a]
            report = await gather_and_check(nc, store, ep, agents)
        finally:
            await store.close()
    members = await _members_disagree(ep) if args.members else None
    if args.json:
        doc = report.as_dict()
        if members is not None:
            doc["etcd_members"] = members
        print_json(doc)
    else:
        print(f"lost={len(report.lost)} stale={len(report.stale)} "
              f"wrong_vni={len(report.wrong_vni)}")
        for line in report.lost:
            print("  lost  " + line)
        for line in report.stale:
            print("  stale " + line)
        for line in report.wrong_vni:
            print("  vni   " + line)
        if members is not None:
            print(f"etcd members: {len(ep.etcd)} read one by one, "
                  + ("they agree" if not members else f"{len(members)} differences"))
            for line in members:
                print("  etcd  " + line)
    return EXIT_OK if report.ok and not members else EXIT_REFUSED


async def _members_disagree(ep: Endpoints) -> list[str]:
    """Every etcd endpoint read on its own (``nvo3.etcd_members``): what they disagree
    on under the key root. A member at another revision is read again for up to 3 s
    (it may still be applying); one that stays behind has diverged."""
    from nvo3.etcd_members import members_disagree

    flags = [] if ep.credentials is None else ep.credentials.etcdctl_flags("op")
    scheme = "http" if ep.credentials is None else "https"
    return await members_disagree([(e, f"{scheme}://{e}") for e in ep.etcd], ep.key_root,
                                  flags)
