"""The tests' control plane: ``nvo3.harness`` under the names the tests use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nvo3.harness import WAIT
from nvo3.harness import ControlPlane as Slice
from nvo3.harness import start_control_plane as start_slice
from schemas.messages import ServiceType

__all__ = ["WAIT", "Slice", "blue_slice_fixture", "running_slice", "start_slice"]


@asynccontextmanager
async def running_slice(
    nats_urls: Sequence[str], etcd_endpoints: Sequence[str], key_prefix: str,
    subject_root: str, nves: tuple[str, ...] = ("nve1", "nve2"), *,
    vns: Sequence[tuple[str, ServiceType]] = (("blue", "l2"),), **config: Any,
) -> AsyncIterator[Slice]:
    """A control plane with ``nves`` (``config`` goes to each NVE) and the VNs ``vns``
    (alias, service), stopped on the way out."""
    s = await start_slice(list(nats_urls), list(etcd_endpoints), key_prefix, subject_root,
                          nves, **config)
    try:
        assert s.client is not None
        for alias, service in vns:
            await s.client.create(alias, service=service)
        yield s
    finally:
        await s.stop()


def blue_slice_fixture(*, lease_ttl: int) -> Any:
    """A ``cp`` fixture for a module (``cp = blue_slice_fixture(lease_ttl=...)``): on the
    plain stack under the test's own key prefix and subject root, ``nve1`` and ``nve2``
    announcing every 0.2 s with leases of ``lease_ttl`` seconds, and VN ``blue``."""

    @pytest.fixture
    async def cp(
        nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
    ) -> AsyncIterator[Slice]:
        async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                                 announce_s=0.2, lease_ttl=lease_ttl) as s:
            yield s

    return cp
