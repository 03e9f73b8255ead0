"""atheris harness for the live-migration stream (bulkhead.snapshot.wire): the bytes a destination reads
from a source host. Input: a byte stream of frames; each frame is read (read_frame), then an offer is
checked (check_offer), a pages frame decoded inside a 128 MiB guest (decode_pages), a JSON frame parsed.
Anything but SnapshotError escaping, or a pages frame decoded outside guest RAM, is a crash.

Run: .venv/bin/python fuzz/fuzz_migration_stream.py -max_total_time=60 /tmp/bh-fuzz/migration
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from bulkhead.errors import SnapshotError
    from bulkhead.snapshot import wire

FRAMES = (128 << 20) // 4096


def one_input(data: bytes) -> None:
    pos = 0

    def recv_exact(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise EOFError
        pos += n
        return data[pos - n : pos]

    for _ in range(16):
        try:
            kind, payload = wire.read_frame(recv_exact)
        except (EOFError, SnapshotError):
            return
        try:
            if kind == b"P":
                pfn, n, pages = wire.decode_pages(payload, page_frames=FRAMES)
                assert pfn + n <= FRAMES and len(pages) == n * 4096
            elif kind == b"O":
                wire.check_offer(wire.parse_json(payload, "offer"), max_mem=1 << 40, max_cpus=256)
            else:
                wire.parse_json(payload, "frame")
        except SnapshotError:
            pass


def TestOneInput(data: bytes) -> None:
    one_input(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
