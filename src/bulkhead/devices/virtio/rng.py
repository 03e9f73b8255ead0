"""virtio-entropy (virtio 1.2 §5.4): fills device-writable buffers with bytes from the host's getrandom.

A request is a chain of device-writable buffers; a chain with device-readable buffers is a GuestFault.
At most `MAX_REQUEST` bytes are supplied per request (the used length tells the driver how many), and
an optional limiter bounds bytes/s so one guest cannot drain the host's entropy pool at will.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from bulkhead.devices.virtio.device import DEVICE_ID_RNG, ThrottledSingleQueueDevice
from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.queue import scatter
from bulkhead.devices.virtio.ratelimit import RateLimiter

__all__ = ["MAX_REQUEST", "QUEUE_SIZE", "RngDevice", "declare_surfaces"]

QUEUE_SIZE = 256
MAX_REQUEST = 64 << 10


def _getrandom(n: int) -> bytes:
    return os.getrandom(n)


class RngDevice(ThrottledSingleQueueDevice):
    """virtio-rng. `source(n)` returns n random bytes (os.getrandom by default; tests inject one)."""

    device_id = DEVICE_ID_RNG
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        *,
        limiter: RateLimiter | None = None,
        source: Callable[[int], bytes] = _getrandom,
        name: str = "virtio-rng",
    ) -> None:
        super().__init__()
        self.name = name
        self.limiter = limiter or RateLimiter()
        self.source = source

    def process_queue(self, index: int) -> None:
        if not self.active or self.mem is None or index != 0:
            return
        q, mem = self.queues[0], self.mem
        if not q.ready or q.broken:
            return
        while self.limiter.deadline is None:
            chain = q.pop(mem)
            if chain is None:
                if q.enable_notification(mem):
                    continue
                return
            if chain.read_len:
                raise VirtioFault(
                    FaultReason.RNG_READABLE,
                    "virtio-rng request has device-readable buffers",
                    device=self.name,
                )
            n = min(chain.write_len, MAX_REQUEST)
            if not self.limiter.try_consume(n):
                q.undo_pop()
                self.count("throttled")
                return
            written = scatter(mem, chain.writable, 0, self.source(n)) if n else 0
            self.count("bytes", written)
            q.add_used(mem, chain.head, written)


def declare_surfaces() -> None:
    """Declare virtio-rng's guest-reachable entry point (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "virtio-queue",
        "virtio-rng-requestq",
        owner=__name__,
        boundary="guest-vmm",
        accepts="device-writable chains, filled with up to 64 KiB of getrandom bytes each; "
        "device-readable parts -> GuestFault",
        handler="RngDevice.process_queue",
        fuzz="fuzz/fuzz_virtio_rng.py",
        spec="virtio 1.2 section 5.4",
    )
