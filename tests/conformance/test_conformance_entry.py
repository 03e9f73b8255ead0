"""Entry state: the CPU state each VMM hands a PVH guest, read back by the guest (payloads/entry_state.c).

QEMU microvm is the oracle. The PVH ABI (xen docs/misc/pvh.pandoc) fixes: 32-bit protected mode,
paging off (CR0.PG = 0, CR0.PE = 1), CR4 = 0, EFER = 0, EFLAGS.IF/TF/VM clear, flat 4 GiB CS/DS/ES/SS,
EBX = hvm_start_info. Those must agree. What the ABI leaves open (selector values, the GDT/IDT's place,
ESP, EAX, TR's selector) differs on purpose; each difference is asserted exactly and explained.
"""

from __future__ import annotations

import pytest
from tests.conformance.common import needs_both
from tests.conformance.harness import Guest, build, run_both

pytestmark = needs_both

MUST_AGREE = ("proto", "cr0", "cr3", "cr4", "eflags", "efer", "cs", "rsi_hi")


@pytest.mark.parametrize("variant", ["ttext", "default"])
def test_pvh_entry_state_matches_qemu(variant: str) -> None:
    q, b = run_both(Guest(build("entry_state", variant)))
    assert q.passed and b.passed, (q, b)
    qe, be = q.facts("ENTRY"), b.facts("ENTRY")
    for key in MUST_AGREE:
        assert qe[key] == be[key], (key, qe[key], be[key])
    assert be["cr0"] == "0x11"  # PE | ET: protected mode, paging off
    assert be["cr4"] == "0x0" and be["efer"] == "0x0"
    assert int(be["eflags"], 16) & 0x20300 == 0  # IF, TF, VM clear
    # EBX points at hvm_start_info on both (QEMU's firmware places it itself, bulkhead at 0x6000).
    assert int(qe["ebx"], 16) and be["ebx"] == "0x6000"
    # Deliberate differences (the PVH ABI leaves them unspecified):
    # - data selectors: bulkhead's GDT follows Documentation/arch/x86/boot.rst (__BOOT_DS = 0x18);
    #   QEMU's firmware (qboot) uses 0x10. Both are flat 4 GiB read/write (the guest's loads through
    #   them to 3 GiB+ work on both: the LAPIC page is read by smp_timer.c).
    assert be["ds"] == be["es"] == be["ss"] == be["fs"] == be["gs"] == "0x18"
    assert qe["ds"] == "0x10"
    # - TR: bulkhead loads a TSS descriptor (selector 0x20, Firecracker's limit 0xfffff pages); QEMU's
    #   firmware never runs LTR, so TR keeps its reset value (selector 0, base 0, limit 0xffff).
    assert be["tr"] == "0x20" and qe["tr"] == "0x0"
    # - GDT / IDT: bulkhead's at 0x500 (48 bytes) and 0x540 (one zero entry, limit 7, as Firecracker);
    #   QEMU's GDT is in its firmware ROM and its IDTR keeps the reset value (base 0, limit 0xffff).
    assert (be["gdt_base"], be["gdt_limit"]) == ("0x500", "0x2f")
    assert (be["idt_base"], be["idt_limit"]) == ("0x540", "0x7")
    assert qe["idt_limit"] == "0xffff"
    # - ESP: unspecified by PVH; bulkhead hands over its boot stack (0x8ff0) on both protocols.
    assert be["esp"] == "0x8ff0"


def test_vcpu_registers_match_qemu() -> None:
    """MCG_CAP as QEMU sets it (10 banks, MCG_CTL_P | MCG_SER_P), the LAPIC base and BSP flag."""
    q, b = run_both(Guest(build("entry_state"), cpus=2))
    assert q.passed and b.passed
    assert b.facts("REG") == q.facts("REG")
    mcg = int(b.facts("REG")["mcg_cap"], 16)
    assert mcg & 0xFF == 10 and mcg & (1 << 8) and mcg & (1 << 24)
    assert b.facts("REG")["apic_base"] == "0xfee00900"  # xAPIC enabled, BSP


@pytest.mark.parametrize("variant", ["vmlinux", "bzimage"])
def test_linux64_entry_state_follows_boot_protocol(variant: str) -> None:
    """bulkhead enters an ELF without a PVH note (vmlinux-style) at e_entry and a bzImage at its load
    address + 0x200, in long mode (boot.rst "64-bit BOOT PROTOCOL"): paging on with an identity map,
    CS = __BOOT_CS (0x10), DS/ES/SS = __BOOT_DS (0x18), RSI = boot_params, interrupts off.
    QEMU microvm cannot take the 64-bit entry: it refuses the ELF (it loads ELF kernels only through the
    PVH note) and enters the bzImage through its real-mode setup code, whose stub reaches the 32-bit
    entry (paging off, ESI = boot_params). So the oracle for the 64-bit entry is the protocol text."""
    q, b = run_both(Guest(build("entry_state", variant)))
    if variant == "vmlinux":
        assert not q.lines and "without PVH ELF Note" in q.stderr, q  # QEMU refuses the image (status 1)
    else:
        assert q.passed, q
        qe = q.facts("ENTRY")
        assert qe["proto"] == "0x3" and int(qe["cr0"], 16) & 0x80000001 == 1 and int(qe["esi"], 16)
    assert b.passed, b
    e = b.facts("ENTRY")
    assert e["proto"] == "0x2"
    assert e["cr0"] == "0x80000031"  # PG | NE | ET | PE
    assert e["cr4"] == "0x20"  # PAE
    assert e["efer"] == "0x500"  # LME | LMA
    assert e["cr3"] == "0x9000"
    assert e["cs"] == "0x10" and e["ds"] == e["es"] == e["ss"] == "0x18"
    assert e["esi"] == "0x7000" and e["rsi_hi"] == "0x0"
    assert e["tr"] == "0x20"
    assert int(e["eflags"], 16) & 0x200 == 0
