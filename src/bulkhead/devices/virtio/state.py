"""virtio-mmio transport and split-virtqueue state for snapshots (issue 20; pure: no I/O).

What a restored guest can observe of a virtio-mmio device, and so what `save_state` keeps:
- the transport registers of virtio 1.2/1.3 §4.2.2: Status, DeviceFeaturesSel, DriverFeaturesSel, the
  negotiated DriverFeatures, QueueSel, InterruptStatus and ConfigGeneration;
- per queue (§4.2.2 QueueNum/QueueReady/QueueDesc/QueueDriver/QueueDevice, §2.7 split virtqueues): size,
  ready, the descriptor table, available ring ("driver area") and used ring ("device area") addresses,
  the device's position in the available ring (last_avail_idx, here `next_avail`) and the next used
  index (`next_used`), the event-idx state (§2.7.7.2: the used index last signalled and whether it is
  valid), and whether the queue was stopped by a guest fault;
- the device's own guest-visible facts (virtio-blk: capacity and read-only; virtio-net: the MAC; the
  config space and feature bits the guest read), checked against the device the restore opens.

In-flight requests: none. virtio-blk, virtio-net and virtio-rng complete every chain they pop before
they release the transport lock (`process_queue` pops, runs and adds the used element in one call; an RX
chain without a frame is given back with undo_pop), so at any moment `next_used == next_avail` for a
working queue. RX buffers the guest posted stay in its available ring, which is guest memory. At pause, `drain` runs every ready queue once
more: a notification the I/O thread had not read yet (its ioeventfd written by the guest) is then
completed, and the guest sees it in its used ring, before the state is read. After a restore,
`kick` does the same for what the guest had made available but not notified.

`check_doc` is the schema check of one transport document against the guest's RAM layout; it runs on
the decrypted state before anything reaches a device (bulkhead.snapshot.format.check_state, fuzzed by
fuzz/fuzz_snapshot.py), so a hostile file (a ring outside RAM, a size that is not a power of two, a
ready queue whose rings were never set, indices that do not fit the queue) is refused at load, not at
the guest's first notify. Raises ValueError naming the field.
"""

from __future__ import annotations

from typing import Any, cast

from bulkhead.devices.virtio.device import DEVICE_ID_BLOCK, DEVICE_ID_NET, DEVICE_ID_RNG, VirtioDevice
from bulkhead.devices.virtio.mmio import (
    _NEXT_STATUS,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    MmioTransport,
)
from bulkhead.devices.virtio.queue import U16, U32, U64, VIRTIO_F_VERSION_1, Queue
from bulkhead.errors import GuestFault, GuestMemoryError
from bulkhead.memory import GuestMemory

__all__ = ["SUPPORTED", "check_doc", "drain", "kick", "load_state", "save_state"]

# device id -> (name, queue max sizes, every feature bit the device may offer): the devices a snapshot may
# hold. virtio-vsock keeps host-side state (its streams and their credit) that is not saved yet.
SUPPORTED: dict[int, tuple[str, tuple[int, ...], int]] = {}


def _register() -> None:
    from bulkhead.devices.virtio import block, net, rng
    from bulkhead.devices.virtio.device import BASE_FEATURES

    blk_bits = 0
    for bit in (block.VIRTIO_BLK_F_SEG_MAX, block.VIRTIO_BLK_F_RO, block.VIRTIO_BLK_F_BLK_SIZE,
                block.VIRTIO_BLK_F_FLUSH, block.VIRTIO_BLK_F_DISCARD, block.VIRTIO_BLK_F_WRITE_ZEROES):
        blk_bits |= 1 << bit
    SUPPORTED[DEVICE_ID_BLOCK] = ("virtio-blk", (block.QUEUE_SIZE,), BASE_FEATURES | blk_bits)
    SUPPORTED[DEVICE_ID_RNG] = ("virtio-rng", (rng.QUEUE_SIZE,), BASE_FEATURES)
    SUPPORTED[DEVICE_ID_NET] = ("virtio-net", (net.QUEUE_SIZE, net.QUEUE_SIZE),
                                BASE_FEATURES | 1 << net.VIRTIO_NET_F_MAC | 1 << net.VIRTIO_NET_F_STATUS)


_register()

_REGS: dict[str, tuple[int, int] | str] = {
    "device_id": (0, U32), "status": (0, 0xFF), "device_features_sel": (0, U32), "driver_features_sel": (0, U32),
    "driver_features": (0, U64), "queue_sel": (0, U32), "interrupt_status": (0, 3), "config_generation": (0, U32),
}
_QUEUE: dict[str, tuple[int, int] | str] = {
    "size": (0, U32), "ready": "bool", "desc": (0, U64), "avail": (0, U64), "used": (0, U64),
    "next_avail": (0, U16), "next_used": (0, U16), "signalled_used": (0, U16), "signalled_valid": "bool",
    "notified": "bool", "broken": "bool",
}
# The statuses a driver can reach (mmio.py _NEXT_STATUS: 0, ACK, +DRIVER, +FEATURES_OK, +DRIVER_OK).
_REACHABLE = frozenset({0, *_NEXT_STATUS.values()})


class _Ram:
    """The guest's RAM layout as Queue.validate needs it (check_range), without any memory."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions = regions

    def check_range(self, addr: int, length: int) -> None:
        for base, size in self.regions:
            if base <= addr and addr + length <= base + size:
                return
        raise GuestMemoryError(f"guest range [{addr:#x}, +{length:#x}) is not inside guest RAM", addr=addr,
                               length=length)


def _queue(max_size: int, doc: dict[str, Any]) -> Queue:
    q = Queue(max_size)
    q.size, q.ready = doc["size"], doc["ready"]
    q.desc_table, q.avail_ring, q.used_ring = doc["desc"], doc["avail"], doc["used"]
    q.next_avail, q.next_used = doc["next_avail"], doc["next_used"]
    q.signalled_used, q.signalled_valid = doc["signalled_used"], doc["signalled_valid"]
    q.notified, q.broken = doc["notified"], doc["broken"]
    return q


def check_doc(doc: object, regions: list[tuple[int, int]], what: str = "virtio") -> dict[str, Any]:
    """The schema of one transport document (module docstring), `regions`: the guest's RAM as (base,
    size) pairs (memory/layout.py ram_regions). Returns the checked document; raises ValueError."""
    from bulkhead.devices.state import fields

    if not isinstance(doc, dict) or set(doc) != {*_REGS, "queues", "device"}:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{what} state has the wrong fields ({got})")
    regs = fields({k: doc[k] for k in _REGS}, _REGS, what)
    if regs["device_id"] not in SUPPORTED:
        raise ValueError(f"{what} state: device id {regs['device_id']} cannot be restored (only virtio-blk, "
                         "virtio-net and virtio-rng can)")
    name, max_sizes, offered = SUPPORTED[regs["device_id"]]
    what = f"{what} ({name})"
    status = regs["status"]
    base = status & ~(STATUS_FAILED | STATUS_NEEDS_RESET)
    if base not in _REACHABLE:
        raise ValueError(f"{what} state: status {status:#x} is not one a driver can reach (virtio 1.2 §3.1.1)")
    if status & STATUS_NEEDS_RESET and not status & STATUS_FEATURES_OK:
        raise ValueError(f"{what} state: NEEDS_RESET before FEATURES_OK (no device work could have failed)")
    features = regs["driver_features"]
    if features & ~offered:
        raise ValueError(f"{what} state: driver features {features:#x} are not all offered by the device")
    if not status & STATUS_DRIVER and features:
        raise ValueError(f"{what} state: driver features written before the DRIVER status bit")
    if status & STATUS_FEATURES_OK and not features >> VIRTIO_F_VERSION_1 & 1:
        raise ValueError(f"{what} state: FEATURES_OK without VIRTIO_F_VERSION_1")
    queues = doc["queues"]
    if not isinstance(queues, list) or len(queues) != len(max_sizes):
        raise ValueError(f"{what} state: it needs {len(max_sizes)} queue(s)")
    ram = _Ram(regions)
    checked = []
    for i, (qdoc, max_size) in enumerate(zip(queues, max_sizes, strict=True)):
        qwhat = f"{what} queue {i}"
        qs = fields(qdoc, _QUEUE, qwhat)
        _check_queue(qs, max_size, status, ram, qwhat)
        checked.append(qs)
    dev = doc["device"]
    if regs["device_id"] == DEVICE_ID_BLOCK:
        dev = fields(dev, {"capacity": (0, U64 >> 9), "read_only": "bool"}, f"{what} device")
    elif regs["device_id"] == DEVICE_ID_NET:
        dev = fields(dev, {"mac": (0, (1 << 48) - 1)}, f"{what} device")
    else:
        dev = fields(dev, {}, f"{what} device")
    return {**regs, "queues": checked, "device": dev}


def _check_queue(qs: dict[str, Any], max_size: int, status: int, ram: _Ram, what: str) -> None:
    live = bool(status & STATUS_DRIVER_OK)
    if qs["ready"]:
        if not status & STATUS_FEATURES_OK:
            raise ValueError(f"{what}: ready before FEATURES_OK (virtio 1.2 §3.1.1 step 7)")
        try:
            _queue(max_size, qs).validate(cast(GuestMemory, ram))  # only check_range is used; size, alignment, inside RAM, no overlap (unset rings overlap)
        except GuestFault as exc:
            raise ValueError(f"{what}: {exc}") from None
    if not live and any(qs[k] for k in ("next_avail", "next_used", "signalled_used", "signalled_valid", "notified")):
        raise ValueError(f"{what}: ring positions before DRIVER_OK (they start at 0 then)")
    if qs["broken"] and not status & STATUS_NEEDS_RESET:
        raise ValueError(f"{what}: stopped by a fault, but the device does not need a reset")
    in_flight = (qs["next_avail"] - qs["next_used"]) & U16
    if in_flight and not qs["broken"]:
        # blk, net and rng complete each chain they pop under the transport lock: a working queue has none open.
        raise ValueError(f"{what}: next_avail {qs['next_avail']} and next_used {qs['next_used']} differ "
                         "(requests in flight cannot be restored)")
    if qs["ready"] and in_flight > qs["size"]:
        raise ValueError(f"{what}: {in_flight} requests in flight, more than the queue size {qs['size']}")


def _device_doc(dev: VirtioDevice) -> dict[str, Any]:
    if dev.device_id == DEVICE_ID_BLOCK:
        return {"capacity": dev.capacity, "read_only": dev.read_only}  # type: ignore[attr-defined]
    if dev.device_id == DEVICE_ID_NET:
        return {"mac": int.from_bytes(dev.mac or bytes(6), "big")}  # type: ignore[attr-defined]
    return {}


def save_state(t: MmioTransport) -> dict[str, Any]:
    """The transport's document (module docstring). Raises ValueError for a device that cannot be saved."""
    dev = t.device
    if dev.device_id not in SUPPORTED:
        raise ValueError(f"{dev.name} cannot be saved in a snapshot yet (only virtio-blk, virtio-net and virtio-rng "
                         "can)")
    with t.lock:
        return {
            "device_id": dev.device_id, "status": t.status, "device_features_sel": t.device_features_sel,
            "driver_features_sel": t.driver_features_sel, "driver_features": t.driver_features,
            "queue_sel": t.queue_sel, "interrupt_status": t.interrupt_status,
            "config_generation": dev.config_generation & U32,
            "queues": [{"size": q.size, "ready": q.ready, "desc": q.desc_table, "avail": q.avail_ring,
                        "used": q.used_ring, "next_avail": q.next_avail, "next_used": q.next_used,
                        "signalled_used": q.signalled_used, "signalled_valid": q.signalled_valid,
                        "notified": q.notified, "broken": q.broken} for q in t.queues],
            "device": _device_doc(dev),
        }


def load_state(t: MmioTransport, doc: object, what: str = "virtio") -> None:
    """Restore save_state() output into a freshly attached transport. Everything is checked first (the
    schema with the guest's real memory, then that the device is the one saved: type, offered features,
    virtio-blk capacity and read-only); a refused document changes nothing. Raises ValueError."""
    regions = [(r.base, r.size) for r in t.mem.regions]
    st = check_doc(doc, regions, what)
    dev = t.device
    if st["device_id"] != dev.device_id or len(st["queues"]) != len(t.queues):
        raise ValueError(f"{what} state is a device of type {st['device_id']}, the VM has {dev.name} here")
    if st["driver_features"] & ~dev.features:
        raise ValueError(f"{what} state: driver features {st['driver_features']:#x} are not offered by {dev.name}")
    if st["device"] != _device_doc(dev):
        raise ValueError(f"{what} state: {dev.name} was {st['device']} when saved, it is {_device_doc(dev)} now "
                         "(the drive must be the one the snapshot was taken with)")
    queues = [_queue(q.max_size, qs) for q, qs in zip(t.queues, st["queues"], strict=True)]
    for i, q in enumerate(queues):
        if q.ready:
            try:
                q.validate(t.mem)
            except GuestFault as exc:
                raise ValueError(f"{what} queue {i}: {exc}") from None
    with t.lock:
        t.status, t.driver_features, t.queue_sel = st["status"], st["driver_features"], st["queue_sel"]
        t.device_features_sel, t.driver_features_sel = st["device_features_sel"], st["driver_features_sel"]
        t.interrupt_status = st["interrupt_status"]
        dev.config_generation = st["config_generation"]
        for q, new in zip(t.queues, queues, strict=True):
            for name in ("size", "ready", "desc_table", "avail_ring", "used_ring", "next_avail", "next_used",
                         "signalled_used", "signalled_valid", "notified", "broken"):
                setattr(q, name, getattr(new, name))
            q.dirty = False
        if t.status & STATUS_DRIVER_OK:  # as MmioTransport._activate, without restarting the ring positions
            for q in t.queues:
                q.set_features(t.driver_features)
            dev.activate(t.mem, t.queues, t.driver_features)


def drain(t: MmioTransport) -> None:
    """Run every ready queue once (at pause, before save_state; after a restore, `kick`): requests the
    guest made available are completed and visible in its used ring. Guest faults are contained by the
    transport as on any notification."""
    for i, q in enumerate(t.queues):
        if q.ready and not q.broken:
            t.notify(i)


def kick(t: MmioTransport) -> None:
    """After load_state: complete what the guest had made available, and raise the interrupt again if
    InterruptStatus is set (an irqfd edge in flight at the save may have missed the saved IOAPIC state;
    a driver that finds nothing new treats the extra edge as spurious)."""
    if t.interrupt_status:
        t.irq.trigger()
    drain(t)
