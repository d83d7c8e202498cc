"""compose.yaml without Docker: its services run as local processes and must work.

The local launcher is derived from compose.yaml (nvo3/topology.py:compose_plan):
each service's own `command`, `environment`, volumes, `depends_on` and
`healthcheck`, with service names mapped to 127.0.0.1 and container ports to
free loopback ports.  What cannot be derived (image tags, the Dockerfile,
cluster membership lists) is checked for agreement here.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import yaml
from cryptography import x509

from agents.inventory import Inventory, load_inventory
from nvo3.pki import CertificateAuthority
from nvo3.pki_commands import hypervisors_of
from nvo3.pki_commands import init as pki_init
from nvo3.security import SERVER_CN, Credentials, hv_identity, nve_identity
from nvo3.servers import find_binary
from nvo3.topology import ComposeRewriter, Plan, compose_plan
from nvo3.up import ProcSpec, Supervisor, UpError

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


def _flags(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


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
    assert list(_services("pki init")) == ["pki"]
    assert list(_services("pki etcd-rbac")) == ["etcd-rbac"]
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
    peers = ",".join(f"{n}=https://{n}:2380" for n in etcd)
    for name, svc in etcd.items():
        command = svc["command"]
        assert _flag(command, "--name") == name
        assert _flag(command, "--initial-cluster") == peers
        assert _flag(command, "--advertise-client-urls") == f"https://{name}:2379"
        assert _flag(command, "--listen-client-urls") == "https://0.0.0.0:2379"
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


# ---------------------------------------------------------------------- security
PKI = "/pki"


def test_every_server_and_process_is_secured() -> None:
    """TLS on every listener, client certificates required, one identity per process."""
    services = _compose()["services"]
    for name, svc in services.items():
        mounts = [v for v in svc.get("volumes", []) if v.split(":")[0] == "pki"]
        want = f"pki:{PKI}" if name == "pki" else f"pki:{PKI}:ro"
        assert mounts == [want], f"{name} mounts the credentials volume as {mounts}"
        if svc["command"][0] == "nvo3":
            assert svc["environment"]["NVO3_CREDS"] == PKI, name
    for name, svc in _services("etcd").items():
        command, env = svc["command"], svc["environment"]
        for flag in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
                     "--initial-advertise-peer-urls"):
            assert _flag(command, flag).startswith("https://"), (name, flag)
        assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
        assert env["ETCD_TRUSTED_CA_FILE"] == env["ETCD_PEER_TRUSTED_CA_FILE"] == f"{PKI}/ca.pem"
        assert env["ETCD_CERT_FILE"] == env["ETCD_PEER_CERT_FILE"] == f"{PKI}/server.pem"
        assert env["ETCD_PEER_CERT_ALLOWED_CN"] == SERVER_CN
        assert svc["depends_on"] == {"pki": {"condition": "service_completed_successfully"}}
        # The health check reads as the read-only inspector.
        assert f"--cert={PKI}/inspector.pem" in svc["healthcheck"]["test"]
    for svc in _services("nats-server").values():
        assert svc["depends_on"] == {"pki": {"condition": "service_completed_successfully"}}
    # Nothing talks to etcd before its roles exist and auth is on.
    for kind in ("ima run", "nve run"):
        for name, svc in _services(kind).items():
            assert svc["depends_on"]["etcd-rbac"] == {
                "condition": "service_completed_successfully"}, name
    assert set(services["etcd-rbac"]["depends_on"]) == set(_services("etcd"))


def test_the_pki_job_names_every_server_nve_and_hypervisor() -> None:
    command = _compose()["services"]["pki"]["command"]
    assert command[3] == PKI
    hosts = set(_flags(command, "--server-host"))
    assert hosts == set(_services("etcd")) | set(_services("nats-server"))
    nves = {_flag(svc["command"], "--id") for svc in _services("nve run").values()}
    assert set(_flags(command, "--nve")) == nves
    # The inventories it reads are the agents' own (same host directory).
    pki_mounts = dict(v.split(":")[1::-1] for v in _compose()["services"]["pki"]["volumes"])
    sources = [ROOT / pki_mounts[path] for path in _flags(command, "--inventory")]
    assigned = hypervisors_of(sources)
    for svc in _services("agent run").values():
        inventory = _inventory(svc)
        assert assigned[inventory.hypervisor] == (inventory.nve,)


def test_nats_config_requires_tls_nkeys_and_server_routes() -> None:
    config = (ROOT / "deploy/nats/nats.conf").read_text()
    client_tls, cluster = config.split("\ncluster {")
    assert re.search(r"^tls \{[^}]*\bverify: true", client_tls, re.M)
    assert f"cert_file: {PKI}/server.pem" in client_tls
    # The users (NKeys and permissions) are generated into the volume.
    include = re.search(r'^include "([^"]+)"', client_tls, re.M)
    assert include
    assert (Path("/etc/nats") / include.group(1)).resolve() == Path(PKI) / "nats-users.conf"
    # A route must present the servers' certificate: its subject is the route user.
    assert re.search(r"\bverify_and_map: true", cluster)
    route_user = re.search(r'authorization \{ user: "([^"]+)" \}', cluster)
    assert route_user
    issued = CertificateAuthority.generate().issue_server(SERVER_CN)
    subject = x509.load_pem_x509_certificate(issued.cert_pem).subject.rfc4514_string()
    assert route_user.group(1) == subject
    assert re.search(r"^\s*no_advertise: true", cluster, re.M)


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
    # The pki job writes as the image's user into the empty volume at /pki, which
    # takes its owner from the image's mount point.
    assert re.search(rf"mkdir -m 0700 {PKI} && chown nvo3 {PKI}\b", dockerfile)
    assert lines[[i for i, line in enumerate(lines) if line.startswith("USER")][-1]] == (
        "USER nvo3")
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


def _run_job(proc: ProcSpec) -> str:
    done = subprocess.run(proc.argv, env=proc.env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_nats_config_as_rewritten_is_valid(tmp_path: Path) -> None:
    """Once the pki job has written the NATS users the config includes."""
    plan = compose_plan(COMPOSE, tmp_path)
    procs = {p.name: p for p in plan.procs}
    _run_job(procs["pki"])
    for proc in plan.procs:
        if proc.role == "nats":
            done = subprocess.run([*proc.argv, "-t"], capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr


def test_pki_job_keeps_credentials_and_adds_new_hypervisors(tmp_path: Path) -> None:
    plan = compose_plan(COMPOSE, tmp_path)
    pki = {p.name: p for p in plan.procs}["pki"]
    _run_job(pki)
    creds_dir = Path(plan.env["NVO3_CREDS"])
    creds = Credentials.load(creds_dir)
    assert set(creds.identities) == {
        *(hv_identity(f"hv{i}") for i in range(1, 5)), nve_identity("nve1"),
        nve_identity("nve2"), "ima", "op", "inspector", "root"}
    cert = x509.load_pem_x509_certificate(creds.server_cert_file.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"etcd1", "nats3", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    ca_before = creds.ca_file.read_bytes()
    users = (creds_dir / "nats-users.conf").read_text()
    assert users.count("nkey:") == 8  # hv1..hv4, nve1, nve2, ima, op
    # A rerun (every `docker compose up`) keeps what exists...
    assert "nothing to add" in _run_job(pki)
    assert creds.ca_file.read_bytes() == ca_before
    # ... and a new hypervisor's inventory gets an identity and a NATS user.
    inventories = pki.argv[pki.argv.index("--inventory") + 1]
    (Path(inventories) / "hv9.yaml").write_text("hypervisor: hv9\nnve: nve2\n")
    assert "added hv9" in _run_job(pki)
    assert Credentials.load(creds_dir).hypervisors["hv9"] == ("nve2",)
    assert (creds_dir / "nats-users.conf").read_text().count("nkey:") == 9
    assert creds.ca_file.read_bytes() == ca_before


def test_pki_init_refuses_a_hypervisor_on_an_unknown_nve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventories = ROOT / "deploy" / "inventories"
    assert pki_init(tmp_path / "pki", ["nve1"], [inventories], []) == 2
    assert "hypervisor hv3 uses NVE(s) nve2, which are not given with --nve" in (
        capsys.readouterr().err)
    assert not (tmp_path / "pki").exists()


# ---------------------------------------------------------------------- the cluster, running
@pytest.fixture(scope="module")
def rewriter() -> ComposeRewriter:
    """The cluster's address map: which loopback port each (service, port) got."""
    return ComposeRewriter(list(_compose()["services"]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            rewriter: ComposeRewriter) -> Iterator[tuple[Plan, Supervisor]]:
    work = tmp_path_factory.mktemp("compose")
    plan = compose_plan(COMPOSE, work, rewriter=rewriter)
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


def _connz(rw: ComposeRewriter, server: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{rw.port(server, 8222)}/connz?auth=1&limit=1024"
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
        connections: list[dict[str, Any]] = orjson.loads(r.read())["connections"] or []
    return connections


async def _nats_connect(url: str, **options: Any) -> None:
    nc = await nats.connect(servers=[url], allow_reconnect=False, connect_timeout=2,
                            max_reconnect_attempts=0, **options)
    await nc.close()


@pytest.mark.integration
def test_the_running_cluster_is_secured(cluster: tuple[Plan, Supervisor],
                                        rewriter: ComposeRewriter) -> None:
    """Each process holds its own NKey over TLS; plaintext and identity-less clients are
    refused; etcdctl as the inspector reads the IMA and cannot write it."""
    plan, _ = cluster
    creds = Credentials.load(plan.env["NVO3_CREDS"])
    by_nkey = {i.nkey_public: name for name, i in creds.identities.items() if i.nkey_public}
    seen: dict[str, int] = {}
    for server in _services("nats-server"):
        for conn in _connz(rewriter, server):
            if not conn.get("authorized_user"):
                continue  # a health probe still in its handshake
            assert conn.get("tls_version"), conn
            who = by_nkey[conn["authorized_user"]]
            seen[who] = seen.get(who, 0) + 1
    # Both IMA replicas as `ima`, each NVE and agent as itself (the health checks as op).
    assert seen["ima"] == 2
    assert {name for name in seen if name != "op"} == {
        "ima", nve_identity("nve1"), nve_identity("nve2"),
        *(hv_identity(f"hv{i}") for i in range(1, 5))}
    url = plan.env["NVO3_NATS"].split(",")[0]
    with pytest.raises(Exception, match=r"(?i)tls|ssl|no servers"):
        asyncio.run(_nats_connect(url))
    inspector = creds.identity("inspector")  # a valid certificate, but no NATS user
    with pytest.raises(Exception, match=r"(?i)authorization"):
        asyncio.run(_nats_connect(url, tls=inspector.nats_tls()))
    endpoints = ",".join(f"https://{e}" for e in plan.env["NVO3_ETCD"].split(","))
    etcdctl = [find_binary("etcdctl"), f"--endpoints={endpoints}", *inspector.etcdctl_flags()]
    keys = subprocess.run([*etcdctl, "get", "--prefix", "/nvo3/vn/alias/", "--keys-only"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert keys == ["/nvo3/vn/alias/blue", "/nvo3/vn/alias/red"]
    put = subprocess.run([*etcdctl, "put", "/nvo3/vn/alias/evil", "{}"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert put.returncode != 0
    assert "permission denied" in put.stderr
    plain = subprocess.run([find_binary("etcdctl"), "--endpoints=" + endpoints.replace(
        "https://", "http://"), "--dial-timeout=2s", "--command-timeout=3s", "get", "/nvo3/"],
        capture_output=True, text=True, timeout=30, check=False)
    assert plain.returncode != 0


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
