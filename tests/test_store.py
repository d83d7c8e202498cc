"""Integration tests for ima.store against a real etcd (fixtures from conftest)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from ima.store import (
    Delete,
    EtcdStore,
    Get,
    KeyMissing,
    LeaseLost,
    ModRevisionEquals,
    Put,
    RevisionCompacted,
    StoreError,
    StoreUnavailable,
    TxnTooLarge,
    ValueEquals,
    WatchCompacted,
    WatchEvent,
)
from nvo3.servers import EtcdCluster

pytestmark = pytest.mark.integration

WAIT = 10.0


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoints) as s:
        yield s
        await s.delete_prefix(key_prefix)


async def test_put_get_delete(store: EtcdStore, key_prefix: str) -> None:
    key = key_prefix + "a"
    assert await store.get(key) is None

    rev1 = await store.put(key, b"one")
    kv = await store.get(key)
    assert kv is not None
    assert (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease) == (
        key,
        b"one",
        rev1,
        rev1,
        1,
        0,
    )

    rev2 = await store.put(key, b"two")
    kv = await store.get(key)
    assert kv is not None
    assert (kv.value, kv.mod_revision, kv.create_revision, kv.version) == (b"two", rev2, rev1, 2)

    rev3 = await store.delete(key)
    assert rev3 > rev2
    assert await store.get(key) is None
    assert await store.current_revision() >= rev3


async def test_delete_prefix_counts_and_stays_inside_prefix(
    store: EtcdStore, key_prefix: str
) -> None:
    await store.commit([Put(f"{key_prefix}x/{i}", b"") for i in range(5)])
    await store.put(key_prefix + "y", b"keep")
    assert await store.delete_prefix(key_prefix + "x/") == 5
    assert await store.delete_prefix(key_prefix + "x/") == 0
    items, _ = await store.get_prefix(key_prefix)
    assert [kv.key for kv in items] == [key_prefix + "y"]
    with pytest.raises(ValueError, match="empty prefix"):
        await store.delete_prefix("")


async def test_get_prefix_pages_over_many_keys(store: EtcdStore, key_prefix: str) -> None:
    keys = [f"{key_prefix}k{i:05d}" for i in range(2500)]
    written = await store.commit([Put(k, k.encode()) for k in keys])

    pages = [page async for page in store.iter_prefix(key_prefix, page_size=1000)]
    assert [len(p.kvs) for p in pages] == [1000, 1000, 500]
    assert len({p.revision for p in pages}) == 1

    items, revision = await store.get_prefix(key_prefix, page_size=1000)
    assert revision >= written.revision
    assert [kv.key for kv in items] == keys
    assert all(kv.value == kv.key.encode() for kv in items)


async def test_get_prefix_is_one_snapshot_despite_concurrent_writes(
    store: EtcdStore, key_prefix: str
) -> None:
    keys = [f"{key_prefix}k{i:05d}" for i in range(0, 5000, 2)]  # 2,500 keys, gaps between
    await store.commit([Put(k, b"old") for k in keys])

    pages = aiter(store.iter_prefix(key_prefix, page_size=1000))
    first = await anext(pages)
    assert len(first.kvs) == 1000

    # While the listing is half done: add keys into the gaps of later pages and past the
    # end, rewrite and delete keys that the later pages have not returned yet.
    late = [f"{key_prefix}k{i:05d}" for i in range(2001, 5000, 6)]
    later = await store.commit(
        [Put(k, b"new") for k in late]
        + [Put(f"{key_prefix}z{i}", b"new") for i in range(50)]
        + [Put(keys[1500], b"changed"), Delete(keys[2400])]
    )
    assert later.revision > first.revision

    rest = [page async for page in pages]
    assert {p.revision for p in rest} == {first.revision}
    items = first.kvs + [kv for p in rest for kv in p.kvs]
    assert [kv.key for kv in items] == keys
    assert all(kv.value == b"old" and kv.mod_revision <= first.revision for kv in items)

    # A fresh listing does see the new state.
    fresh, revision = await store.get_prefix(key_prefix, page_size=1000)
    assert revision >= later.revision
    assert len(fresh) == len(keys) + len(late) + 50 - 1


async def test_commit_splits_into_txns_of_128(store: EtcdStore, key_prefix: str) -> None:
    result = await store.commit([Put(f"{key_prefix}{i:03d}", b"v") for i in range(300)])
    assert result.txns == 3
    items, revision = await store.get_prefix(key_prefix)
    assert len(items) == 300
    assert revision == result.revision
    # Ordered split: each txn is one revision, so the last 44 keys share the last one.
    assert {kv.mod_revision for kv in items[256:]} == {result.revision}
    assert {kv.mod_revision for kv in items[:128]} == {result.revision - 2}


async def test_big_values_split_txns_by_bytes_and_pages_by_message_size(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    # 6 x 1 MiB: one txn would exceed etcd's 1.5 MiB request limit, and one 1000-key page
    # would exceed a 4 MiB receive limit (gRPC's default; the store allows 64 MiB).
    store = EtcdStore(etcd_endpoints, max_receive_bytes=4 << 20)
    await store.connect()
    try:
        await _split_big_values(store, key_prefix)
    finally:
        await store.close()


async def _split_big_values(store: EtcdStore, key_prefix: str) -> None:
    big = [Put(f"{key_prefix}big{i}", bytes([i]) * (1 << 20)) for i in range(6)]
    result = await store.commit(big)
    assert result.txns == 6
    pages = [page async for page in store.iter_prefix(key_prefix, page_size=1000)]
    assert len(pages) > 1
    items = [kv for page in pages for kv in page.kvs]
    assert [(kv.key, kv.value) for kv in items] == [(op.key, op.value) for op in big]


async def test_commit_preserves_order_across_repeated_keys(
    store: EtcdStore, key_prefix: str
) -> None:
    # etcd rejects a txn writing one key twice; commit must split there, not fail.
    key = key_prefix + "k"
    result = await store.commit(
        [Put(key, b"1"), Put(key, b"2"), Delete(key_prefix, prefix=True), Put(key, b"3")]
    )
    assert result.txns == 4
    kv = await store.get(key)
    assert kv is not None
    assert (kv.value, kv.version) == (b"3", 1)


async def test_txn_too_large_is_refused(store: EtcdStore, key_prefix: str) -> None:
    with pytest.raises(TxnTooLarge):
        await store.txn([], [Put(f"{key_prefix}{i}", b"") for i in range(129)])
    items, _ = await store.get_prefix(key_prefix)
    assert items == []


async def test_txn_key_missing_succeeds_once(store: EtcdStore, key_prefix: str) -> None:
    key = key_prefix + "owner"
    first = await store.txn([KeyMissing(key)], [Put(key, b"me")], [Get(key)])
    assert first.succeeded
    assert [r.kind for r in first.responses] == ["put"]

    second = await store.txn([KeyMissing(key)], [Put(key, b"you")], [Get(key)])
    assert not second.succeeded
    assert second.revision == first.revision
    (got,) = second.responses
    assert got.kind == "get"
    assert [(kv.key, kv.value) for kv in got.kvs] == [(key, b"me")]


async def test_txn_compare_and_swap(store: EtcdStore, key_prefix: str) -> None:
    key = key_prefix + "cas"
    rev = await store.put(key, b"a")
    ok = await store.txn(
        [ModRevisionEquals(key, rev), ValueEquals(key, b"a")],
        [Put(key, b"b"), Delete(key_prefix + "absent")],
    )
    assert ok.succeeded
    assert [(r.kind, r.deleted) for r in ok.responses] == [("put", 0), ("delete", 0)]
    stale = await store.txn([ModRevisionEquals(key, rev)], [Put(key, b"c")])
    assert not stale.succeeded
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == b"b"


async def test_watch_sees_puts_and_deletes_in_order(store: EtcdStore, key_prefix: str) -> None:
    start = await store.current_revision() + 1
    await store.put(key_prefix + "a", b"1")
    await store.put(key_prefix + "nested/x", b"x")
    await store.put("/not-under-prefix" + key_prefix, b"x")
    await store.put(key_prefix + "a", b"2")
    await store.delete(key_prefix + "a")
    await store.put(key_prefix + "c", b"4")
    last = await store.commit([Put(key_prefix + "b", b"3"), Delete(key_prefix + "c")])
    await store.delete("/not-under-prefix" + key_prefix)

    seen: list[WatchEvent] = []
    async with asyncio.timeout(WAIT), store.watch_prefix(key_prefix, start) as watch:
        async for batch in watch:
            assert batch
            seen.extend(batch)
            if seen[-1].mod_revision >= last.revision:
                break
        assert watch.progress_revision == last.revision

    ours = [(e.kind, e.key.removeprefix(key_prefix), e.value) for e in seen]
    assert ours == [
        ("put", "a", b"1"),
        ("put", "nested/x", b"x"),
        ("put", "a", b"2"),
        ("delete", "a", b""),
        ("put", "c", b"4"),
        ("put", "b", b"3"),
        ("delete", "c", b""),
    ]
    revisions = [e.mod_revision for e in seen]
    assert revisions == sorted(revisions)
    assert revisions[0] == start
    assert revisions[-2] == revisions[-1] == last.revision  # one txn, one revision


async def test_watch_from_now_sees_only_new_events(store: EtcdStore, key_prefix: str) -> None:
    await store.put(key_prefix + "before", b"")
    async with asyncio.timeout(WAIT), store.watch_prefix(key_prefix, 0) as watch:
        waiter = asyncio.ensure_future(anext(watch))
        # Until etcd has created the watch, "now" is not pinned; write until it is.
        while not waiter.done():
            await store.put(key_prefix + "after", b"")
            await asyncio.sleep(0.05)
        batch = waiter.result()
    assert {e.key for e in batch} == {key_prefix + "after"}


async def test_closing_store_ends_watch_with_store_error(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    store = EtcdStore(etcd_endpoints)
    await store.connect()
    async with store.watch_prefix(key_prefix, 0) as watch:
        waiter = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        await store.close()
        # gRPC aborts the stream with a bare CancelledError; it must not look like one.
        with pytest.raises(StoreError, match="closed"):
            await asyncio.wait_for(waiter, WAIT)


async def test_watch_raises_when_start_revision_compacted(
    store: EtcdStore, key_prefix: str
) -> None:
    old = await store.put(key_prefix + "a", b"1")
    await store.put(key_prefix + "a", b"2")
    newer = await store.put(key_prefix + "a", b"3")
    await store.compact(newer)
    await store.compact(newer)  # compacting again is a no-op, not an error

    async with asyncio.timeout(WAIT), store.watch_prefix(key_prefix, old) as watch:
        with pytest.raises(WatchCompacted) as info:
            await anext(watch)  # never skips ahead: the first thing seen is the error
    assert info.value.compact_revision >= newer

    with pytest.raises(RevisionCompacted):
        await store.get_prefix(key_prefix, revision=old)

    # Re-listing and watching from the listing's revision is the recovery path.
    items, revision = await store.get_prefix(key_prefix)
    assert [kv.value for kv in items] == [b"3"]
    async with asyncio.timeout(WAIT), store.watch_prefix(key_prefix, revision + 1) as watch:
        await store.put(key_prefix + "a", b"4")
        batch = await anext(watch)
    assert [(e.kind, e.value) for e in batch] == [("put", b"4")]


async def test_lease_revoke_removes_keys(store: EtcdStore, key_prefix: str) -> None:
    lease = await store.grant_lease(30)
    key = key_prefix + "leased"
    await store.put(key, b"alive", lease=lease)
    kv = await store.get(key)
    assert kv is not None
    assert kv.lease == lease
    assert await store.keepalive_once(lease) > 0

    await store.revoke_lease(lease)
    assert await store.get(key) is None
    assert await store.keepalive_once(lease) == 0
    await store.revoke_lease(lease)  # idempotent
    with pytest.raises(LeaseLost):
        await store.put(key, b"again", lease=lease)


async def test_run_keepalive_reports_lost_lease(store: EtcdStore, key_prefix: str) -> None:
    lease = await store.grant_lease(2)
    lost = asyncio.Event()
    async with asyncio.timeout(WAIT):
        task = asyncio.create_task(store.run_keepalive(lease, 2, lost.set))
        await asyncio.sleep(2.5)  # longer than the TTL: only the keepalive keeps it alive
        assert not task.done()
        assert await store.keepalive_once(lease) > 0
        await store.revoke_lease(lease)
        await lost.wait()
        with pytest.raises(LeaseLost):
            await task


async def test_unreachable_etcd_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable) as info:
        async with EtcdStore(["127.0.0.1:1"], timeout=2.0):
            pass
    assert info.value.__cause__ is not None


@pytest.fixture
def private_etcd() -> Iterator[EtcdCluster]:
    """A throwaway one-member etcd, for tests that crash it (never the shared one)."""
    cluster = EtcdCluster(1, extra_args=["--unsafe-no-fsync"])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_watch_resumes_without_gap_after_etcd_crash(
    private_etcd: EtcdCluster, key_prefix: str
) -> None:
    # etcd replays old history in batches of <= 1000 revisions, each stamped with the
    # *current* revision; etcd3aio would resume from that stamp and lose the rest.
    n = 2500
    member = private_etcd.members[0]
    async with EtcdStore(private_etcd.endpoints, timeout=10.0) as store:
        start = await store.current_revision() + 1
        limit = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with limit:
                await store.put(f"{key_prefix}{i:05d}", b"")

        await asyncio.gather(*(put(i) for i in range(n)))

        seen: list[WatchEvent] = []
        async with asyncio.timeout(60), store.watch_prefix(key_prefix, start) as watch:
            seen.extend(await anext(watch))
            assert len(seen) < n
            await asyncio.to_thread(member.kill)
            await asyncio.to_thread(member.restart)
            # Only a new stream can deliver this, so the resume path is exercised.
            extra = await store.put(key_prefix + "after-restart", b"")
            async for batch in watch:
                seen.extend(batch)
                if seen[-1].mod_revision >= extra:
                    break
            assert watch.streams_started >= 2

    revisions = [e.mod_revision for e in seen]
    assert revisions == [*range(start, start + n), extra]  # every revision, once, in order
    assert {e.key for e in seen[:n]} == {f"{key_prefix}{i:05d}" for i in range(n)}


async def test_watch_resumes_by_itself_when_a_member_stops_cleanly(
    private_etcd: EtcdCluster, key_prefix: str
) -> None:
    """A member stopped with SIGTERM ends its watch streams; the watch resumes from the
    last revision it delivered, gap-free, without surfacing an error. (Over TLS, in a
    3-member cluster, the stop resets the streams with gRPC INTERNAL "Stream removed"
    instead; that reached the NVE's follower as an error and cost a full re-list of the
    VN, until ``PrefixWatch._next`` treated it as a broken stream too. The secured short
    chaos run covers that path: its compaction re-list only happens on a resume.)"""
    member = private_etcd.members[0]
    async with EtcdStore(private_etcd.endpoints, timeout=10.0) as store:
        start = await store.current_revision() + 1
        first = await store.put(key_prefix + "before", b"")
        async with asyncio.timeout(60), store.watch_prefix(key_prefix, start) as watch:
            assert [e.mod_revision for e in await anext(watch)] == [first]
            await asyncio.to_thread(member.stop)
            await asyncio.to_thread(member.restart)
            after = await store.put(key_prefix + "after", b"")
            batch = await anext(watch)  # no StoreError: the stream was resumed
            assert [(e.key, e.mod_revision) for e in batch] == [(key_prefix + "after", after)]
            assert watch.streams_started >= 2


async def test_failover_between_endpoints(key_prefix: str) -> None:
    cluster = EtcdCluster(3, extra_args=["--unsafe-no-fsync"])
    await asyncio.to_thread(cluster.start)
    try:
        async with EtcdStore(cluster.endpoints, timeout=10.0) as store:
            start = await store.current_revision() + 1
            async with asyncio.timeout(60), store.watch_prefix(key_prefix, start) as watch:
                await store.put(key_prefix + "before", b"")
                assert [e.key for e in await anext(watch)] == [key_prefix + "before"]

                await asyncio.to_thread(cluster.members[0].kill)
                for i in range(20):  # round-robin: some of these hit the dead member first
                    await store.put(f"{key_prefix}after/{i:02d}", b"")
                    assert await store.get(f"{key_prefix}after/{i:02d}") is not None

                keys: list[str] = []
                async for batch in watch:
                    keys.extend(e.key for e in batch)
                    if len(keys) >= 20:
                        break
            assert keys == [f"{key_prefix}after/{i:02d}" for i in range(20)]
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.mark.parametrize(
    ("code", "transient"),
    [(grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.DEADLINE_EXCEEDED, True),
     (grpc.StatusCode.INTERNAL, True), (grpc.StatusCode.PERMISSION_DENIED, False),
     (grpc.StatusCode.INVALID_ARGUMENT, False)],
)
def test_broken_transport_errors_are_retried_and_refusals_are_not(
    code: grpc.StatusCode, transient: bool
) -> None:
    """gRPC INTERNAL ("Internal error from Core") came from the keepalive stream after a
    pause past the lease TTL, and used to kill the NVE instead of being retried."""
    from ima.store import _raise_mapped

    rpc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="Internal error from Core")
    with pytest.raises(StoreError) as raised:
        _raise_mapped(rpc, "keepalive lease 1")
    assert isinstance(raised.value, StoreUnavailable) is transient


@pytest.mark.parametrize("detail", ["No status received",
                                    "Stream removed (Data frame with END_STREAM flag received)"])
def test_a_call_cut_off_without_a_status_is_a_broken_transport(detail: str) -> None:
    """UNKNOWN with these details: the connection went away mid-call (a hung etcd
    member's connection dropped). Taken for a refusal, it killed both NVEs of one chaos
    run and one NVE of the next, through their writer and lease tasks; it is now a
    broken transport like UNAVAILABLE."""
    from ima.store import _raise_mapped

    rpc = grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(),
                               grpc.aio.Metadata(), details=detail)
    with pytest.raises(StoreUnavailable):
        _raise_mapped(rpc, "txn")


async def test_an_ambiguous_txn_is_never_retried_into_a_false_refusal(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    """etcd applied the txn but its answer was lost (a leader that commits and dies).

    A client that silently sends it again gets ``succeeded=False`` from its own first
    attempt, and the writer would report a key it holds as lost to another NVE. The
    store must surface the ambiguity (``StoreUnavailable``, so the writer re-plans from
    what etcd holds) or report the success; never a refusal.
    """
    from tests.cut_proxy import CutProxy

    host, port = etcd_endpoints[0].rsplit(":", 1)
    key = key_prefix + "ambiguous"
    async with CutProxy(host, int(port)) as proxy, EtcdStore([proxy.endpoint]) as via_proxy:
        proxy.arm()
        try:
            result = await via_proxy.txn([KeyMissing(key)], [Put(key, b"mine")])
        except StoreUnavailable:
            pass
        else:
            assert result.succeeded, "a retry of the applied txn came back as a refusal"
        assert proxy.cuts == 1, "the proxy never lost an answer: the test proved nothing"
    async with EtcdStore(etcd_endpoints) as direct:
        kv = await direct.get(key)
        assert kv is not None
        assert kv.value == b"mine"
        await direct.delete_prefix(key_prefix)
