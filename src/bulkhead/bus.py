"""Port-I/O and MMIO range registry (pure). Devices see offsets into their own range, never addresses.

The bus rejects overlapping registrations and checks the whole access [addr, addr + size) against a
single range, so a device can never be handed an offset outside the range it claimed (the crosvm
`bus.rs` counter-example looked devices up by base address only). Accesses nobody claims are
contained: reads return all ones, writes are dropped, both are counted.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple, Protocol

from bulkhead.errors import ConfigError

__all__ = ["Bus", "BusDevice", "BusRange"]


class BusDevice(Protocol):
    """A register-level device: sees offsets inside its range and access sizes in bytes."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusRange(NamedTuple):
    base: int
    length: int
    name: str
    device: BusDevice

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """One address space (`pio`: 16-bit ports, `mmio`: 64-bit physical addresses)."""

    def __init__(self, name: str, limit: int, sizes: tuple[int, ...]) -> None:
        self.name = name
        self.limit = limit
        self.sizes = frozenset(sizes)
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.bad_size = 0

    @classmethod
    def pio(cls) -> Bus:
        return cls("pio", 1 << 16, (1, 2, 4))

    @classmethod
    def mmio(cls) -> Bus:
        return cls("mmio", 1 << 64, (1, 2, 4, 8))

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return tuple(self._ranges)

    def register(self, base: int, length: int, device: BusDevice, name: str) -> BusRange:
        """Claim [base, base+length) for `device`. Raises ConfigError on overlap or a bad range."""
        if length <= 0 or base < 0 or base + length > self.limit:
            raise ConfigError(f"{self.name} range [{base:#x}, +{length:#x}) for {name} is invalid")
        i = bisect.bisect_right(self._bases, base)
        if i > 0 and self._ranges[i - 1].end > base:
            other = self._ranges[i - 1]
            raise ConfigError(f"{self.name} range for {name} at {base:#x} overlaps {other.name} at {other.base:#x}")
        if i < len(self._ranges) and base + length > self._ranges[i].base:
            other = self._ranges[i]
            raise ConfigError(f"{self.name} range for {name} at {base:#x} overlaps {other.name} at {other.base:#x}")
        rng = BusRange(base, length, name, device)
        self._bases.insert(i, base)
        self._ranges.insert(i, rng)
        return rng

    def find(self, addr: int, size: int) -> tuple[BusRange, int] | None:
        """The range holding all of [addr, addr+size) and the offset into it, or None."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        rng = self._ranges[i]
        off = addr - rng.base
        if off + size > rng.length:
            return None
        return rng, off

    def read(self, addr: int, size: int) -> int:
        """Dispatch a read; unclaimed or badly sized accesses read as all ones."""
        hit = self.find(addr, size) if size in self.sizes else None
        if hit is None:
            if size not in self.sizes:
                self.bad_size += 1
            self.unclaimed_reads += 1
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
        rng, off = hit
        return rng.device.read(off, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        """Dispatch a write; unclaimed or badly sized accesses are dropped and counted."""
        hit = self.find(addr, size) if size in self.sizes else None
        if hit is None:
            if size not in self.sizes:
                self.bad_size += 1
            self.unclaimed_writes += 1
            return
        rng, off = hit
        rng.device.write(off, size, value & ((1 << (8 * size)) - 1))
