"""atheris harness for the ACPI GED model (bulkhead.devices.ged). A crash is any exception or a broken
invariant (a read returning more than its width, a selector that does not clear on read).

Input: 3-byte records [op, offset, width]: op & 1 read/write, op >= 0xf0 the host's power button;
offset % 8 - 2 (so offsets outside the register are reachable); width from (1, 2, 4, 8).

Run: .venv/bin/python fuzz/fuzz_ged.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices import ged as g
    from bulkhead.testing import FakeIrq

WIDTHS = (1, 2, 4, 8)


def run(data: bytes) -> None:
    irq = FakeIrq()
    dev = g.Ged(irq)
    for i in range(0, len(data) - 2, 3):
        op, off, w = data[i], data[i + 1] % 8 - 2, WIDTHS[data[i + 2] & 3]
        if op >= 0xF0:
            dev.power_button()
        elif op & 1:
            dev.write(off, w, op)
        else:
            v = dev.read(off, w)
            if not 0 <= v < (1 << (8 * w)):
                raise AssertionError(f"read({off}, {w}) = {v:#x}")
            if off == 0 and w == g.GED_LEN and dev.read(0, g.GED_LEN) != 0:
                raise AssertionError("the selector did not clear on read")
    if irq.count != dev.metrics.power_button:
        raise AssertionError("one interrupt per power-button press")


def TestOneInput(data: bytes) -> None:
    run(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
