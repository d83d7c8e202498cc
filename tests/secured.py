"""A secured stack for tests: TLS, one NKey identity per process, etcd RBAC.

Shared by the modules that need one (``test_security_transport``,
``test_fuzz_secured``); each starts its own per module (``secured_stack``),
since a module may rotate or remove identities.
"""

from __future__ import annotations

from collections.abc import Iterator

from nats.aio.client import Client as Nats

from nvo3.security import SecureSpec
from nvo3.servers import LocalServers

#: hypervisor -> the NVEs it is assigned to (it may publish requests to those only)
HYPERVISORS = {"hv1": ["nve1"], "hv2": ["nve1"], "hv3": ["nve2"], "hvr": ["nve1"]}
NVES = ["nve1", "nve2"]


def secured_stack() -> Iterator[LocalServers]:
    """nats-server + etcd with generated credentials; for a module-scoped fixture."""
    with LocalServers(secure=SecureSpec(HYPERVISORS, NVES)) as stack:
        yield stack


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
