"""Test doubles shipped with the package. Kept minimal: other doubles live in their own modules
(e.g. `bulkhead.testing.virtqueue`) and are imported from there directly."""

from __future__ import annotations

from bulkhead.testing.irq import FakeIrq

__all__ = ["FakeIrq"]
