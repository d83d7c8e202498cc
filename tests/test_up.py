"""``nvo3 up``: a topology file, the compose cluster it mirrors, and the running command."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from agents.inventory import load_inventory
from nvo3 import topology
from nvo3.security import Credentials
from nvo3.servers import find_binary
from nvo3.topology import Plan, TopologySource, compose_plan, topology_plan
from nvo3.up import ProcSpec, Supervisor, UpError

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "deploy" / "topology.yaml"
COMPOSE = ROOT / "compose.yaml"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def _commands(plan: Plan) -> Counter[str]:
    """The nvo3 commands of a plan, with each inventory path replaced by its content.

    Without the `nvo3 pki` jobs: `nvo3 up` generates a topology's credentials and
    bootstraps etcd RBAC itself, before it starts any process.
    """
    out: Counter[str] = Counter()
    for proc in plan.procs:
        if proc.argv[1:3] != ["-m", "nvo3.cli"] or proc.argv[3] == "pki":
            continue
        args = proc.argv[3:]
        if "--inventory" in args:
            i = args.index("--inventory") + 1
            args[i] = load_inventory(Path(args[i])).model_dump_json()
        out[" ".join(args)] += 1
    return out


def test_topology_describes_the_compose_cluster(tmp_path: Path) -> None:
    source = topology.load(TOPOLOGY)
    assert isinstance(source, TopologySource)
    mirrored = topology_plan(source, tmp_path / "up", ["nats://127.0.0.1:1"], ["127.0.0.1:2"])
    composed = compose_plan(COMPOSE, tmp_path / "compose")
    assert _commands(mirrored) == _commands(composed)
    roles = Counter(p.role for p in composed.procs)
    assert (source.topology.nats, source.topology.etcd) == (roles["nats"], roles["etcd"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "error"), [
    ("nves: [{id: nve1, underlay: 192.0.2.1}]\n"
     "agents: [{hypervisor: hv1, nve: nve2}]\n", "NVE 'nve2' is not in nves"),
    ("nves: [{id: nve1, underlay: 192.0.2.1}]\n"
     "agents: [{hypervisor: hv1, nve: nve1, vnics: [{name: 6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a01,"
     " port: eth0, vns: [{vn: {alias: blue}}]}]}]\n", "VN 'blue' is not in vns"),
    ("nves: [{id: nve1, underlay: 192.0.2.1}, {id: nve1, underlay: 192.0.2.2}]\n",
     "duplicate NVE id"),
    ("nves: [{id: nve1, underlay: 10.0.0.0/8}]\n", "underlay"),
    ("ima: 0\nvns: [{alias: blue}]\n", "needs at least one IMA"),
    ("nats: 1\netcd: 1\nmystery: 1\n", "mystery"),
])
def test_bad_topologies_are_refused(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        topology.load(_write(tmp_path / "t.yaml", text))


def test_bad_topology_is_a_usage_error(tmp_path: Path) -> None:
    bad = _write(tmp_path / "t.yaml", "nves: [{id: 'not a token', underlay: 192.0.2.1}]\n")
    done = subprocess.run([sys.executable, "-m", "nvo3.cli", "up", str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "nves" in done.stderr
    # compose.yaml secures itself; --insecure cannot turn that off.
    done = subprocess.run([sys.executable, "-m", "nvo3.cli", "up", str(COMPOSE), "--insecure"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "--insecure is for topology files" in done.stderr


def test_topology_credentials_follow_the_agents(tmp_path: Path) -> None:
    source = topology.load(TOPOLOGY)
    assert isinstance(source, TopologySource)
    creds = topology.topology_credentials(source, tmp_path / "pki")
    assert creds.hypervisors == {"hv1": ("nve1",), "hv2": ("nve1",), "hv3": ("nve2",),
                                 "hv4": ("nve2",)}
    assert creds.nves == ("nve1", "nve2")
    plan = topology_plan(source, tmp_path / "up", ["nats://127.0.0.1:1"], ["127.0.0.1:2"],
                         creds.workdir)
    assert plan.env["NVO3_CREDS"] == str(creds.workdir)
    assert all(p.env is not None and p.env["NVO3_CREDS"] == str(creds.workdir)
               for p in plan.procs)


# ---------------------------------------------------------------------- the supervisor
def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_supervisor_starts_in_dependency_order_and_stops_by_pid(tmp_path: Path) -> None:
    flag = tmp_path / "server-ready"
    specs = [
        ProcSpec("agent", _py("import time; time.sleep(60)"), "agent",
                 depends_on={"job": "completed", "server": "healthy"}),
        ProcSpec("job", _py("pass"), "job", oneshot=True, depends_on={"server": "healthy"}),
        ProcSpec("server", _py(f"import pathlib, time; time.sleep(0.3); "
                               f"pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"),
                 "server", health=flag.exists),
    ]
    out = io.StringIO()
    supervisor = Supervisor(specs, tmp_path / "logs", out, start_timeout=30)
    supervisor.start()
    try:
        lines = out.getvalue().splitlines()
        order = [line.split()[0] + " " + line.split()[3] for line in lines]
        assert order == ["server starting", "server ready", "job starting", "job done",
                         "agent starting", "agent ready"]
        assert supervisor.summary() == "1 agent, 1 job, 1 server"
    finally:
        supervisor.stop()
    stopped = [line.split()[0] for line in out.getvalue().splitlines() if "stopped" in line]
    assert stopped == ["agent", "server"]
    assert all(_gone(pid) for pid in supervisor.pids)


def test_a_failing_job_stops_what_was_started(tmp_path: Path) -> None:
    specs = [
        ProcSpec("server", _py("import time; time.sleep(60)"), "server"),
        ProcSpec("job", _py("print('boom'); raise SystemExit(3)"), "job", oneshot=True,
                 depends_on={"server": "started"}),
    ]
    supervisor = Supervisor(specs, tmp_path / "logs", io.StringIO(), start_timeout=30)
    with pytest.raises(UpError, match=r"(?s)job: job exited with 3.*boom"):
        supervisor.start()
    assert all(_gone(pid) for pid in supervisor.pids)


def test_cycles_and_unknown_dependencies_are_refused(tmp_path: Path) -> None:
    def spec(name: str, *deps: str) -> ProcSpec:
        return ProcSpec(name, _py("pass"), "x", depends_on=dict.fromkeys(deps, "started"))

    with pytest.raises(UpError, match="cycle: a -> b -> a"):
        Supervisor([spec("a", "b"), spec("b", "a")], tmp_path, io.StringIO())
    with pytest.raises(UpError, match="depends on unknown 'c'"):
        Supervisor([spec("a", "c")], tmp_path, io.StringIO())


# ---------------------------------------------------------------------- running it
class Up:
    """``nvo3 up FILE`` as a child process, its output read line by line."""

    def __init__(self, path: Path, *options: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvo3.cli", "up", str(path), *options], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("NVO3_")},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {timeout}s:\n" +
                                     "\n".join(self.output)) from None
            if line is None:
                raise AssertionError(f"nvo3 up exited ({self.proc.wait()}) before {prefix!r}:\n"
                                     + "\n".join(self.output))
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def rest(self) -> list[str]:
        self._reader.join(timeout=STOP_TIMEOUT)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                return self.output
            self.output.append(line)

    def pids(self) -> dict[str, int]:
        out = {}
        for line in self.output:
            m = re.match(r"\s+(\S+)\s+pid (\d+)\s", line)
            if m:
                out[m.group(1)] = int(m.group(2))
        return out

    def env(self) -> dict[str, str]:
        line = self.until("NVO3_NATS=", 5)
        return dict(part.split("=", 1) for part in line.split())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def nvo3(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "nvo3.cli", *args, "--json"],
                          env={**os.environ, **env}, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return orjson.loads(done.stdout)


@pytest.mark.integration
def test_up_runs_the_topology_until_sigterm() -> None:
    """Secured by default: TLS, NKeys and etcd RBAC, with the credentials in NVO3_CREDS."""
    up = Up(TOPOLOGY)
    try:
        assert "TLS + NKeys + etcd RBAC" in up.until("nvo3 up:", 10)
        up.until("ready:", READY_TIMEOUT)
        env = up.env()
        pids = up.pids()
        expected = {"nats1", "nats2", "nats3", "etcd1", "etcd2", "etcd3", "ima1", "ima2",
                    "vn-blue", "vn-red", "nve1", "nve2",
                    "agent-hv1", "agent-hv2", "agent-hv3", "agent-hv4"}
        assert set(pids) == expected
        assert env["NVO3_NATS"].count("nats://") == 3
        assert env["NVO3_ETCD"].count(",") == 2
        creds = Credentials.load(env["NVO3_CREDS"])
        assert set(creds.hypervisors) == {"hv1", "hv2", "hv3", "hv4"}
        assert {v["alias"] for v in nvo3(env, "vn", "list")} == {"blue", "red"}
        # Without the credentials the same request is refused by the servers (TLS).
        plain = {k: v for k, v in env.items() if k != "NVO3_CREDS"}
        etcdctl = [find_binary("etcdctl"), "--endpoints=" + env["NVO3_ETCD"],
                   "--dial-timeout=2s", "--command-timeout=3s", "get", "/nvo3/"]
        assert subprocess.run(etcdctl, capture_output=True, env={**os.environ, **plain},
                              timeout=30, check=False).returncode != 0
        inspector = [find_binary("etcdctl"), "--endpoints=" + ",".join(
            f"https://{e}" for e in env["NVO3_ETCD"].split(",")),
            *creds.etcdctl_flags("inspector"), "get", "--prefix", "/nvo3/vn/alias/", "--keys-only"]
        assert subprocess.run(inspector, capture_output=True, text=True, timeout=30,
                              check=True).stdout.split() == [
            "/nvo3/vn/alias/blue", "/nvo3/vn/alias/red"]
        tables = nvo3(env, "nve", "tables", "nve2")
        assert {v["hypervisor"] for v in tables["vnics"].values()} == {"hv3", "hv4"}
        deadline = time.monotonic() + 10
        while not tables["remote"] and time.monotonic() < deadline:
            time.sleep(0.2)
            tables = nvo3(env, "nve", "tables", "nve2")
        assert tables["remote"], "nve2 learns nve1's bindings through etcd"
        alive = {name for name, pid in pids.items() if not _gone(pid)}
        assert alive == expected - {"vn-blue", "vn-red"}
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(STOP_TIMEOUT) == 130
        output = up.rest()
        assert output[-1] == "stopped"
        stopped = {m.group(1) for line in output
                   if (m := re.match(r"\s+(\S+)\s+pid \d+\s+stopped", line))}
        assert stopped == alive
        assert [name for name, pid in pids.items() if not _gone(pid)] == []
    finally:
        up.close()


@pytest.mark.integration
def test_up_with_an_inline_inventory_stops_on_ctrl_c(tmp_path: Path) -> None:
    path = _write(tmp_path / "small.yaml", """
nats: 1
etcd: 1
ima: 1
vns: [{alias: blue}]
nves: [{id: edge, underlay: 192.0.2.9, lease_ttl: 3}]
agents:
  - hypervisor: hv9
    nve: edge
    vnics:
      - name: 6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a09
        port: eth0
        vns: [{vn: {alias: blue}, addresses: [{mac: "02:00:00:00:09:09", ips: [10.9.0.9]}]}]
""")
    up = Up(path, "--insecure")
    try:
        assert "INSECURE" in up.until("nvo3 up:", 10)
        up.until("ready:", READY_TIMEOUT)
        env = up.env()
        assert "NVO3_CREDS" not in env
        pids = up.pids()
        assert set(pids) == {"nats1", "etcd1", "ima1", "vn-blue", "edge", "agent-hv9"}
        tables = nvo3(env, "nve", "tables", "edge")
        assert [v["hypervisor"] for v in tables["vnics"].values()] == ["hv9"]
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(STOP_TIMEOUT) == 130
        assert up.rest()[-1] == "stopped"
        assert [name for name, pid in pids.items() if not _gone(pid)] == []
    finally:
        up.close()
