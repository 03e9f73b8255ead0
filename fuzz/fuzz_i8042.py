"""atheris harness for the i8042 model (bulkhead.devices.i8042). A crash is any exception.

Input format: a sequence of 3-byte records [op, offset, value]:
op & 1: 0 read, 1 write; (op >> 1) & 3 selects the width from (1, 1, 2, 4); op >= 0xf0: the host's
Ctrl-Alt-Del request (trigger_ctrl_alt_del) instead;
offset is taken as (offset % 8) - 1 (so -1 and 5-6, outside the device, are reachable).

Run: .venv/bin/python fuzz/fuzz_i8042.py -runs=100000
With the seeds: .venv/bin/python fuzz/fuzz_i8042.py -runs=100000 /tmp/i8042-corpus fuzz/corpus/i8042
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices import i8042 as k
    from bulkhead.testing import FakeIrq

WIDTHS = (1, 1, 2, 4)


def run(data: bytes) -> None:
    resets = [0]

    def on_reset() -> None:
        resets[0] += 1

    dev = k.I8042Device(on_reset, kbd_irq=FakeIrq())
    for i in range(0, len(data) - 2, 3):
        op, off, value = data[i], data[i + 1], data[i + 2]
        if op >= 0xF0:
            dev.trigger_ctrl_alt_del()
            if len(dev._buf) > k.BUF_SIZE:
                raise AssertionError("output buffer over BUF_SIZE")
            continue
        size = WIDTHS[(op >> 1) & 3]
        offset = off % 8 - 1
        if op & 1:
            dev.write(offset, size, value | (op << 8))
        else:
            v = dev.read(offset, size)
            if not 0 <= v < (1 << (8 * size)):
                raise AssertionError(f"read({offset}, {size}) = {v:#x} out of range")
    if resets[0] != dev.metrics.resets:
        raise AssertionError("reset callbacks and metrics disagree")
    status = dev.read(k.OFS_COMMAND, 1)
    if status & ~(k.SB_OUT_DATA_AVAIL | k.SB_CMD_DATA) != k.SB_KBD_ENABLED:
        raise AssertionError(f"status {status:#x} has impossible bits")


def TestOneInput(data: bytes) -> None:
    run(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
