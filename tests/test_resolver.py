"""An NVE resolves existing VNs from its mirror of the registry, without reading etcd.

The first resolution of a VN used to read etcd while the NVE's request loop waited,
for every hypervisor; during an etcd leader election that could take the store's
whole call budget. The NVE mirrors the VN records anyway (to forget deleted VNs),
so it now learns every record it sees.
"""

from __future__ import annotations

import pytest

from schemas.messages import VnRef
from tests.slice import running_slice

pytestmark = pytest.mark.integration


async def test_existing_and_new_vns_are_resolved_from_the_mirror(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    async with running_slice(nats_urls, etcd_endpoints, key_prefix, subject_root,
                             ("nve1",), vns=()) as cp:
        assert cp.client is not None
        blue = (await cp.client.create("blue")).vn
        nve = cp.nves["nve1"]
        await cp.wait("nve1", lambda: nve.resolver.cached(VnRef(alias="blue")) is not None)
        for ref in (VnRef(alias="blue"), VnRef(name=blue.name), VnRef(id=blue.vn_id)):
            assert nve.resolver.cached(ref) == blue
        await cp.client.delete(VnRef(alias="blue"))
        await cp.wait("nve1", lambda: nve.resolver.cached(VnRef(alias="blue")) is None)
