"""x86 boot-time CPU structures: identity page tables, GDT, segment registers (pure).

Page tables identity-map guest physical [0, 4 GiB) with 2 MiB pages: one PML4 entry -> one PDPT
with 4 entries -> 4 page directories of 512 entries each. Entries are present + writable; the PD
entries also have PS (2 MiB page). This is what the Linux 64-bit boot protocol asks for: "the range
with setup_header.init_size from start address of loaded kernel, zero page and command line buffer
get ident mapping" (boot.rst) -- mapping all of the low 4 GiB covers every placement we allow.

GDT descriptors are encoded like the kernel's GDT_ENTRY(flags, base, limit) macro, where `flags`
packs the access byte (bits 0-7: type, S, DPL, P) and the flags nibble (bits 12-15: AVL, L, D/B, G).
`Segment` is what the runtime loads into KVM's struct kvm_segment: its `limit` is the byte limit
after granularity scaling (a 4 GiB flat segment has limit 0xffffffff), as KVM expects.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from bulkhead.boot.layout import (
    BOOT_TSS_START,
    GDT_ENTRIES,
    PML4_START,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_TSS,
)

__all__ = [
    "CR0_ET",
    "CR0_NE",
    "CR0_PE",
    "CR0_PG",
    "CR4_PAE",
    "EFER_LMA",
    "EFER_LME",
    "PDE_PS",
    "PTE_PRESENT",
    "PTE_RW",
    "RFLAGS_RESERVED",
    "Segment",
    "build_gdt",
    "build_page_tables",
    "gdt_entry",
    "segment_from_descriptor",
    "segments_for",
]

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PDE_PS = 1 << 7
PAGE = 0x1000
PAGE_2M = 0x20_0000
GIB = 1 << 30

# Access/flags words for gdt_entry (Firecracker / Linux GDT_ENTRY conventions).
FLAGS_CODE64 = 0xA09B  # G=1 L=1 D=0, P=1 DPL=0 S=1 type=0xb (exec/read, accessed)
FLAGS_CODE32 = 0xC09B  # G=1 L=0 D=1, P=1 DPL=0 S=1 type=0xb
FLAGS_DATA = 0xC093  # G=1 D/B=1, P=1 DPL=0 S=1 type=0x3 (read/write, accessed)
# The boot TSS descriptor is the one Firecracker hands a Linux 64-bit guest (arch/x86_64/regs.rs,
# LinuxBoot: gdt_entry(0x808b, 0, 0xfffff)): G=1, P=1, DPL=0, S=0, type 0xb (busy 32-bit TSS; the same
# type code is a busy 64-bit TSS in long mode), base 0, limit 0xfffff pages = 4 GiB. bulkhead uses it
# for PVH too, a deliberate deviation: the PVH ABI (docs/misc/pvh.pandoc) asks TR limit 0x67, and
# Firecracker/Cloud Hypervisor's PVH path follow it (gdt_entry(0x008b, 0, 0x67)). A TSS that ends at
# 0x67 has no I/O permission bitmap, and on PVM hosts ring-3 port I/O at IOPL 3 still consults the
# bitmap, so such a guest faults there while it runs on QEMU, the oracle (its firmware never loads
# TR: TR keeps its reset value, base 0, limit 0xffff). A larger limit is still a valid, busy 32-bit
# TSS; a PVH guest sees the difference only through LSL on TR or that bitmap lookup.
# The I/O map base (offset 0x66 of the zeroed TSS at 0) is 0, so the bitmap bit of port p is bit p%8
# of guest byte p/8: zero (allowed) for every port except 0x2800..0x297f, whose bits are the GDT's
# bytes at 0x500..0x530.
FLAGS_TSS = 0x808B
TSS_LIMIT = 0xF_FFFF


class Segment(NamedTuple):
    """A segment register as KVM's struct kvm_segment wants it (limit already scaled)."""

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the long-mode bit
    g: int
    avl: int
    unusable: int = 0


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode an 8-byte segment descriptor (base u32, limit u20, flags as described above)."""
    base &= 0xFFFF_FFFF
    limit &= 0xF_FFFF
    flags &= 0xF0FF
    return (
        ((base & 0xFF00_0000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
    )


def segment_from_descriptor(selector: int, desc: int) -> Segment:
    """Decode an 8-byte descriptor into the Segment the runtime loads for `selector`."""
    base = ((desc >> 16) & 0xFF_FFFF) | (((desc >> 56) & 0xFF) << 24)
    raw_limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    g = (desc >> 55) & 1
    limit = (raw_limit << 12) | 0xFFF if g else raw_limit
    return Segment(
        selector=selector & 0xFFFF,
        base=base,
        limit=limit,
        type=(desc >> 40) & 0xF,
        present=(desc >> 47) & 1,
        dpl=(desc >> 45) & 3,
        db=(desc >> 54) & 1,
        s=(desc >> 44) & 1,
        l=(desc >> 53) & 1,
        g=g,
        avl=(desc >> 52) & 1,
    )


def _descriptors(tss_base: int = BOOT_TSS_START) -> list[int]:
    """The GDT as 8-byte words, indexed by selector >> 3."""
    gdt = [0] * GDT_ENTRIES
    gdt[SEL_CODE32 >> 3] = gdt_entry(FLAGS_CODE32, 0, 0xF_FFFF)
    gdt[SEL_CODE64 >> 3] = gdt_entry(FLAGS_CODE64, 0, 0xF_FFFF)
    gdt[SEL_DATA >> 3] = gdt_entry(FLAGS_DATA, 0, 0xF_FFFF)
    gdt[SEL_TSS >> 3] = gdt_entry(FLAGS_TSS, tss_base, TSS_LIMIT)
    gdt[(SEL_TSS >> 3) + 1] = (tss_base >> 32) & 0xFFFF_FFFF  # upper half of a 16-byte system descriptor
    return gdt


def build_gdt() -> bytes:
    """The boot GDT: null, 32-bit flat code (0x08), 64-bit code (0x10 = __BOOT_CS), flat data
    (0x18 = __BOOT_DS), boot TSS (0x20, 16-byte system descriptor). Limit = len(result) - 1."""
    return b"".join(struct.pack("<Q", d) for d in _descriptors())


def segments_for(long_mode: bool) -> dict[str, Segment]:
    """Segment registers cs, ds, es, fs, gs, ss, tr as loaded for the chosen entry mode.

    Long mode: CS = 64-bit code 0x10; protected mode (PVH): CS = 32-bit flat code 0x08.
    Data segments are the flat 4 GiB data segment 0x18; TR is the boot TSS 0x20 (base 0, 4 GiB).
    """
    gdt = _descriptors()
    code_sel = SEL_CODE64 if long_mode else SEL_CODE32
    data = segment_from_descriptor(SEL_DATA, gdt[SEL_DATA >> 3])
    return {
        "cs": segment_from_descriptor(code_sel, gdt[code_sel >> 3]),
        "ds": data,
        "es": data,
        "fs": data,
        "gs": data,
        "ss": data,
        "tr": segment_from_descriptor(SEL_TSS, gdt[SEL_TSS >> 3]),
    }


def build_page_tables(pml4_addr: int = PML4_START) -> bytes:
    """Identity map of [0, 4 GiB) in 2 MiB pages: PML4 at `pml4_addr`, PDPT at +4 KiB, 4 PDs at
    +8 KiB..+24 KiB (the default places them at layout's PML4_START, PDPTE_START,
    PDE_START). Returns the 6 pages (24 KiB) to write at `pml4_addr`."""
    pdpt_addr = pml4_addr + PAGE
    pd_addr = pml4_addr + 2 * PAGE
    out = bytearray(6 * PAGE)
    struct.pack_into("<Q", out, 0, pdpt_addr | PTE_PRESENT | PTE_RW)
    for i in range(4):
        struct.pack_into("<Q", out, PAGE + 8 * i, (pd_addr + i * PAGE) | PTE_PRESENT | PTE_RW)
        base = 2 * PAGE + i * PAGE
        for j in range(512):
            phys = i * GIB + j * PAGE_2M
            struct.pack_into("<Q", out, base + 8 * j, phys | PTE_PRESENT | PTE_RW | PDE_PS)
    return bytes(out)
