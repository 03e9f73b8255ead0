"""A fake interrupt line that counts edges (implements `bulkhead.devices.IrqLine`)."""

from __future__ import annotations

import threading

__all__ = ["FakeIrq"]


class FakeIrq:
    """Counts `trigger()` calls; thread-safe. `take()` returns the count since the last `take()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._taken = 0

    def trigger(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        """Total edges since construction."""
        with self._lock:
            return self._count

    def take(self) -> int:
        """Edges since the previous `take()` (or construction)."""
        with self._lock:
            n = self._count - self._taken
            self._taken = self._count
            return n
