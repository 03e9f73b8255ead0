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
    with pytest.raises(ConfigError, match="pio range"):
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


# --- mutation-testing survivors (issue 15): both address spaces' limits and widths, exact boundaries ----

class Ones(Recorder):
    def read(self, offset: int, size: int) -> int:
        super().read(offset, size)
        return (1 << 128) - 1  # wider than any access: the bus must mask


def test_pio_and_mmio_spaces_known_answers() -> None:
    pio, mmio = Bus.pio(), Bus.mmio()
    assert (pio.name, pio.limit, pio.sizes) == ("pio", 0x10000, frozenset({1, 2, 4}))
    assert (mmio.name, mmio.limit, mmio.sizes) == ("mmio", 1 << 64, frozenset({1, 2, 4, 8}))
    # a range may end exactly at the end of the space, not one past it
    pio.register(0xFFFF, 1, Recorder(), "last-port")
    mmio.register((1 << 64) - 8, 8, Recorder(), "last-qword")
    with pytest.raises(ConfigError, match=r"mmio range \[0xfffffffffffffff8, \+0x9\) for x is invalid"):
        Bus.mmio().register((1 << 64) - 8, 9, Recorder(), "x")
    dev = Ones()
    mmio.register(0xD000_0000, 0x200, dev, "virtio")
    assert mmio.read(0xD000_0000, 8) == (1 << 64) - 1 and dev.calls == [("r", 0, 8, 0)]
    assert pio.read(0, 8) == (1 << 64) - 1 and pio.bad_size == 1  # 8 bytes is no PIO width


def test_adjacent_ranges_in_both_orders_and_the_returned_range() -> None:
    for order in ((0x10, 0x20), (0x20, 0x10)):
        bus = Bus.pio()
        got = [bus.register(b, 0x10, Recorder(), f"r{b:x}") for b in order]
        assert [(r.base, r.length, r.name, r.end) for r in got] == [(b, 0x10, f"r{b:x}", b + 0x10) for b in order]
        assert [r.base for r in bus.ranges] == [0x10, 0x20]  # kept sorted
    with pytest.raises(ConfigError, match="overlaps r10"):
        bus.register(0x1F, 1, Recorder(), "x")  # names the range it hit, not a neighbour
    with pytest.raises(ConfigError, match="overlaps r20"):
        bus.register(0x20, 1, Recorder(), "x")


def test_access_ending_exactly_at_the_end_of_a_range_is_claimed() -> None:
    bus, dev = Bus.pio(), Ones()
    bus.register(0xF4, 4, dev, "debug-exit")
    assert bus.read(0xF4, 4) == 0xFFFF_FFFF and bus.read(0xF7, 1) == 0xFF and bus.read(0xF6, 2) == 0xFFFF
    assert bus.unclaimed_reads == 0 and [c[1:3] for c in dev.calls] == [(0, 4), (3, 1), (2, 2)]
    bus.write(0xF6, 2, 0x1_2345)
    assert dev.calls[-1] == ("w", 2, 2, 0x2345)


def test_unclaimed_reads_are_all_ones_of_their_width_and_nonsense_widths_read_zero() -> None:
    bus = Bus.mmio()
    assert [bus.read(0x1000, s) for s in (1, 2, 4, 8)] == [0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1]
    assert [bus.read(0x1000, s) for s in (0, 3, 9, 16)] == [0, 0xFF_FFFF, 0, 0]
    assert bus.unclaimed_reads == 8 and bus.bad_size == 4
