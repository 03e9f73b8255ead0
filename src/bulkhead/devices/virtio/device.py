"""What a virtio device model looks like to the MMIO transport (pure interface + shared helpers).

A device owns its configuration space and its request parsing; the transport owns the registers,
the feature/status handshake, the queues' guest-written configuration, interrupts, locking and the
containment of GuestFault. Device methods are always called with the transport lock held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bulkhead.devices.irq import IrqLine
from bulkhead.devices.virtio.queue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Queue,
)
from bulkhead.memory import GuestMemory

if TYPE_CHECKING:
    from bulkhead.devices.virtio.ratelimit import RateLimiter

__all__ = [
    "BASE_FEATURES",
    "DEVICE_ID_BLOCK",
    "DEVICE_ID_NET",
    "DEVICE_ID_RNG",
    "IrqLine",
    "PollCallback",
    "VirtioDevice",
]

DEVICE_ID_NET = 1
DEVICE_ID_BLOCK = 2
DEVICE_ID_RNG = 4

BASE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

PollCallback = Callable[[], None]


class VirtioDevice:
    """Base class of device models. Subclasses set `device_id`, `name`, `queue_max_sizes`,
    `features` and implement `config_bytes()` and `process_queue()`.

    Lifecycle: `activate()` at DRIVER_OK with the negotiated features and the validated queues;
    `process_queue(i)` on each notification (and whenever the transport retries); `reset()` when the
    driver writes 0 to Status. Any method may raise GuestFault; the transport contains it.
    """

    device_id: int = 0
    name: str = "virtio"
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.features = BASE_FEATURES
        self.acked_features = 0
        self.config_generation = 0
        self.mem: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.active = False
        self.stats: dict[str, int] = {}

    # -- counters ---------------------------------------------------------------------------------

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    # -- configuration space ----------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The device-specific configuration space (§4.2.2 offset 0x100 onwards)."""
        return b""

    def read_config(self, offset: int, size: int) -> int | None:
        """Little-endian read of `size` bytes at `offset`; None when out of range."""
        cfg = self.config_bytes()
        if offset < 0 or size not in (1, 2, 4, 8) or offset + size > len(cfg):
            return None
        return int.from_bytes(cfg[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> bool:
        """Configuration writes; the default space is read-only. Returns False when refused."""
        return False

    # -- lifecycle --------------------------------------------------------------------------------

    def make_queues(self) -> list[Queue]:
        """Fresh queues for the transport (override to cap per-queue chain bytes)."""
        return [Queue(n) for n in self.queue_max_sizes]

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int) -> None:
        """Start operating. Raises GuestFault if the driver's setup is unusable."""
        self.mem = mem
        self.queues = queues
        self.acked_features = features
        self.active = True

    def reset(self) -> None:
        """Stop operating and forget all driver state (queues are reset by the transport)."""
        self.active = False
        self.acked_features = 0

    def process_queue(self, index: int) -> None:
        """Handle a notification for queue `index`. Raises GuestFault on malformed requests."""

    # -- runtime hooks ----------------------------------------------------------------------------

    def poll_fds(self) -> list[tuple[int, PollCallback]]:
        """Host file descriptors to watch (EPOLLIN, edge-triggered) and what to call when readable."""
        return []

    def next_deadline(self) -> float | None:
        """Monotonic time at which `timer_due()` should run (rate limiting), or None."""
        return None

    def timer_due(self, now: float) -> None:
        """A deadline from `next_deadline()` has passed: resume throttled work."""


class ThrottledSingleQueueDevice(VirtioDevice):
    """A one-queue device behind one RateLimiter (`self.limiter`): work refused by the limiter resumes on
    queue 0 when its deadline passes, and a reset forgets the throttling."""

    limiter: RateLimiter

    def reset(self) -> None:
        super().reset()
        self.limiter.clear()

    def next_deadline(self) -> float | None:
        return self.limiter.deadline

    def timer_due(self, now: float) -> None:
        self.limiter.clear()
        self.process_queue(0)
