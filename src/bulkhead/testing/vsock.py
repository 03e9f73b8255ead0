"""An in-memory host backend for virtio-vsock (`vsock_device.VsockBackend`), for tests and the fuzzer.

`FakeStream` buffers what the device sends (`received`) and serves `inbox` bytes to recv; `capacity`
bounds how much it takes per send (0: a host socket whose buffer is full). `FakeVsockBackend` hands out
queued host connections (`host_connect`) and answers `connect(port)` for ports in `listeners`.
"""

from __future__ import annotations

from collections.abc import Sequence

from bulkhead.devices.virtio.vsock_device import VsockStream

__all__ = ["FakeStream", "FakeVsockBackend"]


class FakeStream:
    _next_fd = 1000

    def __init__(self, port: int = 0, *, capacity: int = 1 << 30) -> None:
        FakeStream._next_fd += 1
        self.fd = FakeStream._next_fd
        self.port = port
        self.capacity = capacity
        self.inbox = bytearray()
        self.eof = False
        self.received = bytearray()
        self.shut_write = False
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def recv(self, n: int) -> bytes | None:
        if self.inbox:
            out = bytes(self.inbox[:n])
            del self.inbox[:n]
            return out
        return b"" if self.eof else None

    def send(self, data: bytes) -> int:
        n = min(len(data), self.capacity)
        self.received += data[:n]
        return n

    def shutdown_write(self) -> None:
        self.shut_write = True

    def close(self) -> None:
        self.closed = True


class FakeVsockBackend:
    def __init__(self, listeners: Sequence[int] = ()) -> None:
        self.listeners = set(listeners)
        self.queued: list[tuple[VsockStream, int]] = []
        self.readable: list[int] = []
        self.writable: list[int] = []
        self.connected: list[FakeStream] = []
        self.watching: dict[int, bool] = {}
        self.forgotten: list[VsockStream] = []

    def fileno(self) -> int:
        return 999

    def host_connect(self, port: int) -> FakeStream:
        s = FakeStream(port)
        self.queued.append((s, port))
        return s

    def poll(self) -> tuple[Sequence[tuple[VsockStream, int]], list[int], list[int]]:
        out = (self.queued, self.readable, self.writable)
        self.queued, self.readable, self.writable = [], [], []
        return out

    def connect(self, port: int) -> FakeStream | None:
        if port not in self.listeners:
            return None
        s = FakeStream(port)
        self.connected.append(s)
        return s

    def watch(self, stream: VsockStream, *, write: bool) -> None:
        self.watching[stream.fileno()] = write

    def forget(self, stream: VsockStream) -> None:
        self.watching.pop(stream.fileno(), None)
        self.forgotten.append(stream)
        stream.close()
