"""Transport security against real servers: identities, TLS, NATS permissions, etcd RBAC.

One secured stack per module (``LocalServers(secure=SecureSpec(...))``): nats-server with
TLS (client certificates required) and one NKey user per identity with subject
permissions; etcd with client TLS, CN-based users and RBAC. Every refusal below comes
from the servers themselves, not from our code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as Nats

from ima.service import QUEUE_GROUP
from ima.store import EtcdStore, StoreError, StoreUnavailable, TlsConfig
from nvo3.connect import ConnectError, connect_nats, open_store
from nvo3.exit_codes import EXIT_AUTH, EXIT_UNREACHABLE
from nvo3.pki import client_context
from nvo3.security import (
    IMA_QUEUE,
    Credentials,
    SecureSpec,
    hv_identity,
    inbox_prefix,
    secure_stack,
)
from nvo3.servers import LocalServers, find_binary
from schemas.messages import AddressEntry, VnicShutdown, VnRef
from schemas.wire import dumps
from tests.secured import HYPERVISORS, NVES, Violations, settle, start_secured
from tests.secured import quiet as _quiet

pytestmark = pytest.mark.integration

SHORT = 0.5


@pytest.fixture(scope="module")
def creds(secured: LocalServers) -> Credentials:
    assert secured.credentials is not None
    return secured.credentials


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """A second, unrelated stack's credentials: same names, another CA, other NKeys."""
    return secure_stack(tmp_path_factory.mktemp("foreign-pki"), HYPERVISORS, NVES)


class Client:
    """A NATS connection as one identity, recording the server's async errors."""

    def __init__(self, nc: Nats, errors: list[Exception]) -> None:
        self.nc = nc
        self.errors = errors

    def violations(self) -> list[str]:
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]


class Clients:
    def __init__(self, stack: LocalServers) -> None:
        self.stack = stack
        self.open: list[Nats] = []

    async def __call__(self, name: str) -> Client:
        assert self.stack.credentials is not None
        seen = Violations()
        nc = await connect_nats(
            self.stack.nats_urls,
            name,
            persistent=False,
            identity=self.stack.credentials.identity(name),
            error_cb=seen.record,
        )
        self.open.append(nc)
        return Client(nc, seen.errors)


@pytest.fixture
async def connect(secured: LocalServers) -> AsyncIterator[Clients]:
    clients = Clients(secured)
    try:
        yield clients
    finally:
        for nc in clients.open:
            with contextlib.suppress(Exception):
                await nc.close()


# ------------------------------------------------------------------ NATS: request path


async def test_agent_reaches_its_nve_and_gets_the_reply(connect: Clients) -> None:
    nve = await connect("nve:nve1")
    seen: list[str] = []

    async def respond(msg: Any) -> None:
        seen.append(msg.subject)
        await msg.respond(b"ok")

    await nve.nc.subscribe("nvo3.v1.nve.nve1.hv.*.*", cb=respond)
    await settle(nve.nc)
    hv1 = await connect("hv:hv1")
    reply = await hv1.nc.request("nvo3.v1.nve.nve1.hv.hv1.vn_connect", b"{}", timeout=2)
    assert reply.data == b"ok"
    assert reply.subject.startswith(inbox_prefix(hv_identity("hv1")) + ".")
    assert seen == ["nvo3.v1.nve.nve1.hv.hv1.vn_connect"]
    assert hv1.errors == []
    assert nve.errors == []


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("nvo3.v1.nve.nve1.hv.hv2.vn_connect", "as another hypervisor of the same NVE"),
        ("nvo3.v1.nve.nve2.hv.hv1.vn_connect", "to an NVE it is not assigned to"),
        ("nvo3.v1.nve.nve2.hv.hv3.addr_associate", "as a hypervisor of another NVE"),
    ],
)
async def test_agent_cannot_speak_for_others(connect: Clients, subject: str, why: str) -> None:
    nve1, nve2 = await connect("nve:nve1"), await connect("nve:nve2")
    delivered: list[str] = []

    async def record(msg: Any) -> None:
        delivered.append(msg.subject)
        await msg.respond(b"should never be sent")

    for nve, nid in ((nve1, "nve1"), (nve2, "nve2")):
        await nve.nc.subscribe(f"nvo3.v1.nve.{nid}.hv.*.*", cb=record)
        await settle(nve.nc)
    hv1 = await connect("hv:hv1")
    with pytest.raises(nats.errors.TimeoutError):
        await hv1.nc.request(subject, b"{}", timeout=SHORT)
    assert hv1.violations() == [f'nats: permissions violation for publish to "{subject}"'], why
    assert delivered == [], why


async def test_agent_cannot_read_another_agents_replies(connect: Clients) -> None:
    nve = await connect("nve:nve1")

    async def respond(msg: Any) -> None:
        await msg.respond(b"secret")

    await nve.nc.subscribe("nvo3.v1.nve.nve1.hv.*.*", cb=respond)
    await settle(nve.nc)
    hv1 = await connect("hv:hv1")
    snooped: list[bytes] = []

    async def snoop(msg: Any) -> None:
        snooped.append(msg.data)

    for subject in (f"{inbox_prefix(hv_identity('hv2'))}.>", "_INBOX.>", ">",
                    "nvo3.v1.nve.nve1.hv.*.*"):
        await hv1.nc.subscribe(subject, cb=snoop)
    await settle(hv1.nc)
    hv2 = await connect("hv:hv2")
    reply = await hv2.nc.request("nvo3.v1.nve.nve1.hv.hv2.vn_connect", b"{}", timeout=2)
    assert reply.data == b"secret"
    await asyncio.sleep(0.1)
    assert snooped == []
    assert len(hv1.violations()) == 4
    assert all("subscription" in v for v in hv1.violations())


# A matrix of (identity, pub|sub, subject, allowed): every role's allow list and
# what lies just outside it.
MATRIX = [
    ("hv:hv1", "pub", "nvo3.v1.nve.nve1.hv.hv1.addr_associate", True),
    ("hv:hv1", "pub", "nvo3.v1.nve.nve1.hv.hv1.vn_connect.extra", False),
    ("hv:hv1", "pub", "nvo3.v1.nve.nve1.epoch", False),  # a fake epoch would force resyncs
    ("hv:hv1", "pub", "nvo3.v1.nve.nve1.dp.observed", False),  # a fake gleaned address
    ("hv:hv1", "pub", "nvo3.v1.nve.nve1.ctl.tables", False),
    ("hv:hv1", "pub", "nvo3.v1.ima.vn.placement_set", False),  # placing its own VNICs
    ("hv:hv1", "pub", "nvo3.v1.agent.hv2.state", False),
    ("hv:hv1", "pub", "$JS.API.INFO", False),
    ("hv:hv1", "sub", "_INBOX_hv_hv1.>", True),
    ("hv:hv1", "sub", "nvo3.v1.nve.nve1.epoch", True),
    ("hv:hv1", "sub", "nvo3.v1.agent.hv1.state", True),
    ("hv:hv1", "sub", "nvo3.v1.nve.nve2.epoch", False),
    ("hv:hv1", "sub", "nvo3.v1.agent.hv2.state", False),
    ("hv:hv1", "sub", "nvo3.v1.ima.>", False),
    ("hv:hv1", "sub", "$SYS.>", False),
    ("nve:nve1", "sub", "nvo3.v1.nve.nve1.hv.*.*", True),
    ("nve:nve1", "sub", "nvo3.v1.nve.nve1.ctl.tables", True),
    ("nve:nve1", "sub", "nvo3.v1.nve.nve2.hv.*.*", False),
    ("nve:nve1", "sub", "_INBOX_hv_hv1.>", False),
    ("nve:nve1", "pub", "nvo3.v1.nve.nve1.epoch", True),
    ("nve:nve1", "pub", "nvo3.v1.nve.nve2.epoch", False),
    ("nve:nve1", "pub", "nvo3.v1.nve.nve2.hv.hv3.vn_connect", False),
    ("nve:nve1", "pub", "_INBOX_hv_hv1.abc.def", False),  # only replies it was asked for
    ("nve:nve1", "pub", "nvo3.v1.ima.vn.create", False),
    ("ima", "sub", "nvo3.v1.ima.vn.create", True),
    ("ima", "sub", "nvo3.v1.nve.>", False),
    ("ima", "pub", "nvo3.v1.nve.nve1.hv.hv1.vn_connect", False),
    ("ima", "pub", "nvo3.v1.nve.nve1.epoch", False),
    ("op", "pub", "nvo3.v1.ima.vn.create", True),
    ("op", "pub", "nvo3.v1.ima.vn.placement_set", True),
    ("op", "pub", "nvo3.v1.nve.nve1.ctl.tables", True),
    ("op", "pub", "nvo3.v1.agent.hv1.state", True),
    ("op", "pub", "nvo3.v1.nve.nve1.hv.hv1.vn_connect", False),
    ("op", "pub", "nvo3.v1.nve.nve1.dp.observed", False),
    ("op", "pub", "nvo3.v1.nve.nve1.epoch", False),
    ("op", "sub", "_INBOX_op.>", True),
    ("op", "sub", "nvo3.v1.nve.nve1.hv.*.*", False),
    ("op", "sub", "_INBOX_hv_hv1.>", False),
]


@pytest.mark.parametrize(("name", "action", "subject", "allowed"), MATRIX)
async def test_permission_matrix(
    connect: Clients, name: str, action: str, subject: str, allowed: bool
) -> None:
    client = await connect(name)
    if action == "pub":
        await client.nc.publish(subject, b"{}")
    else:
        await client.nc.subscribe(subject)
    await settle(client.nc)
    assert (client.violations() == []) is allowed, client.violations()


async def test_ima_queue_group_is_allowed(connect: Clients) -> None:
    assert QUEUE_GROUP == IMA_QUEUE
    ima = await connect("ima")
    await ima.nc.subscribe("nvo3.v1.ima.vn.get", queue=QUEUE_GROUP)
    await settle(ima.nc)
    assert ima.errors == []


# ------------------------------------------------------------------ NATS: who may connect


async def _connect_raw(urls: list[str], **options: Any) -> None:
    nc = Nats()
    try:
        await nc.connect(
            servers=urls,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
            error_cb=_quiet,
            **options,
        )
    except BaseException:
        # nats-py leaves the socket open when it gives up, and its close() can hang on
        # a failed TLS upgrade; close the transport itself (else: ResourceWarning).
        transport = nc._transport
        if transport is not None:
            transport.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.1):
                    await transport.wait_closed()
        raise
    await nc.close()


async def _refused(urls: list[str], **options: Any) -> BaseException:
    """The error of a connection attempt the server refuses.

    After an ``-ERR 'Authorization Violation'`` the server closes the socket; nats-py
    then surfaces either that error or the broken pipe of its next write, whichever
    it meets first.
    """
    with pytest.raises((OSError, nats.errors.Error)) as refused:
        await _connect_raw(urls, **options)
    exc = refused.value
    assert "Authorization Violation" in str(exc) or isinstance(exc, OSError), exc
    return exc


def _bad_clients(creds: Credentials, foreign: Credentials) -> dict[str, dict[str, Any]]:
    hv1, other = creds.agent("hv1"), foreign.agent("hv1")
    return {
        # nats-py falls back to the system trust store, which does not know our CA.
        "no TLS settings": {"nkeys_seed_str": hv1.nkey_seed},
        "trusts another CA": {"tls": other.nats_tls(), "nkeys_seed_str": hv1.nkey_seed},
        "cert from another CA": {
            "tls": client_context(creds.ca_file, other.cert_file, other.key_file),
            "nkeys_seed_str": hv1.nkey_seed,
        },
        "no client cert": {"tls": client_context(creds.ca_file), "nkeys_seed_str": hv1.nkey_seed},
        "no NKey": {"tls": hv1.nats_tls()},
        "another stack's NKey": {"tls": hv1.nats_tls(), "nkeys_seed_str": other.nkey_seed},
        "certificate without a NATS user": {"tls": creds.identity("inspector").nats_tls()},
    }


@pytest.mark.parametrize(
    "case",
    [
        "no TLS settings",
        "trusts another CA",
        "cert from another CA",
        "no client cert",
        "no NKey",
        "another stack's NKey",
        "certificate without a NATS user",
    ],
)
async def test_nats_refuses_unauthenticated_clients(
    secured: LocalServers, creds: Credentials, foreign: Credentials, case: str
) -> None:
    options = _bad_clients(creds, foreign)[case]
    await _refused(secured.nats_urls, **options)


async def test_nats_refuses_plaintext(secured: LocalServers) -> None:
    host, port = secured.nats_urls[0].removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = await reader.readline()
        assert b'"tls_required":true' in info
        assert b'"tls_verify":true' in info
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert b"PONG" not in answer  # the server hangs up instead of talking in clear
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# ------------------------------------------------------------------ one-shot clients fail fast

FAST = 10.0  # a refused or unreachable one-shot client must give up well within this


@pytest.mark.parametrize(
    "case",
    ["no TLS settings", "trusts another CA", "cert from another CA", "no client cert",
     "no NKey", "another stack's NKey", "certificate without a NATS user"],
)
async def test_one_shot_nats_client_fails_fast_on_a_refusal(
    secured: LocalServers, creds: Credentials, foreign: Credentials, case: str
) -> None:
    """nats-py's own retry loop hangs after a failed TLS upgrade; the CLI's does not."""
    options = _bad_clients(creds, foreign)[case]
    async with asyncio.timeout(FAST):
        with pytest.raises(ConnectError) as info:
            await connect_nats(["nats://127.0.0.1:1", *secured.nats_urls], "t", persistent=False,
                               tls=options.get("tls"), nkey_seed=options.get("nkeys_seed_str"))
    assert info.value.refused, info.value
    assert [url for url, _ in info.value.failures] == ["nats://127.0.0.1:1", *secured.nats_urls]


async def test_one_shot_clients_fail_fast_when_nothing_answers_or_etcd_refuses(
    secured: LocalServers, creds: Credentials, foreign: Credentials
) -> None:
    async with asyncio.timeout(FAST):
        with pytest.raises(ConnectError) as info:
            await connect_nats(["nats://127.0.0.1:1"], "t", persistent=False)
    assert not info.value.refused
    for name, ident in [("foreign CA", foreign.identity("op")),
                        ("no etcd user", creds.agent("hv1"))]:
        async with asyncio.timeout(FAST):
            with pytest.raises(ConnectError) as info:
                await open_store(secured.etcd_endpoints, identity=ident, persistent=False)
        assert info.value.refused, (name, info.value)
        assert info.value.service == "etcd"


async def _cli(secured: LocalServers, creds_dir: Path | None, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVO3_")}
    env |= {"NVO3_NATS": ",".join(secured.nats_urls), "NVO3_ETCD": ",".join(secured.etcd_endpoints)}
    if creds_dir is not None:
        env["NVO3_CREDS"] = str(creds_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nvo3.cli", *args, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(FAST):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    ("case", "command", "code", "says"),
    [
        ("another stack's credentials", "vn list", EXIT_AUTH, "CERTIFICATE_VERIFY_FAILED"),
        ("no credentials", "vn list", EXIT_AUTH, "CERTIFICATE_VERIFY_FAILED"),
        ("an NKey the server does not know", "nve tables nve1", EXIT_AUTH,
         "Authorization Violation"),
        ("a certificate whose CN has no etcd user", "check", EXIT_AUTH, "permission denied"),
        ("nothing listens", "vn list", EXIT_UNREACHABLE, "did not answer"),
        # Services too: a daemon must not retry forever with credentials that are refused.
        ("another stack's credentials", "ima run", EXIT_AUTH, "CERTIFICATE_VERIFY_FAILED"),
        ("an NKey the server does not know", "nve run --id nve1 --underlay 192.0.2.1",
         EXIT_AUTH, "Authorization Violation"),
    ],
)
async def test_cli_fails_fast_with_its_own_exit_code(
    secured: LocalServers, creds: Credentials, foreign: Credentials, tmp_path: Path,
    case: str, command: str, code: int, says: str,
) -> None:
    """Once the command waited for its 60 s bound (TLS) or said NoServersError (NKey)."""
    copy = tmp_path / "creds"
    shutil.copytree(creds.workdir, copy)
    creds_dir: Path | None = copy
    op = creds.identity("op")
    if case == "another stack's credentials":
        creds_dir = foreign.workdir
    elif case == "no credentials":
        creds_dir = None
    elif case == "an NKey the server does not know":
        who = "nve:nve1" if command.startswith("nve run") else "op"
        seed = foreign.identity(who).nkey_seed
        seed_file = creds.identity(who).nkey_seed_file
        assert seed_file is not None
        assert seed is not None
        (copy / seed_file.name).write_text(seed)
    elif case == "a certificate whose CN has no etcd user":  # NATS accepts it, etcd not
        hv1 = creds.agent("hv1")
        shutil.copy(hv1.cert_file, copy / op.cert_file.name)
        shutil.copy(hv1.key_file, copy / op.key_file.name)
    args = command.split()
    if case == "nothing listens":
        args += ["--nats", "nats://127.0.0.1:1"]
    rc, err = await _cli(secured, creds_dir, *args)
    assert rc == code, err
    assert says in err, err
    assert ("cannot authenticate" in err) is (code == EXIT_AUTH), err


async def test_rotation_and_removal_take_effect_at_reload(
    secured: LocalServers, creds: Credentials
) -> None:
    name = hv_identity("hvr")
    old_seed = creds.identity(name).nkey_seed
    assert old_seed is not None
    dropped = asyncio.Event()

    async def on_disconnect() -> None:
        dropped.set()

    live = await nats.connect(
        servers=secured.nats_urls, tls=creds.identity(name).nats_tls(),
        nkeys_seed_str=old_seed, allow_reconnect=False, error_cb=_quiet,
        disconnected_cb=on_disconnect,
    )
    try:
        new = creds.rotate(name)
        assert new.nkey_seed != old_seed
        secured.reload_nats()
        async with asyncio.timeout(5):
            await dropped.wait()  # the server drops sessions of a replaced key at once
        await _refused(secured.nats_urls, tls=new.nats_tls(), nkeys_seed_str=old_seed)
        await _connect_raw(secured.nats_urls, tls=new.nats_tls(), nkeys_seed_str=new.nkey_seed)

        tls, new_seed = new.nats_tls(), new.nkey_seed
        creds.remove(name)
        secured.reload_nats()
        async with asyncio.timeout(5):
            while True:  # the reload is asynchronous: poll until the key is gone
                try:
                    await _connect_raw(secured.nats_urls, tls=tls, nkeys_seed_str=new_seed)
                except (OSError, nats.errors.Error):
                    break
                await asyncio.sleep(0.05)
        await _refused(secured.nats_urls, tls=tls, nkeys_seed_str=new_seed)
    finally:
        await live.close()


# ------------------------------------------------------------------ etcd: RBAC


def _key(area: str) -> str:
    return f"/nvo3/{area}/t-{secrets.token_hex(4)}"


ETCD_MATRIX = [
    ("ima", "write", "vn/name", True),
    ("ima", "write", "placement", True),
    ("ima", "write", "map/x/mac", False),  # bindings are written by NVEs only
    ("ima", "write", "nve/nve1", False),
    ("ima", "read", "map", True),
    ("nve:nve1", "write", "map/x/mac", True),
    ("nve:nve1", "write", "nve/nve1", True),
    ("nve:nve1", "read", "vn/name", True),
    ("nve:nve1", "read", "placement", True),
    ("nve:nve1", "write", "vn/name", False),
    ("nve:nve1", "write", "vn/profile", False),
    ("nve:nve1", "write", "placement", False),
    ("nve:nve1", "write", "nve/nve2", False),  # another NVE's liveness key
    ("nve:nve1", "read", "other", False),
    ("inspector", "read", "vn/name", True),
    ("inspector", "read", "map/x/mac", True),
    ("inspector", "write", "map/x/mac", False),
    ("inspector", "write", "vn/name", False),
    ("op", "read", "nve", True),
    ("op", "write", "vn/name", False),
    ("hv:hv1", "read", "vn/name", False),  # hypervisors never talk to etcd
]


@pytest.mark.parametrize(("name", "action", "area", "allowed"), ETCD_MATRIX)
async def test_etcd_rbac_matrix(
    secured: LocalServers, creds: Credentials, name: str, action: str, area: str, allowed: bool
) -> None:
    # nve/nve1 and nve/nve2 are exact keys in the per-NVE roles; others get a suffix.
    key = f"/nvo3/{area}" if area.startswith("nve/") else _key(area)
    store = EtcdStore(secured.etcd_endpoints, tls=creds.identity(name).etcd_tls(), timeout=2)
    try:
        if name.startswith("hv:"):
            with pytest.raises(StoreError, match="permission denied"):
                await store.connect()
            return
        await store.connect()

        async def attempt() -> None:
            if action == "write":
                await store.put(key, b"x")
                await store.delete(key)
            else:
                await store.get_prefix(key)

        if allowed:
            await attempt()
        else:
            with pytest.raises(StoreError, match="permission denied"):
                await attempt()
    finally:
        await store.close()


@pytest.mark.parametrize("case", ["plaintext", "no client cert", "cert from another CA"])
async def test_etcd_refuses_clients_without_our_client_cert(
    secured: LocalServers, creds: Credentials, foreign: Credentials, case: str
) -> None:
    ours = creds.ca_file.read_bytes()
    other = foreign.identity("ima")
    tls: TlsConfig | None = {
        "plaintext": None,
        "no client cert": TlsConfig(ca_cert=ours, server_name="localhost"),
        "cert from another CA": TlsConfig(
            ca_cert=ours,
            cert_chain=other.cert_file.read_bytes(),
            key=other.key_file.read_bytes(),
            server_name="localhost",
        ),
    }[case]
    store = EtcdStore(secured.etcd_endpoints, tls=tls, timeout=SHORT)
    with pytest.raises(StoreUnavailable):
        await store.connect()


def test_inspector_etcdctl_reads_but_cannot_write(
    secured: LocalServers, creds: Credentials
) -> None:
    """The command line docs/security.md shows."""
    base = [find_binary("etcdctl"), f"--endpoints={','.join(secured.etcd_urls)}",
            *creds.etcdctl_flags("inspector")]
    read = subprocess.run([*base, "get", "--prefix", "/nvo3/", "--keys-only"],
                          capture_output=True, text=True, timeout=30)
    assert read.returncode == 0, read.stderr
    write = subprocess.run([*base, "put", "/nvo3/vn/name/evil", "x"],
                           capture_output=True, text=True, timeout=30)
    assert write.returncode != 0
    assert "permission denied" in write.stderr
    plain = subprocess.run(
        [find_binary("etcdctl"), f"--endpoints={','.join(secured.etcd_urls)}",
         "--dial-timeout=300ms", "--command-timeout=1s", "get", "--prefix", "/nvo3/"],
        capture_output=True, text=True, timeout=30,
    )
    assert plain.returncode != 0


def test_keys_are_private_and_outside_the_repository(creds: Credentials) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert repo not in creds.workdir.resolve().parents
    for ident in creds.identities.values():
        for secret in (ident.key_file, ident.nkey_seed_file):
            if secret is not None:
                assert secret.stat().st_mode & 0o077 == 0, secret
    assert creds.ca_key_file.stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------ the real services


async def test_real_services_work_with_least_privilege(secured: LocalServers) -> None:
    """IMA, an NVE, an agent and the operator, each as itself: a VN is created, a VNIC
    connects, its address is registered in etcd, and the operator reads the tables."""
    cp = await start_secured(secured, ("nve1",))
    try:
        assert cp.client is not None
        op, ep = cp.client, cp.ep
        alias = f"sec{secrets.token_hex(3)}"
        vn = (await op.create(alias, service="l2")).vn
        agent = await cp.agent("hv1", "nve1")
        vnic = str(uuid.uuid4())
        await agent.connect(vnic, "eth0", VnRef(alias=alias))
        reply = await agent.associate(vnic, VnRef(alias=alias),
                                      (AddressEntry(mac="02:00:00:5e:c0:01"),))
        assert reply.ima_ops == 1
        inspector = await cp.new_store("inspector")
        binding = await inspector.get(ep.layout.mac(vn.name, "02:00:00:5e:c0:01"))
        assert binding is not None
        assert b"nve1" in binding.value
        tables = await op.nc.request(ep.subjects.nve_tables("nve1"), b"{}", timeout=5)
        assert vnic.encode() in tables.data

        # allow_responses lets the NVE publish to whatever reply subject a request names;
        # with reply_prefix it only answers into the sender's own inbox.
        hv2 = await cp.nats("hv2", _quiet, identity=hv_identity("hv2"))
        stolen = await hv2.subscribe(f"{inbox_prefix(hv_identity('hv2'))}.>")
        await settle(hv2)
        request = dumps(VnicShutdown(sender="hv1", seq=1, vnic=vnic))
        await agent.nc.publish(ep.subjects.hv_request("nve1", "hv1", "vnic_shutdown"), request,
                               reply=f"{inbox_prefix(hv_identity('hv2'))}.forged")
        await settle(agent.nc)
        with pytest.raises(nats.errors.TimeoutError):
            await stolen.next_msg(timeout=0.3)
    finally:
        await cp.stop()


def test_tls_context_trusts_only_our_ca(creds: Credentials) -> None:
    ctx = creds.agent("hv1").nats_tls()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1


def test_secured_clusters_route_and_replicate() -> None:
    """Three nats-servers (TLS + authenticated routes) and three etcd members (peer TLS,
    peers limited to the server certificate's CN): requests cross routes, writes
    replicate, and RBAC holds on every member."""
    spec = SecureSpec({"hv1": ["nve1"]}, ["nve1"])

    async def scenario(stack: LocalServers) -> None:
        creds = stack.credentials
        assert creds is not None
        nve = await connect_nats(stack.nats_urls[2:], "nve1", identity=creds.nve("nve1"))
        hv1 = await connect_nats(stack.nats_urls[:1], "hv1", identity=creds.agent("hv1"))
        ima = await open_store(stack.etcd_endpoints[:1], identity=creds.identity("ima"))
        nve_store = await open_store(stack.etcd_endpoints[1:2], identity=creds.nve("nve1"))
        try:

            async def respond(msg: Any) -> None:
                await msg.respond(b"across the route")

            await nve.subscribe("nvo3.v1.nve.nve1.hv.*.*", cb=respond)
            await settle(nve)
            async with asyncio.timeout(5):
                while True:  # the subscription reaches the other servers a moment later
                    try:
                        reply = await hv1.request("nvo3.v1.nve.nve1.hv.hv1.vn_connect", b"{}",
                                                  timeout=0.5)
                        break
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        await asyncio.sleep(0.05)
            assert reply.data == b"across the route"
            key = _key("vn/name")
            await ima.put(key, b"replicated")
            found = await nve_store.get(key)
            assert found is not None
            assert found.value == b"replicated"
            with pytest.raises(StoreError, match="permission denied"):
                await nve_store.put(key, b"forged")
        finally:
            for store in (ima, nve_store):
                await store.close()
            for nc in (nve, hv1):
                await nc.close()

    with LocalServers(3, 3, secure=spec) as stack:
        asyncio.run(scenario(stack))
        assert stack.etcd is not None
        # A member restarted after `auth enable` must pass the launcher's probes again.
        stack.etcd.members[0].restart()
