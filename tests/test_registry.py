"""VN context allocation raced from several clients (real etcd, real NATS)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from ima.keys import KeyLayout
from ima.registry import VnRegistry, vni_candidate
from ima.store import EtcdStore, KeyMissing, Put
from nvo3.connect import Endpoints
from tests.slice import Slice

pytestmark = pytest.mark.integration


async def _stores(endpoints: list[str], n: int) -> list[EtcdStore]:
    stores = [EtcdStore(endpoints) for _ in range(n)]
    for s in stores:
        await s.connect()
    return stores


async def test_racing_creators_of_one_vn_get_one_context(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    stores = await _stores(etcd_endpoints, 8)
    try:
        layout = KeyLayout(key_prefix)
        name = str(uuid.uuid4())
        results = await asyncio.gather(*(
            VnRegistry(s, layout).create(alias="blue", name=name) for s in stores
        ))
        assert len({r.vni for r, _ in results}) == 1
        assert len({r.vn_id for r, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        # Racing by alias only (each creator invents its own name) converges too.
        by_alias = await asyncio.gather(*(
            VnRegistry(s, layout).create(alias="red") for s in stores
        ))
        assert len({r.name for r, _ in by_alias}) == 1
        assert len({r.vni for r, _ in by_alias}) == 1
    finally:
        for s in stores:
            await s.close()


async def test_different_vns_never_share_a_context(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    stores = await _stores(etcd_endpoints, 4)
    try:
        layout = KeyLayout(key_prefix)
        # Pre-claim the first VNI candidate of a VN so its creation must probe on.
        name = str(uuid.uuid4())
        taken = vni_candidate(name, 0)
        await stores[0].txn([KeyMissing(layout.vn_vni(taken))],
                            [Put(layout.vn_vni(taken), b'{"v":1,"name":"squatter"}')])
        record, _ = await VnRegistry(stores[0], layout).create(alias="probe", name=name)
        assert record.vni != taken
        results = await asyncio.gather(*(
            VnRegistry(stores[i % 4], layout).create(alias=f"vn-{i}") for i in range(40)
        ))
        vnis = [r.vni for r, _ in results] + [record.vni, taken]
        assert len(set(vnis)) == len(vnis)
        listed = await VnRegistry(stores[1], layout).list()
        assert len(listed) == 41
    finally:
        for s in stores:
            await s.close()


async def test_two_ima_replicas_agree(
    nats_urls: list[str], etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    s = Slice(Endpoints(tuple(nats_urls), tuple(etcd_endpoints), key_prefix, subject_root))
    try:
        await s.start_ima()
        await s.start_ima()
        from ima.client import ImaClient

        clients = [ImaClient(await s.nats(f"op{i}"), s.ep.subjects) for i in range(6)]
        replies = await asyncio.gather(*(c.create("green", service="l3") for c in clients))
        assert len({r.vn.vni for r in replies}) == 1
        assert sum(r.created for r in replies) == 1
    finally:
        await s.stop()


async def test_a_create_whose_answer_was_lost_returns_the_vn_it_made(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    """etcd applied the creation and its answer was lost: the creator finds its own VN
    (not created a second time under another name, not an error)."""
    from tests.cut_proxy import CutProxy

    host, port = etcd_endpoints[0].rsplit(":", 1)
    layout = KeyLayout(key_prefix)
    async with CutProxy(host, int(port)) as proxy, EtcdStore([proxy.endpoint]) as store:
        registry = VnRegistry(store, layout)
        txn = store.txn

        async def txn_losing_its_answer(*args: Any, **kwargs: Any) -> Any:
            proxy.arm()  # the reads before it go through; this answer is lost
            store.txn = txn  # type: ignore[method-assign]
            return await txn(*args, **kwargs)

        store.txn = txn_losing_its_answer  # type: ignore[method-assign]
        record, _ = await registry.create(alias="lost-answer")
        assert proxy.cuts == 1, "the proxy never lost an answer: the test proved nothing"
        assert [r.name for r in await registry.list()] == [record.name]
        await store.delete_prefix(key_prefix)
