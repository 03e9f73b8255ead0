"""Boot information structures: e820 map, Linux boot_params zero page, PVH hvm_start_info (pure).

Layouts follow arch/x86/include/uapi/asm/bootparam.h (struct boot_params, 4096 bytes) and
xen/include/public/arch-x86/hvm/start_info.h (struct hvm_start_info version 1, 56 bytes;
struct hvm_modlist_entry, 32 bytes; struct hvm_memmap_table_entry, 24 bytes). Builders return bytes;
the loader decides where they go.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from bulkhead.boot.bzimage import BOOT_FLAG, CAN_USE_HEAP, HDRS_MAGIC, LOADED_HIGH, SETUP_HEADER_OFFSET
from bulkhead.errors import ConfigError, ImageError
from bulkhead.memory.layout import EBDA_START, HIMEM_START

__all__ = [
    "BOOT_PARAMS_SIZE",
    "E820_MAX_ENTRIES",
    "E820_RAM",
    "E820_RESERVED",
    "HVM_START_MAGIC",
    "MEMMAP_ENTRY_SIZE",
    "MODLIST_ENTRY_SIZE",
    "START_INFO_SIZE",
    "ZP",
    "E820Entry",
    "build_boot_params",
    "build_e820",
    "build_memmap",
    "build_modlist",
    "build_start_info",
]

BOOT_PARAMS_SIZE = 4096
E820_MAX_ENTRIES = 128
E820_RAM = 1
E820_RESERVED = 2
HVM_START_MAGIC = 0x336EC578
START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24
# Protocol version written into the minimal header of the ELF path (2.15: every field we fill exists).
MINIMAL_PROTOCOL = 0x020F
MINIMAL_KERNEL_ALIGNMENT = 0x0100_0000


class ZP:
    """Offsets inside struct boot_params used here (bootparam.h)."""

    ACPI_RSDP_ADDR = 0x070
    EXT_RAMDISK_IMAGE = 0x0C0
    EXT_RAMDISK_SIZE = 0x0C4
    EXT_CMD_LINE_PTR = 0x0C8
    E820_ENTRIES = 0x1E8
    SENTINEL = 0x1EF
    HDR = 0x1F1
    BOOT_FLAG = 0x1FE
    HEADER = 0x202
    VERSION = 0x206
    TYPE_OF_LOADER = 0x210
    LOADFLAGS = 0x211
    CODE32_START = 0x214
    RAMDISK_IMAGE = 0x218
    RAMDISK_SIZE = 0x21C
    CMD_LINE_PTR = 0x228
    KERNEL_ALIGNMENT = 0x230
    CMDLINE_SIZE = 0x238
    HDR_MAX_END = 0x290
    E820_TABLE = 0x2D0


class E820Entry(NamedTuple):
    """One e820 entry: [addr, addr+size) of `type` (1 = RAM, 2 = reserved)."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def build_e820(ram: Sequence[tuple[int, int]]) -> tuple[E820Entry, ...]:
    """The e820 map for a RAM layout of (base, size) regions, the first starting at 0.

    Low RAM [0, EBDA_START) is usable, [EBDA_START, 1 MiB) reserved (MP table, legacy hole),
    [1 MiB, end of the first region) usable, every further region usable.
    Raises ConfigError when the first region does not start at 0 or does not reach past 1 MiB,
    or when the map would exceed 128 entries.
    """
    regions = sorted(ram)
    if not regions or regions[0][0] != 0 or regions[0][1] <= HIMEM_START:
        raise ConfigError("guest RAM must start at address 0 and extend beyond 1 MiB")
    out = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        E820Entry(HIMEM_START, regions[0][1] - HIMEM_START, E820_RAM),
    ]
    out.extend(E820Entry(base, size, E820_RAM) for base, size in regions[1:])
    if len(out) > E820_MAX_ENTRIES:
        raise ConfigError(f"guest RAM layout needs more than {E820_MAX_ENTRIES} e820 entries")
    return tuple(out)


def build_boot_params(
    *,
    setup_header: bytes | None,
    cmdline_addr: int,
    cmdline_size: int,
    e820: Sequence[E820Entry],
    initrd: tuple[int, int] | None = None,
    code32_start: int = 0,
    acpi_rsdp_addr: int = 0,
) -> bytes:
    """A 4096-byte struct boot_params.

    With `setup_header` (the raw bytes from offset 0x1f1 of a bzImage), the header is copied and
    the loader fields are filled in; without it a minimal valid header is made (boot flag, "HdrS",
    protocol 2.15, LOADED_HIGH, 16 MiB kernel alignment, `cmdline_size`). Always: type_of_loader
    0xff, cmd_line_ptr (+ext_), ramdisk_image/size (+ext_), acpi_rsdp_addr (protocol 2.14, offset
    0x070), e820_entries and the e820 table.
    Raises ImageError when the header would overflow its slot, ConfigError for more than 128
    e820 entries or addresses that do not fit the fields.
    """
    zp = bytearray(BOOT_PARAMS_SIZE)
    if setup_header is not None:
        if SETUP_HEADER_OFFSET + len(setup_header) > ZP.HDR_MAX_END:
            raise ImageError("bzImage setup header is larger than the boot_params slot for it")
        zp[ZP.HDR : ZP.HDR + len(setup_header)] = setup_header
        loadflags = (zp[ZP.LOADFLAGS] & ~CAN_USE_HEAP) | LOADED_HIGH
    else:
        struct.pack_into("<H", zp, ZP.BOOT_FLAG, BOOT_FLAG)
        struct.pack_into("<I", zp, ZP.HEADER, HDRS_MAGIC)
        struct.pack_into("<H", zp, ZP.VERSION, MINIMAL_PROTOCOL)
        struct.pack_into("<I", zp, ZP.KERNEL_ALIGNMENT, MINIMAL_KERNEL_ALIGNMENT)
        struct.pack_into("<I", zp, ZP.CMDLINE_SIZE, cmdline_size & 0xFFFF_FFFF)
        loadflags = LOADED_HIGH
    zp[ZP.SENTINEL] = 0
    struct.pack_into("<Q", zp, ZP.ACPI_RSDP_ADDR, acpi_rsdp_addr & 0xFFFF_FFFF_FFFF_FFFF)
    zp[ZP.TYPE_OF_LOADER] = 0xFF
    zp[ZP.LOADFLAGS] = loadflags
    if code32_start:
        struct.pack_into("<I", zp, ZP.CODE32_START, code32_start & 0xFFFF_FFFF)
    if cmdline_addr >> 64 or cmdline_addr < 0:
        raise ConfigError(f"command line address {cmdline_addr:#x} does not fit in 64 bits")
    struct.pack_into("<I", zp, ZP.CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, ZP.EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        if addr < 0 or size < 0 or addr >> 64 or size >> 64:
            raise ConfigError("initrd address or size does not fit in 64 bits")
        struct.pack_into("<I", zp, ZP.RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
        struct.pack_into("<I", zp, ZP.RAMDISK_SIZE, size & 0xFFFF_FFFF)
        struct.pack_into("<I", zp, ZP.EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zp, ZP.EXT_RAMDISK_SIZE, size >> 32)
    if len(e820) > E820_MAX_ENTRIES:
        raise ConfigError(f"the zero page holds at most {E820_MAX_ENTRIES} e820 entries, not {len(e820)}")
    zp[ZP.E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", zp, ZP.E820_TABLE + 20 * i, e.addr, e.size, e.type)
    return bytes(zp)


def build_memmap(e820: Sequence[E820Entry]) -> bytes:
    """The PVH memory map: one 24-byte hvm_memmap_table_entry (addr, size, type, reserved) each."""
    return b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in e820)


def build_modlist(modules: Sequence[tuple[int, int]]) -> bytes:
    """hvm_modlist_entry records (paddr, size, cmdline_paddr = 0, reserved = 0)."""
    return b"".join(struct.pack("<QQQQ", addr, size, 0, 0) for addr, size in modules)


def build_start_info(
    *,
    cmdline_addr: int,
    memmap_addr: int,
    memmap_entries: int,
    modlist_addr: int = 0,
    nr_modules: int = 0,
    rsdp_addr: int = 0,
) -> bytes:
    """A 56-byte struct hvm_start_info, version 1 (magic 0x336ec578, flags 0); `rsdp_addr` is
    rsdp_paddr, the ACPI RSDP (start_info.h: "Physical address of the RSDP ACPI data structure")."""
    return struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,
        0,
        nr_modules,
        modlist_addr,
        cmdline_addr,
        rsdp_addr,
        memmap_addr,
        memmap_entries,
        0,
    )
