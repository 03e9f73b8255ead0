"""atheris harness for the split virtqueue parser (bulkhead.devices.virtio.queue).

Input: a 6-byte header [size_code, features, desc_off, avail_off, used_off, pops] then the bytes of
guest memory from the descriptor table on (descriptor table, available ring, used ring, data), laid
out like the mock driver's: desc = base + desc_off, avail = base + 16*size + avail_off,
used = align4(base + 16*size + 6 + 2*size) + used_off. size = 1 << (size_code % 7) unless bit 7 of
size_code is set, then size = size_code & 0x7f (often not a power of two). features bit 0 = INDIRECT_DESC,
bit 1 = EVENT_IDX. A crash is any exception other than GuestFault, a broken invariant on a chain the
parser accepted, or a hang.

Run: .venv/bin/python fuzz/fuzz_virtio_queue.py -runs=100000
With seeds: .venv/bin/python fuzz/fuzz_virtio_queue.py -runs=100000 /tmp/vq-corpus fuzz/corpus/virtio_queue
Regenerate seeds: .venv/bin/python fuzz/fuzz_virtio_queue.py --make-seeds fuzz/corpus/virtio_queue
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio.queue import (
        MAX_INDIRECT_ENTRIES,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        Queue,
    )
    from bulkhead.errors import GuestFault

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_virtio_common import QUEUE_BASE, memory

from bulkhead.testing.virtqueue import MockVirtqueueDriver

HDR = 6


def layout(size: int, d: int, a: int, u: int) -> tuple[int, int, int]:
    avail = QUEUE_BASE + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    return QUEUE_BASE + d, avail + a, used + u


def run(data: bytes) -> None:
    if len(data) < HDR:
        return
    size_code, feats, d, a, u, pops = data[:HDR]
    size = size_code & 0x7F if size_code & 0x80 else 1 << (size_code % 7)
    mem = memory()
    mem.fill(QUEUE_BASE, 0x10000, 0)
    mem.write(QUEUE_BASE, data[HDR : HDR + 0x8000])
    q = Queue(64)
    q.size = size
    q.desc_table, q.avail_ring, q.used_ring = layout(size, d, a, u)
    q.set_features((feats & 1) << VIRTIO_F_INDIRECT_DESC | (feats >> 1 & 1) << VIRTIO_F_EVENT_IDX)
    try:
        q.activate(mem)
        for _ in range(pops % 32 + 1):
            chain = q.pop(mem)
            if chain is None:
                q.enable_notification(mem)
                break
            if not 0 <= chain.head < size:
                raise AssertionError("head out of range")
            for addr, n in chain.readable + chain.writable:
                if n <= 0 or not mem.contains(addr, n):
                    raise AssertionError(f"accepted buffer {addr:#x}+{n:#x}")
            if chain.read_len + chain.write_len >= 1 << 32:
                raise AssertionError("chain length not capped")
            if chain.descriptors > size + MAX_INDIRECT_ENTRIES:
                raise AssertionError("chain step limit not enforced")
            q.add_used(mem, chain.head, chain.write_len)
            q.needs_notification(mem)
    except GuestFault:
        pass


def TestOneInput(data: bytes) -> None:
    run(data)


def make_seeds(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    mem = memory()
    for name, feats, build in [
        ("direct", 0, lambda m: [m.add_chain([b"hdr" * 5], [64, 1]), m.add_chain([b"x"])]),
        ("indirect", 1, lambda m: [m.add_chain([b"abc"], [32, 1], indirect=True)]),
        ("event_idx", 3, lambda m: [m.add_chain(writable=[16]) for _ in range(3)]),
    ]:
        mem.fill(QUEUE_BASE, 0x10000, 0)
        m = MockVirtqueueDriver(mem, 8, QUEUE_BASE, data_size=0x1000)
        build(m)
        with open(os.path.join(out, name), "wb") as f:
            f.write((bytes([3, feats, 0, 0, 0, 8]) + mem.read(QUEUE_BASE, m.data_end - QUEUE_BASE)).rstrip(b"\0"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
    else:
        from fuzz_virtio_common import main

        main(TestOneInput)
