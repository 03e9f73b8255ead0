"""The interrupt line a device raises (pure). Re-exported by bulkhead.devices."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["IrqLine"]


@runtime_checkable
class IrqLine(Protocol):
    """An edge-triggered interrupt line. At runtime it is backed by an irqfd (one eventfd write per
    edge); tests use `bulkhead.testing.FakeIrq`. `trigger()` must not call back into the device."""

    def trigger(self) -> None: ...
