"""TagSpace: locally significant 802.1Q tags, lowest free value, shared per VN on a port."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nve.tags import TagSpace
from schemas.errors import ErrorCode, Exhausted, ProtocolError
from schemas.types import MAX_TAG


def snapshot(space: TagSpace) -> tuple[dict[str, int], dict[int, str], dict[str, set[str]]]:
    return (
        dict(space.tag_of),
        dict(space.vn_of),
        {vn: set(users) for vn, users in space.users.items()},
    )


def test_lowest_free_tag_in_order() -> None:
    space = TagSpace("hv1/eth0")
    assert space.empty
    assert [space.acquire(vn, f"nic-{vn}") for vn in ("a", "b", "c")] == [1, 2, 3]
    assert not space.empty
    assert space.tag_of == {"a": 1, "b": 2, "c": 3}
    assert space.vn_of == {1: "a", 2: "b", 3: "c"}


def test_same_vn_on_one_port_shares_its_tag() -> None:
    space = TagSpace("hv1/eth0")
    assert space.acquire("blue", "vnic1") == 1
    assert space.acquire("blue", "vnic2") == 1
    assert space.users == {"blue": {"vnic1", "vnic2"}}
    assert space.acquire("red", "vnic1") == 2
    # Acquiring again for an existing user is idempotent.
    assert space.acquire("blue", "vnic1") == 1
    assert space.users["blue"] == {"vnic1", "vnic2"}


def test_tag_released_only_when_last_user_leaves() -> None:
    space = TagSpace("hv1/eth0")
    space.acquire("blue", "vnic1")
    space.acquire("blue", "vnic2")
    space.acquire("red", "vnic3")
    space.release("blue", "vnic1")
    assert space.tag_of["blue"] == 1
    assert space.vn_of[1] == "blue"
    space.release("blue", "vnic2")
    assert "blue" not in space.tag_of
    assert space.vn_of.get(1) is None
    assert "blue" not in space.users
    assert space.tag_of == {"red": 2}


def test_released_tag_is_reused_lowest_first() -> None:
    space = TagSpace("hv1/eth0")
    for vn in ("a", "b", "c", "d"):
        space.acquire(vn, "n")
    space.release("c", "n")
    space.release("b", "n")
    assert space.acquire("e", "n") == 2
    assert space.acquire("f", "n") == 3
    assert space.acquire("g", "n") == 5
    space.release("a", "n")
    assert space.peek("h") == 1
    assert space.acquire("h", "n") == 1


def test_release_of_unknown_is_a_noop() -> None:
    space = TagSpace("hv1/eth0")
    space.acquire("blue", "vnic1")
    before = snapshot(space)
    space.release("red", "vnic1")
    space.release("blue", "vnic9")
    assert snapshot(space) == before


def test_peek_does_not_mutate() -> None:
    space = TagSpace("hv1/eth0")
    space.acquire("blue", "vnic1")
    before = snapshot(space)
    assert space.peek("red") == 2
    assert space.peek("red") == 2
    assert space.peek("blue") == 1
    assert snapshot(space) == before
    assert space.acquire("red", "vnic1") == 2


def test_exhaustion_after_4094_vns() -> None:
    space = TagSpace("hv1/eth0")
    assert space.max_tag == MAX_TAG == 4094
    tags = [space.acquire(f"vn{i}", "vnic") for i in range(MAX_TAG)]
    assert tags == list(range(1, MAX_TAG + 1))
    before = snapshot(space)
    with pytest.raises(Exhausted) as info:
        space.peek("one-too-many")
    assert info.value.code == ErrorCode.TAGS_EXHAUSTED
    with pytest.raises(ProtocolError) as info2:
        space.acquire("one-too-many", "vnic")
    assert info2.value.code == ErrorCode.TAGS_EXHAUSTED
    assert info2.value.fields["port"] == "hv1/eth0"
    assert snapshot(space) == before
    # A VN that already has a tag still gets it, even when the space is full.
    assert space.acquire("vn7", "other-vnic") == 8
    # Freeing one tag makes exactly that one available again.
    space.release("vn100", "vnic")
    assert space.acquire("late", "vnic") == 101
    with pytest.raises(Exhausted):
        space.acquire("later", "vnic")


def test_small_space_exhaustion() -> None:
    space = TagSpace("p", max_tag=2)
    space.acquire("a", "x")
    space.acquire("b", "x")
    with pytest.raises(Exhausted):
        space.peek("c")
    space.release("a", "x")
    assert space.acquire("c", "x") == 1


# ------------------------------------------------------------------ property

VNS = [f"vn{i}" for i in range(6)]
VNICS = [f"vnic{i}" for i in range(4)]

ops = st.lists(
    st.tuples(st.booleans(), st.sampled_from(VNS), st.sampled_from(VNICS)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, max_tag=st.sampled_from([3, 4, MAX_TAG]))
def test_random_acquire_release_keeps_a_bijection(
    ops: list[tuple[bool, str, str]], max_tag: int
) -> None:
    space = TagSpace("hv/port", max_tag=max_tag)
    model: dict[str, set[str]] = {}  # vn -> users
    for acquire, vn, vnic in ops:
        if acquire:
            expected_new = vn not in model
            free = sorted(set(range(1, max_tag + 1)) - set(space.vn_of))
            if expected_new and not free:
                before = snapshot(space)
                with pytest.raises(Exhausted):
                    space.acquire(vn, vnic)
                assert snapshot(space) == before
                continue
            peeked = space.peek(vn)
            tag = space.acquire(vn, vnic)
            assert tag == peeked
            assert tag == (free[0] if expected_new else space.tag_of[vn])
            model.setdefault(vn, set()).add(vnic)
        else:
            space.release(vn, vnic)
            users = model.get(vn)
            if users is not None:
                users.discard(vnic)
                if not users:
                    del model[vn]

        # tag_of and vn_of are inverse bijections
        assert len(space.tag_of) == len(space.vn_of)
        assert {t: v for v, t in space.tag_of.items()} == space.vn_of
        # every tag in range
        assert all(1 <= t <= max_tag for t in space.vn_of)
        # exactly the VNs with users hold a tag, one each
        assert set(space.tag_of) == set(model)
        assert space.users == model
        assert all(space.users[vn] for vn in space.tag_of)
        assert space.empty == (not model)
