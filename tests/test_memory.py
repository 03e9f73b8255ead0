"""Guest memory: layout, bounds checks (hypothesis), zero fill, scrub at teardown."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkhead.errors import GuestMemoryError
from bulkhead.memory import GuestMemory, ram_regions

MIB = 1 << 20
U64 = (1 << 64) - 1


def test_layout_small_guest_is_one_region() -> None:
    assert ram_regions(128 * MIB) == [(0, 128 * MIB)]


def test_layout_splits_around_the_mmio_hole() -> None:
    assert ram_regions(4096 * MIB) == [(0, 0xC000_0000), (0x1_0000_0000, 1 << 30)]


@pytest.mark.parametrize("size", [0, 1 * MIB, 128 * MIB + 1, 65 << 30])
def test_layout_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="guest memory"):
        ram_regions(size)


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    # Two regions with a hole between them, like a guest with more than 3 GiB (scaled down).
    m = GuestMemory([(0, 1 * MIB), (4 * MIB, 1 * MIB)])
    yield m
    m.close()


def test_fresh_memory_is_zero(mem: GuestMemory) -> None:
    assert mem.read(0, 4096) == bytes(4096)
    assert mem.read(4 * MIB + 12345, 100) == bytes(100)


def test_round_trip_and_typed_accessors(mem: GuestMemory) -> None:
    mem.write(0x1000, b"bulkhead")
    assert mem.read(0x1000, 8) == b"bulkhead"
    mem.write_u64(0x2000, U64)
    assert mem.read_u64(0x2000) == U64
    mem.write_u32(0x2000, 0x1_2345_6789)  # masked to 32 bits
    assert mem.read_u32(0x2000) == 0x2345_6789
    mem.write_u16(4 * MIB, 0xBEEF)
    assert mem.read_u16(4 * MIB) == 0xBEEF


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (1 * MIB - 4, 8),  # straddles the end of region 0
        (1 * MIB, 1),  # inside the hole
        (3 * MIB, 4096),  # inside the hole
        (5 * MIB - 1, 2),  # past the end of region 1
        (U64, 2),  # wraps around 2**64
        (U64 - 3, 8),
        (-1, 4),  # "negative" address
        (0, -1),  # "negative" length
        (1 << 64, 1),  # beyond u64
        (0, 1 << 64),
    ],
)
def test_out_of_bounds_accesses_raise_guest_memory_error(mem: GuestMemory, addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError, match="guest range"):
        mem.view(addr, length)
    assert mem.find(addr, length) is None


@given(
    addr=st.integers(min_value=-(1 << 65), max_value=1 << 65),
    length=st.integers(min_value=-(1 << 65), max_value=1 << 65),
)
def test_bounds_check_property(mem: GuestMemory, addr: int, length: int) -> None:
    """An access is allowed iff it lies wholly inside one region; then the view has exactly that length."""
    inside = any(addr >= 0 and length >= 0 and r.base <= addr and addr + length <= r.end for r in mem.regions)
    if inside:
        assert len(mem.view(addr, length)) == length
    else:
        with pytest.raises(GuestMemoryError, match="guest range"):
            mem.view(addr, length)


def test_close_scrubs_touched_pages_then_unmaps() -> None:
    m = GuestMemory([(0, 1 * MIB)])
    region = m.regions[0]
    m.write(0x3000, b"secret" * 100)
    addr = region.host_addr
    runs = list(region.resident_runs())
    assert any(off <= 0x3000 < off + n for off, n in runs)
    # Observe the scrub: wrap memset so we can see it zeroes the touched page before unmapping.
    seen: list[bytes] = []
    real_unmap = type(region).scrub_and_unmap

    def spy(self):  # type: ignore[no-untyped-def]
        orig = ctypes.memset

        def memset_then_read(dst, c, n):  # type: ignore[no-untyped-def]
            r = orig(dst, c, n)
            if dst <= addr + 0x3000 < dst + n:
                seen.append(ctypes.string_at(addr + 0x3000, 600))
            return r

        ctypes.memset = memset_then_read
        try:
            real_unmap(self)
        finally:
            ctypes.memset = orig

    type(region).scrub_and_unmap = spy  # type: ignore[method-assign]
    try:
        m.close()
    finally:
        type(region).scrub_and_unmap = real_unmap  # type: ignore[method-assign]
    assert seen == [bytes(600)]
    assert m.closed
    with pytest.raises(GuestMemoryError, match="guest memory is closed"):
        m.read(0x3000, 1)
    m.close()  # idempotent
