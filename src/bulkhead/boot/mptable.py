"""Intel MultiProcessor Specification 1.4 tables for N vCPUs (pure).

Layout written at MPTABLE_START (the EBDA, reserved in the e820 map), modelled on Firecracker's
src/vmm/src/arch/x86_64/mptable.rs:

    MP floating pointer (16 bytes, "_MP_", points at the configuration table right after it)
    MP configuration table header (44 bytes, "PCMP", spec 1.4, LAPIC at LAPIC_BASE)
    processor entries (20 bytes each): APIC ids 0..N-1, enabled, BSP flag on id 0
    bus entry: bus 0 "ISA   "
    I/O APIC entry: id N, version 0x14, usable, at IOAPIC_BASE
    I/O interrupt entries: ISA IRQ i -> IOAPIC pin i for i in 0..23 (type INT, conforming polarity
        and trigger), matching KVM's default GSI routing (kvm_setup_default_irq_routing), as
        Firecracker does; pins 16..23 serve virtio-mmio devices
    local interrupt entries: ExtINT on LINT0 of the BSP, NMI on LINT1 of every APIC (dest 0xff)

Both checksums make their structure sum to 0 mod 256.
"""

from __future__ import annotations

import struct

from bulkhead.boot.layout import MPTABLE_END, MPTABLE_START
from bulkhead.config import MAX_CPUS
from bulkhead.errors import ConfigError
from bulkhead.memory.layout import IOAPIC_BASE, LAPIC_BASE

__all__ = [
    "APIC_VERSION",
    "IOAPIC_PINS",
    "MAX_CPUS",
    "MP_BUS",
    "MP_INTSRC",
    "MP_IOAPIC",
    "MP_LINTSRC",
    "MP_PROCESSOR",
    "build_mptable",
    "checksum",
    "mptable_size",
]

MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
MPC_APIC_USABLE = 1
APIC_VERSION = 0x14
CPU_STEPPING = 0x600
CPU_FEATURE_APIC = 0x200
CPU_FEATURE_FPU = 0x001
IOAPIC_PINS = 24
MPF_SIZE = 16
MPC_HEADER_SIZE = 44
CPU_ENTRY_SIZE = 20
SMALL_ENTRY_SIZE = 8
# The EBDA slot is 1 KiB; MAX_CPUS (32, bulkhead.config) vCPUs fit with room to spare (284 + 20 * N bytes).


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with a zero checksum byte) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def mptable_size(cpus: int) -> int:
    """Bytes the floating pointer plus configuration table take for `cpus` vCPUs."""
    return MPF_SIZE + MPC_HEADER_SIZE + CPU_ENTRY_SIZE * cpus + SMALL_ENTRY_SIZE * (1 + 1 + IOAPIC_PINS + 2)


def build_mptable(cpus: int, base: int = MPTABLE_START) -> bytes:
    """The MP floating pointer and configuration table for `cpus` vCPUs, to be written at `base`.

    Raises ConfigError unless 1 <= cpus <= MAX_CPUS (the table must fit the 1 KiB EBDA slot and the
    I/O APIC takes APIC id `cpus`).
    """
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"the MP table supports 1 to {MAX_CPUS} vCPUs, not {cpus}")
    if base == MPTABLE_START and base + mptable_size(cpus) > MPTABLE_END:
        raise ConfigError(f"the MP table for {cpus} vCPUs does not fit in the EBDA")
    ioapic_id = cpus
    entries: list[bytes] = []
    for apic_id in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if apic_id == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBIIII",
                MP_PROCESSOR,
                apic_id,
                APIC_VERSION,
                flags,
                CPU_STEPPING,
                CPU_FEATURE_APIC | CPU_FEATURE_FPU,
                0,
                0,
            )
        )
    entries.append(struct.pack("<BB6s", MP_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE, IOAPIC_BASE))
    for irq in range(IOAPIC_PINS):
        entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    length = MPC_HEADER_SIZE + len(body)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHII",
            b"PCMP",
            length,
            4,
            0,
            b"BULKHEAD",
            b"MICROVM     ",
            0,
            0,
            len(entries),
            LAPIC_BASE,
            0,
        )
    )
    header[7] = checksum(bytes(header) + body)
    table_addr = base + MPF_SIZE
    mpf = bytearray(struct.pack("<4sIBBBBBBBB", b"_MP_", table_addr, 1, 4, 0, 0, 0, 0, 0, 0))
    mpf[10] = checksum(bytes(mpf))
    return bytes(mpf) + bytes(header) + body
