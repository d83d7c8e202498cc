"""The member-agreement check that tells an etcd divergence from a control-plane bug."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ima.store import EtcdStore
from nvo3.connect import open_store
from nvo3.etcd_members import MemberView, divergence, read_member
from nvo3.etcd_versions import etcd_version, kill9_corrupts


def test_members_at_one_revision_with_the_same_keys_agree() -> None:
    keys = {"/p/a": 3, "/p/b": 4}
    assert divergence([MemberView("m1", 9, dict(keys)), MemberView("m2", 9, dict(keys))]) == []


def test_a_member_still_catching_up_is_reported_as_lagging_not_diverged() -> None:
    found = divergence([MemberView("m1", 9, {"/p/a": 3}), MemberView("m2", 8, {})])
    assert found == ["etcd member m2 is at revision 8, another at 9"]


def test_missing_extra_and_other_versions_are_each_named() -> None:
    found = divergence([MemberView("m1", 9, {"/p/a": 3, "/p/b": 4, "/p/c": 5}),
                        MemberView("m2", 9, {"/p/b": 4, "/p/c": 7, "/p/d": 8})])
    assert len(found) == 3
    assert "m2 lacks 1 keys that m1 has, e.g. /p/a" in found[0]
    assert "m2 has extra 1 keys that m1 lacks, e.g. /p/d" in found[1]
    assert "m2 has other versions of 1 keys" in found[2]


def test_a_member_that_cannot_be_read_is_said_so() -> None:
    found = divergence([MemberView("m1", 9, {}), MemberView("m2", error="connection refused")])
    assert found == ["etcd member m2 could not be read: connection refused"]


def test_a_real_member_is_read_with_its_keys_and_revision(
    etcd_endpoints: list[str], key_prefix: str
) -> None:
    async def write() -> int:
        store: EtcdStore = await open_store(etcd_endpoints)
        try:
            await store.put(f"{key_prefix}a", b"1")
            await store.put(f"{key_prefix}b", b"2")
            return await store.current_revision()
        finally:
            await store.close()

    revision = asyncio.run(write())
    view = read_member("m", f"http://{etcd_endpoints[0]}", key_prefix)
    assert view.error == ""
    assert view.revision >= revision
    assert sorted(view.keys) == [f"{key_prefix}a", f"{key_prefix}b"]


def test_etcd_versions_that_kill_9_can_corrupt_are_known() -> None:
    assert etcd_version("3.5.1") == (3, 5, 1)
    assert etcd_version("v3.4.23") == (3, 4, 23)
    assert etcd_version("nonsense") is None
    assert kill9_corrupts((3, 5, 1))
    assert kill9_corrupts((3, 5, 5))
    assert not kill9_corrupts((3, 5, 6))
    assert not kill9_corrupts((3, 4, 23))
    assert not kill9_corrupts(None)


def test_a_long_running_service_is_warned_about_such_an_etcd(
    etcd_endpoints: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The bundled etcd (3.5.1) is one: every service says so once, at connect."""
    async def connect() -> str:
        store = await open_store(etcd_endpoints)
        try:
            return await store.server_version()
        finally:
            await store.close()

    from nvo3 import connect as connect_module

    connect_module._warned_versions.clear()  # other tests' connects warned already
    with caplog.at_level(logging.WARNING, logger="nvo3.connect"):
        version = asyncio.run(connect())
        asyncio.run(connect())  # a second connection says nothing more
    warned = [r for r in caplog.records if "etcd-io/etcd#13766" in r.getMessage()]
    assert len(warned) == (1 if kill9_corrupts(etcd_version(version)) else 0)


def test_a_member_that_stays_behind_once_writes_stopped_has_diverged() -> None:
    """A member that skipped an entry is one revision behind for good."""
    found = divergence([MemberView("m1", 9, {"/p/a": 9}), MemberView("m2", 8, {"/p/a": 8})],
                       settled=True)
    assert found == ["etcd members diverged: member m2 stays at revision 8, another at 9"]
