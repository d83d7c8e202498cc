"""Counting the garbage collector's pauses in a service process.

A full collection walks every tracked object, so an NVE holding large tables
can stall its event loop; these counters (in ``nvo3 nve tables --json`` and
the metrics) say whether a latency tail coincides with such pauses.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable
from typing import Any


def watch_gc(counters: Counter[str]) -> Callable[[str, dict[str, Any]], None]:
    """Count collections, their total and longest pause (us), per generation.

    Returns the registered callback (``gc.callbacks.remove`` undoes it)."""
    started = [0]

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
    return callback
