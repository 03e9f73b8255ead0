"""Register-level device models. Devices see offsets inside their own range, never port numbers or
guest physical addresses; interrupt lines, output sinks, callbacks and metrics are passed in.

Everything here is pure (no file descriptors, no KVM): the runtime wires an `IrqLine` to an irqfd and
registers each device on the PIO bus at the base the module exports (e.g. `COM1_BASE`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "DEBUG_EXIT_BASE",
    "DEBUG_EXIT_LEN",
    "I8042_BASE",
    "I8042_LEN",
    "SERIAL_LEN",
    "DebugExit",
    "I8042Device",
    "I8042Metrics",
    "IrqLine",
    "Serial",
    "SerialMetrics",
]


@runtime_checkable
class IrqLine(Protocol):
    """An edge-triggered interrupt line. At runtime it is backed by an irqfd (one eventfd write per
    edge); tests use `bulkhead.testing.FakeIrq`. `trigger()` must not call back into the device."""

    def trigger(self) -> None: ...


# Imported after IrqLine is defined; the device modules only need IrqLine for annotations.
from bulkhead.devices.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, DebugExit  # noqa: E402
from bulkhead.devices.i8042 import I8042_BASE, I8042_LEN, I8042Device, I8042Metrics  # noqa: E402
from bulkhead.devices.serial import COM1_BASE, COM1_IRQ, SERIAL_LEN, Serial, SerialMetrics  # noqa: E402
