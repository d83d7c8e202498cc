"""``nvo3``: one console script for every process and for operators.

Processes: ``nvo3 ima run``, ``nvo3 nve run``, ``nvo3 agent run``.
Operators: ``nvo3 vn create|list|show``, ``nvo3 nve tables NVE_ID``.
Others: ``nvo3 demo``, ``nvo3 schema export DIR``.

Exit codes scripts can rely on: 0 success, 1 refused by the system (typed
error), 2 bad usage, 3 unreachable (NATS/etcd/NVE did not answer), 4 cannot
authenticate (NATS or etcd refused the TLS handshake or the credentials), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from nvo3.exit_codes import (
    EXIT_AUTH,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)


def _endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", help="NATS URLs, comma separated (env NVO3_NATS)")
    p.add_argument("--etcd", help="etcd endpoints host:port, comma separated (env NVO3_ETCD)")
    p.add_argument("--key-root", help="etcd key root (default /nvo3/)")
    p.add_argument("--subject-root", help="NATS subject root (default nvo3)")
    p.add_argument("--creds", help="credentials dir written by the secured stack (env NVO3_CREDS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvo3", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: info; -vv: debug, one line per event with its trace id")
    parser.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the scripted demo on an embedded cluster")
    demo.add_argument("--hold", action="store_true", help="keep the cluster running after")
    demo.add_argument("--insecure", action="store_true",
                      help="no TLS, NKeys or etcd RBAC (debugging only)")

    ima = sub.add_parser("ima", help="the IMA process").add_subparsers(dest="action", required=True)
    ima_run = ima.add_parser("run", help="serve the VN registry over NATS")
    _endpoint_args(ima_run)
    ima_run.add_argument("--metrics-port", type=int, default=-1,
                         help="serve Prometheus /metrics on this port (0: any free; -1: off)")

    nve = sub.add_parser("nve", help="NVE process and its tables")
    nve_sub = nve.add_subparsers(dest="action", required=True)
    nve_run = nve_sub.add_parser("run", help="run an NVE")
    _endpoint_args(nve_run)
    nve_run.add_argument("--id", required=True, help="NVE id (a token)")
    nve_run.add_argument("--underlay", required=True, help="the NVE's underlay IP address")
    nve_run.add_argument("--lease-ttl", type=int, default=5)
    nve_run.add_argument("--hold-s", type=float, default=30.0,
                         help="departure without handshake: hold bindings this long")
    nve_run.add_argument("--announce-s", type=float, default=2.0,
                         help="epoch announcement period")
    nve_run.add_argument("--state-file",
                         help="warm restart: save remote tables here on stop (and every "
                              "--state-save-s while running), resume from them")
    nve_run.add_argument("--state-save-s", type=float, default=10.0,
                         help="period of warm-state saves while running (0: only on stop)")
    nve_run.add_argument("--relist-s", type=float, default=60.0,
                         help="list each followed VN again this often and repair what a "
                              "missed watch event left wrong (counted: relist_repairs; "
                              "0: never)")
    nve_run.add_argument("--metrics-port", type=int, default=-1,
                         help="serve Prometheus /metrics on this port (0: any free; -1: off)")
    nve_run.add_argument("--enforce-placement", action="store_true",
                         help="accept a VNIC only from the hypervisor the IMA places it on [5]")
    nve_run.add_argument("--rate-per-s", type=float, default=0.0,
                         help="requests per second per hypervisor; more are refused "
                              "(rate_limited) so one cannot starve the others (0: unlimited)")
    nve_run.add_argument("--burst", type=float, default=1000.0,
                         help="requests a hypervisor may send at once above --rate-per-s")
    tables = nve_sub.add_parser("tables", help="show a running NVE's tables")
    _endpoint_args(tables)
    tables.add_argument("nve_id")
    tables.add_argument("--json", action="store_true")

    agent = sub.add_parser("agent", help="hypervisor agent")
    agent_sub = agent.add_subparsers(dest="action", required=True)
    agent_ctl = agent_sub.add_parser(
        "ctl", help="ask a running agent to do a VNIC operation (as its hypervisor)")
    _endpoint_args(agent_ctl)
    agent_ctl.add_argument("hypervisor")
    agent_ctl.add_argument("op", choices=("connect", "disconnect", "associate", "disassociate",
                                          "shutdown", "startup", "remove", "depart", "prepare",
                                          "arrive"))
    agent_ctl.add_argument("vnic")
    agent_ctl.add_argument("--port")
    agent_ctl.add_argument("--vn", help="VN alias, name or id")
    agent_ctl.add_argument("--addr", action="append", default=[],
                           help="MAC[=IP,IP/len...] (repeat)")
    agent_ctl.add_argument("--json", action="store_true")
    agent_run = agent_sub.add_parser("run", help="apply an inventory file and keep running")
    _endpoint_args(agent_run)
    agent_run.add_argument("--inventory", required=True, type=Path)
    agent_run.add_argument("--once", action="store_true", help="apply and exit")
    agent_run.add_argument("--libvirt", metavar="URI",
                           help="also take VNICs from this libvirt's domains and their "
                                "lifecycle events (e.g. qemu:///system, test:///default)")
    agent_run.add_argument("--libvirt-port", default="eth0",
                           help="port of libvirt VNICs without nvo3 metadata (default eth0)")
    agent_run.add_argument("--metrics-port", type=int, default=-1,
                           help="serve Prometheus /metrics on this port (0: any free; -1: off)")

    vn = sub.add_parser("vn", help="VN registry").add_subparsers(dest="action", required=True)
    create = vn.add_parser("create", help="create a VN (idempotent)")
    _endpoint_args(create)
    create.add_argument("alias")
    create.add_argument("--service", choices=("l2", "l3"), default="l2")
    create.add_argument("--name", help="VN Name (UUID); generated if absent")
    create.add_argument("--id", type=int, dest="vn_id", help="VN ID; allocated if absent")
    create.add_argument("--member-hv", action="append", default=[],
                        help="only these hypervisors may connect VNICs (repeat); default: any")
    create.add_argument("--member-vnic", action="append", default=[],
                        help="only these VNICs may connect (repeat); default: any")
    create.add_argument("--json", action="store_true")
    lst = vn.add_parser("list", help="list VNs")
    _endpoint_args(lst)
    lst.add_argument("--json", action="store_true")
    delete = vn.add_parser("delete", help="remove a VN (refused while addresses are bound)")
    _endpoint_args(delete)
    delete.add_argument("ref")
    delete.add_argument("--json", action="store_true")
    profile = vn.add_parser("profile", help="VN profile: ACLs and QoS [4.5]")
    profile_sub = profile.add_subparsers(dest="profile_action", required=True)
    profile_set = profile_sub.add_parser("set", help="set a VN's profile from a JSON/YAML file")
    _endpoint_args(profile_set)
    profile_set.add_argument("ref", help="VN alias, name or id")
    profile_set.add_argument("--file", required=True, type=Path)
    profile_set.add_argument("--json", action="store_true")
    profile_show = profile_sub.add_parser("show", help="show a VN's profile")
    _endpoint_args(profile_show)
    profile_show.add_argument("ref")
    profile_show.add_argument("--json", action="store_true")
    show = vn.add_parser("show", help="show one VN by alias, name or id")
    _endpoint_args(show)
    show.add_argument("ref")
    show.add_argument("--json", action="store_true")

    place = sub.add_parser("placement", help="where VNICs run (NVEs may enforce it) [5]")
    place_sub = place.add_subparsers(dest="action", required=True)
    place_set = place_sub.add_parser("set", help="record that VNIC runs on HYPERVISOR")
    _endpoint_args(place_set)
    place_set.add_argument("vnic")
    place_set.add_argument("hypervisor")
    place_set.add_argument("--json", action="store_true")

    chk = sub.add_parser("check", help="compare agents' intent with NVE tables and the IMA")
    _endpoint_args(chk)
    chk.add_argument("--agents", help="hypervisor ids to ask besides those the NVEs know")
    chk.add_argument("--members", action="store_true",
                     help="also read every etcd endpoint on its own and report what the "
                          "members disagree on (needs etcdctl; exit 1 if they do)")
    chk.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="measure floors and the system on embedded servers")
    bench.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    bench.add_argument("--json", dest="json_path", help="also write the results as JSON to FILE")

    chaos = sub.add_parser("chaos", help="random churn under injected faults, then the checker")
    chaos.add_argument("--rounds", type=int, default=50)
    chaos.add_argument("--seed", type=int, default=1)
    chaos.add_argument("--json", dest="json_path", help="write per-round results here")
    chaos.add_argument("--faults", default="",
                       help="comma-separated fault kinds to inject (default: all)")
    chaos.add_argument("--secured", action="store_true",
                       help="on a secured stack: TLS, one NKey identity per process, etcd RBAC")
    chaos.add_argument("--etcd-sigkill", action="store_true",
                       help="kill etcd members with SIGKILL even on a version known to "
                            "diverge after one (etcd 3.5.0-3.5.5; see docs/reliability.md)")

    schema = sub.add_parser("schema", help="JSON Schema of every message and record")
    schema.add_argument("action", choices=("export",))
    schema.add_argument("directory", type=Path)

    # deployment and contracts: `nvo3 up`, `nvo3 pki`, `nvo3 asyncapi`
    from nvo3.up import add_subcommands

    add_subcommands(sub)
    return parser


OPERATOR_TIMEOUT_S = 60.0  # one-shot commands give up (exit 3) instead of hanging
OP_S = OPERATOR_TIMEOUT_S


def _run_async(factory: Callable[[], Awaitable[int]], deadline: float | None = None) -> int:
    from agents.agent import AgentError, NveUnreachable
    from ima.client import ImaError
    from ima.store import StoreError
    from nvo3.connect import ConnectError

    async def runner() -> int:
        # SIGTERM (docker stop, systemd) is a graceful stop like Ctrl-C: cancelling the
        # main task unwinds the service's TaskGroup, which revokes the NVE's lease.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            async with asyncio.timeout(deadline):
                return await factory()
        except asyncio.CancelledError:
            return EXIT_INTERRUPTED

    try:
        return asyncio.run(runner())
    except (AgentError, ImaError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ValidationError as exc:
        from schemas.wire import summarize

        print(f"invalid input: {summarize(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
        return EXIT_OK
    except ConnectError as exc:  # one-shot commands: one round over the servers, then this
        if exc.refused:
            print(f"cannot authenticate: {exc}\n  check --creds / NVO3_CREDS: its CA, "
                  f"certificate and NKey must be this cluster's", file=sys.stderr)
            return EXIT_AUTH
        print(f"unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Exception as exc:
        text = str(exc).lower()
        if "authorization" in text or "permission denied" in text or isinstance(
                exc, ssl.SSLError):
            print(f"refused: not_authorized: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        if isinstance(exc, (NveUnreachable, NatsTimeout, NoRespondersError, NoServersError,
                            StoreError, OSError, TimeoutError)):
            print(f"unreachable: {exc!r}", file=sys.stderr)
            return EXIT_UNREACHABLE
        raise


def main(argv: list[str] | None = None) -> int:
    from nvo3 import operator_commands, process_commands

    args = build_parser().parse_args(argv)
    from nvo3.logs import configure

    configure(args.verbose, args.log_json)
    try:
        if args.command == "demo":
            from nvo3 import demo

            return demo.main(hold=args.hold, insecure=args.insecure)
        if args.command == "schema":
            from schemas.export import export_schemas

            for path in export_schemas(args.directory):
                print(path)
            return EXIT_OK
        if args.command in ("up", "asyncapi", "pki"):
            from nvo3.up import run_subcommand

            return run_subcommand(args)
        if args.command == "bench":
            from nvo3 import bench as bench_module

            return bench_module.main(quick=args.quick, json_path=args.json_path)
        if args.command == "chaos":
            from nvo3 import chaos

            faults = [f for f in args.faults.split(",") if f] or list(chaos.FAULTS)
            return chaos.main(args.rounds, args.seed, args.json_path, faults=faults,
                              secured=args.secured, etcd_sigkill=args.etcd_sigkill)
        if args.command == "placement":
            return _run_async(lambda: operator_commands.placement_command(args), OP_S)
        if args.command == "check":
            return _run_async(lambda: operator_commands.check_command(args), OP_S)
        if args.command == "vn":
            return _run_async(lambda: operator_commands.vn_command(args), OP_S)
        if args.command == "nve":
            if args.action == "tables":
                return _run_async(lambda: operator_commands.tables_command(args), OP_S)
            return _run_async(lambda: process_commands.run_nve(args))
        if args.command == "ima":
            return _run_async(lambda: process_commands.run_ima(args))
        if args.command == "agent":
            if args.action == "ctl":
                return _run_async(lambda: operator_commands.agent_ctl_command(args), OP_S)
            return _run_async(lambda: process_commands.run_agent(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
