"""The ``nvo3`` console script against a running slice: exit codes and --json."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import orjson
import pytest

from schemas.messages import AddressEntry, VnRef
from tests.slice import Slice, running_slice

pytestmark = pytest.mark.integration


@pytest.fixture
async def cp(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> AsyncIterator[Slice]:
    async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root, ("nve1",),
                             vns=()) as s:
        yield s


async def nvo3(cp: Slice, *args: str) -> tuple[int, bytes, bytes]:
    env = {**os.environ, "NVO3_NATS": ",".join(cp.ep.nats), "NVO3_ETCD": ",".join(cp.ep.etcd),
           "NVO3_KEY_ROOT": cp.ep.key_root, "NVO3_SUBJECT_ROOT": cp.ep.subject_root}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nvo3.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_vn_create_list_show(cp: Slice) -> None:
    rc, out, err = await nvo3(cp, "vn", "create", "blue", "--service", "l3", "--json")
    assert rc == 0, err
    created = orjson.loads(out)[0]
    assert created["alias"] == "blue"
    assert created["service"] == "l3"
    rc, out, _ = await nvo3(cp, "vn", "list", "--json")
    assert rc == 0
    assert [v["name"] for v in orjson.loads(out)] == [created["name"]]
    for ref in ("blue", created["name"], str(created["vn_id"])):
        rc, out, _ = await nvo3(cp, "vn", "show", ref)
        assert rc == 0
        assert str(created["vni"]).encode() in out
    rc, _, err = await nvo3(cp, "vn", "create", "blue", "--service", "l2")
    assert rc == 1
    assert b"vn_exists" in err
    rc, _, err = await nvo3(cp, "vn", "show", "nope")
    assert rc == 1
    assert b"unknown_vn" in err


async def test_nve_tables(cp: Slice) -> None:
    rc, out, err = await nvo3(cp, "nve", "tables", "nve1", "--json")
    assert rc == 0, err
    assert orjson.loads(out)["nve"] == "nve1"
    rc, out, _ = await nvo3(cp, "nve", "tables", "nve1")
    assert rc == 0
    assert b"802.1Q tags per port" in out
    rc, _, err = await nvo3(cp, "nve", "tables", "no-such-nve")
    assert rc == 3, err


async def test_agent_run_once_applies_an_inventory(cp: Slice, tmp_path: object) -> None:
    import pathlib

    assert cp.client is not None
    await cp.client.create("blue")
    path = pathlib.Path(str(tmp_path)) / "inv.yaml"
    path.write_text(
        "hypervisor: hv1\nnve: nve1\nvnics:\n"
        "  - name: 6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e5f\n    port: eth0\n    vns:\n"
        "      - vn: {alias: blue}\n        addresses:\n"
        "          - {mac: '02:00:00:00:00:01', ips: [10.0.0.1]}\n")
    rc, out, err = await nvo3(cp, "agent", "run", "--inventory", str(path), "--once")
    assert rc == 0, err
    assert b"inventory applied" in out
    assert len([k for k in await cp.keys() if "/map/" in k]) == 2


async def test_placement_and_membership_from_the_cli(cp: Slice) -> None:
    rc, out, err = await nvo3(cp, "vn", "create", "gold", "--member-hv", "hv1", "--json")
    assert rc == 0, err
    assert orjson.loads(out)[0]["members"]["hypervisors"] == ["hv1"]
    vnic = "6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e5f"
    rc, out, err = await nvo3(cp, "placement", "set", vnic, "hv1")
    assert rc == 0, err
    assert b"placed on hv1" in out
    rc, out, err = await nvo3(cp, "placement", "set", vnic, "hv2", "--json")
    assert rc == 0, err
    assert orjson.loads(out)["placement"] == {"v": 1, "vnic": vnic, "hypervisor": "hv2"}
    rc, _, err = await nvo3(cp, "placement", "set", "not-a-uuid", "hv1")
    assert rc == 2
    assert b"invalid input" in err
    assert b"not a UUID" in err


async def test_vn_profile_set_and_show(cp: Slice, tmp_path: object) -> None:
    import pathlib

    rc, _, err = await nvo3(cp, "vn", "create", "blue")
    assert rc == 0, err
    path = pathlib.Path(str(tmp_path)) / "profile.yaml"
    path.write_text("acl:\n  - {action: deny, protocol: tcp, dst_port: 23}\n"
                    "qos: {rate_mbps: 100, dscp: 10}\n")
    rc, out, err = await nvo3(cp, "vn", "profile", "set", "blue", "--file", str(path), "--json")
    assert rc == 0, err
    assert orjson.loads(out)["profile"]["qos"]["rate_mbps"] == 100
    rc, out, _ = await nvo3(cp, "vn", "profile", "show", "blue")
    assert rc == 0
    assert b"dst_port=23" in out
    path.write_text("qos: {rate_mbps: 0}\n")
    rc, _, err = await nvo3(cp, "vn", "profile", "set", "blue", "--file", str(path))
    assert rc == 2
    assert b"invalid input" in err


async def test_agent_ctl_runs_vnic_operations_through_the_agent(cp: Slice) -> None:
    from agents.service import AgentService

    assert cp.client is not None
    await cp.client.create("blue")
    agent = await cp.agent("hv1", "nve1")
    service = AgentService(agent)
    cp._tasks.append(asyncio.create_task(service.run()))
    await service.ready.wait()
    vnic = "6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e5f"
    rc, out, err = await nvo3(cp, "agent", "ctl", "hv1", "connect", vnic, "--port", "eth0",
                              "--vn", "blue")
    assert rc == 0, err
    assert b"tag=1" in out
    rc, out, err = await nvo3(cp, "agent", "ctl", "hv1", "associate", vnic, "--vn", "blue",
                              "--addr", "02:00:00:00:00:01=10.0.0.1")
    assert rc == 0, err
    assert b"ima_ops=2" in out
    rc, out, err = await nvo3(cp, "agent", "ctl", "hv1", "shutdown", vnic, "--json")
    assert rc == 0, err
    assert orjson.loads(out)["ima_ops"] == 2
    assert service.agent.desired.vnics[vnic].state == "down"
    rc, _, err = await nvo3(cp, "agent", "ctl", "hv1", "associate", vnic)
    assert rc == 1
    assert b"needs a VN" in err


async def test_vn_delete_refused_while_in_use(cp: Slice) -> None:
    assert cp.client is not None
    await cp.client.create("blue")
    await cp.client.create("spare")
    hv1 = await cp.agent("hv1", "nve1")
    vnic = "6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e5f"
    blue = VnRef(alias="blue")
    await hv1.connect(vnic, "eth0", blue)
    await hv1.associate(vnic, blue, (AddressEntry(mac="02:00:00:00:00:01"),))
    rc, _, err = await nvo3(cp, "vn", "delete", "blue")
    assert rc == 1
    assert b"vn_in_use" in err
    rc, _, err = await nvo3(cp, "vn", "delete", "spare")
    assert rc == 0, err
    rc, out, _ = await nvo3(cp, "vn", "list", "--json")
    assert [v["alias"] for v in orjson.loads(out)] == ["blue"]
    assert not any("/vn/alias/spare" in k for k in await cp.keys())


async def test_nve_run_flags_limit_a_flooding_hypervisor(cp: Slice) -> None:
    """`nvo3 nve run --rate-per-s/--burst` (issue 5: a flood cannot starve the others)."""
    from agents.agent import AgentError, HypervisorAgent
    from schemas.errors import ErrorCode

    env = {**os.environ, "NVO3_NATS": ",".join(cp.ep.nats), "NVO3_ETCD": ",".join(cp.ep.etcd),
           "NVO3_KEY_ROOT": cp.ep.key_root, "NVO3_SUBJECT_ROOT": cp.ep.subject_root}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nvo3.cli", "nve", "run", "--id", "nve9", "--underlay",
        "192.0.2.9", "--rate-per-s", "2", "--burst", "5", "--enforce-placement", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        flood = HypervisorAgent("hv1", "nve9", await cp.nats("hv1"), subjects=cp.ep.subjects,
                                timeout=1.0, attempts=20)
        calm = HypervisorAgent("hv2", "nve9", await cp.nats("hv2"), subjects=cp.ep.subjects,
                               timeout=1.0, attempts=20)
        codes: list[str] = []
        for i in range(12):
            try:
                await flood.shutdown(f"6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4e{i:02x}")
            except AgentError as exc:
                codes.append(exc.code)
        assert ErrorCode.RATE_LIMITED in codes  # beyond the burst of 5
        with pytest.raises(AgentError) as other:  # hv2 still gets a real answer
            await calm.shutdown("6f1c2c4e-2a3b-4c5d-8e9f-0a1b2c3d4eff")
        assert other.value.code == ErrorCode.UNKNOWN_VNIC
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
