"""Per-hypervisor token buckets, so one flooding hypervisor cannot starve others [5].

Pure: the caller passes the time.  Each sender gets ``rate`` requests per
second with bursts up to ``burst``; a request over its share is refused
(``rate_limited``) and counted, never queued without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RateLimiter:
    rate: float  # tokens per second; 0 disables limiting
    burst: float
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # sender -> (tokens, t)

    def allow(self, sender: str, now_s: float) -> bool:
        if self.rate <= 0:
            return True
        tokens, last = self._buckets.get(sender, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - last) * self.rate)
        if tokens < 1.0:
            self._buckets[sender] = (tokens, now_s)
            return False
        self._buckets[sender] = (tokens - 1.0, now_s)
        return True
