"""Counting the garbage collector's pauses in a service process, and shortening them.

A full collection walks every tracked object, so an NVE holding large tables
can stall its event loop; these counters (in ``nvo3 nve tables --json`` and
the metrics) say whether a latency tail coincides with such pauses.

``watch_gc`` is called once by a service process (``nvo3 nve run``) after its
imports and connections.  It also moves everything alive then (modules,
classes, pydantic schemas, gRPC and protobuf machinery: ~55 000 objects, 25-30
ms of every full collection) into the permanent generation with
``gc.freeze()``, so that full collections only walk what the service created
since, and lets full collections run at most once per ``FULL_EVERY`` gen1
collections instead of 10 (docs/performance.md, "Propagation tail:
attribution").  Set ``NVO3_GC_FREEZE=0`` to keep the interpreter's defaults.
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

#: Full collections at most once per this many gen1 collections (CPython's default: 10).
#: At 1 000 requests/s an NVE ran a gen1 collection about 7 times a second and a full
#: one every 1-2 s; with 100, every 10-15 s at that load.
FULL_EVERY = 100


def settle_heap(counters: Counter[str]) -> None:
    """Collect once, freeze what survives, and make full collections rarer.

    Later collections skip the frozen start-up heap.  Only for a process's start-up
    heap, which lives as long as the process: a frozen object that later becomes part
    of a garbage cycle is never reclaimed.  Cyclic garbage that reaches the oldest
    generation waits longer for a full collection (``FULL_EVERY``); what is freed
    without the collector (reference counts, i.e. nearly everything) is not affected."""
    gc.collect()
    gc.freeze()
    counters["gc_frozen_objects"] = gc.get_freeze_count()
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, FULL_EVERY))


def watch_gc(counters: Counter[str], freeze: bool | None = None
             ) -> Callable[[str, dict[str, Any]], None]:
    """Count collections, their total and longest pause (us), per generation.

    ``freeze`` (default: unless ``NVO3_GC_FREEZE=0``) also freezes the start-up heap
    and makes full collections rarer (``settle_heap``).  Returns the registered callback
    (``gc.callbacks.remove`` undoes the counting)."""
    started = [0]
    # Every key exists before the first collection. The callback runs wherever a
    # collection starts, which may be in the middle of code iterating ``counters``
    # (``NveService.snapshot`` sorting them): adding a key there raised "dictionary
    # changed size during iteration" and took the NVE down (chaos, nve_restart).
    for gen in range(3):
        for name in ("gc_collections", "gc_pause_us_total", "gc_pause_us_max"):
            counters[f"{name}.gen{gen}"] += 0

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter_ns()
            return
        pause_us = (time.perf_counter_ns() - started[0]) // 1000
        gen = info.get("generation", "?")
        counters[f"gc_collections.gen{gen}"] += 1
        counters[f"gc_pause_us_total.gen{gen}"] += pause_us
        if pause_us > counters[f"gc_pause_us_max.gen{gen}"]:
            counters[f"gc_pause_us_max.gen{gen}"] = pause_us

    gc.callbacks.append(callback)
    if freeze if freeze is not None else os.environ.get("NVO3_GC_FREEZE", "1") != "0":
        settle_heap(counters)
    return callback
