"""e820 map, boot_params zero page and hvm_start_info layouts (bootparam.h, start_info.h)."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.bzimage import parse_bzimage
from bulkhead.boot.craft import make_bzimage
from bulkhead.boot.params import (
    E820Entry,
    build_boot_params,
    build_e820,
    build_memmap,
    build_modlist,
    build_start_info,
)
from bulkhead.errors import ConfigError, ImageError
from bulkhead.memory.layout import ram_regions

MIB = 1 << 20
GIB = 1 << 30


def test_e820_below_3g() -> None:
    e = build_e820(ram_regions(256 * MIB))
    assert e == (
        E820Entry(0, 0x9FC00, 1),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, 2),
        E820Entry(0x100000, 256 * MIB - 0x100000, 1),
    )


def test_e820_above_3g() -> None:
    e = build_e820(ram_regions(5 * GIB))
    assert e == (
        E820Entry(0, 0x9FC00, 1),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, 2),
        E820Entry(0x100000, 3 * GIB - 0x100000, 1),
        E820Entry(4 * GIB, 2 * GIB, 1),
    )
    # usable RAM adds up to the guest size minus the reserved EBDA/legacy hole
    assert sum(x.size for x in e if x.type == 1) == 5 * GIB - (0x100000 - 0x9FC00)
    # nothing is described inside the MMIO hole
    assert not any(x.addr < 4 * GIB and x.end > 3 * GIB for x in e)


def test_e820_rejects_bad_layouts() -> None:
    for ram in ([], [(0x1000, 4 * MIB)], [(0, MIB)]):
        with pytest.raises(ConfigError, match="guest RAM must start at address 0 and extend beyond 1 MiB"):
            build_e820(ram)


E820 = build_e820(ram_regions(64 * MIB))


def test_zero_page_minimal_header_offsets() -> None:
    zp = build_boot_params(setup_header=None, cmdline_addr=0x20000, cmdline_size=2047, e820=E820,
                           initrd=(0x3000000, 0x12345))
    assert len(zp) == 4096
    u8 = lambda o: zp[o]  # noqa: E731
    u16 = lambda o: struct.unpack_from("<H", zp, o)[0]  # noqa: E731
    u32 = lambda o: struct.unpack_from("<I", zp, o)[0]  # noqa: E731
    # Offsets from bootparam.h / boot.rst
    assert u16(0x1FE) == 0xAA55  # boot_flag
    assert u32(0x202) == 0x53726448  # header "HdrS"
    assert u16(0x206) >= 0x0206  # version
    assert u8(0x210) == 0xFF  # type_of_loader
    assert u8(0x211) & 1  # loadflags LOADED_HIGH
    assert u32(0x218) == 0x3000000  # ramdisk_image
    assert u32(0x21C) == 0x12345  # ramdisk_size
    assert u32(0x228) == 0x20000  # cmd_line_ptr
    assert u32(0x230) == 0x1000000  # kernel_alignment
    assert u32(0x238) == 2047  # cmdline_size
    assert u32(0x0C0) == 0 and u32(0x0C4) == 0 and u32(0x0C8) == 0  # ext_ fields
    assert u8(0x1E8) == 3  # e820_entries
    assert u8(0x1EF) == 0  # sentinel cleared
    for i, e in enumerate(E820):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == (e.addr, e.size, e.type)
    # nothing else outside the fields we set
    assert zp[0x2D0 + 20 * 3 :] == bytes(4096 - 0x2D0 - 60)


def test_zero_page_ext_fields_for_high_addresses() -> None:
    zp = build_boot_params(setup_header=None, cmdline_addr=0x1_2345_6000, cmdline_size=10, e820=E820,
                           initrd=(0x2_0000_1000, 0x1_0000_0002))
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x2345_6000
    assert struct.unpack_from("<I", zp, 0x0C8)[0] == 1
    assert struct.unpack_from("<II", zp, 0x218) == (0x1000, 2)
    assert struct.unpack_from("<II", zp, 0x0C0) == (2, 1)


def test_zero_page_copies_bzimage_header() -> None:
    img = make_bzimage(b"\x90" * 64, cmdline_size=777, initrd_addr_max=0x1FFF_FFFF)
    bz = parse_bzimage(img)
    zp = build_boot_params(setup_header=bz.header_bytes(img), cmdline_addr=0x20000, cmdline_size=0,
                           e820=E820, code32_start=0x100000)
    # header copied, loader fields overwritten
    assert struct.unpack_from("<I", zp, 0x238)[0] == 777
    assert struct.unpack_from("<I", zp, 0x22C)[0] == 0x1FFF_FFFF
    assert struct.unpack_from("<H", zp, 0x236)[0] == 1
    assert zp[0x210] == 0xFF
    assert struct.unpack_from("<I", zp, 0x214)[0] == 0x100000
    # no heap is provided, so CAN_USE_HEAP must not be claimed
    assert not zp[0x211] & 0x80
    with pytest.raises(ImageError, match="bzImage setup header is larger than the boot_params slot"):
        build_boot_params(setup_header=b"\0" * 0xA0, cmdline_addr=0, cmdline_size=0, e820=E820)


def test_zero_page_rejects_too_many_e820_entries() -> None:
    with pytest.raises(ConfigError, match="128"):
        build_boot_params(setup_header=None, cmdline_addr=0, cmdline_size=0, e820=[E820[0]] * 129)
    zp = build_boot_params(setup_header=None, cmdline_addr=0, cmdline_size=0, e820=[E820[0]] * 128)
    assert zp[0x1E8] == 128
    # the table ends at 0xcd0, before _pad8
    assert struct.unpack_from("<QQI", zp, 0x2D0 + 127 * 20) == (0, 0x9FC00, 1)


def test_start_info_layout() -> None:
    si = build_start_info(cmdline_addr=0x20000, memmap_addr=0x7000, memmap_entries=3,
                          modlist_addr=0x6040, nr_modules=1)
    # struct hvm_start_info (start_info.h): magic, version, flags, nr_modules, modlist_paddr,
    # cmdline_paddr, rsdp_paddr, memmap_paddr (v1), memmap_entries (v1), reserved (v1)
    assert len(si) == 56
    assert struct.unpack_from("<I", si, 0)[0] == 0x336EC578
    assert struct.unpack_from("<I", si, 4)[0] == 1
    assert struct.unpack_from("<I", si, 8)[0] == 0
    assert struct.unpack_from("<I", si, 12)[0] == 1
    assert struct.unpack_from("<Q", si, 16)[0] == 0x6040
    assert struct.unpack_from("<Q", si, 24)[0] == 0x20000
    assert struct.unpack_from("<Q", si, 32)[0] == 0
    assert struct.unpack_from("<Q", si, 40)[0] == 0x7000
    assert struct.unpack_from("<I", si, 48)[0] == 3
    assert struct.unpack_from("<I", si, 52)[0] == 0


def test_memmap_and_modlist_layout() -> None:
    mm = build_memmap(E820)
    assert len(mm) == 24 * 3
    assert struct.unpack_from("<QQII", mm, 24) == (0x9FC00, 0x100000 - 0x9FC00, 2, 0)
    ml = build_modlist([(0x3000000, 1234)])
    assert ml == struct.pack("<QQQQ", 0x3000000, 1234, 0, 0)
