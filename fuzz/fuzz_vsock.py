"""atheris harness for virtio-vsock (bulkhead.devices.virtio.vsock, vsock_device) via the MMIO transport.

Input: a script of guest and host actions decoded by FuzzedDataProvider: TX packets (a 44-byte header,
with the right cids half the time so streams get established, and a payload whose length may lie),
RX buffers of any size and direction, host connects, host data, host EOF, full host sockets, and CONNECT
lines for the muxer's parser. Invariants checked after every input: at most MAX_CONNECTIONS streams,
no stream buffers more than BUF_ALLOC, the control queue stays within MAX_CONTROL, every packet the
device wrote carries a length equal to its payload. A crash is any exception escaping, or a hang.

Run: .venv/bin/python fuzz/fuzz_vsock.py -runs=20000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio.mmio import MmioTransport
    from bulkhead.devices.virtio.vsock import BUF_ALLOC, HDR, HDR_SIZE, MAX_CONNECTIONS, parse_connect_line
    from bulkhead.devices.virtio.vsock_device import MAX_CONTROL, RXQ, TXQ, VsockDevice
    from bulkhead.memory import GuestMemory
    from bulkhead.testing import FakeIrq
    from bulkhead.testing.virtqueue import setup_transport
    from bulkhead.testing.vsock import FakeVsockBackend

CID = 3
MEM = GuestMemory([(0, 1 << 20)])


def run(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    be = FakeVsockBackend(listeners=(80, 81))
    dev = VsockDevice(be, CID)
    t = MmioTransport(dev, MEM, FakeIrq())
    rx, tx, _ = setup_transport(t, data_size=0xC000, stride=0x10000, queue_size=32)
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        action = fdp.ConsumeIntInRange(0, 7)
        if action <= 2:
            raw = bytearray(fdp.ConsumeBytes(HDR_SIZE).ljust(HDR_SIZE, b"\0"))
            if action == 0:
                raw[0:16] = CID.to_bytes(8, "little") + (2).to_bytes(8, "little")
                raw[36:38] = (1).to_bytes(2, "little")  # type STREAM
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
            tx.add_chain([bytes(raw) + payload])
            t.notify(TXQ)
        elif action == 3:
            size = fdp.ConsumeIntInRange(0, 2048)
            if fdp.ConsumeBool():
                rx.add_chain([b"r" * max(size, 1)])
            else:
                rx.add_chain(writable=[size])
            t.notify(RXQ)
        elif action == 4:
            be.host_connect(fdp.ConsumeIntInRange(0, 0xFFFF_FFFF))
        elif action == 5 and dev.streams:
            stream = list(dev.streams.values())[fdp.ConsumeIntInRange(0, len(dev.streams) - 1)]
            if fdp.ConsumeBool():
                stream.inbox += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8192))
            else:
                stream.eof = True
            be.readable.append(stream.fileno())
        elif action == 6 and dev.streams:
            stream = next(iter(dev.streams.values()))
            stream.capacity = fdp.ConsumeIntInRange(0, 4096)  # type: ignore[attr-defined]
            be.writable.append(stream.fileno())
        elif action == 7:
            parse_connect_line(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
        for _fd, cb in t.poll_fds():
            cb()
    assert len(dev.conns) <= MAX_CONNECTIONS
    assert all(len(c.pending) <= BUF_ALLOC for c in dev.conns.values())
    assert len(dev.control) <= MAX_CONTROL
    for head, length in rx.used():
        if length >= HDR_SIZE:
            addr = MEM.read_u64(rx.desc_table + 16 * head)
            assert HDR.unpack(MEM.read(addr, HDR_SIZE))[4] == length - HDR_SIZE


def TestOneInput(data: bytes) -> None:
    run(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
