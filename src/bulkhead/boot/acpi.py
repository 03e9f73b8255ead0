"""ACPI tables for a hardware-reduced microVM: RSDP, XSDT, FADT, MADT, DSDT (pure).

Modelled on Firecracker 1.8+ (src/vmm/src/acpi, src/acpi-tables) and QEMU's microvm
(hw/i386/acpi-microvm.c), following the ACPI 6.5 specification:

- RSDP revision 2 (section 5.2.5.3), in the BIOS area where Linux scans for it; RsdtAddress 0, so the
  XSDT is the only root table.
- XSDT (5.2.8) listing the FADT and the MADT.
- FADT revision 6.5 (5.2.9), HW_REDUCED_ACPI (flags bit 20): no PM timer, no SCI, no GPE blocks, no
  FACS; IAPC_BOOT_ARCH says "8042 present" (bulkhead has one, for reset), "VGA not present", "MSI not
  supported", "CMOS RTC not present". X_DSDT points at the DSDT.
- MADT (5.2.12): one Processor Local APIC per vCPU (UID = APIC id = index, enabled), one I/O APIC
  (id = number of vCPUs, as in the MP table, GSI base 0). No interrupt source overrides: KVM's default
  routing sends ISA IRQ n to I/O APIC pin n, which is ACPI's identity default. PCAT_COMPAT is set:
  KVM's in-kernel irqchip has the dual 8259.
- DSDT (5.2.11.1) whose AML describes, under \\_SB: the Generic Event Device `GED_` (ACPI0013, 5.6.9:
  `_CRS` its interrupt, an OperationRegion over its event selector, `_EVT` notifying the power button
  with 0x80 when the power-down bit is set, as QEMU microvm's DSDT; devices/ged.py) and the power button
  `PWRB` (PNP0C0C, control-method power button, 4.8.2.2.1.2); COM1 (PNP0501: I/O 0x3f8/8, IRQ 4), the i8042
  (PNP0303: I/O 0x60 and 0x64, IRQ 1), and one `LNRO0005` device per populated virtio-mmio slot,
  as QEMU microvm and Firecracker do: `_HID` the string "LNRO0005", `_UID` the slot index, `_CRS` a
  Memory32Fixed of the register window and an Extended Interrupt (consumer, edge, active high,
  exclusive: Firecracker's choice; the MP table also says edge for these pins, and KVM's irqfd pulses).

The AML is written by hand (ACPI 6.5 chapter 20); it is small enough to read byte by byte, and the
tests disassemble every table with iasl. Every table's checksum makes its bytes sum to 0 mod 256.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from bulkhead.boot import layout as L
from bulkhead.errors import ConfigError
from bulkhead.memory.layout import IOAPIC_BASE, LAPIC_BASE

__all__ = [
    "OEM_ID",
    "AcpiTables",
    "VirtioSlot",
    "aml_pkglength",
    "build_acpi",
    "checksum",
]

OEM_ID = b"BLKHD "
OEM_TABLE_ID = b"BHMICROV"
CREATOR_ID = b"BLKH"
FADT_F_HW_REDUCED_ACPI = 1 << 20
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
MADT_PCAT_COMPAT = 1
MADT_LAPIC = 0
MADT_IOAPIC = 1
COM1 = (0x3F8, 8, 4)
I8042 = ((0x60, 1), (0x64, 1), 1)


class VirtioSlot(NamedTuple):
    """One populated virtio-mmio slot: register window [base, base+size) and its GSI."""

    base: int
    size: int
    irq: int


class AcpiTables(NamedTuple):
    """The tables and where each goes (guest physical address -> bytes)."""

    rsdp: bytes
    xsdt: bytes
    fadt: bytes
    madt: bytes
    dsdt: bytes

    def writes(self) -> list[tuple[str, int, bytes]]:
        """(loader-table name, address, bytes) for each table."""
        return [
            ("ACPI RSDP", L.ACPI_RSDP_START, self.rsdp),
            ("ACPI XSDT", L.ACPI_XSDT_START, self.xsdt),
            ("ACPI FADT", L.ACPI_FADT_START, self.fadt),
            ("ACPI MADT", L.ACPI_MADT_START, self.madt),
            ("ACPI DSDT", L.ACPI_DSDT_START, self.dsdt),
        ]


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with its checksum byte zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (ACPI 6.5 5.2.6) + body, checksummed."""
    length = 36 + len(body)
    hdr = struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1
    )
    raw = bytearray(hdr + body)
    raw[9] = checksum(bytes(raw))
    return bytes(raw)


def _rsdp(xsdt_addr: int) -> bytes:
    raw = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(bytes(raw[:20]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


def _fadt(dsdt_addr: int) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, body, offset - 36, value)

    put(109, "<H", IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT)
    put(112, "<I", FADT_F_HW_REDUCED_ACPI)
    put(131, "<B", 5)  # FADT minor version: ACPI 6.5
    put(140, "<Q", dsdt_addr)  # X_DSDT (the 32-bit DSDT field stays 0: X_DSDT wins, 5.2.9)
    body[268 - 36 : 276 - 36] = b"BULKHEAD"  # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def _madt(cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT)
    for i in range(cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, 1)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, cpus, 0, IOAPIC_BASE, 0)
    return _table(b"APIC", 6, body)


# ---- AML (ACPI 6.5 chapter 20) ----------------------------------------------------------------


def aml_pkglength(body_len: int) -> bytes:
    """PkgLength encoding (20.2.4) for a package whose contents after PkgLength are body_len bytes:
    the encoded length counts the PkgLength bytes themselves."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < (1 << (4 + 8 * extra)):
            out = [(extra << 6) | (total & 0xF)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too large")


def _nameseg(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"AML NameSeg {name!r} must be 4 characters")
    return raw


def _aml_int(value: int) -> bytes:
    if value == 0:
        return b"\x00"  # ZeroOp
    if value == 1:
        return b"\x01"  # OneOp
    if value < 0x100:
        return b"\x0a" + bytes([value])  # BytePrefix
    if value < 0x10000:
        return b"\x0b" + struct.pack("<H", value)  # WordPrefix
    return b"\x0c" + struct.pack("<I", value)  # DWordPrefix


def _aml_name(name: str, data: bytes) -> bytes:
    return b"\x08" + _nameseg(name) + data  # NameOp


def _aml_string(text: str) -> bytes:
    return b"\x0d" + text.encode("ascii") + b"\x00"  # StringPrefix


def _aml_buffer(data: bytes) -> bytes:
    inner = _aml_int(len(data)) + data
    return b"\x11" + aml_pkglength(len(inner)) + inner  # BufferOp


def _aml_device(name: str, body: bytes) -> bytes:
    inner = _nameseg(name) + body
    return b"\x5b\x82" + aml_pkglength(len(inner)) + inner  # DeviceOp


def _res_template(*descriptors: bytes) -> bytes:
    return _aml_buffer(b"".join(descriptors) + b"\x79\x00")  # End Tag, checksum 0 (6.4.2.9)


def _res_mem32_fixed(base: int, size: int) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, 1, base, size)  # Memory32Fixed, read/write (6.4.3.4)


def _res_io(port: int, length: int) -> bytes:
    return struct.pack("<BBHHBB", 0x47, 1, port, port, 1, length)  # I/O, 16-bit decode (6.4.2.5)


def _res_interrupt(gsi: int) -> bytes:
    # Extended Interrupt (6.4.3.6): consumer (bit 0), edge (bit 1), active high, exclusive; one GSI.
    return struct.pack("<BHBBI", 0x89, 6, 0x03, 1, gsi)


def _ged_and_power_button() -> bytes:
    """GED_ + PWRB (see the module docstring and devices/ged.py), the AML QEMU microvm builds:

        Device (GED_) { Name (_HID, "ACPI0013") Name (_UID, Zero) Name (_CRS, {Interrupt {GED_IRQ}})
            OperationRegion (EREG, SystemMemory, GED_BASE, GED_LEN)
            Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }
            Method (_EVT, 1, Serialized) { Local0 = ESEL
                If ((Local0 & EVT_POWER_DOWN) == EVT_POWER_DOWN) { Notify (\\_SB.PWRB, 0x80) } } }
        Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }
    """
    from bulkhead.devices.ged import EVT_POWER_DOWN, GED_BASE, GED_IRQ, GED_LEN

    region = b"\x5b\x80" + _nameseg("EREG") + b"\x00" + _aml_int(GED_BASE) + _aml_int(GED_LEN)  # SystemMemory
    # FieldFlags 0x43: AccessType DWordAcc (3), LockRule NoLock, UpdateRule WriteAsZeros (2 << 5) (19.6.48)
    fields = _nameseg("EREG") + b"\x43" + _nameseg("ESEL") + bytes([32])  # NamedField: 32 bits
    field = b"\x5b\x81" + aml_pkglength(len(fields)) + fields
    power_button = b"\x5c\x2e" + _nameseg("_SB_") + _nameseg("PWRB")  # \_SB.PWRB (RootChar, DualNamePrefix)
    notify = b"\x86" + power_button + _aml_int(0x80)  # NotifyOp
    masked = b"\x7b\x60" + _aml_int(EVT_POWER_DOWN) + b"\x00"  # AndOp Local0 value, no target
    predicate = b"\x93" + masked + _aml_int(EVT_POWER_DOWN)  # LEqualOp
    if_body = predicate + notify
    body = b"\x70" + _nameseg("ESEL") + b"\x60"  # StoreOp ESEL -> Local0
    body += b"\xa0" + aml_pkglength(len(if_body)) + if_body  # IfOp
    method_inner = _nameseg("_EVT") + b"\x09" + body  # MethodFlags: 1 argument, Serialized
    method = b"\x14" + aml_pkglength(len(method_inner)) + method_inner  # MethodOp
    ged = _aml_device(
        "GED_",
        _aml_name("_HID", _aml_string("ACPI0013"))
        + _aml_name("_UID", _aml_int(0))
        + _aml_name("_CRS", _res_template(_res_interrupt(GED_IRQ)))
        + region + field + method,
    )
    return ged + _aml_device(
        "PWRB",
        _aml_name("_HID", b"\x0c" + bytes.fromhex("41d00c0c"))  # EISAID("PNP0C0C")
        + _aml_name("_UID", _aml_int(0)),
    )


def _dsdt(slots: Sequence[VirtioSlot]) -> bytes:
    devices = _ged_and_power_button()
    devices += _aml_device(
        "COM1",
        _aml_name("_HID", b"\x0c" + bytes.fromhex("41d00501"))  # EISAID("PNP0501")
        + _aml_name("_UID", _aml_int(0))
        + _aml_name("_CRS", _res_template(_res_io(COM1[0], COM1[1]), _res_interrupt(COM1[2]))),
    )
    devices += _aml_device(
        "PS2_",
        _aml_name("_HID", b"\x0c" + bytes.fromhex("41d00303"))  # EISAID("PNP0303")
        + _aml_name(
            "_CRS",
            _res_template(_res_io(*I8042[0]), _res_io(*I8042[1]), _res_interrupt(I8042[2])),
        ),
    )
    for i, s in enumerate(slots):
        devices += _aml_device(
            f"V{i:03d}",
            _aml_name("_HID", _aml_string("LNRO0005"))
            + _aml_name("_UID", _aml_int(i))
            + _aml_name("_CRS", _res_template(_res_mem32_fixed(s.base, s.size), _res_interrupt(s.irq))),
        )
    inner = b"\x5c" + _nameseg("_SB_") + devices  # RootChar + NameSeg
    scope = b"\x10" + aml_pkglength(len(inner)) + inner  # ScopeOp
    return _table(b"DSDT", 2, scope)


def build_acpi(cpus: int, virtio: Sequence[VirtioSlot] = ()) -> AcpiTables:
    """The ACPI tables for `cpus` vCPUs and the populated virtio-mmio slots, for the fixed addresses
    of the loader table. Raises ConfigError when a table would not fit its slot (too many vCPUs or
    devices) or a slot's numbers are out of range."""
    if not 1 <= cpus <= 255:
        raise ConfigError(f"the ACPI MADT supports 1 to 254 vCPUs, not {cpus}")
    for s in virtio:
        if not (s.base >= 0 and s.base + s.size <= 1 << 32 and s.size > 0 and 0 <= s.irq < 256):
            raise ConfigError(f"virtio-mmio slot {s} cannot be described in ACPI")
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", L.ACPI_FADT_START, L.ACPI_MADT_START))
    tables = AcpiTables(
        rsdp=_rsdp(L.ACPI_XSDT_START),
        xsdt=xsdt,
        fadt=_fadt(L.ACPI_DSDT_START),
        madt=_madt(cpus),
        dsdt=_dsdt(virtio),
    )
    for name, addr, data in tables.writes():
        slot = L.slot(name)
        if addr + len(data) > slot.end:
            raise ConfigError(
                f"the {name} ({len(data)} bytes) does not fit its slot [{slot.start:#x}, {slot.end:#x})"
            )
    return tables
