"""SMP start-up (INIT-SIPI-SIPI through a real-mode trampoline at 0x70000, a page the memory map must
mark usable), the LAPIC timer and hlt wake-ups (payloads/smp_timer.c). The processors come from the
ACPI MADT on both VMMs."""

from __future__ import annotations

import pytest
from tests.conformance.common import needs_both
from tests.conformance.harness import Guest, build, run_both

pytestmark = needs_both


@pytest.mark.parametrize("cpus", [1, 2])
def test_smp_and_lapic_timer_match_qemu(cpus: int) -> None:
    q, b = run_both(Guest(build("smp_timer"), cpus=cpus))
    assert q.passed and b.passed, (q, b)
    assert q.facts("TRAMPOLINE")["usable"] == b.facts("TRAMPOLINE")["usable"] == "1"
    for prefix in ("CPUS", "CPUS_UP", "TIMER"):
        assert q.facts(prefix) == b.facts(prefix), prefix
    assert sorted(q.with_prefix("APIC")) == sorted(b.with_prefix("APIC"))
    assert b.facts("CPUS_UP")["n"] == str(cpus)
    assert b.facts("TIMER") == {"ticks": "5", "hlt_wakeups": "5"}


def test_smp_and_timer_through_the_bzimage_entry() -> None:
    """QEMU enters the bzImage through real mode and passes no memory map on that path (the BIOS
    would), so the payload cannot prove 0x70000 usable and does not start the APs there; bulkhead enters
    through the 64-bit protocol with its e820 map and starts them. The LAPIC timer works on both."""
    q, b = run_both(Guest(build("smp_timer", "bzimage"), cpus=2))
    assert q.facts("TRAMPOLINE")["usable"] == "0" and q.facts("TRAMPOLINE")["map_entries"] == "0"
    assert b.passed, b
    assert b.facts("TRAMPOLINE")["usable"] == "1" and b.facts("CPUS_UP")["n"] == "2"
    assert q.facts("TIMER") == b.facts("TIMER") == {"ticks": "5", "hlt_wakeups": "5"}
