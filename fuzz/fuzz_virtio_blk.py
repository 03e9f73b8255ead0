"""atheris harness for virtio-blk request parsing (bulkhead.devices.virtio.block) via the transport.

Input: [flags] then guest memory for the request queue from its descriptor table on (see
fuzz_virtio_common). flags bit 0 = read-only drive. The disk is a 64 KiB memfd. A crash is any
exception escaping the transport, a read-only disk that changed, or a hang.

Run: .venv/bin/python fuzz/fuzz_virtio_blk.py -runs=20000
With seeds: .venv/bin/python fuzz/fuzz_virtio_blk.py -runs=20000 /tmp/vblk-corpus fuzz/corpus/virtio_blk
Regenerate seeds: .venv/bin/python fuzz/fuzz_virtio_blk.py --make-seeds fuzz/corpus/virtio_blk
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio import block as blk

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_virtio_common import fresh_transport, load, main, make_seed

DISK = 64 * 1024
_fd = os.memfd_create("fuzz-disk")
os.ftruncate(_fd, DISK)
_PATTERN = bytes(i & 0xFF for i in range(DISK))


def run(data: bytes) -> None:
    if not data:
        return
    ro = bool(data[0] & 1)
    if ro:
        os.pwrite(_fd, _PATTERN, 0)
    dev = blk.BlockDevice(_fd, read_only=ro, disk_id="fuzz")
    t, _ = fresh_transport(dev)
    load(data[1:], 0)
    t.notify(0)
    t.timer_due(0.0)
    if ro and os.pread(_fd, DISK, 0) != _PATTERN:
        raise AssertionError("read-only disk modified")


def TestOneInput(data: bytes) -> None:
    run(data)


def make_seeds(out: str) -> None:
    os.makedirs(out, exist_ok=True)

    def hdr(t: int, sector: int = 0) -> bytes:
        return struct.pack("<IIQ", t, 0, sector)

    seeds = {
        "read": (0, lambda d: d[0].add_chain([hdr(blk.VIRTIO_BLK_T_IN, 2)], [1024, 1])),
        "write": (0, lambda d: d[0].add_chain([hdr(blk.VIRTIO_BLK_T_OUT, 4), b"w" * 512], [1])),
        "write_ro": (1, lambda d: d[0].add_chain([hdr(blk.VIRTIO_BLK_T_OUT, 4), b"w" * 512], [1])),
        "read_indirect": (0, lambda d: d[0].add_chain([hdr(0, 1)], [512, 512, 1], indirect=True)),
        "flush_getid": (
            0,
            lambda d: (d[0].add_chain([hdr(blk.VIRTIO_BLK_T_FLUSH)], [1]), d[0].add_chain([hdr(8)], [20, 1])),
        ),
        "discard": (0, lambda d: d[0].add_chain([hdr(11), struct.pack("<QII", 8, 8, 0)], [1])),
        "write_zeroes": (0, lambda d: d[0].add_chain([hdr(13), struct.pack("<QII", 8, 8, 1)], [1])),
    }
    for name, (flags, build) in seeds.items():
        path = os.path.join(out, name)
        make_seed(path, blk.BlockDevice(_fd, read_only=bool(flags)), lambda d, b=build: (b(d), 0)[1])
        with open(path, "rb") as f:
            body = f.read().rstrip(b"\0")
        with open(path, "wb") as f:
            f.write(bytes([flags]) + body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
    else:
        main(TestOneInput)
