"""What ``nvo3 up`` runs: a topology file, or a compose file without Docker.

A **topology file** (``deploy/topology.yaml``) names member counts and the
nvo3 processes::

    nats: 3                      # nats-server members (one JetStream cluster)
    etcd: 3                      # etcd members
    ima: 2                       # IMA replicas (one NATS queue group)
    vns:                         # created by one-shot `nvo3 vn create` jobs
      - {alias: blue, service: l2}
    nves:
      - {id: nve1, underlay: 192.0.2.1}
    agents:                      # an inventory file (relative to this file) ...
      - inventory: inventories/hv1.yaml
      - hypervisor: hv9          # ... or an inventory written inline
        nve: nve1
        vnics: []

The servers come from :mod:`nvo3.servers` (free loopback ports, fresh data
dirs); the nvo3 processes are the same commands compose.yaml runs.  Unless
``nvo3 up --insecure``, the stack is secured as compose.yaml is: credentials
for every NVE and hypervisor (:func:`nvo3.security.secure_stack`) in
``<work>/pki``, TLS and NKeys on NATS, TLS and RBAC on etcd, and
``NVO3_CREDS`` for every nvo3 process.

A **compose file** (``compose.yaml``) is run service by service as local
processes: :class:`ComposeRewriter` maps every service name (and 0.0.0.0,
127.0.0.1, localhost inside a service) to 127.0.0.1 and every container port
to a free loopback port, in commands, environment values, health checks and
bind-mounted files.  Each service sees its mounts under
``<work>/mounts/<service>/<container path>`` (a named volume is a symlink there to
``<work>/volumes/<name>``, shared by every service that mounts it), so a relative
path between two mounts, such as an ``include`` in a config file, resolves as in
the container.  Nothing else is changed, so what runs here is what compose runs.
Keys whose meaning a local run cannot honour are refused rather than ignored.
Differences, all about timing: a health test is retried every 0.5 s instead of
every ``interval`` (``retries`` and ``start_period`` are replaced by one start
deadline), its ``timeout`` is at least 10 s, and ``restart`` is not applied.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml
from pydantic import Field, ValidationError, model_validator

from agents.inventory import Inventory, load_inventory
from nvo3.security import Credentials, secure_stack
from nvo3.servers import EtcdCluster, NatsCluster, find_binary, free_port
from nvo3.up import (
    HEALTH_TIMEOUT,
    CommandCheck,
    Condition,
    ProcSpec,
    UpError,
    status_line,
)
from schemas.base import Strict
from schemas.types import Alias, NveId, UnderlayIp, VnId, VnName

NVO3_MODULE = ("-m", "nvo3.cli")
LOCAL_HOSTS = ("0.0.0.0", "127.0.0.1", "localhost")
# Programs a compose command may start, and where a local run finds them.
SERVER_BINARIES = ("etcd", "etcdctl", "nats-server")
SYSTEM_TOOLS = ("sh", "wget")
# Service keys a local run honours, and keys it may ignore (Docker-only concerns).
COMPOSE_KEYS = {"command", "environment", "volumes", "depends_on", "healthcheck"}
COMPOSE_IGNORED = {"image", "build", "restart", "init", "stop_grace_period", "ports"}
_CONDITIONS: dict[str, Condition] = {
    "service_started": "started",
    "service_healthy": "healthy",
    "service_completed_successfully": "completed",
}
_PASS_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH")
# What an operator exports to reach the cluster (the `ready` line of `nvo3 up`).
_OPERATOR_ENV = ("NVO3_NATS", "NVO3_ETCD", "NVO3_CREDS")


# ---------------------------------------------------------------------- topology files
class VnSpec(Strict):
    alias: Alias
    service: Literal["l2", "l3"] = "l2"
    name: VnName | None = None
    id: VnId | None = None


class NveSpec(Strict):
    id: NveId
    underlay: UnderlayIp
    lease_ttl: int = Field(default=5, ge=1)
    rate_per_s: float = Field(default=0.0, ge=0)  # per-hypervisor request limit (0: none)
    burst: float = Field(default=1000.0, gt=0)


class AgentFile(Strict):
    inventory: str


class Topology(Strict):
    nats: int = Field(default=1, ge=1, le=9)
    etcd: int = Field(default=1, ge=1, le=9)
    ima: int = Field(default=1, ge=0, le=16)
    vns: tuple[VnSpec, ...] = ()
    nves: tuple[NveSpec, ...] = ()
    agents: tuple[AgentFile | Inventory, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        _unique("NVE id", [n.id for n in self.nves])
        _unique("VN alias", [v.alias for v in self.vns])
        if self.vns and self.ima == 0:
            raise ValueError("creating VNs needs at least one IMA replica (ima: 1)")
        return self


def _unique(what: str, values: Sequence[str]) -> None:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"duplicate {what}: {', '.join(dupes)}")


@dataclass(frozen=True)
class TopologySource:
    path: Path
    topology: Topology
    inventories: tuple[tuple[Inventory, Path | None], ...]  # (inventory, its file if any)


@dataclass(frozen=True)
class ComposeSource:
    path: Path
    data: dict[str, Any]


Source = TopologySource | ComposeSource


def load(path: Path) -> Source:
    """Read a topology or compose file (compose has ``services:``); ValueError if invalid."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a YAML mapping")
    if "services" in data:
        if not isinstance(data["services"], dict) or not data["services"]:
            raise ValueError("services: expected a mapping of services")
        return ComposeSource(path, data)
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None
    inventories: list[tuple[Inventory, Path | None]] = []
    for agent in topology.agents:
        if isinstance(agent, AgentFile):
            file = (path.parent / agent.inventory).resolve()
            try:
                inventories.append((load_inventory(file), file))
            except ValidationError as exc:
                raise ValueError(f"inventory {agent.inventory}: {exc}") from None
        else:
            inventories.append((agent, None))
    _check_agents(topology, [inv for inv, _ in inventories])
    return TopologySource(path, topology, tuple(inventories))


def _agent_nves(inventory: Inventory) -> list[str]:
    """The NVEs an agent talks to: its default one, and per-VN routes where it has them."""
    routes: Mapping[str, str] = getattr(inventory, "routes", None) or {}
    return sorted({inventory.nve, *routes.values()})


@dataclass(frozen=True)
class HypervisorOnNve:
    """Healthy once one of the NVEs lists a VNIC of this hypervisor in its tables."""

    commands: tuple[tuple[str, ...], ...]  # `nvo3 nve tables NVE --json`, per NVE
    env: Mapping[str, str]
    hypervisor: str

    def __call__(self) -> bool:
        for argv in self.commands:
            try:
                done = subprocess.run(argv, env=dict(self.env), capture_output=True,
                                      timeout=HEALTH_TIMEOUT, check=False)
                tables = json.loads(done.stdout) if done.returncode == 0 else {}
            except (subprocess.TimeoutExpired, OSError, ValueError):
                continue
            vnics = tables.get("vnics", {}) if isinstance(tables, dict) else {}
            if any(v.get("hypervisor") == self.hypervisor for v in vnics.values()):
                return True
        return False


def _check_agents(topology: Topology, inventories: Sequence[Inventory]) -> None:
    _unique("hypervisor", [inv.hypervisor for inv in inventories])
    nves = {n.id for n in topology.nves}
    aliases = {v.alias for v in topology.vns}
    for inv in inventories:
        for nve in _agent_nves(inv):
            if nve not in nves:
                raise ValueError(f"agent {inv.hypervisor}: NVE {nve!r} is not in nves")
        for vnic in inv.vnics:
            for vn in vnic.vns:
                if vn.vn.alias is not None and vn.vn.alias not in aliases:
                    raise ValueError(f"agent {inv.hypervisor}: VN {vn.vn.alias!r} is not in vns")


# ---------------------------------------------------------------------- servers
@dataclass
class StartedServers:
    """The topology's nats-server and etcd members (none for a compose file)."""

    nats: NatsCluster | None = None
    etcd: EtcdCluster | None = None
    credentials: Credentials | None = None  # secured: what every process gets as NVO3_CREDS

    def members(self) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = []
        if self.nats is not None:
            out += [(f"nats{i}", m.url, m) for i, m in enumerate(self.nats.members, 1)]
        if self.etcd is not None:
            out += [(f"etcd{i}", m.endpoint, m) for i, m in enumerate(self.etcd.members, 1)]
        return out

    def summary(self) -> str:
        parts = []
        if self.nats is not None:
            parts.append(f"{len(self.nats.members)} nats, ")
        if self.etcd is not None:
            parts.append(f"{len(self.etcd.members)} etcd, ")
        return "".join(parts)

    def stop(self, out: TextIO | None = None) -> None:
        if self.etcd is not None:
            self.etcd.stop()
        if self.nats is not None:
            self.nats.stop()
        if out is not None:
            for name, where, member in self.members():
                pid = member.process.pid if member.process is not None else None
                print(status_line(name, pid, "stopped", where), file=out, flush=True)


def topology_credentials(source: TopologySource, directory: Path) -> Credentials:
    """An identity for every NVE and hypervisor (assigned to the NVEs it uses), plus
    ``ima``, ``op``, ``inspector`` and ``root``."""
    hypervisors = {inv.hypervisor: _agent_nves(inv) for inv, _ in source.inventories}
    return secure_stack(directory, hypervisors, [n.id for n in source.topology.nves])


def start_servers(source: Source, work: Path, out: TextIO, *,
                  secure: bool = True) -> StartedServers:
    """Start the topology's clusters (blocking until ready); compose files start their own.

    ``secure``: generate credentials into ``work/pki`` and start the servers with TLS,
    NKey users and etcd RBAC (bootstrapped before anything else connects).
    """
    started = StartedServers()
    if isinstance(source, ComposeSource):
        return started
    try:
        creds = topology_credentials(source, work / "pki") if secure else None
        started.credentials = creds
        started.nats = NatsCluster(source.topology.nats, work / "nats", credentials=creds)
        started.nats.start()
        started.etcd = EtcdCluster(source.topology.etcd, work / "etcd", credentials=creds)
        started.etcd.start()
    except BaseException:
        started.stop()
        raise
    for name, where, member in started.members():
        print(status_line(name, member.process.pid, "ready", where), file=out, flush=True)
    return started


# ---------------------------------------------------------------------- plans
@dataclass
class Plan:
    procs: list[ProcSpec]
    env: dict[str, str] = field(default_factory=dict)  # NVO3_NATS / NVO3_ETCD for operators


def plan(source: Source, work: Path, servers: StartedServers) -> Plan:
    if isinstance(source, ComposeSource):
        return compose_plan(source.path, work, source.data)
    assert servers.nats is not None
    assert servers.etcd is not None
    creds = servers.credentials.workdir if servers.credentials is not None else None
    return topology_plan(source, work, servers.nats.urls, servers.etcd.endpoints, creds)


def local_argv(argv: Sequence[str]) -> list[str]:
    """The local program for a compose/topology command; the arguments stay as they are."""
    if not argv:
        raise UpError("empty command")
    program, args = argv[0], list(argv[1:])
    name = Path(program).name
    if name == "nvo3":
        return [sys.executable, *NVO3_MODULE, *args]
    if name in SERVER_BINARIES:
        return [find_binary(name), *args]
    if name in SYSTEM_TOOLS:
        found = shutil.which(name)
        if found is None:
            raise UpError(f"{name!r} is needed on PATH to run {shlex.join(argv)}")
        return [found, *args]
    raise UpError(f"no local equivalent for program {program!r} (in {shlex.join(argv)})")


def base_env(shims: Path) -> dict[str, str]:
    """A container-like environment: nothing from the caller but PATH basics.

    ``shims`` holds ``nvo3`` (this interpreter's ``-m nvo3.cli``) and the server
    binaries, first on PATH, for shell health checks.
    """
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    env["PATH"] = os.pathsep.join([str(shims), os.environ.get("PATH", os.defpath)])
    return env


def write_shims(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    nvo3 = directory / "nvo3"
    nvo3.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m nvo3.cli \"$@\"\n")
    nvo3.chmod(0o755)
    for name in SERVER_BINARIES:
        link = directory / name
        if not link.exists():
            link.symlink_to(find_binary(name))
    return directory


def _pretty(argv: Sequence[str]) -> str:
    return shlex.join(["nvo3", *argv[3:]] if list(argv[1:3]) == list(NVO3_MODULE) else argv)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def topology_plan(
    source: TopologySource, work: Path, nats_urls: Sequence[str], etcd_endpoints: Sequence[str],
    credentials: Path | None = None,
) -> Plan:
    """``credentials``: the directory every process gets as ``NVO3_CREDS`` (secured)."""
    t = source.topology
    endpoints = {"NVO3_NATS": ",".join(nats_urls), "NVO3_ETCD": ",".join(etcd_endpoints)}
    if credentials is not None:
        endpoints["NVO3_CREDS"] = str(credentials)
    env = {**base_env(write_shims(work / "bin")), **endpoints}
    procs: list[ProcSpec] = []

    def add(name: str, role: str, command: list[str], **kw: Any) -> None:
        argv = local_argv(command)
        procs.append(ProcSpec(name=name, argv=argv, role=role, env=env,
                              detail=kw.pop("detail", _pretty(argv)), **kw))

    def cli_check(*args: str) -> CommandCheck:
        return CommandCheck(tuple(local_argv(["nvo3", *args])), env)

    for i in range(1, t.ima + 1):
        add(f"ima{i}", "ima", ["nvo3", "ima", "run"], health=cli_check("vn", "list", "--json"))
    jobs = []
    for vn in t.vns:
        command = ["nvo3", "vn", "create", vn.alias, "--service", vn.service]
        command += ["--name", vn.name] if vn.name is not None else []
        command += ["--id", str(vn.id)] if vn.id is not None else []
        add(f"vn-{vn.alias}", "job", command, oneshot=True, depends_on={"ima1": "healthy"})
        jobs.append(f"vn-{vn.alias}")
    for nve in t.nves:
        command = ["nvo3", "nve", "run", "--id", nve.id, "--underlay", nve.underlay]
        command += ["--lease-ttl", str(nve.lease_ttl)] if nve.lease_ttl != 5 else []
        if nve.rate_per_s:
            command += ["--rate-per-s", f"{nve.rate_per_s:g}", "--burst", f"{nve.burst:g}"]
        add(nve.id, "nve", command, health=cli_check("nve", "tables", nve.id, "--json"))
    inv_dir = work / "inventories"
    for inventory, file in source.inventories:
        if file is None:
            inv_dir.mkdir(parents=True, exist_ok=True)
            file = inv_dir / f"{inventory.hypervisor}.json"
            file.write_text(inventory.model_dump_json(indent=2))
        name = f"agent-{inventory.hypervisor}"
        nves = _agent_nves(inventory)
        deps: dict[str, Condition] = {nve: "healthy" for nve in nves}
        deps.update({job: "completed" for job in jobs})
        # Ready once an NVE holds this hypervisor's VNICs, as in compose.yaml.
        health = HypervisorOnNve(
            tuple(tuple(local_argv(["nvo3", "nve", "tables", nve, "--json"])) for nve in nves),
            env, inventory.hypervisor) if inventory.vnics else None
        add(name, "agent", ["nvo3", "agent", "run", "--inventory", str(file)],
            health=health, depends_on=deps,
            detail=f"nvo3 agent run --inventory {_relative(file)}")
    return Plan(procs, endpoints)


# ---------------------------------------------------------------------- compose files
class ComposeRewriter:
    """Maps compose addresses and paths to loopback ones, per service.

    A ``host:port`` whose host is a service name is that service's port; one
    whose host is 0.0.0.0, 127.0.0.1 or localhost is the port of the service
    being rewritten.  Each (service, container port) gets one free loopback
    port, the first time it is seen, for the whole file.
    """

    def __init__(self, services: Sequence[str], port: Callable[[], int] = free_port) -> None:
        self.services = list(services)
        self._port = port
        self.ports: dict[tuple[str, int], int] = {}
        hosts = sorted([*self.services, *LOCAL_HOSTS], key=len, reverse=True)
        alternation = "|".join(re.escape(h) for h in hosts)
        self._host_port = re.compile(rf"(?<![\w.-])({alternation}):(\d{{1,5}})(?!\d)")

    def port(self, service: str, container_port: int) -> int:
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = self._port()
        return self.ports[key]

    def text(self, value: str, service: str, mounts: Mapping[str, Path] | None = None) -> str:
        def host_port(m: re.Match[str]) -> str:
            host = m.group(1)
            owner = service if host in LOCAL_HOSTS else host
            return f"127.0.0.1:{self.port(owner, int(m.group(2)))}"

        out = self._host_port.sub(host_port, value)
        if mounts:
            targets = sorted(mounts, key=len, reverse=True)
            pattern = re.compile(
                r"(?<![\w.-])(" + "|".join(re.escape(t) for t in targets) + r")(?=$|[/\s\"',;\]}])"
            )
            out = pattern.sub(lambda m: str(mounts[m.group(1)]), out)
        return out

    def service_ports(self, service: str) -> str:
        mapped = sorted((c, p) for (s, c), p in self.ports.items() if s == service)
        return " ".join(f"{c}->{p}" for c, p in mapped)


def _duration(value: Any, default: float) -> float:
    """Compose durations: 30s, 1m30s, 500ms, 2h."""
    if value is None:
        return default
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    if not parts or "".join(n + u for n, u in parts) != str(value):
        raise UpError(f"bad duration {value!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def _command(value: Any) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise UpError(f"bad command {value!r}")


def _environment(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in map(str, value):
            key, _, val = item.partition("=")
            out[key] = val
        return out
    raise UpError(f"bad environment {value!r}")


def _depends_on(value: Any) -> dict[str, Condition]:
    if value is None:
        return {}
    if isinstance(value, list):
        return {str(name): "started" for name in value}
    if isinstance(value, dict):
        out: dict[str, Condition] = {}
        for name, spec in value.items():
            condition = (spec or {}).get("condition", "service_started")
            if condition not in _CONDITIONS:
                raise UpError(f"unknown depends_on condition {condition!r}")
            out[str(name)] = _CONDITIONS[condition]
        return out
    raise UpError(f"bad depends_on {value!r}")


def _volume(entry: Any) -> tuple[str, str]:
    """(source, target) of a short or long volume entry."""
    if isinstance(entry, str):
        parts = entry.split(":")
        if len(parts) < 2:
            raise UpError(f"anonymous volume {entry!r}: give it a name")
        return parts[0], parts[1]
    if isinstance(entry, dict) and "source" in entry and "target" in entry:
        return str(entry["source"]), str(entry["target"])
    raise UpError(f"bad volume {entry!r}")


def _copy_rewritten(src: Path, dst: Path, rewrite: Callable[[str], str]) -> None:
    if src.is_dir():
        for child in sorted(src.iterdir()):
            _copy_rewritten(child, dst / child.name, rewrite)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    try:
        dst.write_text(rewrite(data.decode()))
    except UnicodeDecodeError:
        dst.write_bytes(data)


@dataclass(frozen=True)
class _Rewrite:
    rw: ComposeRewriter
    service: str
    mounts: Mapping[str, Path]

    def __call__(self, text: str) -> str:
        return self.rw.text(text, self.service, self.mounts)


def _etcd_setting(argv: Sequence[str], env: Mapping[str, str], flag: str) -> str | None:
    """An etcd flag's value: ``--flag=v`` / ``--flag v``, or its ``ETCD_FLAG`` variable."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return env.get("ETCD_" + flag.upper().replace("-", "_"))


def _etcd_leader_check(argv: Sequence[str],
                       env: Mapping[str, str]) -> Callable[[], bool] | None:
    """Asks the member's HTTP gateway whether it leads (the supervisor stops it last).

    With TLS the member's ``--trusted-ca-file`` must sit in a credentials directory
    (``nvo3 pki init``): the probe presents its CN-less certificate, the only kind the
    gateway of an RBAC-enabled etcd answers.  It is read when asked, because the
    directory is written by a job that runs after this plan is made.
    """
    url = _etcd_setting(argv, env, "listen-client-urls")
    if url is None:
        return None
    status_url = url.split(",")[0].rstrip("/") + "/v3/maintenance/status"
    ca_file = _etcd_setting(argv, env, "trusted-ca-file")

    def opener() -> urllib.request.OpenerDirector:
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if status_url.startswith("https://") and ca_file is not None:
            context = Credentials.load(Path(ca_file).parent).probe_context()
            handlers.append(urllib.request.HTTPSHandler(context=context))
        return urllib.request.build_opener(*handlers)

    def is_leader() -> bool:
        request = urllib.request.Request(status_url, data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with opener().open(request, timeout=0.5) as response:
            status = json.loads(response.read())
        header = status.get("header", {})
        return bool(status.get("leader")) and status.get("leader") == header.get("member_id")

    return is_leader


def _role(argv: Sequence[str], oneshot: bool) -> str:
    name = Path(argv[0]).name
    if name == "etcd":
        return "etcd"
    if name == "nats-server":
        return "nats"
    if name == "nvo3" and len(argv) >= 3 and argv[2] == "run" and not oneshot:
        return argv[1]  # ima, nve, agent
    return "job" if oneshot else name


def compose_plan(path: Path, work: Path, data: Mapping[str, Any] | None = None,
                 rewriter: ComposeRewriter | None = None) -> Plan:
    """Every service of a compose file as a local process (see the module docstring)."""
    data = data if data is not None else yaml.safe_load(path.read_text())
    services: dict[str, dict[str, Any]] = dict(data["services"])
    declared = set((data.get("volumes") or {}).keys())
    rw = rewriter or ComposeRewriter(list(services))
    shims = write_shims(work / "bin")
    env0 = base_env(shims)
    deps = {name: _depends_on(svc.get("depends_on")) for name, svc in services.items()}
    awaited = {d for dd in deps.values() for d, c in dd.items() if c == "completed"}
    procs: list[ProcSpec] = []
    endpoints: dict[str, str] = {}
    for name, svc in services.items():
        unknown = set(svc) - COMPOSE_KEYS - COMPOSE_IGNORED
        if unknown:
            raise UpError(f"service {name}: a local run cannot honour {sorted(unknown)}")
        if "command" not in svc:
            raise UpError(f"service {name}: needs a command (the full argv)")
        mounts: dict[str, Path] = {}
        binds: list[tuple[Path, Path]] = []
        for entry in svc.get("volumes") or []:
            source, target = _volume(entry)
            # The service's view: each mount at its container path under its own root.
            local = work / "mounts" / name / target.strip("/")
            if source.startswith((".", "/", "~")):
                host = (path.parent / Path(source).expanduser()).resolve()
                binds.append((host, local))
            else:
                if source not in declared:
                    raise UpError(f"service {name}: volume {source!r} is not declared")
                volume = work / "volumes" / source
                volume.mkdir(parents=True, exist_ok=True)
                local.parent.mkdir(parents=True, exist_ok=True)
                if not local.is_symlink():
                    local.symlink_to(volume, target_is_directory=True)
                local = volume
            mounts[target] = local
        # Mounted files are rewritten like the command: a config file names
        # addresses (listen: 0.0.0.0:4222) and mount paths (store_dir: /data/...).
        for host, local in binds:
            _copy_rewritten(host, local, _Rewrite(rw, name, mounts))
        command = [rw.text(arg, name, mounts) for arg in _command(svc["command"])]
        env = {k: rw.text(v, name, mounts) for k, v in _environment(svc.get("environment")).items()}
        full_env = {**env0, **env}
        if Path(command[0]).name == "nvo3" and not endpoints:
            endpoints = {k: v for k, v in env.items() if k in _OPERATOR_ENV}
        argv = local_argv(command)
        oneshot = name in awaited
        procs.append(ProcSpec(
            name=name, argv=argv, role=_role(command, oneshot), env=full_env,
            health=_compose_health(svc.get("healthcheck"), name, rw, mounts, full_env),
            depends_on=deps[name], oneshot=oneshot,
            is_leader=(_etcd_leader_check(argv, full_env) if Path(command[0]).name == "etcd"
                       else None),
        ))
        procs[-1].detail = shlex.join(_command(svc["command"])) if command[0] == "nvo3" else ""
    for proc in procs:
        if not proc.detail:
            proc.detail = "ports " + rw.service_ports(proc.name)
    return Plan(procs, endpoints)


def _compose_health(hc: Any, service: str, rw: ComposeRewriter, mounts: Mapping[str, Path],
                    env: Mapping[str, str]) -> CommandCheck | None:
    if not hc or hc.get("disable"):
        return None
    test = hc.get("test")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not isinstance(test, list) or not test:
        raise UpError(f"service {service}: bad healthcheck test {test!r}")
    kind, rest = test[0], [rw.text(str(t), service, mounts) for t in test[1:]]
    if kind == "NONE":
        return None
    if kind == "CMD":
        argv = local_argv(rest)
    elif kind == "CMD-SHELL" and len(rest) == 1:
        argv = local_argv(["sh", "-c", rest[0]])
    else:
        raise UpError(f"service {service}: bad healthcheck test {test!r}")
    timeout = max(_duration(hc.get("timeout"), 30.0), HEALTH_TIMEOUT)
    return CommandCheck(tuple(argv), env, timeout=timeout)

