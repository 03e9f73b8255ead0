"""ACPI tables (bulkhead.boot.acpi), checked with an independent tool: iasl (acpica-tools)
disassembles every table without errors or checksum warnings; structure and checksums are also
decoded here. The guest-side read-back is tests/conformance/test_conformance_acpi.py."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from bulkhead.boot import layout as L
from bulkhead.boot.acpi import AcpiTables, VirtioSlot, aml_pkglength, build_acpi
from bulkhead.boot.mptable import MAX_CPUS
from bulkhead.errors import ConfigError

SLOTS = [VirtioSlot(0xD000_0000 + i * 0x1000, 0x200, 5 + i) for i in range(19)]


def csum_ok(data: bytes) -> bool:
    return sum(data) % 256 == 0


def test_rsdp_revision2_and_checksums() -> None:
    t = build_acpi(2)
    sig, _c, _oem, rev, rsdt, length, xsdt, _x, _r = struct.unpack("<8sB6sBIIQB3s", t.rsdp)
    assert (sig, rev, rsdt, length, xsdt) == (b"RSD PTR ", 2, 0, 36, L.ACPI_XSDT_START)
    assert csum_ok(t.rsdp[:20]) and csum_ok(t.rsdp)
    assert L.ACPI_RSDP_START % 16 == 0 and 0xE0000 <= L.ACPI_RSDP_START < 0x100000  # Linux's scan range


@pytest.mark.parametrize("cpus", [1, 2, MAX_CPUS])
def test_tables_structure(cpus: int) -> None:
    t = build_acpi(cpus, SLOTS[:3])
    for name in ("xsdt", "fadt", "madt", "dsdt"):
        data = getattr(t, name)
        assert struct.unpack_from("<I", data, 4)[0] == len(data) and csum_ok(data), name
    assert struct.unpack_from("<QQ", t.xsdt, 36) == (L.ACPI_FADT_START, L.ACPI_MADT_START)
    assert t.fadt[:4] == b"FACP" and len(t.fadt) == 276
    assert struct.unpack_from("<I", t.fadt, 112)[0] & (1 << 20)  # HW_REDUCED_ACPI
    assert struct.unpack_from("<Q", t.fadt, 140)[0] == L.ACPI_DSDT_START
    lapics = [t.madt[44 + 8 * i : 52 + 8 * i] for i in range(cpus)]
    assert [struct.unpack("<BBBBI", e) for e in lapics] == [(0, 8, i, i, 1) for i in range(cpus)]
    assert struct.unpack_from("<BBBBII", t.madt, 44 + 8 * cpus) == (1, 12, cpus, 0, 0xFEC0_0000, 0)
    assert t.dsdt.count(b"\x0dLNRO0005\x00") == 3


def test_everything_fits_its_slot_at_the_limits() -> None:
    t = build_acpi(MAX_CPUS, SLOTS)
    for name, addr, data in t.writes():
        assert addr + len(data) <= L.slot(name).end, name
    with pytest.raises(ConfigError, match="the ACPI MADT supports 1 to 254 vCPUs, not 0"):
        build_acpi(0)


def test_aml_pkglength() -> None:
    assert aml_pkglength(0x3E) == b"\x3f"
    assert aml_pkglength(0x3F) == bytes([0x40 | (0x41 & 0xF), 0x41 >> 4])  # 2-byte form counts itself
    enc = aml_pkglength(0x1000)
    assert enc[0] >> 6 == 2
    total = (enc[0] & 0xF) | (enc[1] << 4) | (enc[2] << 12)
    assert total == 0x1000 + 3


def _iasl(tmp: Path, t: AcpiTables) -> dict[str, str]:
    out = {}
    for name in ("xsdt", "fadt", "madt", "dsdt"):
        f = tmp / f"{name}.dat"
        f.write_bytes(getattr(t, name))
        p = subprocess.run(["iasl", "-d", str(f)], capture_output=True, text=True, cwd=tmp, check=False)
        log = p.stdout + p.stderr
        assert p.returncode == 0, log
        assert "error" not in log.lower() and "warning" not in log.lower() and "invalid" not in log.lower(), log
        out[name] = (tmp / f"{name}.dsl").read_text()
    return out


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_every_table(tmp_path: Path) -> None:
    dsl = _iasl(tmp_path, build_acpi(2, SLOTS[:2]))
    assert "Hardware Reduced (V5) : 1" in dsl["fadt"]
    assert dsl["madt"].count("[Processor Local APIC]") == 2 and "[I/O APIC]" in dsl["madt"]
    assert "Incorrect checksum" not in "".join(dsl.values())
    d = dsl["dsdt"]
    assert d.count('Name (_HID, "LNRO0005")') == 2
    assert "0xD0001000,         // Address Base" in d and "0x00000006," in d
    assert 'EisaId ("PNP0501")' in d and 'EisaId ("PNP0303")' in d
    # iasl recompiles its own disassembly of our DSDT without errors
    p = subprocess.run(["iasl", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert p.returncode == 0 and "Compilation successful" in p.stdout + p.stderr, p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_at_the_limits(tmp_path: Path) -> None:
    dsl = _iasl(tmp_path, build_acpi(MAX_CPUS, SLOTS))
    assert dsl["dsdt"].count('"LNRO0005"') == 19
    assert dsl["madt"].count("[Processor Local APIC]") == MAX_CPUS


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_the_dsdt_has_qemu_microvms_ged_and_power_button(tmp_path: Path) -> None:
    """ACPI 6.5 §5.6.9: the Generic Event Device (the shape of QEMU microvm's DSDT, the oracle: same
    address, length, event bit) whose _EVT notifies the control-method power button (§4.8.2.2.1.2)."""
    from bulkhead.devices.ged import EVT_POWER_DOWN, GED_BASE, GED_IRQ, GED_LEN

    d = _iasl(tmp_path, build_acpi(1))["dsdt"]
    assert 'Name (_HID, "ACPI0013" /* Generic Event Device */)' in d
    assert f"OperationRegion (EREG, SystemMemory, 0x{GED_BASE:08X}, 0x{GED_LEN:02X})" in d
    assert "Field (EREG, DWordAcc, NoLock, WriteAsZeros)" in d and "ESEL,   32" in d
    assert "Method (_EVT, 1, Serialized)" in d
    assert f"If (((Local0 & 0x{EVT_POWER_DOWN:02X}) == 0x{EVT_POWER_DOWN:02X}))" in d
    assert "Notify (\\_SB.PWRB, 0x80)" in d
    assert 'EisaId ("PNP0C0C") /* Power Button Device */' in d
    assert f"0x{GED_IRQ:08X}," in d
    p = subprocess.run(["iasl", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert p.returncode == 0 and "Compilation successful" in p.stdout + p.stderr, p.stdout + p.stderr
