"""atheris harness for the 16550A model (bulkhead.devices.serial). A crash is any exception.

Input format (so seeds are easy to write by hand): a sequence of 3-byte records
    [op, offset, arg]
op & 3: 0 read, 1 write (value = arg), 2 host input (arg = length of the bytes that follow),
3 flush. (op >> 2) & 7 selects the access width from (1, 1, 1, 2, 4, 0, 8, 3).
offset is taken as (offset % 12) - 1, so -1 and 8-10 (outside the device) are reachable.
After every step the harness checks the register invariants and raises AssertionError on a breach.

Run: .venv/bin/python fuzz/fuzz_serial.py -runs=100000
With the seeds (the first directory receives new inputs, so keep it outside the repo):
     .venv/bin/python fuzz/fuzz_serial.py -runs=100000 /tmp/serial-corpus fuzz/corpus/serial
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices import serial as s
    from bulkhead.testing import FakeIrq

WIDTHS = (1, 1, 1, 2, 4, 0, 8, 3)
CAPACITY = 64


def run(data: bytes) -> None:
    irq = FakeIrq()
    out: list[bytes] = []
    dev = s.Serial(irq, out.append, rx_capacity=CAPACITY, flush_threshold=32)
    i = 0
    while i + 3 <= len(data):
        op, off, arg = data[i], data[i + 1], data[i + 2]
        i += 3
        size = WIDTHS[(op >> 2) & 7]
        offset = off % 12 - 1
        kind = op & 3
        if kind == 0:
            v = dev.read(offset, size)
            if not 0 <= v < (1 << (8 * size)) and not (size == 0 and v == 0):
                raise AssertionError(f"read({offset}, {size}) = {v:#x} out of range")
        elif kind == 1:
            dev.write(offset, size, arg | (op << 8))
        elif kind == 2:
            chunk = data[i : i + arg]
            i += arg
            if not 0 <= dev.enqueue_input(chunk) <= len(chunk):
                raise AssertionError("enqueue_input accepted more than it was given")
        else:
            dev.flush()
        if not 0 <= dev.rx_pending <= CAPACITY:
            raise AssertionError(f"receive queue holds {dev.rx_pending} bytes")
    dev.flush()
    if sum(map(len, out)) != dev.metrics.bytes_out:
        raise AssertionError("output bytes lost")
    if irq.count != dev.metrics.irq_triggers:
        raise AssertionError("interrupt edges and metrics disagree")
    lsr = dev.read(s.LSR, 1)
    if lsr & (s.LSR_THRE | s.LSR_TEMT) != s.LSR_THRE | s.LSR_TEMT or bool(lsr & s.LSR_DR) != (
        dev.rx_pending > 0
    ):
        raise AssertionError(f"LSR {lsr:#x} inconsistent")
    if dev.read(s.IIR, 1) & 0x3F not in (0x00, 0x01, 0x02, 0x04):
        raise AssertionError("IIR reports an interrupt the model cannot raise")


def TestOneInput(data: bytes) -> None:
    run(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
