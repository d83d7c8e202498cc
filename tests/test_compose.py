"""compose.yaml without Docker: its services run as local processes and must work.

The local launcher is derived from compose.yaml (nvo3/topology.py:compose_plan):
each service's own `command`, `environment`, volumes, `depends_on` and
`healthcheck`, with service names mapped to 127.0.0.1 and container ports to
free loopback ports.  What cannot be derived (image tags, the Dockerfile,
cluster membership lists) is checked for agreement here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from agents.inventory import Inventory, load_inventory
from nvo3.servers import find_binary
from nvo3.topology import ComposeRewriter, Plan, compose_plan
from nvo3.up import Supervisor, UpError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
START_BUDGET = 45.0
LEASE_TTL = 5  # nvo3 nve run --lease-ttl default


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services(kind: str) -> dict[str, dict[str, Any]]:
    """Services by what they run: etcd, nats-server, or an nvo3 subcommand like 'nve run'."""
    out = {}
    for name, svc in _compose()["services"].items():
        command = svc["command"]
        program = Path(command[0]).name
        what = f"{command[1]} {command[2]}" if program == "nvo3" else program
        if what == kind:
            out[name] = svc
    return out


def _flag(command: list[str], flag: str) -> str:
    for i, arg in enumerate(command):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return command[i + 1]
    raise AssertionError(f"{flag} not in {command}")


def _version(binary: str) -> str:
    out = subprocess.run([find_binary(binary), "--version"], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"(\d+\.\d+\.\d+)", out)
    assert found, out
    return found.group(1)


def _inventory(svc: dict[str, Any]) -> Inventory:
    """The inventory file an agent service mounts, read from the host side of the mount."""
    path = _flag(svc["command"], "--inventory")
    for volume in svc["volumes"]:
        source, target = volume.split(":")[:2]
        if path.startswith(target + "/"):
            return load_inventory(ROOT / source / path[len(target) + 1:])
    raise AssertionError(f"{path} is not mounted")


# ---------------------------------------------------------------------- static agreement
def test_the_cluster_has_the_documented_shape() -> None:
    assert len(_services("etcd")) == 3
    assert len(_services("nats-server")) == 3
    assert len(_services("ima run")) == 2
    assert len(_services("nve run")) == 2
    assert len(_services("agent run")) == 4
    services = _compose()["services"]
    jobs = {d for svc in services.values() for d, c in (svc.get("depends_on") or {}).items()
            if c.get("condition") == "service_completed_successfully"}
    for name, svc in services.items():
        if name not in jobs:
            assert svc.get("healthcheck"), f"{name} has no healthcheck"
            assert svc.get("restart") == "unless-stopped", name


def test_server_images_are_pinned_to_the_binaries_the_tests_run() -> None:
    for svc in _services("nats-server").values():
        assert re.fullmatch(r"nats:\d+\.\d+\.\d+-alpine", svc["image"]), svc["image"]
        assert svc["image"] == f"nats:{_version('nats-server')}-alpine"
    etcd_minor = ".".join(_version("etcd").split(".")[:2])
    for svc in _services("etcd").values():
        tag = re.fullmatch(r"gcr\.io/etcd-development/etcd:v(\d+\.\d+)\.\d+", svc["image"])
        assert tag, svc["image"]
        assert tag.group(1) == etcd_minor, "compose runs another etcd minor than the tests"


def test_every_member_is_named_where_members_are_listed() -> None:
    etcd = _services("etcd")
    nats = _services("nats-server")
    peers = ",".join(f"{n}=http://{n}:2380" for n in etcd)
    for name, svc in etcd.items():
        command = svc["command"]
        assert _flag(command, "--name") == name
        assert _flag(command, "--initial-cluster") == peers
        assert _flag(command, "--advertise-client-urls") == f"http://{name}:2379"
        assert _flag(command, "--listen-client-urls") == "http://0.0.0.0:2379"
        assert f"{name}-data:" in " ".join(svc["volumes"]), "one named volume per member"
    config = (ROOT / "deploy/nats/nats.conf").read_text()
    routes = re.findall(r"nats://(\w+):6222", config)
    assert routes == list(nats)
    assert re.search(r"^listen: 0\.0\.0\.0:4222\b", config, re.M)
    assert re.search(r"^\s*sync_interval: always\b", config, re.M)
    for name, svc in nats.items():
        assert _flag(svc["command"], "--name") == name
        assert f"{name}-data:/data" in svc["volumes"]
    # Every nvo3 process can fail over to any member of either cluster.
    want_nats = ",".join(f"nats://{n}:4222" for n in nats)
    want_etcd = ",".join(f"{n}:2379" for n in etcd)
    for name, svc in _compose()["services"].items():
        if svc["command"][0] == "nvo3":
            assert svc["environment"]["NVO3_NATS"] == want_nats, name
            assert svc["environment"]["NVO3_ETCD"] == want_etcd, name


def test_agents_and_nves_agree() -> None:
    nves = {_flag(svc["command"], "--id"): name for name, svc in _services("nve run").items()}
    vns = {svc["command"][3] for svc in _services("vn create").values()}
    hypervisors = set()
    for name, svc in _services("agent run").items():
        inventory = _inventory(svc)
        hypervisors.add(inventory.hypervisor)
        assert name == f"agent-{inventory.hypervisor}"
        assert inventory.nve in nves, f"{name}: no NVE {inventory.nve}"
        assert svc["depends_on"][nves[inventory.nve]] == {"condition": "service_healthy"}
        for job in _services("vn create"):
            assert svc["depends_on"][job] == {"condition": "service_completed_successfully"}
        aliases = {vn.vn.alias for vnic in inventory.vnics for vn in vnic.vns}
        assert aliases <= vns, f"{name} uses VNs that no job creates: {aliases - vns}"
        assert f'"hypervisor": "{inventory.hypervisor}"' in str(svc["healthcheck"]["test"])
    assert hypervisors == {"hv1", "hv2", "hv3", "hv4"}


def test_dockerfile_builds_the_image_compose_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    # compose commands are complete argvs: an ENTRYPOINT would be prepended to them.
    assert not [line for line in lines if line.startswith("ENTRYPOINT")]
    froms = [line.split()[1] for line in lines if line.startswith("FROM")]
    assert froms
    assert all(re.fullmatch(r"python:3\.11-slim-\w+", f) for f in froms), froms
    assert any("pip install" in line for line in lines)
    for svc in _compose()["services"].values():
        if svc["command"][0] == "nvo3":
            assert svc["build"] == "."
            assert svc["image"] == "nvo3:local"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    assert ".git" in ignored
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*") for p in include]
    for needed in [*packages, "pyproject.toml", "README.md"]:
        assert needed not in ignored, f".dockerignore drops {needed}, which the build needs"


# ---------------------------------------------------------------------- the translator
def test_rewriter_maps_service_addresses_and_mounts() -> None:
    ports = iter(range(50000, 50100))
    rw = ComposeRewriter(["etcd1", "etcd2", "nats1"], port=lambda: next(ports))
    mounts = {"/data": Path("/tmp/v/nats1-data"), "/etc/nats/nats.conf": Path("/tmp/m/c")}
    out = rw.text("--listen=http://0.0.0.0:2379 --peer=etcd2:2380 etcd1:2379 localhost:2379",
                  "etcd1")
    assert out == ("--listen=http://127.0.0.1:50000 --peer=127.0.0.1:50001 "
                   "127.0.0.1:50000 127.0.0.1:50000")
    assert rw.text("mac 02:00:00:00:01:01 ip 10.1.0.11:80 etcd10:1", "etcd1") == (
        "mac 02:00:00:00:01:01 ip 10.1.0.11:80 etcd10:1")
    assert rw.text("store_dir: /data/js, -c /etc/nats/nats.conf /database", "nats1", mounts) == (
        "store_dir: /tmp/v/nats1-data/js, -c /tmp/m/c /database")
    assert rw.service_ports("etcd1") == "2379->50000"


def test_keys_a_local_run_cannot_honour_are_refused(tmp_path: Path) -> None:
    for extra in ({"entrypoint": ["sh"]}, {"env_file": ".env"}, {"network_mode": "host"}):
        data = {"services": {"x": {"image": "nvo3:local", "command": ["nvo3", "--help"], **extra}}}
        with pytest.raises(UpError, match="cannot honour"):
            compose_plan(COMPOSE, tmp_path, data)
    data = {"services": {"x": {"image": "busybox", "command": ["busybox", "true"]}}}
    with pytest.raises(UpError, match="no local equivalent"):
        compose_plan(COMPOSE, tmp_path, data)


def test_nats_config_as_rewritten_is_valid(tmp_path: Path) -> None:
    plan = compose_plan(COMPOSE, tmp_path)
    for proc in plan.procs:
        if proc.role == "nats":
            done = subprocess.run([*proc.argv, "-t"], capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------- the cluster, running
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plan, Supervisor]]:
    work = tmp_path_factory.mktemp("compose")
    plan = compose_plan(COMPOSE, work)
    log = (work / "status.log").open("w")
    supervisor = Supervisor(plan.procs, work / "logs", log, start_timeout=START_BUDGET)
    started = time.monotonic()
    try:
        supervisor.start()
        assert time.monotonic() - started < START_BUDGET
        yield plan, supervisor
    finally:
        supervisor.stop()
        log.close()
        for pid in supervisor.pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def nvo3(plan: Plan, *args: str) -> Any:
    env = {**os.environ, **plan.env}
    done = subprocess.run([sys.executable, "-m", "nvo3.cli", *args, "--json"], env=env,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return orjson.loads(done.stdout)


@pytest.mark.integration
def test_every_service_started_from_its_compose_command(
    cluster: tuple[Plan, Supervisor]
) -> None:
    plan, supervisor = cluster
    services = _compose()["services"]
    assert [p.spec.name for p in supervisor.procs] == list(services)
    for proc in supervisor.procs:
        assert proc.state in ("ready", "done"), proc.spec.name
        assert proc.process is not None
        if proc.spec.oneshot:
            assert proc.process.returncode == 0
        else:
            assert proc.process.alive, proc.spec.name
    assert plan.env["NVO3_NATS"].count("nats://127.0.0.1:") == 3
    assert plan.env["NVO3_ETCD"].count("127.0.0.1:") == 3


@pytest.mark.integration
def test_vns_and_inventories_are_applied(cluster: tuple[Plan, Supervisor]) -> None:
    plan, _ = cluster
    vns = {v["alias"]: v for v in nvo3(plan, "vn", "list")}
    assert set(vns) == {"blue", "red"}
    assert vns["red"]["service"] == "l3"
    inventories = [_inventory(svc) for svc in _services("agent run").values()]
    for nve in ("nve1", "nve2"):
        mine = [inv for inv in inventories if inv.nve == nve]
        others = [inv for inv in inventories if inv.nve != nve]
        tables = nvo3(plan, "nve", "tables", nve)
        assert tables["nve"] == nve
        assert set(tables["vnics"]) == {v.name for inv in mine for v in inv.vnics}
        assert {v["hypervisor"] for v in tables["vnics"].values()} == {i.hypervisor for i in mine}
        # The other NVE's MACs in shared VNs are learned through etcd watches, shortly
        # after the other agents' requests were acknowledged.
        served = {vn.vn.alias for inv in mine for vnic in inv.vnics for vn in vnic.vns}
        expected = {a.mac for inv in others for vnic in inv.vnics for vn in vnic.vns
                    if vn.vn.alias in served for a in vn.addresses}
        assert expected
        deadline = time.monotonic() + 10
        while True:
            remote_macs = {b.get("mac") for r in tables["remote"].values()
                           for b in r["entries"].values()}
            if expected <= remote_macs or time.monotonic() > deadline:
                break
            time.sleep(0.2)
            tables = nvo3(plan, "nve", "tables", nve)
        assert expected <= remote_macs


@pytest.mark.integration
def test_nvo3_processes_fail_over_to_the_other_members(cluster: tuple[Plan, Supervisor]) -> None:
    """Lose two NATS servers and one etcd member: IMA and NVEs keep serving on the rest.

    Only nats3 is left, so every NATS client must have moved there; the NVEs' etcd
    leases must be kept alive through the surviving etcd members for longer than
    their TTL (5 s), or the NVEs would exit with LeaseLost.
    """
    plan, supervisor = cluster
    for name in ("nats1", "nats2", "etcd1"):
        process = supervisor.get(name).process
        assert process is not None
        process.stop()
    created = nvo3(plan, "vn", "create", "green")
    assert created[0]["alias"] == "green"
    assert {v["alias"] for v in nvo3(plan, "vn", "list")} == {"blue", "red", "green"}
    deadline = time.monotonic() + LEASE_TTL + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.5)
        for name in ("nve1", "nve2", "ima1", "ima2"):
            process = supervisor.get(name).process
            assert process is not None
            assert process.alive, f"{name} died after the members went away"
    for nve, vnics in (("nve1", 3), ("nve2", 3)):
        tables = nvo3(plan, "nve", "tables", nve)
        assert len(tables["vnics"]) == vnics
