"""Ring 3: on the VMM's boot TSS (IOPL 3, port I/O from ring 3) and on a guest-built TSS whose I/O
permission bitmap allows COM1 and the exit port only (payloads/ring3.c). Ring 3 is entered with
iretq (sysretq faults on PVM hosts, see the project guide); the guest's RING3/FAULT/PASS lines must
be identical on both VMMs.

Before bulkhead handed over Firecracker's boot TSS descriptor (limit 0xfffff pages), its TSS limit was
0x67: no I/O bitmap, and on a PVM host ring-3 port I/O consults the bitmap even at IOPL 3, so the
boot_tss case raised #GP on bulkhead (and triple-faulted a guest without an IDT) while QEMU ran it.
"""

from __future__ import annotations

import pytest
from tests.conformance.common import needs_both
from tests.conformance.harness import Guest, build, run_both

pytestmark = needs_both


@pytest.mark.parametrize("variant", ["ttext", "default", "bzimage"])
def test_ring3_port_io_on_the_boot_tss(variant: str) -> None:
    """PVH for the ELF variants; the bzImage enters QEMU through real mode (TR keeps its reset value)
    and bulkhead through the 64-bit protocol (its boot TSS)."""
    q, b = run_both(Guest(build("ring3", variant), "boot_tss"))
    assert q.passed and b.passed, (q, b)
    assert not b.with_prefix("FAULT")
    assert q.with_prefix("RING3") == b.with_prefix("RING3")
    r3 = b.facts("RING3")
    assert r3["cpl"] == "3"
    assert (r3["mxcsr"], r3["fcw"]) == ("0x1f80", "0x37f")  # the reset values both VMMs hand over


def test_ring3_on_a_guest_tss_with_an_io_bitmap() -> None:
    q, b = run_both(Guest(build("ring3"), "iobitmap"))
    assert q.passed and b.passed, (q, b)
    for prefix in ("TSS", "RING3", "FAULT", "DENIED"):
        assert q.with_prefix(prefix) == b.with_prefix(prefix), prefix
    fault = b.facts("FAULT")
    assert (fault["vector"], fault["cpl"], fault["err"]) == ("13", "3", "0x0")  # #GP from ring 3


def test_ring3_on_the_boot_tss_after_the_linux64_entry() -> None:
    """The vmlinux-style ELF (no PVH note): QEMU microvm refuses it, bulkhead enters it in long mode
    with the same boot TSS."""
    q, b = run_both(Guest(build("ring3", "vmlinux"), "boot_tss"))
    assert "without PVH ELF Note" in q.stderr
    assert b.passed and not b.with_prefix("FAULT"), b
    assert b.facts("RING3")["cpl"] == "3"
