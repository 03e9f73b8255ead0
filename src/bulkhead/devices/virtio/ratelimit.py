"""Token-bucket rate limiting for device I/O (pure; the clock is injected).

Each bucket refills continuously at `rate` tokens per second up to `capacity` (one second's worth by
default). A request of `cost` tokens is admitted when the bucket holds at least min(cost, capacity)
tokens; the bucket may then go negative, so requests larger than the burst still pass and the
long-run rate stays exact. A throttled caller asks `wait()` how long until the request would pass and
arms a timer; nothing here sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RateLimiter", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """One bucket. `rate` <= 0 means unlimited."""

    def __init__(self, rate: int, clock: Clock, capacity: float | None = None) -> None:
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else rate)
        self.clock = clock
        self.tokens = self.capacity
        self.stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self) -> None:
        now = self.clock()
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def can(self, cost: float) -> bool:
        if self.unlimited:
            return True
        self._refill()
        return self.tokens >= min(cost, self.capacity)

    def take(self, cost: float) -> None:
        if not self.unlimited:
            self._refill()
            self.tokens -= cost

    def wait(self, cost: float) -> float:
        """Seconds until `can(cost)` becomes true (0 if it is already)."""
        if self.unlimited:
            return 0.0
        self._refill()
        need = min(cost, self.capacity) - self.tokens
        return max(0.0, need / self.rate)


class RateLimiter:
    """Bytes/s and ops/s buckets for one device (0 = unlimited); both must admit a request.
    Build it from a `RateLimit` config with `RateLimiter(r.bytes_per_sec, r.ops_per_sec)`."""

    def __init__(self, bytes_per_sec: int = 0, ops_per_sec: int = 0, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.bytes = TokenBucket(bytes_per_sec, clock)
        self.ops = TokenBucket(ops_per_sec, clock)
        self.throttled = 0
        self._deadline: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.bytes.unlimited and self.ops.unlimited

    def try_consume(self, nbytes: int, nops: int = 1) -> bool:
        """Admit and charge a request, or refuse it and remember when to retry."""
        if self.unlimited:
            return True
        if self.bytes.can(nbytes) and self.ops.can(nops):
            self.bytes.take(nbytes)
            self.ops.take(nops)
            self._deadline = None
            return True
        self.throttled += 1
        self._deadline = self.clock() + max(self.bytes.wait(nbytes), self.ops.wait(nops), 1e-4)
        return False

    def charge(self, nbytes: int) -> None:
        """Charge bytes after the fact (RX: the frame size is known only once it is read)."""
        self.bytes.take(nbytes)

    @property
    def deadline(self) -> float | None:
        """When a refused request should be retried, or None if nothing is waiting."""
        return self._deadline

    def clear(self) -> None:
        self._deadline = None
