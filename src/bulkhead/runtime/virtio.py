"""Wire virtio-mmio devices into a Machine: MMIO slot, irqfd, ioeventfds, backend fds, rate-limit timers.

Queue notifications arrive on ioeventfds (one per queue, on QueueNotify with datamatch = queue index), so a
guest's notify never costs a userspace exit; the I/O thread drains the eventfd and runs the device.
Interrupts go out through irqfds. With `ioeventfd=False` (benchmarks only) the notify is an ordinary
MMIO exit handled on the vCPU thread: the "naive path" we compare against.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from bulkhead.errors import HostError
from bulkhead.memory.layout import VIRTIO_MMIO_SIZE
from bulkhead.runtime.eventloop import EventFd

if TYPE_CHECKING:
    from bulkhead.bus import Bus
    from bulkhead.config import VmConfig
    from bulkhead.devices.virtio.device import VirtioDevice
    from bulkhead.devices.virtio.mmio import MmioTransport
    from bulkhead.memory import GuestMemory
    from bulkhead.runtime.eventloop import EventLoop

__all__ = ["MachineBuilder", "attach_virtio", "default_mac"]


class MachineBuilder(Protocol):
    """The part of runtime.vm.Machine's builder API attach_virtio uses (public members only; this module
    does not import runtime.vm, so the two do not import each other)."""

    config: VmConfig
    ioeventfd: bool
    mmio: Bus
    transports: list[Any]

    @property
    def mem(self) -> GuestMemory | None: ...
    @property
    def loop(self) -> EventLoop | None: ...
    @property
    def vm(self) -> Any: ...

    def record(self, event: str, **detail: Any) -> None: ...
    def add_closer(self, closer: Callable[[], None]) -> None: ...
    def irq_line(self, gsi: int) -> EventFd: ...
    def next_virtio_slot(self) -> tuple[int, int]: ...


def default_mac(tap: str) -> str:
    """A stable, locally administered unicast MAC derived from the tap name."""
    h = hashlib.sha256(tap.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00, h[0], h[1], h[2]))


def attach_virtio(m: MachineBuilder) -> None:
    """Attach every virtio device of m.config, in a fixed order: drives, NICs, rng, vsock."""
    from bulkhead.devices.virtio.block import BlockDevice
    from bulkhead.devices.virtio.net import NetDevice, parse_mac
    from bulkhead.devices.virtio.ratelimit import RateLimiter
    from bulkhead.devices.virtio.rng import RngDevice
    from bulkhead.runtime.tap import TapBackend, open_tap

    cfg = m.config
    for i, d in enumerate(cfg.drives):
        dev = BlockDevice.open(  # raises ConfigError naming the drive and the reason
            d.path,
            read_only=d.read_only,
            disk_id=d.drive_id or f"bulkhead-disk{i}",
            limiter=RateLimiter(d.rate.bytes_per_sec, d.rate.ops_per_sec),
            name=f"virtio-blk{i}",
        )
        m.add_closer(functools.partial(os.close, dev.fd))
        _attach(m, dev)
    for n in cfg.nets:
        backend = TapBackend.adopt(n.tap_fd) if n.tap_fd >= 0 else open_tap(n.tap)
        m.add_closer(backend.close)
        mac = parse_mac(n.mac or default_mac(n.tap))
        r = n.rate
        net = NetDevice(
            backend,
            mac=mac,
            rx_limiter=RateLimiter(r.bytes_per_sec, r.ops_per_sec),
            tx_limiter=RateLimiter(r.bytes_per_sec, r.ops_per_sec),
            name=f"virtio-net-{n.tap}",
        )
        _attach(m, net)
    if cfg.rng:
        _attach(m, RngDevice())
    if cfg.vsock is not None:
        _attach_vsock(m, cfg.vsock)


def _attach_vsock(m: MachineBuilder, v: Any) -> None:
    """virtio-vsock after the other devices: the listener the jailer passed in, else one bound at v.path."""
    from bulkhead.devices.virtio.vsock_device import VsockDevice
    from bulkhead.runtime.vsock import UnixMuxer

    if v.listen_fd >= 0:
        muxer = UnixMuxer.adopt(v.listen_fd, v.connect_prefix or v.path)
    else:
        muxer = UnixMuxer.open(v.path)  # raises ConfigError naming the path
    m.add_closer(muxer.close)
    _attach(m, VsockDevice(muxer, v.guest_cid))


def _attach(m: MachineBuilder, dev: VirtioDevice) -> None:
    from bulkhead.devices.virtio.mmio import MmioTransport

    assert m.mem is not None and m.loop is not None
    base, irq = m.next_virtio_slot()

    def on_event(kind: str, detail: dict[str, Any]) -> None:
        m.record(kind, **{"device": dev.name, **detail})

    t = MmioTransport(dev, m.mem, m.irq_line(irq), on_event=on_event)
    m.mmio.register(base, VIRTIO_MMIO_SIZE, t, dev.name)
    m.transports.append(t)
    service = _Servicer(m, t)
    if m.ioeventfd:
        for offset, queue in t.ioeventfd_queues():
            efd = EventFd()
            m.add_closer(efd.close)
            try:
                m.vm.ioeventfd(efd.fd, base + offset, 4, pio=False, datamatch=queue)
            except HostError as exc:
                raise HostError(f"cannot register the queue notification of {dev.name}: {exc}") from None
            m.loop.add_reader(efd.fd, service.on_notify(efd, queue))
    for fd, callback in t.poll_fds():
        m.loop.add_reader(fd, service.wrap(callback), edge=True)


class _Servicer:
    """Runs device work on the I/O thread and keeps one rate-limit timer armed when a device is throttled."""

    def __init__(self, m: MachineBuilder, t: MmioTransport) -> None:
        self.m = m
        self.t = t
        self.armed = False

    def on_notify(self, efd: EventFd, queue: int) -> Any:
        t = self.t

        def run() -> None:
            efd.drain()
            t.notify(queue)
            self._rearm()

        return run

    def wrap(self, callback: Any) -> Any:
        def run() -> None:
            callback()
            self._rearm()

        return run

    def _rearm(self) -> None:
        if self.armed:
            return
        deadline = self.t.next_deadline()
        if deadline is None:
            return
        self.armed = True
        assert self.m.loop is not None
        self.m.loop.call_later(deadline - time.monotonic(), self._fire)

    def _fire(self) -> None:
        self.armed = False
        self.t.timer_due(time.monotonic())
        self._rearm()
