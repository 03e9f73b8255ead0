"""ACPI discovery (payloads/acpi.c): the guest finds the RSDP, walks the XSDT and reads the FADT, MADT
and DSDT from guest memory, on QEMU microvm (acpi=on, its default) and on bulkhead.

Must agree: RSDP revision 2 with valid checksums, the XSDT listing FACP and APIC, a hardware-reduced
FADT, one MADT Local APIC per vCPU, an I/O APIC, one LNRO0005 device per virtio-mmio device, valid
checksums everywhere. May differ: addresses, table lengths and revisions, QEMU's second I/O APIC
(microvm's ioapic2 for its extra pins; bulkhead has the 24-pin one KVM emulates) and QEMU's FADT
RESET_REG_SUPPORTED flag (its GED reset register; bulkhead resets through the i8042).
"""

from __future__ import annotations

import pytest
from tests.conformance.common import needs_both
from tests.conformance.harness import Guest, build, run_both

pytestmark = needs_both


@pytest.mark.parametrize(("cpus", "rng"), [(1, False), (2, True)])
def test_acpi_tables_match_qemu(cpus: int, rng: bool) -> None:
    q, b = run_both(Guest(build("acpi"), cpus=cpus, rng=rng))
    assert q.passed and b.passed, (q, b)
    for out in (q, b):
        rsdp = out.facts("RSDP")
        assert (rsdp["rev"], rsdp["sum20_ok"], rsdp["sum36_ok"], rsdp["via"]) == ("2", "1", "1", "start_info")
        assert all("sum_ok=1" in line for line in out.with_prefix("TABLE"))
        assert out.facts("DSDT")["sum_ok"] == "1"
        assert out.facts("FADT")["hw_reduced"] == "1"
        assert int(out.facts("MADT")["ioapics"]) >= 1
    sigs = {line.split()[1] for line in q.with_prefix("TABLE")}
    assert sigs == {line.split()[1] for line in b.with_prefix("TABLE")} == {"FACP", "APIC"}
    assert q.facts("MADT")["lapics"] == b.facts("MADT")["lapics"] == str(cpus)
    assert q.facts("MADT")["lapic_addr"] == b.facts("MADT")["lapic_addr"]
    assert q.facts("DSDT")["lnro0005"] == b.facts("DSDT")["lnro0005"] == str(int(rng))


def test_virtio_devices_in_the_dsdt_match_the_command_line() -> None:
    """Each LNRO0005 device's _CRS gives the same window and interrupt as the device's
    virtio_mmio.device= token (bulkhead announces both); QEMU's devices are described the same way
    (a 0x200-byte window and one interrupt each) at its own addresses."""
    q, b = run_both(Guest(build("acpi"), "x", cpus=1, rng=True))
    assert q.passed and b.passed
    assert b.with_prefix("VIRTIO") == ["VIRTIO base=0xd0000000 size=0x200 irq=5"]
    (qv,) = [dict(w.split("=") for w in line.split()[1:]) for line in q.with_prefix("VIRTIO")]
    assert qv["size"] == "0x200" and int(qv["irq"]) < 256
