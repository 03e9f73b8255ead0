"""The guest physical address map (pure constants and arithmetic, no I/O).

    0x0000_0000 .. 0x0009_fc00   low RAM (boot structures live here, see bulkhead.boot.layout)
    0x0009_fc00 .. 0x000a_0000   EBDA (MP table), reserved in the e820 map
    0x000a_0000 .. 0x0010_0000   legacy VGA/BIOS hole, reserved (not backed)
    0x0010_0000 .. 0xc000_0000   RAM (kernel, initrd, rest)
    0xc000_0000 .. 0x1_0000_0000 32-bit MMIO hole: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC
    0x1_0000_0000 ..             RAM above 4 GiB when the guest has more than 3 GiB

Low RAM below 1 MiB is backed by the same region as the rest of the first 3 GiB (as Firecracker
does); the e820 map is what tells the guest which parts to use.
"""

from __future__ import annotations

from bulkhead.config import MAX_MEM_MIB, MIN_MEM_MIB

__all__ = [
    "EBDA_START",
    "HIMEM_START",
    "IOAPIC_BASE",
    "LAPIC_BASE",
    "MAX_GUEST_MEM",
    "MIN_GUEST_MEM",
    "MMIO32_END",
    "MMIO32_START",
    "VIRTIO_FIRST_IRQ",
    "VIRTIO_MMIO_BASE",
    "VIRTIO_MMIO_SIZE",
    "VIRTIO_MMIO_SLOTS",
    "VIRTIO_MMIO_STRIDE",
    "ram_regions",
]

MIB = 1 << 20
GIB = 1 << 30

EBDA_START = 0x9FC00
HIMEM_START = 0x10_0000
MMIO32_START = 0xC000_0000
MMIO32_END = 0x1_0000_0000
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_SIZE = 0x200
# Each virtio-mmio slot has its own IOAPIC pin (edge, irqfd): GSIs 5..23, so 19 slots at most.
VIRTIO_FIRST_IRQ = 5
VIRTIO_MMIO_SLOTS = 24 - VIRTIO_FIRST_IRQ  # IOAPIC_PINS (boot/mptable.py) - the first virtio GSI
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000

MIN_GUEST_MEM = MIN_MEM_MIB * MIB
MAX_GUEST_MEM = MAX_MEM_MIB * MIB


def ram_regions(mem_bytes: int) -> list[tuple[int, int]]:
    """Split `mem_bytes` of guest RAM around the 32-bit MMIO hole.

    Returns (guest physical base, size) pairs, sorted and non-overlapping.
    Raises ValueError when the size is out of the supported range or not page aligned.
    """
    if mem_bytes < MIN_GUEST_MEM or mem_bytes > MAX_GUEST_MEM:
        raise ValueError(
            f"guest memory must be between {MIN_GUEST_MEM >> 20} MiB and {MAX_GUEST_MEM >> 30} GiB"
        )
    if mem_bytes & 0xFFF:
        raise ValueError("guest memory size must be a multiple of 4 KiB")
    if mem_bytes <= MMIO32_START:
        return [(0, mem_bytes)]
    return [(0, MMIO32_START), (MMIO32_END, mem_bytes - MMIO32_START)]
