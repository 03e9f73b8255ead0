"""atheris harness for virtio-net RX/TX handling (bulkhead.devices.virtio.net) via the transport.

Input: [flags][frame_len lo][frame_len hi][frame bytes ...][guest memory window]. flags bit 0 picks
the queue whose window the memory bytes overwrite (0 = RX, 1 = TX; the other queue stays empty). The
frame (if any) waits in a fake backend; the harness notifies both queues and fires the backend's
readable callback. A crash is any exception escaping the transport, a header-less frame reaching
the backend, or a hang.

Run: .venv/bin/python fuzz/fuzz_virtio_net.py -runs=20000
With seeds: .venv/bin/python fuzz/fuzz_virtio_net.py -runs=20000 /tmp/vnet-corpus fuzz/corpus/virtio_net
Regenerate seeds: .venv/bin/python fuzz/fuzz_virtio_net.py --make-seeds fuzz/corpus/virtio_net
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio.net import NetDevice

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_virtio_common import fresh_transport, load, main, make_seed

MAC = bytes.fromhex("525400123456")


class Backend:
    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.sent = 0

    def fileno(self) -> int:
        return -1

    def read_frame_into(self, views: list[memoryview]) -> int | None:
        if not self.frames:
            return None
        data = self.frames.pop(0)
        pos = 0
        for v in views:
            k = min(len(v), len(data) - pos)
            v[:k] = data[pos : pos + k]
            pos += k
        return len(data)

    def write_frame(self, views: list[memoryview]) -> None:
        if sum(len(v) for v in views) < 12:
            raise AssertionError("frame without header reached the backend")
        self.sent += 1


def run(data: bytes) -> None:
    if len(data) < 3:
        return
    q = data[0] & 1
    n = data[1] | data[2] << 8
    frame, window = data[3 : 3 + n], data[3 + n :]
    be = Backend([frame] if frame else [])
    t, _ = fresh_transport(NetDevice(be, mac=MAC))
    load(window, q)
    t.notify(q)
    for _fd, cb in t.poll_fds():
        cb()
    t.notify(1 - q)


def TestOneInput(data: bytes) -> None:
    run(data)


def make_seeds(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    frame = bytes(12) + bytes.fromhex("ffffffffffff5254001234560800") + bytes(50)
    for name, q, build in [
        ("rx", 0, lambda d: d[0].add_chain(writable=[1526])),
        ("rx_split", 0, lambda d: d[0].add_chain(writable=[12, 100, 1400], indirect=True)),
        ("tx", 1, lambda d: d[1].add_chain([bytes(12), frame[12:]])),
    ]:
        path = os.path.join(out, name)
        make_seed(path, NetDevice(Backend([]), mac=MAC), lambda d, b=build, q=q: (b(d), q)[1])
        with open(path, "rb") as f:
            body = f.read().rstrip(b"\0")
        with open(path, "wb") as f:
            f.write(bytes([q, len(frame) & 0xFF, len(frame) >> 8]) + frame + body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
    else:
        main(TestOneInput)
