"""Event-loop lag: how late a task that only sleeps wakes up.

A task sleeps a fixed short interval and records the oversleep.  While the
loop runs one long synchronous step (a big decode, a garbage collection, a
table copy), or while the process waits for a CPU, every other task's turn
comes late by the same amount, so the oversleep is what a request arriving
then waits on top of its own work.  Each lag is split into the part spent in
garbage collections (from the counters ``nvo3.gc_watch`` keeps, when the
process registered it) and the rest, so a latency tail can be attributed:
GC pauses, our own long steps, or the OS not scheduling the process.

Lags of at least ``stall_ms`` are also kept one by one (``stalls``), with
their GC share and the CPU time the loop's thread got meanwhile: a stall the
thread spent on the CPU is our own work (a long step or a collection); one it
did not is the OS giving the CPU to someone else (or a blocking call).  They
are in ``loop_lag_ms`` of ``nvo3 nve tables --json``, slowest first.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any

#: The GC counters of ``nvo3.gc_watch`` whose sum is the process's total pause time.
_GC_TOTALS = tuple(f"gc_pause_us_total.gen{g}" for g in range(3))


class LoopLag:
    """Measures the event loop's lag; run ``run()`` as a task of the loop to watch."""

    def __init__(self, counters: Counter[str], interval_s: float = 0.005,
                 stall_ms: float = 10.0, keep: int = 20_000) -> None:
        self.interval_s = interval_s
        self.counters = counters
        self.stall_ns = int(stall_ms * 1e6)
        #: (woke_ns wall clock, lag_ns) per wake-up, the most recent ``keep``.
        self.samples: deque[tuple[int, int]] = deque(maxlen=keep)
        #: (woke_ns wall clock, lag_ns, gc_ns, cpu_ns) of each lag of at least
        #: ``stall_ms``; cpu_ns is the loop thread's CPU time over the whole sleep.
        self.stalls: deque[tuple[int, int, int, int]] = deque(maxlen=1_000)

    def _gc_us(self) -> int:
        counters = self.counters
        return sum(counters.get(name, 0) for name in _GC_TOTALS)

    async def run(self) -> None:
        interval_ns = int(self.interval_s * 1e9)
        counters, samples = self.counters, self.samples
        while True:
            before, gc_before = time.perf_counter_ns(), self._gc_us()
            cpu_before = time.thread_time_ns()
            await asyncio.sleep(self.interval_s)
            lag = max(0, time.perf_counter_ns() - before - interval_ns)
            woke = time.time_ns()
            samples.append((woke, lag))
            lag_us = lag // 1000
            counters["loop_lag_us_total"] += lag_us
            if lag_us > counters["loop_lag_us_max"]:
                counters["loop_lag_us_max"] = lag_us
            if lag >= self.stall_ns:
                gc_ns = (self._gc_us() - gc_before) * 1000
                self.stalls.append((woke, lag, gc_ns, time.thread_time_ns() - cpu_before))
                counters["loop_stalls"] += 1
                counters["loop_stall_us_total"] += lag_us
                counters["loop_stall_gc_us_total"] += gc_ns // 1000

    def summary(self, since_ns: int = 0, top: int = 10) -> dict[str, Any]:
        """Lag p50/p99/max (ms) since ``since_ns``, the share of wall time the loop was
        late, and the longest stalls: lag, its GC part, and the loop thread's CPU time
        over the sleep that ended in the stall (ms; the interval plus the lag, wall)."""
        lags = sorted(lag for at, lag in list(self.samples) if at > since_ns)
        if not lags:
            return {"n": 0}
        stalls = [s for s in list(self.stalls) if s[0] > since_ns]
        span_ns = len(lags) * int(self.interval_s * 1e9) + sum(lags)

        def at(q: float) -> float:
            return round(lags[min(len(lags) - 1, int(q * len(lags)))] / 1e6, 3)

        return {
            "n": len(lags), "p50": at(0.5), "p99": at(0.99), "max": round(lags[-1] / 1e6, 3),
            "late_share": round(sum(lags) / span_ns, 4),
            "stalls": len(stalls),
            "stall_ms_total": round(sum(s[1] for s in stalls) / 1e6, 1),
            "stall_gc_ms_total": round(sum(s[2] for s in stalls) / 1e6, 1),
            "stall_cpu_ms_total": round(sum(s[3] for s in stalls) / 1e6, 1),
            "interval_ms": self.interval_s * 1e3,
            "longest": [{"at_ns": w, "lag_ms": round(lag / 1e6, 2), "gc_ms": round(g / 1e6, 2),
                         "cpu_ms": round(c / 1e6, 2)}
                        for w, lag, g, c in sorted(stalls, key=lambda s: -s[1])[:top]],
        }
