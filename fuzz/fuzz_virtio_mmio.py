"""atheris harness for the virtio-mmio register file (bulkhead.devices.virtio.mmio).

Input: 7-byte records [op, off_lo, off_hi, v0, v1, v2, v3] applied to an MmioTransport in front of a
virtio-rng device. op & 3: 0 read, 1 write, 2 notify(value), 3 write 0 to the used/avail area at
QUEUE_BASE + value (so rings change under the device); (op >> 2) & 3 picks the width from (1, 2, 4, 8);
the offset is off % 0x200. Checks: reads fit their width, status only ever holds defined bits,
interrupt status only bits 0-1. A crash is any exception, a broken invariant or a hang.

Run: .venv/bin/python fuzz/fuzz_virtio_mmio.py -runs=20000
With seeds: .venv/bin/python fuzz/fuzz_virtio_mmio.py -runs=20000 /tmp/vmmio-corpus fuzz/corpus/virtio_mmio
Regenerate seeds: .venv/bin/python fuzz/fuzz_virtio_mmio.py --make-seeds fuzz/corpus/virtio_mmio
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio import mmio
    from bulkhead.devices.virtio.rng import RngDevice
    from bulkhead.testing import FakeIrq

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_virtio_common import MEM_SIZE, QUEUE_BASE, main, memory

from bulkhead.testing.virtqueue import setup_transport

WIDTHS = (1, 2, 4, 8)
REC = struct.Struct("<BHI")


def run(data: bytes) -> None:
    mem = memory()
    mem.fill(0, MEM_SIZE, 0)
    t = mmio.MmioTransport(RngDevice(source=lambda n: bytes(n)), mem, FakeIrq())
    for i in range(0, len(data) - REC.size + 1, REC.size):
        op, off, value = REC.unpack_from(data, i)
        size = WIDTHS[(op >> 2) & 3]
        off %= 0x200
        if off + size > 0x200:
            continue
        kind = op & 3
        if kind == 0:
            v = t.read(off, size)
            if not 0 <= v < 1 << (8 * size):
                raise AssertionError(f"read {off:#x}/{size} = {v:#x}")
        elif kind == 1:
            t.write(off, size, value & ((1 << (8 * size)) - 1))
        elif kind == 2:
            t.notify(value)
        else:
            mem.write_u16(QUEUE_BASE + (value % 0x4000), value >> 16)
        if t.status & ~0xCF or t.interrupt_status & ~3:
            raise AssertionError(f"status {t.status:#x} / isr {t.interrupt_status:#x}")


def TestOneInput(data: bytes) -> None:
    run(data)


class _Recorder:
    """Wraps a transport and records every access as harness records."""

    def __init__(self, t: mmio.MmioTransport) -> None:
        self.t, self.out = t, bytearray()
        self.mem, self.queues = t.mem, t.queues

    def read(self, off: int, size: int) -> int:
        self.out += REC.pack(0 | WIDTHS.index(size) << 2, off, 0)
        return self.t.read(off, size)

    def write(self, off: int, size: int, value: int) -> None:
        self.out += REC.pack(1 | WIDTHS.index(size) << 2, off, value)
        self.t.write(off, size, value)


def make_seeds(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    mem = memory()
    rec = _Recorder(mmio.MmioTransport(RngDevice(), mem, FakeIrq()))
    setup_transport(rec, base_addr=QUEUE_BASE, queue_size=8)  # type: ignore[arg-type]
    with open(os.path.join(out, "handshake"), "wb") as f:
        f.write(bytes(rec.out) + REC.pack(2, 0, 0) + REC.pack(1 | 2 << 2, 0x70, 0))
    cfg = b"".join(REC.pack(w << 2, 0x100 + o, 0) for w in range(4) for o in (0, 1, 0xFC, 0xFF))
    with open(os.path.join(out, "config_edges"), "wb") as f:
        f.write(cfg)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
    else:
        main(TestOneInput)
