"""Transport security for a secured nvo3 stack: identities, NATS permissions, etcd RBAC.

One identity per process (documented in docs/security.md):

================  =======================================================================
identity          what it is
================  =======================================================================
``hv:<hv>``       a hypervisor agent; NATS only
``nve:<id>``      an NVE; NATS and etcd
``ima``           the IMA service (VN registry); NATS and etcd
``op``            the operator CLI and the checker; NATS and read-only etcd
``inspector``     ``etcdctl`` for humans; read-only etcd, no NATS user
``root``          etcd bootstrap only (users, roles, ``auth enable``)
================  =======================================================================

Every identity has a client certificate (CN = the identity name) from the stack's own
CA (:mod:`nvo3.pki`). NATS users are NKeys with per-identity subject permissions; the
client certificate is required too (``verify: true``) but only proves "one of ours".
etcd maps the certificate's CN to an RBAC user (``--client-cert-auth``).

:func:`secure_stack` generates everything into a directory and returns
:class:`Credentials`; ``LocalServers(secure=...)`` starts servers that enforce it, and
``Credentials.identity(name)`` is what ``connect_nats`` / ``open_store`` take.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import nkeys  # type: ignore[import-untyped]
from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.auth import PermissionType

from ima.keys import DEFAULT_ROOT
from ima.store import TlsConfig
from nvo3.pki import CertificateAuthority, client_context, write_public, write_secret
from schemas.subjects import DEFAULT_SUBJECT_ROOT, Subjects

__all__ = [
    "AGENT_REPLY_PREFIX",
    "IMA_QUEUE",
    "ROLE_HV",
    "ROLE_IMA",
    "ROLE_INSPECTOR",
    "ROLE_NVE",
    "ROLE_OP",
    "ROLE_ROOT",
    "SERVER_CN",
    "Credentials",
    "EtcdGrant",
    "Identity",
    "NatsPermissions",
    "SecureSpec",
    "bootstrap_etcd_rbac",
    "etcd_roles",
    "hv_identity",
    "inbox_prefix",
    "nats_permissions",
    "nve_identity",
    "render_nats_config",
    "secure_stack",
]

ROLE_HV = "hv"
ROLE_NVE = "nve"
ROLE_IMA = "ima"
ROLE_OP = "op"
ROLE_INSPECTOR = "inspector"
ROLE_ROOT = "root"
#: ``ima/service.py:QUEUE_GROUP``; the permission below allows any queue on the subject.
IMA_QUEUE = "nvo3-ima"
#: The server certificate's CN. It must never be an etcd user: etcd's HTTP gateway and
#: its peers present this certificate.
SERVER_CN = "nvo3-server"
#: etcd's TLS name in the server certificate; etcd3aio dials IP literals, so it is set.
TLS_SERVER_NAME = "localhost"
MANIFEST = "credentials.json"
#: ``ima/store.py:EtcdStore.current_revision`` reads this single key to learn the
#: revision, so every etcd role may read it (it never exists).
REVISION_PROBE_KEY = "\0"

_T = TypeVar("_T")
#: Same rule as ``schemas/types.py`` tokens: ids become subject tokens and key parts.
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def hv_identity(hv: str) -> str:
    return f"{ROLE_HV}:{hv}"


def nve_identity(nve: str) -> str:
    return f"{ROLE_NVE}:{nve}"


#: For ``NveConfig.reply_prefix``: an NVE answers only into the sender's own inbox, so
#: a hypervisor cannot aim the NVE's reply (which nats-server lets through by
#: ``allow_responses``) at another client's inbox or at any other subject.
AGENT_REPLY_PREFIX = "_INBOX_hv_{hv}."


def inbox_prefix(name: str) -> str:
    """The identity's private reply inbox (``_INBOX_hv_hv1``); nobody else may subscribe.

    ``:`` becomes ``_``; hypervisor and NVE ids are tokens, so the mapping is one-to-one
    (``_INBOX_hv_...`` and ``_INBOX_nve_...`` cannot collide with ``_INBOX_op``).
    """
    return "_INBOX_" + name.replace(":", "_")


def _file_stem(name: str) -> str:
    return name.replace(":", "-")


# --------------------------------------------------------------------------- NATS


@dataclass(frozen=True)
class NatsPermissions:
    """One nats-server user's ``permissions`` block (allow lists; everything else denied)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    #: Lets the user publish one reply to the reply subject of a message it received.
    allow_responses: bool = False

    def render(self) -> str:
        parts = []
        # An empty allow list would mean "no publish restriction" to nats-server, so a
        # user without explicit publish rights gets deny ">" (replies still pass).
        publish = (
            f"allow: {_list(self.publish)}" if self.publish else f"deny: {_list(['>'])}"
        )
        parts.append(f"publish: {{{publish}}}")
        subscribe = (
            f"allow: {_list(self.subscribe)}" if self.subscribe else f"deny: {_list(['>'])}"
        )
        parts.append(f"subscribe: {{{subscribe}}}")
        if self.allow_responses:
            parts.append("allow_responses: true")
        return "{" + ", ".join(parts) + "}"


def _q(value: str) -> str:
    return json.dumps(value)


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def nats_permissions(
    name: str, role: str, subjects: Subjects, nves: Sequence[str] = ()
) -> NatsPermissions | None:
    """The subjects one identity may use; ``nves`` are a hypervisor's assigned NVEs."""
    base = subjects.base
    inbox = f"{inbox_prefix(name)}.>"
    if role == ROLE_HV:
        hv = name.split(":", 1)[1]
        return NatsPermissions(
            # Exactly one kind token after the hypervisor: nothing else reaches the NVE.
            publish=tuple(subjects.hv_request(nve, hv, "*") for nve in nves),
            subscribe=(
                inbox,
                *(subjects.nve_epoch(nve) for nve in nves),
                f"{base}.agent.{hv}.>",
            ),
            # Replies to `agent.<hv>.state` requests from the operator / checker.
            allow_responses=True,
        )
    if role == ROLE_NVE:
        nve = name.split(":", 1)[1]
        return NatsPermissions(
            publish=(subjects.nve_epoch(nve), subjects.nve_observed(nve)),
            subscribe=(inbox, f"{base}.nve.{nve}.>"),
            allow_responses=True,
        )
    if role == ROLE_IMA:
        return NatsPermissions(subscribe=(inbox, f"{base}.ima.>"), allow_responses=True)
    if role == ROLE_OP:
        return NatsPermissions(
            publish=(
                f"{base}.ima.>",
                f"{base}.nve.*.ctl.>",
                subjects.agent_state("*"),
                subjects.agent_ctl("*"),
            ),
            subscribe=(inbox,),
        )
    return None  # inspector, root: no NATS user


@dataclass(frozen=True)
class RouteAuth:
    """Credentials the cluster's routes present to each other (only servers know them)."""

    user: str
    password: str


def render_nats_config(
    creds: Credentials,
    *,
    server_name: str,
    port: int,
    monitor_port: int,
    store_dir: str | Path,
    cluster_name: str | None = None,
    cluster_port: int = 0,
    routes: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> str:
    """The whole ``-c`` file of one nats-server: listeners, JetStream, client TLS, users
    with permissions, and the cluster with route TLS and route auth.

    Everything is in the file, nothing in flags: a reload (SIGHUP) re-reads only the
    file, and refuses to run if e.g. the server name it finds differs from the running
    one. ``routes`` are ``nats://host:port`` cluster URLs.
    """
    tls = (
        "{\n"
        f"    cert_file: {_q(str(creds.server_cert_file))}\n"
        f"    key_file: {_q(str(creds.server_key_file))}\n"
        f"    ca_file: {_q(str(creds.ca_file))}\n"
        "    verify: true\n"
        "    timeout: 2\n"
        "  }"
    )
    users = []
    for ident in creds.identities.values():
        if ident.nats is None or ident.nkey_public is None:
            continue
        users.append(
            f"    # {ident.name}\n"
            f"    {{nkey: {_q(ident.nkey_public)}, permissions: {ident.nats.render()}}}"
        )
    lines = [
        "# Generated by nvo3.security (secure_stack); do not edit, regenerate.",
        f"server_name: {_q(server_name)}",
        f"listen: {_q(f'{host}:{port}')}",
        f"http: {_q(f'{host}:{monitor_port}')}",
        f"jetstream {{ store_dir: {_q(str(store_dir))} }}",
        f"tls {tls}",
        "authorization {",
        "  users = [",
        ",\n".join(users),
        "  ]",
        "}",
    ]
    if cluster_name:
        route = creds.route_auth()
        urls = [
            u.replace("nats://", f"nats-route://{route.user}:{route.password}@", 1)
            for u in routes
        ]
        lines += [
            "cluster {",
            f"  name: {_q(cluster_name)}",
            f"  listen: {_q(f'{host}:{cluster_port}')}",
            f"  routes: {_list(urls)}",
            f"  authorization {{ user: {_q(route.user)}, password: {_q(route.password)},"
            " timeout: 2 }",
            f"  tls {tls}",
            "}",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- etcd


@dataclass(frozen=True)
class EtcdGrant:
    perm: Literal["read", "readwrite"]
    key: str
    #: True: every key under ``key``; False: exactly ``key``.
    prefix: bool = True


def etcd_roles(key_root: str, nves: Sequence[str]) -> dict[str, tuple[EtcdGrant, ...]]:
    """Role → grants. ``nve`` is shared by all NVEs; ``nve:<id>`` adds its own liveness key."""
    probe = EtcdGrant("read", REVISION_PROBE_KEY, prefix=False)
    roles: dict[str, tuple[EtcdGrant, ...]] = {
        # The registry (VN records, pointers, profiles) and placements; bindings are the
        # NVEs' business, so a compromised IMA cannot forge one.
        ROLE_IMA: (
            EtcdGrant("readwrite", f"{key_root}vn/"),
            EtcdGrant("readwrite", f"{key_root}placement/"),
            EtcdGrant("read", key_root),
            probe,
        ),
        ROLE_NVE: (
            EtcdGrant("readwrite", f"{key_root}map/"),
            # Which NVEs serve a VN (keeps `vn delete` from removing a VN in use).
            EtcdGrant("readwrite", f"{key_root}vn/attached/"),
            EtcdGrant("read", f"{key_root}vn/"),
            EtcdGrant("read", f"{key_root}placement/"),
            EtcdGrant("read", f"{key_root}nve/"),
            probe,
        ),
        ROLE_INSPECTOR: (EtcdGrant("read", key_root), probe),
    }
    for nve in nves:
        roles[nve_identity(nve)] = (EtcdGrant("readwrite", f"{key_root}nve/{nve}", prefix=False),)
    return roles


def _etcd_user_roles(role: str, name: str) -> tuple[str, ...]:
    if role == ROLE_NVE:
        return (ROLE_NVE, name)
    if role in (ROLE_IMA, ROLE_INSPECTOR, ROLE_ROOT):
        return (role,)
    if role == ROLE_OP:
        return (ROLE_INSPECTOR,)  # `nvo3 check` reads; operators write through the IMA
    return ()  # hypervisors never talk to etcd


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Identity:
    """What one process presents: a client certificate, and for NATS users an NKey."""

    name: str
    role: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    nkey_seed_file: Path | None = None
    nkey_public: str | None = None
    inbox_prefix: str | None = None
    nats: NatsPermissions | None = None
    etcd_roles: tuple[str, ...] = ()

    @property
    def etcd_user(self) -> str | None:
        """The etcd RBAC user: the certificate's CN, if it has any role."""
        return self.name if self.etcd_roles else None

    @property
    def nkey_seed(self) -> str | None:
        if self.nkey_seed_file is None:
            return None
        return self.nkey_seed_file.read_text().strip()

    def nats_tls(self) -> ssl.SSLContext:
        """Trusts only the stack's CA and presents this identity's certificate."""
        return client_context(self.ca_file, self.cert_file, self.key_file)

    def etcd_tls(self) -> TlsConfig:
        return TlsConfig(
            ca_cert=self.ca_file.read_bytes(),
            cert_chain=self.cert_file.read_bytes(),
            key=self.key_file.read_bytes(),
            server_name=TLS_SERVER_NAME,
        )

    def etcdctl_flags(self) -> list[str]:
        return [f"--cacert={self.ca_file}", f"--cert={self.cert_file}", f"--key={self.key_file}"]

    def to_json(self) -> dict[str, Any]:
        """File names only: the directory can be moved or mounted elsewhere."""
        return {
            "name": self.name,
            "role": self.role,
            "cert_file": self.cert_file.name,
            "key_file": self.key_file.name,
            "nkey_seed_file": None if self.nkey_seed_file is None else self.nkey_seed_file.name,
            "nkey_public": self.nkey_public,
            "inbox_prefix": self.inbox_prefix,
            "nats": None
            if self.nats is None
            else {
                "publish": list(self.nats.publish),
                "subscribe": list(self.nats.subscribe),
                "allow_responses": self.nats.allow_responses,
            },
            "etcd_roles": list(self.etcd_roles),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], workdir: Path) -> Identity:
        nats = data.get("nats")
        seed = data.get("nkey_seed_file")
        return cls(
            name=data["name"],
            role=data["role"],
            ca_file=workdir / "ca.pem",
            cert_file=workdir / data["cert_file"],
            key_file=workdir / data["key_file"],
            nkey_seed_file=None if seed is None else workdir / seed,
            nkey_public=data.get("nkey_public"),
            inbox_prefix=data.get("inbox_prefix"),
            nats=None
            if nats is None
            else NatsPermissions(
                tuple(nats["publish"]), tuple(nats["subscribe"]), bool(nats["allow_responses"])
            ),
            etcd_roles=tuple(data.get("etcd_roles", ())),
        )


def _new_nkey() -> tuple[str, str]:
    """(seed, public key) of a fresh NATS user NKey."""
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


@dataclass(frozen=True)
class SecureSpec:
    """What to generate; ``LocalServers(secure=SecureSpec(...))`` builds it at start."""

    hypervisors: Mapping[str, Sequence[str]]
    nves: Sequence[str]
    subject_root: str = DEFAULT_SUBJECT_ROOT
    key_root: str = DEFAULT_ROOT

    def build(self, workdir: str | Path) -> Credentials:
        return secure_stack(
            workdir,
            self.hypervisors,
            self.nves,
            subject_root=self.subject_root,
            key_root=self.key_root,
        )


@dataclass
class Credentials:
    """Everything a secured stack needs, on disk under ``workdir`` (keys mode 0600)."""

    workdir: Path
    subject_root: str
    key_root: str
    hypervisors: dict[str, tuple[str, ...]]
    nves: tuple[str, ...]
    identities: dict[str, Identity] = field(default_factory=dict)

    # -- files

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.workdir / "ca-key.pem"

    @property
    def server_cert_file(self) -> Path:
        return self.workdir / "server.pem"

    @property
    def server_key_file(self) -> Path:
        return self.workdir / "server-key.pem"

    @property
    def probe_cert_file(self) -> Path:
        return self.workdir / "probe.pem"

    @property
    def probe_key_file(self) -> Path:
        return self.workdir / "probe-key.pem"

    @property
    def route_auth_file(self) -> Path:
        return self.workdir / "nats-route.json"

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_root)

    def route_auth(self) -> RouteAuth:
        data = json.loads(self.route_auth_file.read_text())
        return RouteAuth(data["user"], data["password"])

    # -- identities

    def identity(self, name: str) -> Identity:
        try:
            return self.identities[name]
        except KeyError:
            known = ", ".join(sorted(self.identities))
            raise KeyError(f"no identity {name!r} in {self.workdir} (known: {known})") from None

    def agent(self, hv: str) -> Identity:
        return self.identity(hv_identity(hv))

    def nve(self, nve: str) -> Identity:
        return self.identity(nve_identity(nve))

    def probe_context(self) -> ssl.SSLContext:
        """For the launcher's own HTTP probes of etcd (health, member list, leader).

        Its certificate has no CN: once auth is on, etcd's HTTP gateway answers 400 to
        a client certificate with a CN (it cannot map it to a user), and without a CN it
        is no RBAC user either.
        """
        return client_context(self.ca_file, self.probe_cert_file, self.probe_key_file)

    def etcdctl_flags(self, name: str = ROLE_INSPECTOR) -> list[str]:
        return self.identity(name).etcdctl_flags()

    def etcd_users(self) -> dict[str, tuple[str, ...]]:
        return {i.name: i.etcd_roles for i in self.identities.values() if i.etcd_roles}

    def etcd_roles(self) -> dict[str, tuple[EtcdGrant, ...]]:
        return etcd_roles(self.key_root, self.nves)

    # -- generation and rotation

    def _ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_file.read_bytes(), self.ca_key_file.read_bytes())

    def _issue(self, ca: CertificateAuthority, name: str, role: str) -> Identity:
        stem = _file_stem(name)
        cert_file = self.workdir / f"{stem}.pem"
        key_file = self.workdir / f"{stem}-key.pem"
        ca.issue_client(name).write(cert_file, key_file)
        perms = nats_permissions(name, role, self.subjects, self._nves_of(name, role))
        seed_file: Path | None = None
        public: str | None = None
        if perms is not None:
            seed, public = _new_nkey()
            seed_file = self.workdir / f"{stem}.nk"
            write_secret(seed_file, seed.encode() + b"\n")
        ident = Identity(
            name=name,
            role=role,
            ca_file=self.ca_file,
            cert_file=cert_file,
            key_file=key_file,
            nkey_seed_file=seed_file,
            nkey_public=public,
            inbox_prefix=inbox_prefix(name) if perms is not None else None,
            nats=perms,
            etcd_roles=_etcd_user_roles(role, name),
        )
        self.identities[name] = ident
        return ident

    def _nves_of(self, name: str, role: str) -> tuple[str, ...]:
        if role != ROLE_HV:
            return ()
        return self.hypervisors[name.split(":", 1)[1]]

    def add_hypervisor(self, hv: str, nves: Sequence[str]) -> Identity:
        """A new agent identity (or new NVE assignment); reload nats-server to apply."""
        _check_token(hv, "hypervisor")
        for nve in nves:
            _check_token(nve, "NVE")
        self.hypervisors[hv] = tuple(nves)
        ident = self._issue(self._ca(), hv_identity(hv), ROLE_HV)
        self.save()
        return ident

    def rotate(self, name: str) -> Identity:
        """New certificate and NKey for ``name``; the old NKey stops working at reload.

        The etcd user stays (it is the CN). Existing TLS sessions keep their old
        certificate until they reconnect; see docs/security.md for revocation.
        """
        old = self.identity(name)
        ident = self._issue(self._ca(), name, old.role)
        self.save()
        return ident

    def remove(self, name: str) -> None:
        """Forget an identity (its NKey is gone from the next rendered config)."""
        ident = self.identities.pop(name)
        if ident.role == ROLE_HV:
            self.hypervisors.pop(name.split(":", 1)[1], None)
        for path in (ident.cert_file, ident.key_file, ident.nkey_seed_file):
            if path is not None:
                path.unlink(missing_ok=True)
        self.save()

    def save(self) -> None:
        manifest = {
            "subject_root": self.subject_root,
            "key_root": self.key_root,
            "hypervisors": {hv: list(n) for hv, n in self.hypervisors.items()},
            "nves": list(self.nves),
            "identities": [i.to_json() for i in self.identities.values()],
        }
        write_public(self.workdir / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")

    @classmethod
    def load(cls, workdir: str | Path) -> Credentials:
        """Read a directory written by :func:`secure_stack` (for CLI processes)."""
        path = Path(workdir)
        data = json.loads((path / MANIFEST).read_text())
        creds = cls(
            workdir=path,
            subject_root=data["subject_root"],
            key_root=data["key_root"],
            hypervisors={hv: tuple(n) for hv, n in data["hypervisors"].items()},
            nves=tuple(data["nves"]),
        )
        for item in data["identities"]:
            ident = Identity.from_json(item, path)
            creds.identities[ident.name] = ident
        return creds


def _check_token(value: str, what: str) -> None:
    if not _TOKEN.match(value):
        raise ValueError(f"invalid {what} id {value!r} (a token: letters, digits, _ and -)")


def secure_stack(
    workdir: str | Path,
    hypervisors: Mapping[str, Sequence[str]],
    nves: Sequence[str],
    *,
    subject_root: str = DEFAULT_SUBJECT_ROOT,
    key_root: str = DEFAULT_ROOT,
) -> Credentials:
    """Generate a CA, the server certificate and every identity into ``workdir``.

    ``hypervisors`` maps each hypervisor id to the NVEs it is assigned to (it may publish
    requests to those only); ``nves`` are the NVE ids. Identities ``ima``, ``op``,
    ``inspector`` and ``root`` are always created.
    """
    for hv, assigned in hypervisors.items():
        _check_token(hv, "hypervisor")
        for nve in assigned:
            _check_token(nve, "NVE")
    for nve in nves:
        _check_token(nve, "NVE")
    Subjects(subject_root)  # validates
    if not (key_root.startswith("/") and key_root.endswith("/")):
        raise ValueError(f"key root must start and end with '/': {key_root!r}")
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    creds = Credentials(
        workdir=path,
        subject_root=subject_root,
        key_root=key_root,
        hypervisors={hv: tuple(n) for hv, n in hypervisors.items()},
        nves=tuple(nves),
    )
    ca = CertificateAuthority.generate()
    ca.write(creds.ca_file, creds.ca_key_file)
    ca.issue_server(SERVER_CN).write(creds.server_cert_file, creds.server_key_file)
    ca.issue_client("").write(creds.probe_cert_file, creds.probe_key_file)
    route = {"user": "nvo3-route", "password": secrets.token_urlsafe(24)}
    write_secret(creds.route_auth_file, json.dumps(route).encode())
    for hv in creds.hypervisors:
        creds._issue(ca, hv_identity(hv), ROLE_HV)
    for nve in creds.nves:
        creds._issue(ca, nve_identity(nve), ROLE_NVE)
    for role in (ROLE_IMA, ROLE_OP, ROLE_INSPECTOR, ROLE_ROOT):
        creds._issue(ca, role, role)
    creds.save()
    return creds


# --------------------------------------------------------------------------- RBAC bootstrap


async def bootstrap_etcd_rbac(endpoints: Sequence[str], creds: Credentials) -> None:
    """Create roles and users, then ``auth enable``; as the ``root`` client certificate.

    Runs once on a fresh cluster, before any other client connects (until ``auth
    enable`` any client with a valid certificate could do anything). Idempotent: if
    auth is already on, nothing is done.
    """
    root = creds.identity(ROLE_ROOT)
    client = Etcd3Client(
        list(endpoints),
        tls_server_name=TLS_SERVER_NAME,
        ca_cert=root.ca_file.read_bytes(),
        cert_chain=root.cert_file.read_bytes(),
        cert_key=root.key_file.read_bytes(),
    )
    await client.connect()
    try:
        auth = client.auth
        assert auth is not None
        status = await auth.auth_status(timeout=10)
        if status.enabled:
            return
        for role, grants in creds.etcd_roles().items():
            await auth.role_add(role, timeout=10)
            for grant in grants:
                key = grant.key.encode()
                await auth.role_grant_permission(
                    role,
                    key,
                    prefix_range_end(key) if grant.prefix else None,
                    perm_type=PermissionType.READWRITE
                    if grant.perm == "readwrite"
                    else PermissionType.READ,
                    timeout=10,
                )
        await auth.role_add(ROLE_ROOT, timeout=10)
        for user, roles in creds.etcd_users().items():
            await auth.user_add(user, no_password=True, timeout=10)
            for role in roles:
                await auth.user_grant_role(user, role, timeout=10)
        await auth.auth_enable(timeout=10)
    finally:
        await client.close()


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="nvo3-security")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
