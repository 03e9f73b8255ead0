"""Register-level device models. Devices see offsets inside their own range, never port numbers or
guest physical addresses; interrupt lines, output sinks, callbacks and metrics are passed in.

Everything here is pure (no file descriptors, no KVM): the runtime wires an `IrqLine` to an irqfd and
registers each device on the PIO bus at the base the module exports (e.g. `COM1_BASE`).
"""

from __future__ import annotations

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


from bulkhead.devices.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, DebugExit
from bulkhead.devices.i8042 import I8042_BASE, I8042_LEN, I8042Device, I8042Metrics
from bulkhead.devices.irq import IrqLine
from bulkhead.devices.serial import COM1_BASE, COM1_IRQ, SERIAL_LEN, Serial, SerialMetrics
