"""The boot loader (docs/GUEST_KERNEL.md loader table; Linux boot.rst; PVH start_info.h) at its exact
limits (issue 15 mutation survivors): the initrd placed exactly at initrd_addr_max and exactly at the
kernel's end, kernels ending exactly at the end of RAM and exactly at a boot structure, ranges at the
edges of the 32-bit MMIO hole and of a RAM region above 4 GiB, the longest command line of each
protocol, MAX_CPUS, and the zero-fill after a kernel stopping where it should."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from bulkhead.boot import layout as L
from bulkhead.boot import load_kernel
from bulkhead.boot.craft import make_bzimage, make_elf
from bulkhead.boot.loader import CMDLINE_LIMIT_LINUX_ELF, CMDLINE_LIMIT_PVH, MAX_CPUS
from bulkhead.errors import ConfigError, ImageError
from bulkhead.memory import GuestMemory

MIB = 1 << 20
GIB = 1 << 30
CODE = b"\x90" * 0x40


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.for_size(64 * MIB)
    yield m
    m.close()


def bz(**kw) -> bytes:  # type: ignore[no-untyped-def]
    return make_bzimage(CODE, **{"pref_address": 0x200000, "init_size": 0x40000, **kw})


def load(mem: GuestMemory, kernel: bytes, **kw):  # type: ignore[no-untyped-def]
    return load_kernel(mem, kernel, **{"initrd": None, "cmdline": "console=ttyS0", "cpus": 1, **kw})


# ---------------------------------------------------------------- initrd placement


@pytest.mark.parametrize(("size", "want"), [(0x1000, (0x1FFF000, 0x2000000)), (0x1001, (0x1FFE000, 0x1FFF001))])
def test_initrd_ends_at_most_at_initrd_addr_max_page_aligned(mem, size, want):
    plan = load(mem, bz(initrd_addr_max=0x1FF_FFFF), initrd=b"I" * size)
    assert plan.initrd_range == want
    assert mem.read(want[0], size) == b"I" * size


def test_initrd_may_start_exactly_at_the_kernel_end(mem):
    img = bz(initrd_addr_max=0x240000 + 0x1000 - 1)  # the kernel is [0x200000, 0x240000)
    assert load(mem, img, initrd=b"I" * 0x1000).initrd_range == (0x240000, 0x241000)
    with pytest.raises(ImageError, match=r"the initrd \(4097 bytes\) does not fit between the kernel"):
        load(mem, img, initrd=b"I" * 0x1001)


# ---------------------------------------------------------------- kernels at the edges of RAM


def test_a_bzimage_may_end_exactly_at_the_end_of_low_ram():
    with GuestMemory.for_size(16 * MIB) as m:
        img = bz(pref_address=0xF00000, init_size=0x100000)
        plan = load(m, img)
        assert plan.kernel_range == (0xF00000, 0x1000000)
        with pytest.raises(ImageError, match=r"bzImage needs \[0xf01000, 0x1001000\)"):
            load(m, bz(pref_address=0xF01000, init_size=0x100000))


def test_the_zero_fill_after_a_kernel_stops_at_memory_needed(mem):
    marker = b"KEEP" * 4
    mem.write(0x240000, marker)  # just past [0x200000, 0x240000)
    mem.write(0x300000, marker)
    load(mem, bz())
    assert mem.read(0x200000 + 0x240, 0x40000 - 0x240) == bytes(0x40000 - 0x240)  # bss zeroed
    assert mem.read(0x240000, 16) == marker
    elf = make_elf([(0x200000, CODE, 0x100000)], 0x200000)  # filesz 0x40, memsz 1 MiB
    mem.write(0x300000, marker)
    load(mem, elf)
    assert mem.read(0x300000, 16) == marker


def test_elf_segments_at_the_edges_of_the_mmio_hole_and_of_ram_above_4_gib():
    with GuestMemory([(0, 16 * MIB), (4 * GIB, 16 * MIB)]) as m:
        def elf_at(paddr: int, size: int = 0x1000) -> bytes:
            return make_elf([(paddr, CODE, size)], paddr)

        cases = [
            (0xBFFFF000, "is not inside guest RAM (guest RAM ends at 0x101000000)"),  # ends at the hole
            (0xC0000000 - 0x800, "overlaps the 32-bit MMIO hole"),
            (0xFFFFF000, "overlaps the 32-bit MMIO hole"),
            (0x2000000, "is not inside guest RAM (guest RAM ends at 0x101000000)"),
        ]
        for paddr, why in cases:
            with pytest.raises(ImageError, match=f"ELF segment \\[{paddr:#x}, .*{why.replace('(', '.').replace(')', '.')}"):
                load(m, elf_at(paddr))
        for paddr in (4 * GIB, 4 * GIB + 16 * MIB - 0x1000):  # inside the high region: only the 4 GiB rule
            with pytest.raises(ImageError, match="above the identity-mapped 4 GiB"):
                load(m, elf_at(paddr))
        assert load(m, elf_at(16 * MIB - 0x1000)).kernel_range == (16 * MIB - 0x1000, 16 * MIB)


def test_a_kernel_may_end_exactly_where_a_boot_structure_starts(mem):
    cmd, tables = L.slot("command line"), L.slot("page tables")
    below = make_elf([(cmd.start - 0x1000, CODE, 0x1000)], cmd.start - 0x1000)  # ends where it starts
    assert load(mem, below).kernel_range == (cmd.start - 0x1000, cmd.start)
    above = make_elf([(tables.end, CODE, 0x1000)], tables.end)  # starts where the page tables end
    assert load(mem, above).kernel_range == (tables.end, tables.end + 0x1000)
    with pytest.raises(ImageError, match=r"ELF segment \[0x1f000, 0x20001\) overlaps the command line"):
        load(mem, make_elf([(cmd.start - 0x1000, CODE, 0x1001)], cmd.start - 0x1000))
    with pytest.raises(ImageError, match=r"bzImage kernel \(load address \+ init_size\) .* overlaps the"):
        load(mem, bz(pref_address=0x20000))


# ---------------------------------------------------------------- command lines and vCPUs


def test_the_longest_command_line_of_each_protocol(mem):
    bzl = L.CMDLINE_MAX - 1
    assert load(mem, bz(cmdline_size=0xFFFF_FFFF), cmdline="x" * bzl).cmdline == "x" * bzl
    with pytest.raises(ConfigError, match=f"is {bzl + 1} bytes; this bzImage accepts at most {bzl}"):
        load(mem, bz(cmdline_size=0xFFFF_FFFF), cmdline="x" * (bzl + 1))
    # the bzImage's own limit: the image does not fit this command line (ImageError, as a fuzzed image
    # found: cmdline_size 1 made the loader raise a plain ConfigError)
    with pytest.raises(ImageError, match="is 13 bytes; this bzImage accepts at most 1"):
        load(mem, bz(cmdline_size=1), cmdline="console=ttyS0")
    elf = make_elf([(0x200000, CODE, 0x1000)], 0x200000)
    assert load(mem, elf, cmdline="y" * CMDLINE_LIMIT_LINUX_ELF).cmdline == "y" * CMDLINE_LIMIT_LINUX_ELF
    with pytest.raises(ConfigError, match=f"the Linux ELF boot path accepts at most {CMDLINE_LIMIT_LINUX_ELF}"):
        load(mem, elf, cmdline="y" * (CMDLINE_LIMIT_LINUX_ELF + 1))
    pvh = make_elf([(0x200000, CODE, 0x1000)], 0x200000, pvh_entry=0x200000)
    assert load(mem, pvh, cmdline="z" * CMDLINE_LIMIT_PVH).cmdline == "z" * CMDLINE_LIMIT_PVH
    with pytest.raises(ConfigError, match=f"the PVH boot protocol accepts at most {CMDLINE_LIMIT_PVH}"):
        load(mem, pvh, cmdline="z" * (CMDLINE_LIMIT_PVH + 1))
    with pytest.raises(ImageError, match="PVH entry point 0x300000 is not inside"):
        load(mem, make_elf([(0x200000, CODE, 0x1000)], 0x200000, pvh_entry=0x300000))


def test_max_cpus_is_accepted(mem):
    assert load(mem, bz(), cpus=MAX_CPUS).cpus == MAX_CPUS


# ---------------------------------------------------------------- what is written


def test_boot_structures_and_registers_known_answers(mem):
    plan = load(mem, bz())
    got = {name: (a, b) for name, a, b in plan.structures}
    assert got["IDT"] == (L.slot("IDT").start, L.slot("IDT").end)
    assert got["boot stack"] == (0x8000, 0x9000)
    assert struct.unpack_from("<I", mem.read(L.ZERO_PAGE_START + 0x214, 4))[0] == 0x200000  # code32_start
    mem.write(L.ZERO_PAGE_START, bytes(0x1000))
    load(mem, make_elf([(0x200000, CODE, 0x1000)], 0x200000))
    assert struct.unpack_from("<I", mem.read(L.ZERO_PAGE_START + 0x214, 4))[0] == 0  # no setup header: 0
    pvh = load(mem, make_elf([(0x200000, CODE, 0x1000)], 0x200000, pvh_entry=0x200000))
    assert (pvh.protocol, pvh.cr3, pvh.cr4, pvh.efer) == ("pvh", 0, 0, 0)
    magic, version, flags, nr_modules, modlist = struct.unpack_from("<IIIIQ", mem.read(L.START_INFO_START, 24))
    assert (magic, version, flags, nr_modules, modlist) == (0x336EC578, 1, 0, 0, 0)
