"""ACPI Generic Event Device (GED) with a power-button event, after QEMU's hw/acpi/generic_event_device.c
as microvm uses it (QEMU is the oracle: same register, address, bit and AML shape), for `vm shutdown`.

ACPI 6.5 §5.6.9 (Interrupt-signaled ACPI events, the Generic Event Device, `_HID` "ACPI0013"): on a
hardware-reduced platform (our FADT sets HW_REDUCED_ACPI, boot/acpi.py) there is no SCI and no fixed
power button (§4.8.2.2.1 describes the fixed one, which needs PM1 event registers we do not have); an
event is an interrupt listed in the GED's `_CRS`, and OSPM runs the GED's `_EVT` method for it. Our DSDT
(boot/acpi.py) makes `_EVT` read the event selector below and, when the power-down bit is set, run
`Notify (\\_SB.PWRB, 0x80)` on a control-method power button device (`PNP0C0C`, §4.8.2.2.1.2): Linux's
evged + button drivers turn that into KEY_POWER (systemd-logind: poweroff).

Register (the device sees offsets inside its own `GED_LEN`-byte MMIO range):

    0  ESEL (event selector), 4 bytes: read returns the pending event bits and clears them (QEMU
       "read the selector value and reset it"); writes are ignored.

Bits: `EVT_POWER_DOWN` (1 << 1, QEMU's ACPI_GED_PWR_DOWN_EVT). `power_button()` sets it and raises the
interrupt (edge, irqfd; GSI `GED_IRQ`). Accesses of another width or offset are contained: reads return
all ones of their width, writes are dropped, both counted in `bad_access`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkhead.devices.irq import IrqLine

__all__ = ["EVT_POWER_DOWN", "GED_BASE", "GED_IRQ", "GED_LEN", "Ged", "GedMetrics", "declare_surfaces", "load_state",
           "save_state"]

GED_BASE = 0xFEA0_0000  # QEMU microvm's GED address, in the 32-bit MMIO hole below the IOAPIC
GED_LEN = 4  # ACPI_GED_EVT_SEL_LEN
GED_IRQ = 3  # ISA IRQ 3 is free (no COM2); pins 5-23 are the virtio-mmio slots (memory/layout.py)
EVT_POWER_DOWN = 1 << 1


class GedMetrics:
    """Counters (a plain class: see SerialMetrics for why not a dataclass)."""

    __slots__ = ("bad_access", "events_read", "power_button")

    def __init__(self) -> None:
        self.power_button = 0  # host power-button requests
        self.events_read = 0  # selector reads that returned a pending event
        self.bad_access = 0  # accesses of the wrong width or offset

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Ged:
    """The GED register machine. `irq`: the edge-triggered GED interrupt."""

    def __init__(self, irq: IrqLine, *, metrics: GedMetrics | None = None) -> None:
        self._irq = irq
        self.metrics = metrics if metrics is not None else GedMetrics()
        self._lock = threading.Lock()
        self._sel = 0

    def read(self, offset: int, size: int) -> int:
        """Read ESEL (offset 0, 4 bytes): the pending events, then cleared. Never raises."""
        with self._lock:
            if offset != 0 or size != GED_LEN:
                self.metrics.bad_access += 1
                return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
            value, self._sel = self._sel, 0
            if value:
                self.metrics.events_read += 1
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        """ESEL is read-only: writes are dropped (counted when they are malformed). Never raises."""
        if offset != 0 or size != GED_LEN:
            with self._lock:
                self.metrics.bad_access += 1

    def power_button(self) -> None:
        """The host presses the power button: set the power-down event and raise the interrupt."""
        with self._lock:
            self._sel |= EVT_POWER_DOWN
            self.metrics.power_button += 1
        self._irq.trigger()


def save_state(dev: Ged) -> dict[str, int]:
    """The pending event bits, for a snapshot (docs/SNAPSHOT.md): a power-button press the guest has not
    read yet survives the restore. Its interrupt is an edge already in the saved IOAPIC/LAPIC state."""
    with dev._lock:
        return {"sel": dev._sel}


def load_state(dev: Ged, doc: object) -> None:
    """Restore save_state() output. Raises ValueError (nothing changed): wrong fields, or event bits this
    GED never sets (only EVT_POWER_DOWN exists)."""
    from bulkhead.devices.state import fields

    st = fields(doc, {"sel": (0, 0xFFFF_FFFF)}, "acpi-ged")
    if st["sel"] & ~EVT_POWER_DOWN:
        raise ValueError(f"acpi-ged state field sel has event bits {st['sel']:#x} this device never sets")
    with dev._lock:
        dev._sel = int(st["sel"])


def declare_surfaces() -> None:
    """The GED's guest-reachable register (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "mmio",
        "acpi-ged",
        owner=__name__,
        boundary="guest-vmm",
        accepts="4-byte reads of the event selector at offset 0 (read and clear); writes and other "
        "widths/offsets are counted and contained",
        base=GED_BASE,
        length=GED_LEN,
        handler="Ged.read/Ged.write",
        fuzz="fuzz/fuzz_ged.py",
        spec="ACPI 6.5 §5.6.9 (Generic Event Device); QEMU hw/acpi/generic_event_device.c",
    )
