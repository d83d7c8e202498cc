"""Shared fixtures: one real NATS + etcd stack per session, isolated per test by naming.

Starting servers per test would dominate the runtime, so tests share one stack and keep
out of each other's way with a unique etcd key prefix and NATS subject root each.

The stack is local processes unless ``NVO3_BACKEND=testcontainers`` asks for Docker
containers of compose.yaml's images (nvo3/containers.py).

``secured`` is a secured stack (TLS, NKeys, etcd RBAC; tests/secured.py) for the modules
that ask for it: one per module, not per session, since a module may rotate or remove
identities and reload nats-server.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from nvo3.containers import ContainerServers, session_servers
from nvo3.servers import LocalServers
from tests.secured import secured_stack


@pytest.fixture(scope="session")
def servers() -> Iterator[LocalServers | ContainerServers]:
    with session_servers() as stack:
        yield stack


@pytest.fixture(scope="module")
def secured() -> Iterator[LocalServers]:
    """Started by the first test of a module that uses it, stopped after its last."""
    yield from secured_stack()


@pytest.fixture
def nats_urls(servers: LocalServers) -> list[str]:
    return servers.nats_urls


@pytest.fixture
def etcd_endpoints(servers: LocalServers) -> list[str]:
    return servers.etcd_endpoints


@pytest.fixture
def key_prefix() -> str:
    """A fresh etcd namespace, so state left by one test is invisible to the next."""
    return f"/nvo3-t-{secrets.token_hex(4)}/"


@pytest.fixture
def subject_root() -> str:
    """A fresh subject root; leading letter keeps it a valid token whatever the hex."""
    return f"t{secrets.token_hex(4)}.nvo3"
