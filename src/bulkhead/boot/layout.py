"""The loader table: every guest-memory structure bulkhead writes at boot, with its slot (pure).

`LOADER_TABLE` is the single source of truth. The loader (bulkhead.boot.loader) writes each structure
inside its slot, and refuses a kernel segment, bzImage or initrd that overlaps exactly what it wrote
for the chosen protocol (the written extent, not the whole slot), naming the structure and its range.
docs/GUEST_KERNEL.md prints `render_loader_table()` (tests/test_boot_layout.py checks they agree).

Nothing else in low memory is reserved: a kernel may load anywhere in guest RAM that avoids these
structures, as rust-vmm's linux-loader and QEMU allow (an ELF linked with `ld -Ttext=0x100000` has its
first PT_LOAD at 0xff000, holding the ELF and program headers; it loads).

GDT selectors follow Documentation/arch/x86/boot.rst: the 64-bit boot protocol wants CS = __BOOT_CS
(0x10) and DS/ES/SS = __BOOT_DS (0x18), both flat. PVH enters through the 32-bit code segment 0x08
(the PVH ABI leaves the selector values unspecified). TR is 0x20.
"""

from __future__ import annotations

from typing import NamedTuple

from bulkhead.memory.layout import EBDA_START, HIMEM_START

__all__ = [
    "ACPI_DSDT_START",
    "ACPI_END",
    "ACPI_FADT_START",
    "ACPI_MADT_START",
    "ACPI_RSDP_START",
    "ACPI_XSDT_START",
    "BOOT_STACK_POINTER",
    "BOOT_STRUCTS_END",
    "BOOT_TSS_SIZE",
    "BOOT_TSS_START",
    "CMDLINE_MAX",
    "CMDLINE_START",
    "GDT_ENTRIES",
    "GDT_START",
    "IDT_LIMIT",
    "IDT_START",
    "LINUX",
    "LOADER_TABLE",
    "MEMMAP_MAX_ENTRIES",
    "MEMMAP_START",
    "MODLIST_START",
    "MPTABLE_END",
    "MPTABLE_START",
    "PAGE_TABLES_END",
    "PDE_START",
    "PDPTE_START",
    "PML4_START",
    "PVH",
    "SEL_CODE32",
    "SEL_CODE64",
    "SEL_DATA",
    "SEL_TSS",
    "START_INFO_START",
    "ZERO_PAGE_START",
    "BootStructure",
    "render_loader_table",
    "slot",
]

BOOT_TSS_START = 0x0
BOOT_TSS_SIZE = 0x68  # a 104-byte TSS; its I/O map base (offset 0x66) is 0

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

# ACPI: the RSDP sits in the BIOS area 0xe0000..0xfffff that Linux scans on 16-byte boundaries
# (ACPI 6.5 section 5.2.5.1); the tables follow it in fixed slots.
ACPI_RSDP_START = 0xE0000
ACPI_XSDT_START = 0xE0040
ACPI_FADT_START = 0xE0100
ACPI_MADT_START = 0xE0300
ACPI_DSDT_START = 0xE0800
ACPI_END = 0xE2000

BOOT_STRUCTS_END = HIMEM_START

PVH = "pvh"
LINUX = ("linux-bzimage", "linux-elf")
_ALL = (PVH, *LINUX)


class BootStructure(NamedTuple):
    """One slot of the loader table: [start, end) in guest physical memory, the module that builds
    the bytes (`owner`), the boot protocols that write it, and how much of the slot is written."""

    name: str
    start: int
    end: int
    owner: str
    protocols: tuple[str, ...]
    size: str


LOADER_TABLE: tuple[BootStructure, ...] = (
    BootStructure("boot TSS", BOOT_TSS_START, BOOT_TSS_START + BOOT_TSS_SIZE, "bulkhead.boot.x86", _ALL,
                  "104 bytes, zeroed"),
    BootStructure("GDT", GDT_START, GDT_START + 8 * GDT_ENTRIES, "bulkhead.boot.x86", _ALL, "48 bytes"),
    BootStructure("IDT", IDT_START, IDT_START + IDT_LIMIT + 1, "bulkhead.boot.loader", _ALL,
                  "one zero entry"),
    BootStructure("PVH hvm_start_info", START_INFO_START, START_INFO_START + 56, "bulkhead.boot.params",
                  (PVH,), "56 bytes"),
    BootStructure("PVH module list", MODLIST_START, MODLIST_START + 32, "bulkhead.boot.params", (PVH,),
                  "32 bytes, with an initrd only"),
    BootStructure("PVH memory map", MEMMAP_START, MEMMAP_START + 24 * MEMMAP_MAX_ENTRIES,
                  "bulkhead.boot.params", (PVH,), "24 bytes per e820 entry"),
    BootStructure("Linux boot_params (zero page)", ZERO_PAGE_START, ZERO_PAGE_START + 0x1000,
                  "bulkhead.boot.params", LINUX, "4096 bytes"),
    BootStructure("boot stack", BOOT_STACK_POINTER & ~0xFFF, (BOOT_STACK_POINTER & ~0xFFF) + 0x1000,
                  "bulkhead.boot.loader", _ALL, "4096 bytes, zeroed; RSP = 0x8ff0"),
    BootStructure("page tables", PML4_START, PAGE_TABLES_END, "bulkhead.boot.x86", LINUX,
                  "PML4, PDPT, 4 PDs: identity map of 0..4 GiB"),
    BootStructure("command line", CMDLINE_START, CMDLINE_START + CMDLINE_MAX, "bulkhead.boot.loader", _ALL,
                  "its length + 1 (NUL)"),
    BootStructure("MP table", MPTABLE_START, MPTABLE_END, "bulkhead.boot.mptable", _ALL,
                  "284 + 20 bytes per vCPU"),
    BootStructure("ACPI RSDP", ACPI_RSDP_START, ACPI_RSDP_START + 36, "bulkhead.boot.acpi", _ALL,
                  "36 bytes (revision 2)"),
    BootStructure("ACPI XSDT", ACPI_XSDT_START, ACPI_FADT_START, "bulkhead.boot.acpi", _ALL, "52 bytes"),
    BootStructure("ACPI FADT", ACPI_FADT_START, ACPI_MADT_START, "bulkhead.boot.acpi", _ALL, "276 bytes"),
    BootStructure("ACPI MADT", ACPI_MADT_START, ACPI_DSDT_START, "bulkhead.boot.acpi", _ALL,
                  "56 + 8 bytes per vCPU"),
    BootStructure("ACPI DSDT", ACPI_DSDT_START, ACPI_END, "bulkhead.boot.acpi", _ALL,
                  "grows with the virtio-mmio devices"),
)

_BY_NAME = {s.name: s for s in LOADER_TABLE}


def slot(name: str) -> BootStructure:
    """The loader-table slot called `name`. Raises KeyError for an unknown name."""
    return _BY_NAME[name]


def render_loader_table() -> str:
    """The loader table as a Markdown table (what docs/GUEST_KERNEL.md prints)."""
    lines = [
        "| structure | slot (guest physical) | written | protocols | owner |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(LOADER_TABLE, key=lambda s: (s.start, s.name)):
        protos = "all" if set(s.protocols) == set(_ALL) else ", ".join(s.protocols)
        lines.append(
            f"| {s.name} | `{s.start:#07x}..{s.end:#07x}` | {s.size} | {protos} | `{s.owner}` |"
        )
    return "\n".join(lines) + "\n"
