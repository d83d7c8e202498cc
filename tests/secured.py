"""A secured stack for tests: TLS, one NKey identity per process, etcd RBAC.

Shared by the modules that need one (``test_security_transport``,
``test_fuzz_secured``, and the ``secured`` variants of ``test_bad_input`` and
``test_authorization``); each gets its own per module (the module-scoped ``secured``
fixture in tests/conftest.py, built by ``secured_stack``), since a module may rotate or
remove identities.

A secured stack's NATS permissions and etcd roles name one subject root and one key
root (``nvo3`` and ``/nvo3/``), so tests on it cannot each have their own, as they do
on the plain stack. ``start_secured`` (and ``start_on_stack``, which runs a test on
either stack) gives each test a clean root instead: it deletes every key under the key
root (as ``root``) before the test's control plane starts, and the previous test's
services and connections are gone by then.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.client import Client as Nats

from nvo3.connect import open_store
from nvo3.security import ROLE_ROOT, SecureSpec
from nvo3.servers import LocalServers
from tests.slice import Slice, start_slice

#: hypervisor -> the NVEs it is assigned to (it may publish requests to those only)
HYPERVISORS = {"hv1": ["nve1"], "hv2": ["nve1"], "hv3": ["nve2"], "hvr": ["nve1"]}
NVES = ["nve1", "nve2"]
#: ``params`` of a fixture whose tests run on both stacks (``start_on_stack``)
STACKS = ["plain", "secured"]


def secured_stack() -> Iterator[LocalServers]:
    """nats-server + etcd with generated credentials; for a module-scoped fixture."""
    with LocalServers(secure=SecureSpec(HYPERVISORS, NVES)) as stack:
        yield stack


async def wipe(stack: LocalServers) -> int:
    """Delete every key under the secured stack's key root, as the bootstrap ``root``
    (no other identity may); returns how many keys were deleted."""
    creds = stack.credentials
    assert creds is not None
    store = await open_store(stack.etcd_endpoints, identity=creds.identity(ROLE_ROOT))
    try:
        return await store.delete_prefix(creds.key_root)
    finally:
        await store.close()


async def start_on_stack(
    request: pytest.FixtureRequest, nve_ids: tuple[str, ...], **nve_config: Any
) -> Slice:
    """``start_slice`` on the stack named by ``request.param`` (one of ``STACKS``).

    ``plain``: the session's plain stack, a fresh key prefix and subject root.
    ``secured``: the module's ``secured`` fixture, with ``start_secured``.
    """
    if request.param == "plain":
        return await start_slice(
            request.getfixturevalue("nats_urls"), request.getfixturevalue("etcd_endpoints"),
            request.getfixturevalue("key_prefix"), request.getfixturevalue("subject_root"),
            nve_ids, **nve_config)
    assert request.param == "secured", request.param
    return await start_secured(request.getfixturevalue("secured"), nve_ids, **nve_config)


async def start_secured(stack: LocalServers, nve_ids: tuple[str, ...], **nve_config: Any) -> Slice:
    """``start_slice`` on a secured stack (``secured_stack``): its fixed roots, wiped
    first; every connection uses its process's identity, and the NVEs answer only into
    the sender's own inbox (nvo3.harness)."""
    creds = stack.credentials
    assert creds is not None
    await wipe(stack)
    return await start_slice(stack.nats_urls, stack.etcd_endpoints, creds.key_root,
                             creds.subject_root, nve_ids, credentials=creds, **nve_config)


def request_counters(nve: Any) -> dict[str, int]:
    """An NVE's counters of hypervisor requests received, answered or refused (not the
    ones its etcd watches move, which may still be catching up)."""
    prefixes = ("messages.", "errors.", "replays", "refused_reply_subject",
                "dropped_no_reply_subject")
    return {k: v for k, v in nve.counters.items() if k.startswith(prefixes)}


class Violations:
    """Keeps a connection's asynchronous server errors; ``record`` is its ``error_cb``
    (nats-py wants a coroutine function) and stays quiet."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    async def record(self, exc: Exception) -> None:
        self.errors.append(exc)

    def publish(self) -> list[str]:
        return [str(e) for e in self.errors
                if "permissions violation for publish" in str(e).lower()]

    def subscribe(self) -> list[str]:
        return [str(e) for e in self.errors
                if "permissions violation for subscription" in str(e).lower()]


async def quiet(exc: Exception) -> None:
    """nats-py's default error callback logs a traceback for every refused attempt."""


async def settle(nc: Nats) -> None:
    """Wait until the server has answered everything sent so far.

    The server answers in order (a violation's -ERR comes before the PONG), but
    nats-py writes flush()'s PING straight to the socket, ahead of publishes still in
    its pending buffer. After one round trip the buffer has been written, so the
    second PONG comes after any -ERR.
    """
    await nc.flush(timeout=2)
    await nc.flush(timeout=2)
