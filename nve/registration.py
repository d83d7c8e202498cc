"""Registering one NVE incarnation in the IMA: its record, under its lease.

Liveness and ownership are separate (issue 4): the lease says the NVE is
alive, the record's ``epoch`` says which incarnation it is.  Registration is
a compare-and-swap on what was read, so two incarnations racing cannot both
win.  A newer epoch already registered means this process is the old one
(paused past its lease, or started twice) and must stop: ``Superseded``.  An
older one is a crashed predecessor: its lease is revoked, which withdraws
everything it left behind at once instead of a lease TTL later.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import orjson

from ima.store import (
    EtcdStore,
    KeyMissing,
    ModRevisionEquals,
    Put,
    StoreError,
    StoreUnavailable,
)
from schemas.records import NveRecord


class Superseded(RuntimeError):
    """A newer incarnation of this NVE is registered: this one must stop (fencing)."""


def record_epoch(value: bytes) -> int:
    try:
        return NveRecord.model_validate_json(value).epoch
    except ValueError:
        return 0  # unreadable: treat as the oldest


async def register(
    store: EtcdStore, key: str, record: NveRecord, lease_id: int, counters: Counter[str]
) -> None:
    """Write ``record`` at ``key`` under ``lease_id``, or raise ``Superseded``."""
    value = orjson.dumps(record.model_dump(mode="json"))
    while True:
        current = await store.get(key)
        if current is not None:
            held = record_epoch(current.value)
            if held > record.epoch:
                with contextlib.suppress(StoreError):
                    await store.revoke_lease(lease_id)
                raise Superseded(f"NVE {record.nve}: incarnation {held} is registered, "
                                 f"newer than this one ({record.epoch}); stopping")
            if held < record.epoch and current.lease and current.lease != lease_id:
                # The agents' resync brings back whatever still exists.
                with contextlib.suppress(StoreError):
                    await store.revoke_lease(current.lease)
                counters["predecessor_leases_revoked"] += 1
                continue  # the revoke deleted the record too: read again
        compare = (KeyMissing(key) if current is None
                   else ModRevisionEquals(key, current.mod_revision))
        try:
            result = await store.txn([compare], [Put(key, value, lease=lease_id)])
        except StoreUnavailable:
            # The answer was lost; it may have been applied. Read again: our own record
            # is then found and written once more (``ima/store.py:_ONCE``).
            counters["registration_retries"] += 1
            continue
        if result.succeeded:
            return
