"""The virtio-mmio transport, version 2 (modern), virtio 1.2 §4.2 (pure register machine).

`MmioTransport(device, mem, irq, on_event=...)` is a `BusDevice` registered for VIRTIO_MMIO_SIZE bytes.
Control registers (0x000..0x0ff) accept only aligned 32-bit accesses (§4.2.2.2); the configuration
space at 0x100 accepts widths 1, 2, 4 and 8 within the device's config size. Everything else reads as
zero / is dropped, and is counted in `stats`.

Device status is a transition table: ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK, each state
only adding the next bit; FAILED may be set at any time; writing 0 resets. Out-of-order writes are
ignored and counted. FEATURES_OK is refused (not set) unless the driver accepted VIRTIO_F_VERSION_1
and only offered bits. Queue registers can be written only between FEATURES_OK and DRIVER_OK, while
the selected queue is not ready (after DRIVER_OK they are dropped and counted; on a ready queue the
write is a driver error, §4.2.2.2: NEEDS_RESET, reason QUEUE_WRITE_WHILE_READY).

The whole queue configuration (size, alignment, every ring inside RAM, no overlap; `Queue.validate`)
is checked three times: at QueueReady=1, at DRIVER_OK and at the queue's first notification. An
invalid one is never used.

Guest faults (bad queue setup, malformed chains or requests) are contained here (virtio 1.2 §2.1.2):
the transport sets DEVICE_NEEDS_RESET, raises a configuration-change interrupt (InterruptStatus bit 1)
when DRIVER_OK is set -- or, for an error found before DRIVER_OK, at the moment the driver sets it --,
stops all device work until the driver resets the device (Status = 0), counts the typed reason
(`fault.<FaultReason>` in `stats`) and reports `on_event("guest-fault", {..., "reason": ...})`.
NEEDS_RESET survives every status write except 0. No GuestFault ever leaves `read`/`write`/`notify`.

Where QEMU is more lenient (it stores any status byte, accepts queue registers at any time and does
not check ring layout at QueueReady), bulkhead is stricter, as §2.1.2/§3.1.1/§4.2.3 allow: the
differences are listed, with the spec section for each, in tests/conformance/test_virtio_driver_errors.py.

Threading: vCPU threads call read/write, the I/O thread calls notify/poll callbacks/timer_due; one
lock per transport serialises them. The used-buffer interrupt is raised after the lock is released
(an irqfd write can take long on some KVMs, and a vCPU reading InterruptStatus must not wait for it; the
status bit itself is set under the lock first); `on_event` is also called after the lock is released.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from bulkhead.devices.virtio.device import IrqLine, PollCallback, VirtioDevice
from bulkhead.devices.virtio.faults import FaultReason, VirtioFault, reason_of
from bulkhead.devices.virtio.queue import VIRTIO_F_VERSION_1, Queue
from bulkhead.errors import GuestFault
from bulkhead.memory import GuestMemory
from bulkhead.memory.layout import VIRTIO_MMIO_SLOTS

__all__ = [
    "MAGIC_VALUE",
    "QUEUE_NOTIFY",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
    "STATUS_NEEDS_RESET",
    "VENDOR_ID",
    "MmioTransport",
    "declare_surfaces",
    "kernel_cmdline_entry",
]

MAGIC_VALUE = 0x7472_6976  # "virt"
VERSION = 2
VENDOR_ID = 0x4B48_4C42  # "BLHK" read as little-endian bytes: 'B','L','H','K'

MAGIC, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
MMIO_SIZE = 0x200  # = bulkhead.memory.layout.VIRTIO_MMIO_SIZE
MAX_SLOTS = VIRTIO_MMIO_SLOTS  # 19 slots the runtime may register: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE

STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

INT_USED_BUFFER = 0x1
INT_CONFIG_CHANGE = 0x2

# The driver-visible lifecycle, as a table: state -> the one state the driver may move to next.
_NEXT_STATUS = {
    0: STATUS_ACKNOWLEDGE,
    STATUS_ACKNOWLEDGE: STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER: STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK: (
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    ),
}

EventCallback = Callable[[str, dict[str, Any]], None]


def kernel_cmdline_entry(base: int, irq: int, size: int = MMIO_SIZE) -> str:
    """The Linux command-line token announcing one virtio-mmio device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)."""
    return f"virtio_mmio.device={size:#x}@{base:#x}:{irq}"


def _no_event(kind: str, detail: dict[str, Any]) -> None:
    return None


_CONSTANT_REGS = {MAGIC: MAGIC_VALUE, VERSION_REG: VERSION, VENDOR: VENDOR_ID}
_LIVE_OR_BROKEN = STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET
_QUEUE_REGS = frozenset({QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                         QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH})


def status_transition(status: int, value: int, offered: int, driver_features: int) -> tuple[str, int]:
    """The device status state machine of a driver's Status write (virtio 1.2 §2.1, §3.1.1), pure:
    (action, new status). action is "reset" (a write of 0), "same", "status_rejected" (out of order,
    after FAILED, or NEEDS_RESET set by the driver), "features_rejected" (FEATURES_OK for features
    without VERSION_1 or beyond the offer: FEATURES_OK stays clear and the driver must give up),
    "driver-ok" (the device goes live) or "set". NEEDS_RESET, once set, only a reset clears (§2.1.2)."""
    if value == 0:
        return "reset", 0
    if value & STATUS_FAILED:
        return "set", status | STATUS_FAILED
    cur = status & ~STATUS_NEEDS_RESET
    new = value & ~STATUS_NEEDS_RESET
    if value & STATUS_NEEDS_RESET and not status & STATUS_NEEDS_RESET:
        return "status_rejected", status  # only the device sets NEEDS_RESET
    if new == cur:
        return "same", status
    if status & STATUS_FAILED or _NEXT_STATUS.get(cur) != new:
        return "status_rejected", status
    added = new & ~cur
    if added == STATUS_FEATURES_OK and (not driver_features >> VIRTIO_F_VERSION_1 & 1 or driver_features & ~offered):
        return "features_rejected", status
    return ("driver-ok" if added == STATUS_DRIVER_OK else "set"), new | (status & STATUS_NEEDS_RESET)


def feature_word(features: int, sel: int) -> int:
    """The 32-bit window `sel` of a 64-bit feature set (§4.2.2 DeviceFeaturesSel); 0 beyond bit 63."""
    return (features >> (32 * sel)) & 0xFFFF_FFFF if sel <= 1 else 0


def with_feature_word(features: int, sel: int, value: int) -> int:
    """`features` with its 32-bit window `sel` (0 or 1) replaced by `value` (§4.2.2 DriverFeaturesSel)."""
    shift = 32 * sel
    return (features & ~(0xFFFF_FFFF << shift)) | (value << shift)


def set_queue_field(q: Queue, offset: int, value: int) -> None:
    """A write of QueueNum or one 32-bit half of a ring address (§4.2.2); validated at QueueReady."""
    if offset == QUEUE_NUM:
        q.size = value & 0xFFFF_FFFF
    elif offset == QUEUE_DESC_LOW:
        q.desc_table = (q.desc_table & ~0xFFFF_FFFF) | value
    elif offset == QUEUE_DESC_HIGH:
        q.desc_table = (q.desc_table & 0xFFFF_FFFF) | (value << 32)
    elif offset == QUEUE_DRIVER_LOW:
        q.avail_ring = (q.avail_ring & ~0xFFFF_FFFF) | value
    elif offset == QUEUE_DRIVER_HIGH:
        q.avail_ring = (q.avail_ring & 0xFFFF_FFFF) | (value << 32)
    elif offset == QUEUE_DEVICE_LOW:
        q.used_ring = (q.used_ring & ~0xFFFF_FFFF) | value
    elif offset == QUEUE_DEVICE_HIGH:
        q.used_ring = (q.used_ring & 0xFFFF_FFFF) | (value << 32)


class MmioTransport:
    """One virtio-mmio device slot. See the module docstring for the contract."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: IrqLine, *,
                 on_event: EventCallback = _no_event) -> None:
        self.device = device
        self.mem = mem
        self.irq = irq
        self.on_event = on_event
        self.lock = threading.Lock()
        self.queues: list[Queue] = device.make_queues()
        self.stats: dict[str, int] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    @property
    def name(self) -> str:
        return self.device.name

    # -- BusDevice --------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Register or config read. Never raises for guest-chosen offsets or sizes."""
        with self.lock:
            if offset >= CONFIG:
                value = self.device.read_config(offset - CONFIG, size)
                if value is None:
                    self._count("config_out_of_range")
                    return 0
                return value
            if size != 4 or offset & 3:
                self._count("bad_register_access")
                return 0
            return self._read_reg(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        """Register or config write. Never raises for guest-chosen offsets, sizes or values."""
        notify = -1
        with self.lock:
            if offset >= CONFIG:
                if not self.device.write_config(offset - CONFIG, size, value):
                    self._count("config_write_refused")
            elif size != 4 or offset & 3:
                self._count("bad_register_access")
            elif offset == QUEUE_NOTIFY:
                notify = value & 0xFFFF_FFFF
            else:
                self._write_reg(offset, value & 0xFFFF_FFFF)
        self._flush_events()
        if notify >= 0:
            self._count("notify_mmio")
            self.notify(notify)

    # -- registers --------------------------------------------------------------------------------

    def _selected(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_reg(self, offset: int) -> int:
        q = self._selected()
        if offset in _CONSTANT_REGS:
            return _CONSTANT_REGS[offset]
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == DEVICE_FEATURES:
            return feature_word(self.device.features, self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions (all ones = "does not exist")
        if offset == CONFIG_GENERATION:
            return self.device.config_generation & 0xFFFF_FFFF
        self._count("bad_register_read")
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value & 0xFF
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == SHM_SEL:
            pass
        elif offset in _QUEUE_REGS:
            self._write_queue_reg(offset, value)
        else:
            self._count("bad_register_write")

    def _write_driver_features(self, value: int) -> None:
        if self.status & (STATUS_FEATURES_OK | STATUS_FAILED) or not self.status & STATUS_DRIVER:
            self._count("features_write_refused")
            return
        if self.driver_features_sel > 1:
            self._count("features_write_refused")
            return
        self.driver_features = with_feature_word(self.driver_features, self.driver_features_sel, value)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._selected()
        # §3.1.1 step 7: queues are set up after FEATURES_OK and before DRIVER_OK
        phase_ok = self.status & STATUS_FEATURES_OK and not self.status & _LIVE_OR_BROKEN
        if q is None:
            self._count("queue_write_refused")
            return
        if offset == QUEUE_READY:
            if value & 1 and not q.ready and phase_ok:
                try:
                    q.validate(self.mem)
                except GuestFault as exc:
                    self._fault(exc, self.queue_sel)
                    return
                q.ready = True
            elif not value & 1:
                q.ready = False  # the driver may stop a queue at any time
            else:
                self._count("queue_write_refused")
            return
        if q.ready and not self.status & STATUS_NEEDS_RESET:
            # §4.2.2.2: "When QueueReady is not zero, the driver MUST NOT access QueueNum, QueueDescLow,
            # ..., QueueDeviceHigh." A driver error: the validated configuration stays, the device
            # needs a reset (QEMU applies the write and fails later on the new rings, or not at all).
            self._count("queue_write_refused")
            why = f"queue register {offset:#x} written while ready"
            self._fault(VirtioFault(FaultReason.QUEUE_WRITE_WHILE_READY, why), self.queue_sel)
            return
        if q.ready or not phase_ok:  # (a ready queue of a device that already needs a reset: dropped)
            self._count("queue_write_refused")
            return
        set_queue_field(q, offset, value)

    def _write_status(self, value: int) -> None:
        keep = self.status & STATUS_NEEDS_RESET
        action, new = status_transition(self.status, value, self.device.features, self.driver_features)
        if action == "reset":
            self._reset()
        elif action in ("status_rejected", "features_rejected"):
            self._count(action)
        elif action != "same":
            self.status = new
            if action == "driver-ok":
                if keep:
                    # The error came before DRIVER_OK, when no notification was allowed (§2.1.2 sends it
                    # "if DRIVER_OK is set"); the first moment it is, tell the driver.
                    self._config_interrupt()
                self._activate()

    def _activate(self) -> None:
        for q in self.queues:
            q.set_features(self.driver_features)
        try:
            for i, q in enumerate(self.queues):
                if q.ready:
                    try:
                        q.activate(self.mem)
                    except GuestFault as exc:
                        self._fault(exc, i)
            self.device.activate(self.mem, self.queues, self.driver_features)
        except GuestFault as exc:
            self._fault(exc, -1)

    def _reset(self) -> None:
        self.device.reset()
        self._reset_state()
        self._count("resets")

    # -- interrupts and faults --------------------------------------------------------------------

    def _fault(self, exc: GuestFault, queue: int) -> None:
        """Contain a guest fault: NEEDS_RESET, config-change interrupt, queue stopped, event queued."""
        self._count("guest_faults")
        if 0 <= queue < len(self.queues):
            self.queues[queue].broken = True
        reason = reason_of(exc)
        self._count(f"fault.{reason.value}")
        first = not self.status & STATUS_NEEDS_RESET
        self.status |= STATUS_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self._config_interrupt()
        self._events.append(("guest-fault", {"device": self.device.name, "queue": queue, "kind": exc.kind,
                                             "reason": reason.value, "message": str(exc)[:240], "first": first}))

    def _config_interrupt(self) -> None:
        """InterruptStatus bit 1 and the interrupt line: the configuration-change notification (§4.2.2)."""
        self.interrupt_status |= INT_CONFIG_CHANGE
        self.irq.trigger()

    def _flush_events(self) -> None:
        if not self._events:
            return
        with self.lock:
            events, self._events = self._events, []
        for kind, detail in events:
            try:
                self.on_event(kind, detail)
            except Exception:
                # The event sink belongs to the runtime; its failure must not escape into a vCPU.
                self._count("event_errors")

    def _signal_used(self) -> bool:
        """Set InterruptStatus for used buffers; returns whether the caller must trigger the IRQ (unlocked)."""
        fire = False
        for i, q in enumerate(self.queues):
            if q.dirty and not q.broken:
                try:
                    fire |= q.needs_notification(self.mem)
                except GuestFault as exc:
                    self._fault(exc, i)
        if fire:
            self.interrupt_status |= INT_USED_BUFFER
            self._count("interrupts")
        return fire

    def _run(self, work: Callable[[], None], queue: int) -> None:
        """Run device work under the lock, containing faults, then signal used buffers."""
        with self.lock:
            if not self.status & STATUS_DRIVER_OK or self.status & (STATUS_FAILED | STATUS_NEEDS_RESET):
                self._count("work_ignored")
                return
            try:
                work()
            except GuestFault as exc:
                self._fault(exc, queue)
            fire = self._signal_used()
        if fire:
            self.irq.trigger()
        self._flush_events()

    # -- runtime entry points ---------------------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """A queue notification (ioeventfd on QueueNotify with datamatch = queue, or an MMIO write)."""
        q = queue_index & 0xFFFF_FFFF
        if q >= len(self.queues) or not self.queues[q].ready or self.queues[q].broken:
            self._count("notify_ignored")
            return
        self._count("notifies")
        self._run(lambda: self._process(q), q)

    def _process(self, q: int) -> None:
        queue = self.queues[q]
        if not queue.notified:
            # The third check of the whole configuration (after QueueReady and DRIVER_OK): nothing
            # the driver can write changes it in between, so this guards bulkhead's own state.
            queue.validate(self.mem)
            queue.notified = True
        self.device.process_queue(q)

    def ioeventfd_queues(self) -> list[tuple[int, int]]:
        """(register offset, datamatch) pairs the runtime should back with ioeventfds (4-byte writes)."""
        return [(QUEUE_NOTIFY, i) for i in range(len(self.queues))]

    def poll_fds(self) -> list[tuple[int, PollCallback]]:
        """Host fds to watch with EPOLLIN | EPOLLET and the callback (already locked and contained)."""
        return [(fd, functools.partial(self._run, cb, -1)) for fd, cb in self.device.poll_fds()]

    def next_deadline(self) -> float | None:
        """Monotonic time at which `timer_due()` should be called (rate limiting), or None."""
        with self.lock:
            return self.device.next_deadline()

    def timer_due(self, now: float) -> None:
        """Resume throttled device work (call when `next_deadline()` has passed)."""
        self._run(lambda: self.device.timer_due(now), -1)

    def config_changed(self) -> None:
        """The host changed the device's configuration (e.g. link status): bump generation, interrupt."""
        with self.lock:
            self.device.config_generation = (self.device.config_generation + 1) & 0xFFFF_FFFF
            if self.status & STATUS_DRIVER_OK:
                self.interrupt_status |= INT_CONFIG_CHANGE
                self.irq.trigger()


def declare_surfaces() -> None:
    """Declare the virtio-mmio register window (see `bulkhead.surface`)."""
    from bulkhead.memory.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE
    from bulkhead.surface import declare

    declare(
        "mmio",
        "virtio-mmio",
        owner=__name__,
        boundary="guest-vmm",
        accepts="aligned 32-bit accesses to the v2 control registers at 0x000-0x0ff of each slot and "
        "1/2/4/8-byte config-space accesses from 0x100; anything else reads 0 / is dropped and counted",
        base=VIRTIO_MMIO_BASE,
        length=VIRTIO_MMIO_STRIDE * MAX_SLOTS,
        slot_size=MMIO_SIZE,
        handler="MmioTransport.read/MmioTransport.write/MmioTransport.notify",
        fuzz="fuzz/fuzz_virtio_mmio.py",
        spec="virtio 1.2 section 4.2.2",
    )
