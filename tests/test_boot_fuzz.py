"""Property tests: the image parsers and load_kernel fed random and mutated images.

Only ImageError may escape (never IndexError, struct.error, OverflowError, GuestMemoryError, ...),
and whenever an image is accepted, what it produced respects the memory layout.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.boot import load_kernel
from bulkhead.boot.bzimage import parse_bzimage
from bulkhead.boot.craft import make_bzimage, make_elf
from bulkhead.boot.elf import parse_elf
from bulkhead.boot.pvh import find_pvh_entry
from bulkhead.errors import ImageError
from bulkhead.memory import GuestMemory
from bulkhead.memory.layout import HIMEM_START

MIB = 1 << 20
SEEDS = [
    make_bzimage(b"\x90" * 200, init_size=0x10000),
    make_bzimage(b"\x90" * 64, relocatable=True, pref_address=0x200000, payload=(0x200, 0x40)),
    make_elf([(0x100000, b"\x90" * 128, 0x2000), (0x300000, b"data", 0x100)], 0x100000),
    make_elf([(0x100000, b"\x90" * 128, 0x1000)], 0x100000, pvh_entry=0x100010),
    make_elf([(0x100000, b"\x90" * 128, 0x1000)], 0x100000, elf_class=32, pvh_entry=0x100010),
]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
               1 << 32, (1 << 63), (1 << 64) - 1, 0x100000, 0x9FC00, 0xFFFF_F000]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 4))
        # bias positions towards the headers, where the parsers look
        hi = min(len(data), draw(st.sampled_from([0x80, 0x300, len(data)])))
        if hi <= 8:
            break
        pos = draw(st.integers(0, hi - 8))
        if kind == 0:
            data[pos] = draw(st.integers(0, 255))
        elif kind == 1:
            struct.pack_into("<I", data, pos, draw(st.sampled_from(INTERESTING)) & 0xFFFF_FFFF)
        elif kind == 2:
            struct.pack_into("<Q", data, pos, draw(st.sampled_from(INTERESTING)))
        elif kind == 3:
            del data[draw(st.integers(len(data) // 2, len(data))) :]
        else:
            data[pos:pos] = draw(st.binary(max_size=16))
    if draw(st.booleans()):  # keep the magic numbers most of the time, so the deep checks run
        for off, n in ((0, 4), (0x1FE, 2), (0x202, 4)):
            if len(data) >= off + n:
                data[off : off + n] = seed[off : off + n]
    return bytes(data)


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.for_size(16 * MIB)
    yield m
    m.close()


def _parse_all(data: bytes) -> None:
    for parse in (parse_bzimage, parse_elf):
        try:
            img = parse(data)
        except ImageError:
            continue
        if parse is parse_elf:
            try:
                find_pvh_entry(img)  # type: ignore[arg-type]
            except ImageError:
                pass


def _check_load(mem: GuestMemory, data: bytes, initrd: bytes | None, protocol: str) -> None:
    try:
        plan = load_kernel(mem, data, initrd=initrd, cmdline="console=ttyS0", cpus=2, protocol=protocol)
    except ImageError:
        return
    k0, k1 = plan.kernel_range
    assert 0 <= k0 <= k1 <= 16 * MIB
    if k0 >= HIMEM_START or plan.protocol == "linux-bzimage":  # one contiguous range: no structure inside
        assert not any(k0 < e and s < k1 for _, s, e in plan.structures), (k0, k1, plan.structures)
    if plan.initrd_range is not None:
        i0, i1 = plan.initrd_range
        assert k1 <= i0 < i1 <= 16 * MIB and i0 % 4096 == 0
        assert not any(i0 < e and s < i1 for _, s, e in plan.structures)
    assert plan.rip < 1 << 32
    assert (plan.protocol == "pvh") == (not plan.long_mode)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_only_image_error(data: bytes) -> None:
    _parse_all(data)


@SETTINGS
@given(mutated())
def test_mutated_images_parsers(data: bytes) -> None:
    _parse_all(data)


@SETTINGS
@given(mutated(), st.sampled_from(["auto", "pvh", "linux"]), st.sampled_from([None, b"I" * 3000]))
def test_mutated_images_load_kernel(mem: GuestMemory, data: bytes, protocol: str, initrd: bytes | None) -> None:
    _check_load(mem, data, initrd, protocol)


@SETTINGS
@given(st.binary(max_size=2048).map(lambda b: b"\x7fELF" + b))
def test_random_elf_like_bytes(mem: GuestMemory, data: bytes) -> None:
    _parse_all(data)
    _check_load(mem, data, None, "auto")


@SETTINGS
@given(st.binary(min_size=0x300, max_size=0x1400))
def test_random_bzimage_like_bytes(mem: GuestMemory, data: bytes) -> None:
    b = bytearray(data)
    struct.pack_into("<H", b, 0x1FE, 0xAA55)
    struct.pack_into("<I", b, 0x202, 0x53726448)
    _parse_all(bytes(b))
    _check_load(mem, bytes(b), None, "auto")


def test_seeds_are_valid(mem: GuestMemory) -> None:
    for seed in SEEDS:
        load_kernel(mem, seed, initrd=None, cmdline="", cpus=1)
