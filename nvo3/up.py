"""``nvo3 up``: run a whole cluster as local processes until Ctrl-C or SIGTERM.

The input is either a topology file (``deploy/topology.yaml``: member counts,
IMA replicas, VNs, NVEs, agents) or a compose file (``compose.yaml``), whose
services then run without Docker (see ``nvo3/topology.py`` for both).  Either
way the result is a list of :class:`ProcSpec`, which :class:`Supervisor`
starts in dependency order, waits on (health checks, one-shot jobs), reports
as one status line per process, and stops in reverse order, every process by
its own pid.

Status lines look like this::

    nvo3 up: deploy/topology.yaml (TLS + NKeys + etcd RBAC; logs in /tmp/nvo3-up-1a2b/logs)
      nats1        pid 4101     ready        nats://127.0.0.1:40123
      nve1         pid 4120     ready        nvo3 nve run --id nve1 --underlay 192.0.2.1
      vn-blue      pid 4117     done         nvo3 vn create blue --service l2
    ready: 3 nats, 3 etcd, 2 ima, 2 job, 2 nve, 4 agent
    NVO3_NATS=nats://127.0.0.1:40123,... NVO3_ETCD=127.0.0.1:40201,... NVO3_CREDS=/tmp/...

A topology file runs secured by default (TLS, one NKey identity per process, etcd
RBAC; credentials generated into the work dir, ``NVO3_CREDS``); ``--insecure`` runs
the plain stack.  A compose file is run as it is written: compose.yaml secures itself
with its ``pki`` and ``etcd-rbac`` jobs.

After ``ready`` a line is printed whenever a process exits.  On SIGTERM or
Ctrl-C every process is stopped (agents first, servers last) and the exit
code is 130; a process that failed makes it 1.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal, TextIO

from nvo3.servers import ManagedProcess

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

START_TIMEOUT = 90.0
POLL_INTERVAL = 0.1
PROBE_SPACING = 0.5  # between the end of one health probe and the start of the next
# Health commands get at least this long: on a loaded machine a Python command can
# take seconds just to start, and a probe killed at a compose-style 3 s never passes.
HEALTH_TIMEOUT = 10.0

Condition = Literal["started", "healthy", "completed"]
State = Literal["waiting", "starting", "ready", "done", "exited", "failed", "stopped"]
HealthCheck = Callable[[], bool]


NAME_WIDTH = 12


def status_line(name: str, pid: int | None, state: str, detail: str,
                width: int = NAME_WIDTH) -> str:
    """``  nve1         pid 4120     ready      nvo3 nve run --id nve1 ...``"""
    pid_text = f"pid {pid}" if pid is not None else "pid -"
    return f"  {name:<{width}} {pid_text:<12} {state:<12} {detail}".rstrip()


class UpError(RuntimeError):
    """The cluster could not be started; the message says which process and why."""


@dataclass(frozen=True)
class CommandCheck:
    """Healthy when the command exits 0 within ``timeout`` (a compose healthcheck test)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    timeout: float = HEALTH_TIMEOUT

    def __call__(self) -> bool:
        try:
            done = subprocess.run(self.argv, env=dict(self.env) if self.env is not None else None,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=self.timeout, check=False)
        except (subprocess.TimeoutExpired, OSError):
            return False
        return done.returncode == 0


@dataclass
class ProcSpec:
    """One process to run: what compose calls a service, with its command made local."""

    name: str
    argv: list[str]
    role: str  # etcd, nats, ima, nve, agent, job: shown in the ready summary
    env: dict[str, str] | None = None
    detail: str = ""
    health: HealthCheck | None = None
    depends_on: dict[str, Condition] = field(default_factory=dict)
    oneshot: bool = False  # a job: expected to exit 0, and then it is "done"
    is_leader: Callable[[], bool] | None = None  # etcd: the leader stops after its followers


@dataclass
class _Running:
    spec: ProcSpec
    state: State = "waiting"
    process: ManagedProcess | None = None
    level: int = 0


def _levels(specs: Sequence[ProcSpec]) -> dict[str, int]:
    """Dependency depth of each process; rejects unknown names and cycles."""
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        names = [s.name for s in specs]
        raise UpError(f"two processes named {sorted({n for n in names if names.count(n) > 1})}")
    levels: dict[str, int] = {}

    def level(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise UpError(f"dependency cycle: {' -> '.join((*path, name))}")
        if name not in by_name:
            raise UpError(f"{path[-1]} depends on unknown {name!r}")
        if name not in levels:
            deps = by_name[name].depends_on
            levels[name] = 1 + max((level(d, (*path, name)) for d in deps), default=-1)
        return levels[name]

    for spec in specs:
        level(spec.name, ())
    return levels


class Supervisor:
    """Starts, watches and stops a set of local processes; every one is owned by pid."""

    def __init__(
        self,
        specs: Sequence[ProcSpec],
        logdir: Path,
        out: TextIO,
        *,
        start_timeout: float = START_TIMEOUT,
        stop_requested: threading.Event | None = None,
    ) -> None:
        levels = _levels(specs)
        self.procs = [_Running(s, level=levels[s.name]) for s in specs]
        self.logdir = logdir
        self.out = out
        self.start_timeout = start_timeout
        self.stop_requested = stop_requested or threading.Event()
        self.failed: list[str] = []
        self._width = max([NAME_WIDTH, *(len(s.name) + 1 for s in specs)])

    # ---------------------------------------------------------------- reporting
    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def status_line(self, proc: _Running) -> str:
        state: str = proc.state
        if proc.state in ("exited", "failed") and proc.process is not None:
            state = f"{proc.state}({proc.process.returncode})"
        pid = proc.process.pid if proc.process is not None else None
        return status_line(proc.spec.name, pid, state, proc.spec.detail, self._width)

    def _set(self, proc: _Running, state: State) -> None:
        if proc.state != state:
            proc.state = state
            self._say(self.status_line(proc))

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self.procs if p.process is not None]

    def get(self, name: str) -> _Running:
        for proc in self.procs:
            if proc.spec.name == name:
                return proc
        raise KeyError(name)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for proc in self.procs:
            counts[proc.spec.role] = counts.get(proc.spec.role, 0) + 1
        return ", ".join(f"{n} {role}" for role, n in counts.items())

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def _failure(self, proc: _Running, why: str) -> UpError:
        tail = proc.process.log_tail(15) if proc.process is not None else ""
        indented = "\n".join(f"    | {line}" for line in tail.splitlines())
        return UpError(f"{proc.spec.name}: {why}\n  command: {shlex.join(proc.spec.argv)}\n"
                       f"  log {self.log_path(proc.spec.name)}:\n{indented}")

    # ---------------------------------------------------------------- start
    def _satisfied(self, spec: ProcSpec) -> bool:
        for dep, condition in spec.depends_on.items():
            state = self.get(dep).state
            if condition == "started" and state == "waiting":
                return False
            if condition == "healthy" and state not in ("ready", "done"):
                return False
            if condition == "completed" and state != "done":
                return False
        return True

    def _launch(self, proc: _Running) -> None:
        proc.process = ManagedProcess(proc.spec.argv, self.log_path(proc.spec.name),
                                      env=proc.spec.env)
        self._set(proc, "starting")

    def start(self) -> None:
        """Start everything in dependency order; on any failure stop all and raise UpError."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.start_timeout
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="nvo3-health")
        probes: dict[str, tuple[Future[bool] | None, float]] = {}
        try:
            while True:
                if self.stop_requested.is_set():
                    raise UpError("interrupted while starting")
                for proc in self.procs:
                    if proc.state == "waiting" and self._satisfied(proc.spec):
                        self._launch(proc)
                        probes[proc.spec.name] = (None, time.monotonic() + PROBE_SPACING)
                self._check_starting(pool, probes)
                if all(p.state in ("ready", "done") for p in self.procs):
                    return
                if time.monotonic() > deadline:
                    late = [p for p in self.procs if p.state not in ("ready", "done")]
                    raise self._failure(late[0], f"not ready within {self.start_timeout:.0f}s "
                                        f"(also late: {[p.spec.name for p in late[1:]]})")
                self.stop_requested.wait(POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _check_starting(self, pool: ThreadPoolExecutor,
                        probes: dict[str, tuple[Future[bool] | None, float]]) -> None:
        """Exits and health, without blocking: each probe runs in the pool at its own pace."""
        now = time.monotonic()
        for proc in self.procs:
            if proc.state != "starting" or proc.process is None:
                continue
            code = proc.process.returncode
            if proc.spec.oneshot:
                if code == 0:
                    self._set(proc, "done")
                elif code is not None:
                    self._set(proc, "failed")
                    raise self._failure(proc, f"job exited with {code}")
            elif code is not None:
                self._set(proc, "failed")
                raise self._failure(proc, f"exited with {code} while starting")
            elif proc.spec.health is None:
                self._set(proc, "ready")
            else:
                future, due = probes[proc.spec.name]
                if future is None:
                    if now >= due:
                        probes[proc.spec.name] = (pool.submit(proc.spec.health), due)
                elif future.done():
                    if future.result():
                        self._set(proc, "ready")
                    else:
                        probes[proc.spec.name] = (None, now + PROBE_SPACING)

    # ---------------------------------------------------------------- run
    def watch(self) -> None:
        """Report exits until a stop is requested."""
        while not self.stop_requested.wait(0.5):
            self.poll()

    def poll(self) -> None:
        for proc in self.procs:
            if proc.state == "ready" and proc.process is not None and not proc.process.alive:
                self.failed.append(proc.spec.name)
                self._set(proc, "exited")
                self._say(f"    log: {self.log_path(proc.spec.name)}")

    # ---------------------------------------------------------------- stop
    def stop(self) -> None:
        """Dependents first (agents, then NVEs/IMA, then servers); etcd leaders last."""
        for level in sorted({p.level for p in self.procs}, reverse=True):
            group = [p for p in self.procs if p.level == level and p.process is not None]
            leaders = [p for p in group if p.spec.is_leader is not None and p.process is not None
                       and p.process.alive and _safe(p.spec.is_leader)]
            for wave in ([p for p in group if p not in leaders], leaders):
                alive = [p for p in wave if p.process is not None and p.process.alive]
                for proc in alive:
                    assert proc.process is not None
                    proc.process.terminate()
                for proc in wave:
                    assert proc.process is not None
                    proc.process.stop()
                for proc in alive:
                    self._set(proc, "stopped")


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        return False


# ---------------------------------------------------------------------- the CLI
def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``nvo3 up FILE``, ``nvo3 pki …`` and ``nvo3 asyncapi export PATH`` (for nvo3/cli.py)."""
    from nvo3 import pki_commands

    up = sub.add_parser("up", help="run a cluster from a topology or compose file until Ctrl-C")
    up.add_argument("file", type=Path,
                    help="a topology file (deploy/topology.yaml) or a compose file (compose.yaml)")
    up.add_argument("--workdir", type=Path,
                    help="keep data and logs here (default: a temporary dir, removed at exit)")
    up.add_argument("--timeout", type=float, default=START_TIMEOUT,
                    help="seconds to wait for every process to be ready")
    up.add_argument("--insecure", action="store_true",
                    help="topology files: no TLS, NKeys or etcd RBAC (debugging only); "
                         "a compose file sets up its own security")
    pki_commands.add_subcommands(sub)
    asyncapi = sub.add_parser("asyncapi", help="AsyncAPI 3 document of every NATS subject")
    asyncapi.add_argument("action", choices=("export",))
    asyncapi.add_argument("path", type=Path, help="where to write it, e.g. docs/asyncapi.yaml")
    asyncapi.add_argument("--schema-dir", type=Path,
                          help="the JSON Schema files it refers to (default: schemas/ beside it)")


def run_subcommand(args: argparse.Namespace) -> int:
    if args.command == "pki":
        from nvo3 import pki_commands

        return pki_commands.run(args)
    if args.command == "asyncapi":
        from schemas.asyncapi import export_asyncapi

        print(export_asyncapi(args.path, args.schema_dir))
        return EXIT_OK
    return run_up(args.file, workdir=args.workdir, start_timeout=args.timeout,
                  insecure=args.insecure)


# ---------------------------------------------------------------------- nvo3 up
@contextlib.contextmanager
def _stop_on_signals(event: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM ask for a graceful stop; the children are in their own sessions."""

    def handler(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_up(path: Path, *, workdir: Path | None = None, start_timeout: float = START_TIMEOUT,
           out: TextIO = sys.stdout, insecure: bool = False) -> int:
    """``insecure`` applies to topology files; a compose file's own services secure it."""
    from nvo3 import topology

    try:
        source = topology.load(path)
    except (OSError, ValueError) as exc:
        print(f"nvo3 up: {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if insecure and isinstance(source, topology.ComposeSource):
        print(f"nvo3 up: {path}: --insecure is for topology files; a compose file runs as "
              "it is written", file=sys.stderr)
        return EXIT_USAGE
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="nvo3-up-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    mode = "" if isinstance(source, topology.ComposeSource) else (
        "INSECURE (--insecure); " if insecure else "TLS + NKeys + etcd RBAC; ")
    print(f"nvo3 up: {path} ({mode}logs in {work / 'logs'})", file=out, flush=True)
    servers: topology.StartedServers | None = None
    supervisor: Supervisor | None = None
    code = EXIT_OK
    with _stop_on_signals(stop):
        try:
            servers = topology.start_servers(source, work, out, secure=not insecure)
            plan = topology.plan(source, work, servers)
            supervisor = Supervisor(plan.procs, work / "logs", out, start_timeout=start_timeout,
                                    stop_requested=stop)
            supervisor.start()
            print(f"ready: {servers.summary()}{supervisor.summary()}", file=out, flush=True)
            print(" ".join(f"{k}={v}" for k, v in plan.env.items()), file=out, flush=True)
            supervisor.watch()
            code = EXIT_FAILED if supervisor.failed else EXIT_INTERRUPTED
        except UpError as exc:
            code = EXIT_INTERRUPTED if stop.is_set() else EXIT_FAILED
            print(f"nvo3 up: {exc}", file=sys.stderr, flush=True)
        except Exception as exc:  # a server that would not start, a bad inventory...
            code = EXIT_FAILED
            print(f"nvo3 up: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            print("stopping", file=out, flush=True)
            if supervisor is not None:
                supervisor.stop()
            if servers is not None:
                servers.stop(out)
            print("stopped", file=out, flush=True)
            if own_workdir:
                shutil.rmtree(work, ignore_errors=True)
    return code
