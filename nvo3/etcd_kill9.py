"""Does this etcd keep its members identical when the leader is killed under load?

A 3-member cluster of the etcd on PATH (the venv's first), 8 writers putting and
deleting keys, one ``PrefixWatch`` following them, and the leader killed and
restarted ``--kills`` times. Then the writes stop and two things are compared:

* every member, read on its own (``nvo3.etcd_members``): same revision, same keys;
* the events the watch delivered through the kills, against a fresh watch of the
  same revisions afterwards: every revision once, in order, naming the same write.

etcd 3.5.0-3.5.2 can fail both (etcd-io/etcd#13766): a member killed while applying
may skip an entry for good, and from there every revision of it names another write
than on its peers. nvo3's chaos run relies on etcd not doing that, which is why it
does not kill members of those versions with kill -9 (docs/reliability.md). Usage:

    python -m nvo3.etcd_kill9 --runs 10 --kills 30 [--signal term]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from dataclasses import dataclass

from ima.store import EtcdStore, StoreError
from nvo3.etcd_members import members_disagree
from nvo3.servers import EtcdCluster

PREFIX = "/etcd-kill9/"


@dataclass
class RunResult:
    revisions: int
    members: list[str]  # what the members disagree on (empty: nothing)
    watch_missing: int  # (revision, key, kind) the fresh watch has and the old one lacks
    watch_extra: int

    @property
    def ok(self) -> bool:
        return not (self.members or self.watch_missing or self.watch_extra)


Event = tuple[int, str, str]


async def _writer(store: EtcdStore, seed: int, stop: asyncio.Event) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        key = f"{PREFIX}{rng.randrange(300)}"
        try:
            if rng.random() < 0.7:
                await store.put(key, b"v")
            else:
                await store.delete(key)
        except StoreError:
            await asyncio.sleep(0.05)


async def _follow(store: EtcdStore, start: int, into: list[Event]) -> None:
    async with store.watch_prefix(PREFIX, start) as watch:
        async for batch in watch:
            into.extend((e.mod_revision, e.key, e.kind) for e in batch)


async def _history(store: EtcdStore, start: int, end: int) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(60), store.watch_prefix(PREFIX, start) as watch:
        async for batch in watch:
            out.extend((e.mod_revision, e.key, e.kind) for e in batch)
            if out[-1][0] >= end:
                break
    return out


async def one_run(kills: int, sigkill: bool, seed: int) -> RunResult:
    cluster = EtcdCluster(3)
    await asyncio.to_thread(cluster.start)
    try:
        async with (EtcdStore(cluster.endpoints, timeout=10.0) as store,
                    EtcdStore(cluster.endpoints, timeout=10.0) as watching):
            start = await store.current_revision() + 1
            seen: list[Event] = []
            stop = asyncio.Event()
            follower = asyncio.create_task(_follow(watching, start, seen))
            writers = [asyncio.create_task(_writer(store, seed * 100 + i, stop))
                       for i in range(8)]
            rng = random.Random(seed)
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                leader = next((m for m in cluster.members if m.is_leader()), None)
                if leader is None:
                    continue
                await asyncio.to_thread(leader.kill if sigkill else leader.stop)
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                await asyncio.to_thread(leader.restart)
            stop.set()
            await asyncio.gather(*writers)
            end = await store.current_revision()
            for _ in range(100):  # the follower catches up
                if seen and seen[-1][0] >= end:
                    break
                await asyncio.sleep(0.1)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError, RuntimeError):
                await follower
            truth = await _history(store, start, end)
            found = await members_disagree([(m.name, m.client_url) for m in cluster.members],
                                           PREFIX)
            got, want = set(seen), set(truth)
            return RunResult(end - start + 1, found, len(want - got), len(got - want))
    finally:
        await asyncio.to_thread(cluster.stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvo3.etcd_kill9", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kills", type=int, default=30, help="leader kills per run")
    parser.add_argument("--signal", choices=("kill", "term"), default="kill")
    args = parser.parse_args(argv)
    bad = 0
    for run in range(1, args.runs + 1):
        result = asyncio.run(one_run(args.kills, args.signal == "kill", run))
        bad += not result.ok
        print(f"run {run}: {result.revisions} revisions, watch missing {result.watch_missing} "
              f"extra {result.watch_extra}; members "
              f"{'agree' if not result.members else '; '.join(result.members)}", flush=True)
    print(f"{bad} of {args.runs} runs with members or watches out of step "
          f"(leader killed with SIG{args.signal.upper()}, {args.kills} times per run)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
