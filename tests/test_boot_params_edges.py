"""Linux x86 boot protocol zero page (Documentation/arch/x86/boot.rst, zero-page.rst) and PVH
hvm_start_info structures at their exact limits (issue 15 mutation survivors): exactly 128 e820
entries, a setup header filling its slot, loadflags bit by bit, 64-bit address fields at 0 and
2**64 - 1, each out-of-range field refused on its own."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.bzimage import CAN_USE_HEAP, LOADED_HIGH, SETUP_HEADER_OFFSET
from bulkhead.boot.params import (
    E820_MAX_ENTRIES,
    ZP,
    E820Entry,
    build_boot_params,
    build_e820,
    build_modlist,
)
from bulkhead.errors import ConfigError, ImageError

E820 = build_e820([(0, 64 << 20)])
U64 = (1 << 64) - 1


def zp(**kw) -> bytes:  # type: ignore[no-untyped-def]
    args = {"setup_header": None, "cmdline_addr": 0x20000, "cmdline_size": 256, "e820": E820, **kw}
    return build_boot_params(**args)


def test_e820_entry_end_and_exactly_128_entries():
    assert E820Entry(0x1000, 0x2000, 1).end == 0x3000
    extra = [((i + 1) << 32, 1 << 20) for i in range(E820_MAX_ENTRIES - 3)]
    assert len(build_e820([(0, 64 << 20), *extra])) == E820_MAX_ENTRIES
    with pytest.raises(ConfigError, match=f"more than {E820_MAX_ENTRIES} e820 entries"):
        build_e820([(0, 64 << 20), *extra, (1 << 48, 1 << 20)])


def test_setup_header_may_fill_its_slot_exactly():
    full = bytes(ZP.HDR_MAX_END - SETUP_HEADER_OFFSET)
    assert len(zp(setup_header=full)) == 4096
    with pytest.raises(ImageError, match="larger than the boot_params slot"):
        zp(setup_header=full + b"\0")


@pytest.mark.parametrize("given", [0x00, 0x01, 0x80, 0x81, 0x20, 0xFF])
def test_loadflags_clear_can_use_heap_and_set_loaded_high(given):
    hdr = bytearray(0x40)
    hdr[ZP.LOADFLAGS - ZP.HDR] = given
    out = zp(setup_header=bytes(hdr))[ZP.LOADFLAGS]
    assert out == (given & ~CAN_USE_HEAP & 0xFF) | LOADED_HIGH
    assert CAN_USE_HEAP == 0x80 and LOADED_HIGH == 0x01


def test_acpi_rsdp_address_is_stored_exactly():
    for addr in (0, 0xE0000, 0x1234_5678_9ABC, U64):
        assert struct.unpack_from("<Q", zp(acpi_rsdp_addr=addr), ZP.ACPI_RSDP_ADDR)[0] == addr


def test_command_line_address_limits_each_on_its_own():
    page = zp(cmdline_addr=U64)
    assert struct.unpack_from("<II", page, ZP.CMD_LINE_PTR)[0] == 0xFFFF_FFFF
    assert struct.unpack_from("<I", page, ZP.EXT_CMD_LINE_PTR)[0] == 0xFFFF_FFFF
    for bad in (1 << 64, -1, 1 << 65):
        with pytest.raises(ConfigError, match="does not fit in 64 bits"):
            zp(cmdline_addr=bad)


def test_initrd_fields_at_zero_and_the_top_and_each_bad_field_alone():
    page = zp(initrd=(0, 0))
    assert struct.unpack_from("<II", page, ZP.RAMDISK_IMAGE) == (0, 0)
    page = zp(initrd=(U64, U64))
    assert struct.unpack_from("<II", page, ZP.RAMDISK_IMAGE) == (0xFFFF_FFFF, 0xFFFF_FFFF)
    assert struct.unpack_from("<II", page, ZP.EXT_RAMDISK_IMAGE) == (0xFFFF_FFFF, 0xFFFF_FFFF)
    for bad in ((-1, 0), (0, -1), (1 << 64, 0), (0, 1 << 64), (1 << 65, 0), (0, 1 << 65)):
        with pytest.raises(ConfigError, match="initrd address or size does not fit"):
            zp(initrd=bad)


def test_modlist_known_answer():
    assert build_modlist([(0x1000, 0x20), (0x2000, 0x30)]) == (
        struct.pack("<QQQQ", 0x1000, 0x20, 0, 0) + struct.pack("<QQQQ", 0x2000, 0x30, 0, 0))
    assert build_modlist([]) == b""
