"""virtio-net (virtio 1.2 §5.1): one RX and one TX queue over a frame backend (a tap at runtime).

Every frame in either direction starts with the 12-byte `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 is
required by the transport). The tap is opened with IFF_VNET_HDR and a 12-byte header size, so an RX
frame is read by `readv` straight into the guest's buffers and a TX frame is written by `writev`
straight from them. No offloads are offered: the guest's TX header is replaced by an all-zero header
(12 bytes the host kernel would otherwise parse on the guest's behalf), and `num_buffers` is set to 1
on RX (§5.1.6.4, no VIRTIO_NET_F_MRG_RXBUF).

- RX chains must be device-writable only and hold at least the header; TX chains device-readable only
  and at least the header; anything else is a GuestFault.
- RX without guest buffers: the frame stays in the backend (never dropped silently); `rx_no_buffers`
  counts it and the device asks the driver for a notification, which resumes reception.
- Rate limiting: separate RX and TX limiters (bytes and frames per second).
"""

from __future__ import annotations

import struct
from typing import Protocol

from bulkhead.devices.virtio.device import DEVICE_ID_NET, PollCallback, VirtioDevice
from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.queue import DescriptorChain, Queue, slice_buffers
from bulkhead.devices.virtio.ratelimit import RateLimiter
from bulkhead.memory import GuestMemory

__all__ = [
    "NET_HDR_SIZE",
    "QUEUE_SIZE",
    "RXQ",
    "TXQ",
    "NetBackend",
    "NetDevice",
    "declare_surfaces",
    "parse_mac",
]

QUEUE_SIZE = 256
RXQ, TXQ = 0, 1
NET_HDR_SIZE = 12
MAX_FRAME = 65550  # Ethernet header + 64 KiB payload: no GSO is offered, nothing larger is legal
MAX_CHAIN_BYTES = 1 << 20

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

_ZERO_HDR = bytes(NET_HDR_SIZE)
_NUM_BUFFERS_ONE = struct.pack("<H", 1)


class NetBackend(Protocol):
    """Where frames go. Each frame is prefixed with a 12-byte virtio_net_hdr_v1."""

    def fileno(self) -> int: ...

    def read_frame_into(self, views: list[memoryview]) -> int | None:
        """Read one frame (header included) into `views`; its full length, or None if none is ready."""
        ...

    def write_frame(self, views: list[memoryview]) -> None:
        """Send one frame (header included). Raises OSError on failure."""
        ...


def parse_mac(mac: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes. Raises ValueError."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{mac!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)


class NetDevice(VirtioDevice):
    """virtio-net device model. `mac` is 6 bytes or None (the guest then picks a random one)."""

    device_id = DEVICE_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes | None = None,
        rx_limiter: RateLimiter | None = None,
        tx_limiter: RateLimiter | None = None,
        name: str = "virtio-net",
    ) -> None:
        super().__init__()
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise ValueError("MAC must be 6 bytes and unicast")
        self.name = name
        self.backend = backend
        self.mac = mac
        self.rx_limiter = rx_limiter or RateLimiter()
        self.tx_limiter = tx_limiter or RateLimiter()
        self.features |= 1 << VIRTIO_NET_F_STATUS
        if mac is not None:
            self.features |= 1 << VIRTIO_NET_F_MAC

    def make_queues(self) -> list[Queue]:
        return [Queue(QUEUE_SIZE, max_chain_bytes=MAX_CHAIN_BYTES) for _ in range(2)]

    def config_bytes(self) -> bytes:
        """virtio_net_config: mac[6], status (link always up)."""
        return (self.mac or bytes(6)) + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def process_queue(self, index: int) -> None:
        if not self.active:
            return
        if index == RXQ:
            self._rx()
        elif index == TXQ:
            self._tx()

    def poll_fds(self) -> list[tuple[int, PollCallback]]:
        return [(self.backend.fileno(), self.on_backend_readable)]

    def on_backend_readable(self) -> None:
        """The backend has frames: deliver as many as the guest has buffers for."""
        if self.active:
            self._rx()

    def reset(self) -> None:
        super().reset()
        self.rx_limiter.clear()
        self.tx_limiter.clear()

    def next_deadline(self) -> float | None:
        times = [t for t in (self.rx_limiter.deadline, self.tx_limiter.deadline) if t is not None]
        return min(times) if times else None

    def timer_due(self, now: float) -> None:
        for lim, work in ((self.rx_limiter, self._rx), (self.tx_limiter, self._tx)):
            d = lim.deadline
            if d is not None and d <= now:
                lim.clear()
                work()

    # -- RX ---------------------------------------------------------------------------------------

    def _rx(self) -> None:
        assert self.mem is not None
        q, mem = self.queues[RXQ], self.mem
        if not q.ready or q.broken:
            return
        while self.rx_limiter.deadline is None:
            chain = q.pop(mem)
            if chain is None:
                if q.enable_notification(mem):
                    continue
                self.count("rx_no_buffers")
                return
            if not self.rx_limiter.try_consume(1):
                q.undo_pop()
                self.count("rx_throttled")
                return
            n = self._rx_one(mem, chain)
            if n is None:
                q.undo_pop()
                return
            q.add_used(mem, chain.head, n)

    def _rx_one(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        if chain.read_len:
            raise VirtioFault(
                FaultReason.NET_RX_READABLE,
                "virtio-net RX chain has device-readable buffers",
                device=self.name,
            )
        if chain.write_len < NET_HDR_SIZE:
            raise VirtioFault(
                FaultReason.NET_RX_SHORT,
                "virtio-net RX chain is smaller than the 12-byte header",
                device=self.name,
            )
        views = chain.write_views(mem)
        try:
            n = self.backend.read_frame_into(views)
        except OSError:
            self.count("rx_errors")  # host-side failure: the guest's buffer goes back unused
            return None
        if n is None:
            return None
        if n > chain.write_len:
            self.count("rx_truncated")
            n = chain.write_len
        if n < NET_HDR_SIZE:
            self.count("rx_runt")
            n = NET_HDR_SIZE
        # num_buffers (bytes 10..11 of the header) must be 1 without MRG_RXBUF.
        pos = 0
        for addr, length in slice_buffers(chain.writable, 10, 2):
            mem.view(addr, length)[:] = _NUM_BUFFERS_ONE[pos : pos + length]
            pos += length
        self.rx_limiter.charge(n - 1)
        self.count("rx_frames")
        self.count("rx_bytes", n - NET_HDR_SIZE)
        return n

    # -- TX ---------------------------------------------------------------------------------------

    def _tx(self) -> None:
        assert self.mem is not None
        q, mem = self.queues[TXQ], self.mem
        if not q.ready or q.broken:
            return
        while self.tx_limiter.deadline is None:
            chain = q.pop(mem)
            if chain is None:
                if q.enable_notification(mem):
                    continue
                return
            if chain.write_len:
                raise VirtioFault(
                    FaultReason.NET_TX_WRITABLE,
                    "virtio-net TX chain has device-writable buffers",
                    device=self.name,
                )
            if chain.read_len < NET_HDR_SIZE:
                raise VirtioFault(
                    FaultReason.NET_TX_SHORT,
                    "virtio-net TX chain is smaller than the 12-byte header",
                    device=self.name,
                )
            frame_len = chain.read_len - NET_HDR_SIZE
            if not self.tx_limiter.try_consume(frame_len):
                q.undo_pop()
                self.count("tx_throttled")
                return
            if 0 < frame_len <= MAX_FRAME:
                views = [memoryview(_ZERO_HDR)]
                views += [mem.view(a, n) for a, n in slice_buffers(chain.readable, NET_HDR_SIZE, frame_len)]
                try:
                    self.backend.write_frame(views)
                    self.count("tx_frames")
                    self.count("tx_bytes", frame_len)
                except OSError:
                    self.count("tx_errors")
            else:
                self.count("tx_dropped_bad_length")
            q.add_used(mem, chain.head, 0)


def declare_surfaces() -> None:
    """Declare virtio-net's guest-reachable entry points (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "virtio-queue",
        "virtio-net-rxq",
        owner=__name__,
        boundary="guest-vmm",
        accepts="device-writable RX chains of at least 12 bytes; one frame per chain, truncated to "
        "the chain; anything else -> GuestFault",
        handler="NetDevice._rx",
        fuzz="fuzz/fuzz_virtio_net.py",
        spec="virtio 1.2 section 5.1",
    )
    declare(
        "virtio-queue",
        "virtio-net-txq",
        owner=__name__,
        boundary="guest-vmm",
        accepts="device-readable TX chains: 12-byte header (replaced by zeros) + frame up to 65550 "
        "bytes, written to the tap; bad lengths dropped and counted, writable parts -> GuestFault",
        handler="NetDevice._tx",
        fuzz="fuzz/fuzz_virtio_net.py",
        spec="virtio 1.2 section 5.1",
    )
    declare(
        "virtio-config",
        "virtio-net-config",
        owner=__name__,
        boundary="guest-vmm",
        accepts="reads of mac[6] and status; writes are refused and counted",
        handler="VirtioDevice.read_config",
    )
