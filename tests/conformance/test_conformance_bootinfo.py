"""The boot paths and the boot information a kernel reads (payloads/bootinfo.c): PVH (hvm_start_info)
for ELF images linked the ordinary way, the Linux 64-bit entry of a vmlinux-style ELF, and a bzImage.

QEMU enters a bzImage through its real-mode setup code (Linux 32-bit protocol, no e820 map: the
payload's stub makes no BIOS call) and cannot boot an ELF without a PVH note; bulkhead enters both
through the 64-bit boot protocol with its e820 map. The command line must arrive unchanged on every
path, and the memory map must describe the same usable RAM where both VMMs provide one.
"""

from __future__ import annotations

import pytest
from tests.conformance.common import needs_both
from tests.conformance.harness import Guest, build, run_both

pytestmark = needs_both

CMDLINE = 'console=ttyS0 key=value quoted="a b" last'
MIB = 1 << 20


@pytest.mark.parametrize("variant", ["ttext", "default"])
def test_pvh_start_info_matches_qemu(variant: str) -> None:
    q, b = run_both(Guest(build("bootinfo", variant), CMDLINE))
    assert q.passed and b.passed, (q, b)
    for out in (q, b):
        assert out.facts("BOOT")["proto"] == "pvh" and out.facts("BOOT")["magic_ok"] == "1"
        assert out.with_prefix("CMDLINE") == [f"CMDLINE {CMDLINE}"]
        # usable RAM: the low 639 KiB and everything from 1 MiB (QEMU and bulkhead both)
        assert int(out.facts("MAP_SUMMARY")["usable"], 16) == 0x9FC00 + 128 * MIB - MIB
        assert out.facts("RSDP")["via"] == "start_info"  # hvm_start_info.rsdp_paddr
    assert q.facts("MAP_SUMMARY")["usable_above_1m"] == b.facts("MAP_SUMMARY")["usable_above_1m"]


def test_vmlinux_elf_boots_through_the_linux_64bit_entry() -> None:
    q, b = run_both(Guest(build("bootinfo", "vmlinux"), CMDLINE))
    assert not q.lines and "without PVH ELF Note" in q.stderr  # QEMU microvm: PVH only
    assert b.passed, b
    assert b.facts("BOOT") == {"proto": "linux64", "info": "0x7000", "hdrs_ok": "1"}
    assert b.with_prefix("CMDLINE") == [f"CMDLINE {CMDLINE}"]
    assert int(b.facts("MAP_SUMMARY")["usable"], 16) == 0x9FC00 + 128 * MIB - MIB
    assert b.facts("RSDP")["via"] == "boot_params"  # boot_params.acpi_rsdp_addr


def test_bzimage_boots_on_both() -> None:
    q, b = run_both(Guest(build("bootinfo", "bzimage"), CMDLINE))
    assert q.passed and b.passed, (q, b)
    assert q.facts("BOOT")["proto"] == "linux32" and b.facts("BOOT")["proto"] == "linux64"
    for out in (q, b):
        assert out.facts("BOOT")["hdrs_ok"] == "1"
        assert out.with_prefix("CMDLINE") == [f"CMDLINE {CMDLINE}"]
    # bulkhead passes its e820 map in boot_params; QEMU's real-mode path leaves it to the BIOS.
    assert q.facts("MAP_SUMMARY")["entries"] == "0"
    assert int(b.facts("MAP_SUMMARY")["usable"], 16) == 0x9FC00 + 128 * MIB - MIB
    # ACPI: bulkhead's RSDP pointer is in boot_params; QEMU leaves acpi_rsdp_addr 0 and the guest
    # finds the RSDP by scanning the BIOS area, as Linux does.
    assert b.facts("RSDP")["via"] == "boot_params" and q.facts("RSDP")["via"] == "scan"
