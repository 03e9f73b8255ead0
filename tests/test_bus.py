"""The bus: overlap rejection, whole-range checks, containment of unclaimed accesses (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkhead.bus import Bus
from bulkhead.errors import ConfigError


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.calls.append(("r", offset, size, 0))
        return 0x1122334455667788

    def write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("w", offset, size, value))


def test_dispatch_by_offset() -> None:
    bus, dev = Bus.pio(), Recorder()
    bus.register(0x3F8, 8, dev, "com1")
    assert bus.read(0x3FD, 1) == 0x88  # masked to the access width
    bus.write(0x3F8, 1, 0x141)
    assert dev.calls == [("r", 5, 1, 0), ("w", 0, 1, 0x41)]


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F0, 0x100)])
def test_overlapping_registrations_are_rejected(base: int, length: int) -> None:
    bus = Bus.pio()
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register(base, length, Recorder(), "other")


@pytest.mark.parametrize(("base", "length"), [(0, 0), (-1, 2), (0xFFFF, 2), (0x10000, 1)])
def test_invalid_ranges_are_rejected(base: int, length: int) -> None:
    with pytest.raises(ConfigError):
        Bus.pio().register(base, length, Recorder(), "x")


def test_access_straddling_the_end_of_a_range_is_unclaimed() -> None:
    bus, dev = Bus.pio(), Recorder()
    bus.register(0xF4, 4, dev, "debug-exit")
    assert bus.read(0xF6, 4) == 0xFFFF_FFFF  # [0xf6, 0xfa) leaves the range
    bus.write(0xF7, 2, 1)
    assert dev.calls == []
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (1, 1)


def test_bad_access_sizes_are_contained() -> None:
    bus, dev = Bus.pio(), Recorder()
    bus.register(0, 0x100, dev, "x")
    assert bus.read(0, 8) == (1 << 64) - 1  # PIO has no 8-byte accesses
    bus.write(0, 3, 0)
    assert dev.calls == [] and bus.bad_size == 2


@given(
    ranges=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 0x40)), max_size=20),
    accesses=st.lists(st.tuples(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4])), max_size=50),
)
def test_devices_only_ever_see_offsets_inside_their_range(
    ranges: list[tuple[int, int]], accesses: list[tuple[int, int]]
) -> None:
    bus = Bus.pio()
    devs: list[tuple[int, int, Recorder]] = []
    for base, length in ranges:
        dev = Recorder()
        try:
            bus.register(base, length, dev, f"d{base:x}")
        except ConfigError:
            assert base + length > 0x10000 or any(b < base + length and base < b + n for b, n, _ in devs)
            continue
        devs.append((base, length, dev))
    for addr, size in accesses:
        bus.read(addr, size)
        bus.write(addr, size, 0xFFFFFFFF)
    for _, length, dev in devs:
        for _, off, size, _ in dev.calls:
            assert off >= 0 and off + size <= length
