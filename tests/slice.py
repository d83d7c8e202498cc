"""The tests' control plane: ``nvo3.harness`` under the names the tests use."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from nvo3.harness import WAIT
from nvo3.harness import ControlPlane as Slice
from nvo3.harness import start_control_plane as start_slice

__all__ = ["WAIT", "Slice", "blue_slice_fixture", "start_slice"]


def blue_slice_fixture(*, lease_ttl: int) -> Any:
    """A ``cp`` fixture for a module (``cp = blue_slice_fixture(lease_ttl=...)``): on the
    plain stack under the test's own key prefix and subject root, ``nve1`` and ``nve2``
    announcing every 0.2 s with leases of ``lease_ttl`` seconds, and VN ``blue``."""

    @pytest.fixture
    async def cp(
        nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
    ) -> AsyncIterator[Slice]:
        s = await start_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                              ("nve1", "nve2"), announce_s=0.2, lease_ttl=lease_ttl)
        try:
            assert s.client is not None
            await s.client.create("blue")
            yield s
        finally:
            await s.stop()

    return cp
