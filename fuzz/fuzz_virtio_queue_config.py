"""atheris harness for the split-virtqueue configuration check (`Queue.validate`, virtio 1.2 §2.7, §4.2.2).

Input: 29 bytes [mode, size u32, desc u64, avail u64, used u64] (little endian; shorter inputs are
zero-padded). `mode` moves each address near a boundary of guest memory (the end of the low region,
the MMIO hole, the start of the high region, the top of the 64-bit space) so the fuzzer reaches the
edges quickly. Guest memory has two regions with a hole between them, like a VM above 3 GiB.

`validate` must accept exactly the configurations an independent oracle accepts (size a non-zero
power of two <= QueueNumMax, desc/avail/used aligned 16/2/4, each area inside one region, no two
areas overlapping), and refuse every other one with a VirtioFault carrying a FaultReason. A crash is
any other exception, a wrong verdict, or a reason that is not a FaultReason.

Run: .venv/bin/python fuzz/fuzz_virtio_queue_config.py -runs=100000
Regenerate seeds: .venv/bin/python fuzz/fuzz_virtio_queue_config.py --make-seeds fuzz/corpus/virtio_queue_config
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
    from bulkhead.devices.virtio.queue import Queue
    from bulkhead.memory import GuestMemory

sys.path.insert(0, os.path.dirname(__file__))

LOW = (0, 1 << 20)
HIGH = (1 << 32, 1 << 20)
MAX = 256
U64 = (1 << 64) - 1
_FMT = struct.Struct("<BIQQQ")
_EDGES = (0, LOW[1], 0xC000_0000, HIGH[0], HIGH[0] + HIGH[1], 1 << 64)

_mem: GuestMemory | None = None


def memory() -> GuestMemory:
    global _mem
    if _mem is None:
        _mem = GuestMemory([LOW, HIGH])
    return _mem


def oracle(size: int, desc: int, avail: int, used: int) -> bool:
    """The configuration rules, written independently of queue.py."""
    if size < 1 or size > MAX or size & (size - 1) or desc % 16 or avail % 2 or used % 4:
        return False
    areas = [(desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)]
    for a, n in areas:
        if not any(base <= a and a + n <= base + length for base, length in (LOW, HIGH)):
            return False
    return all(
        a1 + n1 <= a2 or a2 + n2 <= a1 for i, (a1, n1) in enumerate(areas) for a2, n2 in areas[i + 1 :]
    )


def place(mode: int, shift: int, value: int) -> int:
    """Keep `value` as is, or move it to within +-32 KiB of one boundary (selected by mode bits)."""
    sel = (mode >> shift) & 3
    if sel == 0:
        return value
    edge = _EDGES[(mode + sel + shift) % len(_EDGES)]
    return (edge + (value & 0xFFFF) - 0x8000) & U64


def TestOneInput(data: bytes) -> None:
    mode, size, desc, avail, used = _FMT.unpack(data[: _FMT.size].ljust(_FMT.size, b"\0"))
    if mode & 0x80:
        size &= 0x1FF  # small sizes: mostly near MAX
    desc, avail, used = place(mode, 0, desc), place(mode, 2, avail), place(mode, 4, used)
    q = Queue(MAX)
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, desc, avail, used
    expect = oracle(size, desc, avail, used)
    try:
        q.validate(memory())
    except VirtioFault as exc:
        if expect:
            raise AssertionError(f"valid configuration refused: {exc}") from None
        if not isinstance(exc.reason, FaultReason):
            raise AssertionError(f"untyped reason {exc.reason!r}") from None
        return
    if not expect:
        raise AssertionError(f"invalid configuration accepted: {size} {desc:#x} {avail:#x} {used:#x}")


def make_seeds(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    seeds = {
        "valid": (0x80, 16, 0x1000, 0x2000, 0x3000),
        "npot": (0x80, 12, 0x1000, 0x2000, 0x3000),
        "unaligned": (0x80, 16, 0x1008, 0x2001, 0x3002),
        "high_region": (0, 16, HIGH[0] + 0x1000, HIGH[0] + 0x2000, HIGH[0] + 0x3000),
        "past_end": (0x80, 16, LOW[1] - 0x80, 0x2000, 0x3000),
        "wrap": (0x80, 16, (1 << 64) - 0x80, 0x2000, 0x3000),
        "overlap": (0x80, 16, 0x1000, 0x1010, 0x3000),
    }
    for name, fields in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(_FMT.pack(*fields))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
    else:
        from fuzz_virtio_common import main

        main(TestOneInput)
