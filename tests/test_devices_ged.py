"""ACPI Generic Event Device (bulkhead.devices.ged): the power-down event of `vm shutdown`, QEMU's
register semantics (read-and-clear event selector), containment of other accesses."""

from __future__ import annotations

from bulkhead.devices import ged as g
from bulkhead.testing import FakeIrq


def test_power_button_sets_the_event_raises_the_interrupt_and_the_read_clears_it() -> None:
    irq = FakeIrq()
    dev = g.Ged(irq)
    assert dev.read(0, 4) == 0 and irq.count == 0
    dev.power_button()
    assert irq.count == 1
    assert dev.read(0, 4) == g.EVT_POWER_DOWN  # what _EVT reads (QEMU ACPI_GED_PWR_DOWN_EVT)
    assert dev.read(0, 4) == 0  # read and clear, as QEMU's ged_evt_read
    assert dev.metrics.as_dict() == {"power_button": 1, "events_read": 1, "bad_access": 0}


def test_writes_and_bad_accesses_are_contained() -> None:
    dev = g.Ged(FakeIrq())
    dev.power_button()
    dev.write(0, 4, 0)  # the selector is read-only: a guest cannot clear or forge events by writing
    for off, size in ((0, 1), (0, 2), (0, 8), (1, 4), (4, 4), (-1, 4)):
        assert dev.read(off, size) == (1 << (8 * size)) - 1
        dev.write(off, size, 0xFF)
    assert dev.read(0, 4) == g.EVT_POWER_DOWN
    assert dev.metrics.bad_access == 12


def test_the_register_sits_where_qemu_microvm_puts_it_and_clear_of_the_virtio_irqs() -> None:
    from bulkhead.memory.layout import VIRTIO_FIRST_IRQ

    assert (g.GED_BASE, g.GED_LEN) == (0xFEA0_0000, 4)
    assert g.GED_IRQ < VIRTIO_FIRST_IRQ and g.GED_IRQ not in (1, 2, 4)  # keyboard, cascade, COM1
