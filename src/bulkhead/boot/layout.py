"""The fixed layout of low guest memory used by every boot path (pure constants).

All boot structures live below 1 MiB (HIMEM_START), so no kernel segment, bzImage or initrd may
ever touch them (the loaders reject images that would):

    0x0000_0500 .. 0x0000_0530   GDT: null, 32-bit code, 64-bit code, flat data, 16-byte TSS slot
    0x0000_0540 .. 0x0000_0548   IDT: one zero entry (limit 7); any early exception triple-faults
    0x0000_6000 .. 0x0000_6038   hvm_start_info (PVH)
    0x0000_6040 .. 0x0000_6060   hvm_modlist_entry for the initrd (PVH)
    0x0000_7000 .. 0x0000_8000   boot_params zero page (Linux)  /  PVH memory map (<= 128 x 24 bytes)
    0x0000_8000 .. 0x0000_8ff0   boot stack, initial RSP = 0x8ff0, grows down
    0x0000_9000 .. 0x0000_a000   PML4
    0x0000_a000 .. 0x0000_b000   PDPT
    0x0000_b000 .. 0x0000_f000   4 page directories (2 MiB pages, identity map of 0..4 GiB)
    0x0002_0000 .. 0x0003_0000   kernel command line (NUL-terminated, at most 64 KiB)
    0x0009_fc00 .. 0x000a_0000   MP floating pointer + MP configuration table (EBDA, reserved in e820)
    0x0010_0000 ..               kernel (bzImage: pref_address; ELF: its physical addresses), then RAM;
                                 the initrd sits page aligned at the top of the first RAM region

GDT selectors follow Documentation/arch/x86/boot.rst: the 64-bit boot protocol wants CS = __BOOT_CS
(0x10) and DS/ES/SS = __BOOT_DS (0x18), both flat. PVH enters through the 32-bit code segment 0x08.
"""

from __future__ import annotations

from bulkhead.memory.layout import EBDA_START, HIMEM_START

__all__ = [
    "BOOT_STACK_POINTER",
    "BOOT_STRUCTS_END",
    "CMDLINE_MAX",
    "CMDLINE_START",
    "GDT_ENTRIES",
    "GDT_START",
    "IDT_LIMIT",
    "IDT_START",
    "MEMMAP_MAX_ENTRIES",
    "MEMMAP_START",
    "MODLIST_START",
    "MPTABLE_END",
    "MPTABLE_START",
    "PAGE_TABLES_END",
    "PDE_START",
    "PDPTE_START",
    "PML4_START",
    "SEL_CODE32",
    "SEL_CODE64",
    "SEL_DATA",
    "SEL_TSS",
    "START_INFO_START",
    "ZERO_PAGE_START",
]

GDT_START = 0x500
GDT_ENTRIES = 6  # null, code32, code64, data, TSS (16 bytes in long mode -> 2 slots)
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10  # __BOOT_CS
SEL_DATA = 0x18  # __BOOT_DS
SEL_TSS = 0x20

IDT_START = 0x540
IDT_LIMIT = 7

START_INFO_START = 0x6000
MODLIST_START = 0x6040
ZERO_PAGE_START = 0x7000
MEMMAP_START = 0x7000
MEMMAP_MAX_ENTRIES = 128

BOOT_STACK_POINTER = 0x8FF0

PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
PAGE_TABLES_END = 0xF000

CMDLINE_START = 0x20000
CMDLINE_MAX = 0x10000  # bytes including the terminating NUL

MPTABLE_START = EBDA_START
MPTABLE_END = 0xA0000

BOOT_STRUCTS_END = HIMEM_START
