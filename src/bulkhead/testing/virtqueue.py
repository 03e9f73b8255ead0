"""A mock virtio driver (like rust-vmm virtio-queue's `MockSplitQueue`) for tests and fuzzers.

`MockVirtqueueDriver` lays out one split queue (descriptor table, available ring, used ring, then a
data area) in a GuestMemory, builds chains (direct or through an indirect table), publishes them, and
reads used entries back. Low-level writers (`write_desc`, `set_avail_idx`, ...) let tests build every
malformed structure the device must reject. `setup_transport()` drives an `MmioTransport` through the
whole feature/status handshake and returns one driver per queue, so devices run without KVM.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from bulkhead.memory import GuestMemory

__all__ = ["MockChain", "MockVirtqueueDriver", "setup_transport"]

_DESC = struct.Struct("<QIHH")


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


@dataclass
class MockChain:
    """What the driver built: head index and the (addr, len) of each buffer."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]


class MockVirtqueueDriver:
    """The driver side of one split virtqueue at `base_addr` (which must be 16-byte aligned)."""

    def __init__(self, mem: GuestMemory, queue_size: int, base_addr: int, data_size: int = 0x8000) -> None:
        self.mem = mem
        self.size = queue_size
        self.desc_table = base_addr
        self.avail_ring = base_addr + 16 * queue_size
        self.used_ring = _align(self.avail_ring + 6 + 2 * queue_size, 4)
        self.data_start = _align(self.used_ring + 6 + 8 * queue_size, 4096)
        self.data_end = self.data_start + data_size
        self.end = self.data_end
        self._data = self.data_start
        self.avail_idx = 0
        self.used_seen = 0
        self._next_desc = 0
        mem.fill(base_addr, self.data_start - base_addr, 0)

    # -- raw structure writers --------------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        """Write descriptor `index` of the main table (no checks: tests write hostile values)."""
        self.write_desc_at(self.desc_table + 16 * index, addr, length, flags, next_)

    def write_desc_at(self, at: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.mem.write(
            at, _DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF, flags & 0xFFFF, next_ & 0xFFFF)
        )

    def push_avail(self, head: int, publish: bool = True) -> None:
        """Put `head` in the next available slot; publish the new index unless told not to."""
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.avail_ring + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write_u16(self.avail_ring + 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_ring + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_ring + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_ring)

    # -- buffers ----------------------------------------------------------------------------------

    def alloc(self, length: int, align: int = 16) -> int:
        """Bump-allocate `length` bytes in the data area (wraps to the start when full)."""
        addr = _align(self._data, align)
        if addr + length > self.data_end:
            addr = self.data_start
            if addr + length > self.data_end:
                raise ValueError("mock driver data area too small")
        self._data = addr + length
        return addr

    def _take_desc(self) -> int:
        i = self._next_desc
        self._next_desc = (i + 1) % self.size
        return i

    def add_chain(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> MockChain:
        """Build a chain of readable buffers (with this content) then writable buffers (of these sizes),
        directly in the descriptor table or through one indirect table; make it available."""
        bufs: list[tuple[int, int, int]] = []
        rd: list[tuple[int, int]] = []
        wr: list[tuple[int, int]] = []
        for data in readable:
            a = self.alloc(max(len(data), 1))
            self.mem.write(a, data)
            bufs.append((a, len(data), 0))
            rd.append((a, len(data)))
        for n in writable:
            a = self.alloc(max(n, 1))
            self.mem.fill(a, max(n, 1), 0)
            bufs.append((a, n, VIRTQ_DESC_F_WRITE))
            wr.append((a, n))
        if indirect:
            table = self.alloc(16 * max(len(bufs), 1))
            for i, (a, n, f) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc_at(table + 16 * i, a, n, f | more, i + 1 if more else 0)
            head = self._take_desc()
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            if not bufs:
                raise ValueError("a direct chain needs at least one buffer")
            idx = [self._take_desc() for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc(idx[i], a, n, f | more, idx[i + 1] if more else 0)
            head = idx[0]
        self.push_avail(head, publish)
        return MockChain(head, rd, wr)

    # -- completions ------------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_ring + 2)

    def used(self) -> list[tuple[int, int]]:
        """(descriptor id, length) of every used entry added since the previous call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used_ring + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return [(int(a), int(b)) for a, b in out]

    def read(self, addr: int, length: int) -> bytes:
        return self.mem.read(addr, length)


def setup_transport(
    transport: mmio.MmioTransport,
    *,
    base_addr: int = 0x10000,
    stride: int = 0x10000,
    queue_size: int | None = None,
    features: int | None = None,
    data_size: int = 0x8000,
) -> list[MockVirtqueueDriver]:
    """Reset, negotiate (default: every offered feature) and set up every queue, then DRIVER_OK.
    Returns one driver per queue. Raises RuntimeError when the device refuses a step."""
    t = transport
    if t.read(mmio.MAGIC, 4) != mmio.MAGIC_VALUE or t.read(mmio.VERSION_REG, 4) != 2:
        raise RuntimeError("not a virtio-mmio v2 device")
    t.write(mmio.STATUS, 4, 0)
    t.write(mmio.STATUS, 4, mmio.STATUS_ACKNOWLEDGE)
    t.write(mmio.STATUS, 4, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
    offered = 0
    for sel in (0, 1):
        t.write(mmio.DEVICE_FEATURES_SEL, 4, sel)
        offered |= t.read(mmio.DEVICE_FEATURES, 4) << (32 * sel)
    want = offered if features is None else features
    for sel in (0, 1):
        t.write(mmio.DRIVER_FEATURES_SEL, 4, sel)
        t.write(mmio.DRIVER_FEATURES, 4, (want >> (32 * sel)) & 0xFFFF_FFFF)
    status = mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER | mmio.STATUS_FEATURES_OK
    t.write(mmio.STATUS, 4, status)
    if not t.read(mmio.STATUS, 4) & mmio.STATUS_FEATURES_OK:
        raise RuntimeError("device refused FEATURES_OK")
    drivers = []
    for i in range(len(t.queues)):
        t.write(mmio.QUEUE_SEL, 4, i)
        qmax = t.read(mmio.QUEUE_NUM_MAX, 4)
        size = min(qmax, queue_size) if queue_size else qmax
        d = MockVirtqueueDriver(t.mem, size, base_addr + i * stride, data_size)
        t.write(mmio.QUEUE_NUM, 4, size)
        for reg, addr in (
            (mmio.QUEUE_DESC_LOW, d.desc_table),
            (mmio.QUEUE_DRIVER_LOW, d.avail_ring),
            (mmio.QUEUE_DEVICE_LOW, d.used_ring),
        ):
            t.write(reg, 4, addr & 0xFFFF_FFFF)
            t.write(reg + 4, 4, addr >> 32)
        t.write(mmio.QUEUE_READY, 4, 1)
        if t.read(mmio.QUEUE_READY, 4) != 1:
            raise RuntimeError(f"device refused queue {i}")
        drivers.append(d)
    t.write(mmio.STATUS, 4, status | mmio.STATUS_DRIVER_OK)
    if t.read(mmio.STATUS, 4) & mmio.STATUS_NEEDS_RESET:
        raise RuntimeError("device needs reset right after DRIVER_OK")
    return drivers
