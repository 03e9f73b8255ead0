"""load_kernel: protocol selection, what lands in guest memory, the BootPlan, and rejections."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import pytest

from bulkhead.boot import BootPlan, load_kernel
from bulkhead.boot import layout as L
from bulkhead.boot.craft import make_bzimage, make_elf
from bulkhead.boot.params import E820Entry
from bulkhead.errors import ConfigError, ImageError
from bulkhead.memory import GuestMemory

MIB = 1 << 20
GIB = 1 << 30
PAYLOAD = bytes(range(256)) * 4


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.for_size(64 * MIB)
    yield m
    m.close()


def digest(m: GuestMemory) -> str:
    h = hashlib.sha256()
    for r in m.regions:
        h.update(m.read(r.base, r.size))
    return h.hexdigest()


def cstr(m: GuestMemory, addr: int, maxlen: int = 8192) -> bytes:
    raw = m.read(addr, maxlen)
    return raw[: raw.index(b"\0")]


def test_bootplan_fields_are_the_runtime_contract() -> None:
    assert list(BootPlan._fields) == [
        "protocol", "long_mode", "rip", "rsp", "rsi", "rbx", "rflags", "cr0", "cr3", "cr4", "efer",
        "gdt", "idt", "cs", "ds", "es", "fs", "gs", "ss", "tr", "kernel_range", "initrd_range",
        "cmdline", "e820", "boot_info", "mptable", "cpus", "acpi_rsdp", "structures",
    ]


def test_bzimage_boot(mem: GuestMemory) -> None:
    img = make_bzimage(PAYLOAD, pref_address=0x200000, init_size=0x40000, initrd_addr_max=0x1FF_FFFF)
    initrd = b"INITRD" * 1000
    plan = load_kernel(mem, img, initrd=initrd, cmdline="console=ttyS0 earlyprintk=serial", cpus=2)
    assert plan.protocol == "linux-bzimage"
    assert plan.long_mode
    assert plan.rip == 0x200200
    assert mem.read(0x200200, len(PAYLOAD)) == PAYLOAD
    assert mem.read(0x200000, 0x200) == b"\xf4" * 0x200
    assert plan.kernel_range == (0x200000, 0x240000)
    # registers for the 64-bit boot protocol
    assert plan.rsi == L.ZERO_PAGE_START and plan.rbx == 0
    assert plan.cr0 & 0x8000_0001 == 0x8000_0001  # PG | PE
    assert plan.cr4 & 0x20  # PAE
    assert plan.efer & 0x500 == 0x500  # LME | LMA
    assert plan.cr3 == L.PML4_START
    assert plan.rflags == 2
    assert plan.cs.selector == 0x10 and plan.cs.l == 1
    assert plan.ds.selector == plan.ss.selector == plan.es.selector == 0x18
    assert plan.gdt == (L.GDT_START, 8 * L.GDT_ENTRIES - 1)
    assert plan.rsp == L.BOOT_STACK_POINTER
    # initrd: page aligned, at the top below initrd_addr_max + 1 (32 MiB here, below 64 MiB of RAM)
    start, end = plan.initrd_range or (0, 0)
    assert start % 4096 == 0 and end == start + len(initrd)
    assert end <= 0x200_0000 and 0x200_0000 - end < 4096
    assert mem.read(start, len(initrd)) == initrd
    # zero page as the kernel reads it
    zp = L.ZERO_PAGE_START
    assert mem.read_u16(zp + 0x1FE) == 0xAA55
    assert mem.read_u32(zp + 0x202) == 0x53726448
    assert mem.read_u8(zp + 0x210) == 0xFF
    assert cstr(mem, mem.read_u32(zp + 0x228)) == b"console=ttyS0 earlyprintk=serial"
    assert (mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)) == (start, len(initrd))
    n = mem.read_u8(zp + 0x1E8)
    table = [E820Entry(*struct.unpack("<QQI", mem.read(zp + 0x2D0 + 20 * i, 20))) for i in range(n)]
    assert tuple(table) == plan.e820
    assert table[-1] == E820Entry(MIB, 63 * MIB, 1)
    # structures the runtime points the CPU at
    assert mem.read_u64(L.GDT_START + 0x10) == 0x00AF9B000000FFFF
    assert mem.read_u64(L.PML4_START) == L.PDPTE_START | 3
    assert mem.read(L.MPTABLE_START, 4) == b"_MP_"
    assert plan.cpus == 2


def test_linux_elf_boot_zero_fills_bss(mem: GuestMemory) -> None:
    mem.fill(0x100000, 0x10000, 0xCC)  # dirty memory: bss must come back zeroed
    img = make_elf([(0x100000, PAYLOAD, 0x8000), (0x400000, b"DATA", 0x10)], 0x100010)
    plan = load_kernel(mem, img, initrd=None, cmdline="root=/dev/vda", cpus=1)
    assert plan.protocol == "linux-elf"
    assert plan.rip == 0x100010
    assert plan.long_mode and plan.rsi == L.ZERO_PAGE_START
    assert mem.read(0x100000, len(PAYLOAD)) == PAYLOAD
    assert mem.read(0x100000 + len(PAYLOAD), 0x8000 - len(PAYLOAD)) == bytes(0x8000 - len(PAYLOAD))
    assert mem.read(0x400000, 4) == b"DATA"
    assert plan.kernel_range == (0x100000, 0x400010)
    assert plan.initrd_range is None
    zp = L.ZERO_PAGE_START
    assert mem.read_u32(zp + 0x238) == 2047
    assert mem.read_u16(zp + 0x206) >= 0x206
    assert (mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)) == (0, 0)
    assert cstr(mem, mem.read_u32(zp + 0x228)) == b"root=/dev/vda"


@pytest.mark.parametrize("cls", [32, 64])
def test_pvh_boot(mem: GuestMemory, cls: int) -> None:
    img = make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000, elf_class=cls, pvh_entry=0x100040)
    initrd = b"\x5a" * 10000
    plan = load_kernel(mem, img, initrd=initrd, cmdline="console=ttyS0", cpus=2)
    assert plan.protocol == "pvh"
    assert not plan.long_mode
    assert plan.rip == 0x100040
    assert plan.rbx == L.START_INFO_START and plan.rsi == 0
    assert plan.cr0 & 1 and not plan.cr0 & 0x8000_0000
    assert plan.cr4 == 0 and plan.efer == 0
    assert plan.cs.selector == 0x08 and plan.cs.db == 1 and plan.cs.l == 0 and plan.cs.limit == 0xFFFF_FFFF
    assert plan.ds.limit == 0xFFFF_FFFF and plan.ds.base == 0
    si = L.START_INFO_START
    assert mem.read_u32(si) == 0x336EC578
    assert mem.read_u32(si + 4) == 1
    assert mem.read_u32(si + 12) == 1  # nr_modules
    assert cstr(mem, mem.read_u64(si + 24)) == b"console=ttyS0"
    mm, count = mem.read_u64(si + 40), mem.read_u32(si + 48)
    entries = [struct.unpack("<QQII", mem.read(mm + 24 * i, 24)) for i in range(count)]
    assert [(a, s, t) for a, s, t, _ in entries] == [(e.addr, e.size, e.type) for e in plan.e820]
    mod = mem.read_u64(si + 16)
    paddr, size = struct.unpack("<QQ", mem.read(mod, 16))
    assert (paddr, paddr + size) == plan.initrd_range
    assert mem.read(paddr, size) == initrd


def test_protocol_selection(mem: GuestMemory) -> None:
    pvh = make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000, pvh_entry=0x100040)
    assert load_kernel(mem, pvh, initrd=None, cmdline="", cpus=1, protocol="linux").protocol == "linux-elf"
    assert load_kernel(mem, pvh, initrd=None, cmdline="", cpus=1, protocol="pvh").protocol == "pvh"
    plain = make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000)
    with pytest.raises(ImageError, match="PVH"):
        load_kernel(mem, plain, initrd=None, cmdline="", cpus=1, protocol="pvh")
    with pytest.raises(ImageError, match="PVH"):
        load_kernel(mem, make_bzimage(PAYLOAD), initrd=None, cmdline="", cpus=1, protocol="pvh")
    elf32 = make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000, elf_class=32)
    with pytest.raises(ImageError, match="32-bit"):
        load_kernel(mem, elf32, initrd=None, cmdline="", cpus=1)
    with pytest.raises(ConfigError, match="protocol"):
        load_kernel(mem, plain, initrd=None, cmdline="", cpus=1, protocol="multiboot")
    with pytest.raises(ImageError, match="unrecognised"):
        load_kernel(mem, b"\0" * 8192, initrd=None, cmdline="", cpus=1)


@pytest.mark.parametrize(
    ("image", "limit"),
    [
        (make_bzimage(PAYLOAD, cmdline_size=100), 100),
        (make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000), 2047),
        (make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000, pvh_entry=0x100000), 4095),
    ],
)
def test_cmdline_limits(mem: GuestMemory, image: bytes, limit: int) -> None:
    plan = load_kernel(mem, image, initrd=None, cmdline="a" * limit, cpus=1)
    assert cstr(mem, L.CMDLINE_START) == b"a" * limit
    assert plan.cmdline == "a" * limit
    before = digest(mem)
    with pytest.raises(ConfigError, match="command line"):
        load_kernel(mem, image, initrd=None, cmdline="b" * (limit + 1), cpus=1)
    with pytest.raises(ConfigError, match="NUL"):
        load_kernel(mem, image, initrd=None, cmdline="a\0b", cpus=1)
    assert digest(mem) == before


@pytest.mark.parametrize(
    ("image", "initrd", "message"),
    [
        # initrd larger than the space between kernel and the top of RAM
        (make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000), b"\1" * (64 * MIB), "initrd"),
        # initrd above initrd_addr_max: only 2 MiB allowed below the limit, kernel sits at 1 MiB
        (make_bzimage(PAYLOAD, initrd_addr_max=0x1F_FFFF), b"\1" * (2 * MIB), "initrd"),
        (make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000), b"", "empty"),
        # segment beyond RAM
        (make_elf([(0x3FF_0000, PAYLOAD, 0x20000)], 0x3FF_0000), None, "not inside guest RAM"),
        # segment on top of the boot structures
        (make_elf([(0x9000, PAYLOAD, 0x1000)], 0x9000), None, r"overlaps the page tables \[0x9000, 0xf000\)"),
        (make_elf([(0x100000, PAYLOAD, 0x1000)], 0x200000), None, "entry point"),
        (make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000, pvh_entry=0x300000), None, "PVH entry"),
        # bzImage whose init_size runs past RAM, or that wants to load into low memory
        (make_bzimage(PAYLOAD, init_size=64 * MIB), None, "init_size"),
        (make_bzimage(PAYLOAD, pref_address=0x8000), None, r"overlaps the boot stack \[0x8000, 0x9000\)"),
    ],
)
def test_rejections_leave_memory_untouched(mem: GuestMemory, image: bytes, initrd: bytes | None,
                                           message: str) -> None:
    before = digest(mem)
    with pytest.raises(ImageError, match=message):
        load_kernel(mem, image, initrd=initrd, cmdline="console=ttyS0", cpus=1)
    assert digest(mem) == before


def test_closed_memory_is_a_programming_error() -> None:
    m = GuestMemory.for_size(4 * MIB)
    m.close()
    with pytest.raises(ValueError, match="closed"):
        load_kernel(m, make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000), initrd=None, cmdline="", cpus=1)


def test_bad_cpu_count(mem: GuestMemory) -> None:
    img = make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000)
    for cpus in (0, 33, -1):
        with pytest.raises(ConfigError, match="the boot loader supports 1 to 32 vCPUs, not"):
            load_kernel(mem, img, initrd=None, cmdline="", cpus=cpus)


def test_large_guest_above_mmio_hole() -> None:
    with GuestMemory.for_size(3 * GIB + 512 * MIB) as m:
        img = make_elf([(0x100000, PAYLOAD, 0x1000)], 0x100000)
        plan = load_kernel(m, img, initrd=b"\7" * 5000, cmdline="x", cpus=1)
        assert plan.e820[-2:] == (E820Entry(MIB, 3 * GIB - MIB, 1), E820Entry(4 * GIB, 512 * MIB, 1))
        assert m.read_u8(L.ZERO_PAGE_START + 0x1E8) == 4
        start, end = plan.initrd_range or (0, 0)
        assert end <= 3 * GIB and 3 * GIB - end < 4096
        assert start % 4096 == 0 and m.read(start, 5000) == b"\7" * 5000
        # a segment that would sit in the MMIO hole is rejected
        hole = make_elf([(0xC000_0000, PAYLOAD, 0x1000)], 0xC000_0000)
        with pytest.raises(ImageError, match="not inside guest RAM"):
            load_kernel(m, hole, initrd=None, cmdline="", cpus=1)
