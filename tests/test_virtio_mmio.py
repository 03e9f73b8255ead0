"""virtio-mmio v2 transport: registers, feature/status handshake, queue setup, fault containment."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.faults import FaultReason
from bulkhead.devices.virtio.mmio import MmioTransport, kernel_cmdline_entry
from bulkhead.devices.virtio.queue import VIRTIO_F_VERSION_1, VIRTQ_DESC_F_NEXT
from bulkhead.devices.virtio.rng import RngDevice
from bulkhead.memory import GuestMemory
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import MockVirtqueueDriver, setup_transport

ACK, DRV, FOK, DOK = (
    mmio.STATUS_ACKNOWLEDGE,
    mmio.STATUS_DRIVER,
    mmio.STATUS_FEATURES_OK,
    mmio.STATUS_DRIVER_OK,
)


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 << 20)])
    yield m
    m.close()


class Rig:
    def __init__(self, mem: GuestMemory, base: int = 0x10000) -> None:
        self.irq = FakeIrq()
        self.events: list[tuple[str, dict]] = []
        self.dev = RngDevice(source=lambda n: bytes(range(256)) * (n // 256) + bytes(range(n % 256)))
        self.t = MmioTransport(self.dev, mem, self.irq, on_event=lambda k, d: self.events.append((k, d)))
        self.base = base

    def status(self) -> int:
        return self.t.read(mmio.STATUS, 4)

    def setup(self, **kw):
        return setup_transport(self.t, base_addr=self.base, **kw)


def to_features_ok(t: MmioTransport, features: int = 1 << VIRTIO_F_VERSION_1) -> None:
    t.write(mmio.STATUS, 4, ACK)
    t.write(mmio.STATUS, 4, ACK | DRV)
    for sel in (0, 1):
        t.write(mmio.DRIVER_FEATURES_SEL, 4, sel)
        t.write(mmio.DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFF_FFFF)
    t.write(mmio.STATUS, 4, ACK | DRV | FOK)


def test_identity_registers(mem):
    r = Rig(mem)
    assert r.t.read(0x000, 4) == 0x74726976
    assert r.t.read(0x004, 4) == 2
    assert r.t.read(0x008, 4) == 4  # entropy
    assert r.t.read(0x00C, 4).to_bytes(4, "little") == b"BLHK"
    assert r.t.read(0x034, 4) == 256
    assert r.t.read(mmio.SHM_LEN_LOW, 4) == 0xFFFF_FFFF


def test_device_features_two_selectors(mem):
    r = Rig(mem)
    r.t.write(mmio.DEVICE_FEATURES_SEL, 4, 1)
    assert r.t.read(mmio.DEVICE_FEATURES, 4) & 1  # VERSION_1 is bit 32
    r.t.write(mmio.DEVICE_FEATURES_SEL, 4, 0)
    assert r.t.read(mmio.DEVICE_FEATURES, 4) == (r.dev.features & 0xFFFF_FFFF)
    r.t.write(mmio.DEVICE_FEATURES_SEL, 4, 7)
    assert r.t.read(mmio.DEVICE_FEATURES, 4) == 0


def test_full_handshake_and_request(mem):
    r = Rig(mem)
    (d,) = r.setup()
    assert r.status() == ACK | DRV | FOK | DOK
    c = d.add_chain(writable=[300])
    r.t.notify(0)
    assert d.used() == [(c.head, 300)]
    assert d.read(c.writable[0][0], 300) == (bytes(range(256)) + bytes(range(44)))
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) == 1 and r.irq.take() == 1
    r.t.write(mmio.INTERRUPT_ACK, 4, 1)
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) == 0


def test_mmio_write_to_queue_notify_is_the_naive_path(mem):
    r = Rig(mem)
    (d,) = r.setup()
    d.add_chain(writable=[8])
    r.t.write(mmio.QUEUE_NOTIFY, 4, 0)
    assert len(d.used()) == 1 and r.t.stats["notify_mmio"] == 1


def test_features_ok_requires_version_1(mem):
    r = Rig(mem)
    to_features_ok(r.t, features=0)
    assert not r.status() & FOK
    assert r.t.stats["features_rejected"] == 1


def test_features_ok_refuses_unoffered_bits(mem):
    r = Rig(mem)
    to_features_ok(r.t, features=1 << VIRTIO_F_VERSION_1 | 1 << 5)
    assert not r.status() & FOK


def test_driver_features_frozen_after_features_ok(mem):
    r = Rig(mem)
    to_features_ok(r.t)
    r.t.write(mmio.DRIVER_FEATURES_SEL, 4, 0)
    r.t.write(mmio.DRIVER_FEATURES, 4, 0xFFFF_FFFF)
    assert r.t.driver_features == 1 << VIRTIO_F_VERSION_1
    assert r.t.stats["features_write_refused"] == 1


@pytest.mark.parametrize(
    "sequence",
    [
        [DRV],  # DRIVER without ACKNOWLEDGE
        [ACK, ACK | DRV | DOK],  # DRIVER_OK before FEATURES_OK
        [ACK, ACK | FOK],
        [ACK, ACK | DRV, ACK],  # clearing a bit without reset
        [ACK, ACK | 0x10],  # unknown bit
        [ACK, ACK | mmio.STATUS_NEEDS_RESET],  # only the device sets NEEDS_RESET
    ],
)
def test_out_of_order_status_rejected(mem, sequence):
    r = Rig(mem)
    for v in sequence:
        r.t.write(mmio.STATUS, 4, v)
    assert r.status() == (sequence[-2] if len(sequence) > 1 else 0)
    assert r.t.stats["status_rejected"] == 1


def test_failed_any_time_and_reset(mem):
    r = Rig(mem)
    (d,) = r.setup()
    r.t.write(mmio.STATUS, 4, mmio.STATUS_FAILED)
    assert r.status() & mmio.STATUS_FAILED
    d.add_chain(writable=[8])
    r.t.notify(0)
    assert d.used() == []  # a FAILED device does no work
    r.t.write(mmio.STATUS, 4, 0)
    assert r.status() == 0 and not r.t.queues[0].ready and r.t.driver_features == 0
    assert r.t.queues[0].desc_table == 0 and not r.dev.active


@pytest.mark.parametrize(
    "reg", [mmio.QUEUE_NUM, mmio.QUEUE_DESC_LOW, mmio.QUEUE_DRIVER_HIGH, mmio.QUEUE_DEVICE_LOW]
)
def test_queue_registers_only_between_features_ok_and_driver_ok(mem, reg):
    r = Rig(mem)
    r.t.write(reg, 4, 64)  # status 0: refused
    assert r.t.stats["queue_write_refused"] == 1
    r.setup()
    before = (r.t.queues[0].size, r.t.queues[0].desc_table, r.t.queues[0].avail_ring, r.t.queues[0].used_ring)
    r.t.write(reg, 4, 64)  # after DRIVER_OK: refused
    after = (r.t.queues[0].size, r.t.queues[0].desc_table, r.t.queues[0].avail_ring, r.t.queues[0].used_ring)
    assert before == after and r.t.stats["queue_write_refused"] == 2


def test_queue_registers_refused_while_ready(mem):
    r = Rig(mem)
    to_features_ok(r.t)
    r.t.write(mmio.QUEUE_NUM, 4, 16)
    r.t.write(mmio.QUEUE_DESC_LOW, 4, 0x1000)
    r.t.write(mmio.QUEUE_DRIVER_LOW, 4, 0x2000)
    r.t.write(mmio.QUEUE_DEVICE_LOW, 4, 0x3000)
    r.t.write(mmio.QUEUE_READY, 4, 1)
    assert r.t.read(mmio.QUEUE_READY, 4) == 1
    r.t.write(mmio.QUEUE_DESC_LOW, 4, 0x5000)
    assert r.t.queues[0].desc_table == 0x1000


def test_queue_sel_out_of_range(mem):
    r = Rig(mem)
    to_features_ok(r.t)
    r.t.write(mmio.QUEUE_SEL, 4, 5)
    assert r.t.read(mmio.QUEUE_NUM_MAX, 4) == 0
    r.t.write(mmio.QUEUE_NUM, 4, 8)
    r.t.write(mmio.QUEUE_READY, 4, 1)
    assert r.t.read(mmio.QUEUE_READY, 4) == 0


@pytest.mark.parametrize(
    ("size", "desc"),
    [(100, 0x1000), (0, 0x1000), (512, 0x1000), (16, 0x1004), (16, 0xC000_0000), (16, (4 << 20) - 16)],
)
def test_bad_queue_setup_sets_needs_reset(mem, size, desc):
    r = Rig(mem)
    to_features_ok(r.t)
    r.t.write(mmio.QUEUE_NUM, 4, size)
    r.t.write(mmio.QUEUE_DESC_LOW, 4, desc & 0xFFFF_FFFF)
    r.t.write(mmio.QUEUE_DRIVER_LOW, 4, 0x2000)
    r.t.write(mmio.QUEUE_DEVICE_LOW, 4, 0x3000)
    r.t.write(mmio.QUEUE_READY, 4, 1)
    assert r.t.read(mmio.QUEUE_READY, 4) == 0
    assert r.status() & mmio.STATUS_NEEDS_RESET
    assert r.events and r.events[0][0] == "guest-fault" and r.events[0][1]["device"] == "virtio-rng"


@pytest.mark.parametrize(("offset", "size"), [(0x000, 1), (0x000, 2), (0x002, 4), (0x070, 8), (0x0F0, 4)])
def test_bad_control_register_access(mem, offset, size):
    r = Rig(mem)
    assert r.t.read(offset, size) == 0
    r.t.write(offset, size, 0xFF)
    assert r.status() == 0


def test_config_space_bounds(mem):
    from bulkhead.devices.virtio.net import NetDevice

    class NoBackend:
        def fileno(self) -> int:
            return -1

        def read_frame_into(self, views):
            return None

        def write_frame(self, views):
            pass

    dev = NetDevice(NoBackend(), mac=bytes.fromhex("525400123456"))
    t = MmioTransport(dev, mem, FakeIrq())
    assert t.read(0x100, 1) == 0x52
    assert t.read(0x100, 4) == 0x12005452
    assert t.read(0x100, 8) == 0x0001_5634_1200_5452
    assert t.read(0x106, 2) == 1  # link up
    for off, size in [(0x107, 2), (0x108, 1), (0x101, 8), (0x1FF, 1), (0x100, 3)]:
        assert t.read(off, size) == 0
    assert t.stats["config_out_of_range"] == 5
    t.write(0x100, 1, 0xAA)
    assert t.read(0x100, 1) == 0x52 and t.stats["config_write_refused"] == 1


def test_guest_fault_is_contained(mem):
    r = Rig(mem)
    (d,) = r.setup()
    d.write_desc(0, d.alloc(4), 4, VIRTQ_DESC_F_NEXT, 0)  # self loop
    d.push_avail(0)
    r.irq.take()
    r.t.write(mmio.QUEUE_NOTIFY, 4, 0)  # must not raise
    assert r.status() & mmio.STATUS_NEEDS_RESET
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) & 2 and r.irq.take() == 1
    assert r.events[-1][0] == "guest-fault" and r.events[-1][1]["queue"] == 0
    assert r.events[-1][1]["reason"] == FaultReason.DESC_CHAIN_LOOP == "desc-chain-loop"
    assert r.t.stats["fault.desc-chain-loop"] == 1 and r.t.stats["guest_faults"] == 1
    # The queue is stopped: new valid work is not processed until the driver resets the device.
    d.add_chain(writable=[4])
    r.t.notify(0)
    assert d.used() == []
    (d2,) = r.setup()  # reset + fresh setup recovers
    c = d2.add_chain(writable=[4])
    r.t.notify(0)
    assert d2.used() == [(c.head, 4)]


def test_fault_on_one_device_leaves_another_working(mem):
    bad, good = Rig(mem, base=0x10000), Rig(mem, base=0x40000)
    (db,) = bad.setup()
    (dg,) = good.setup()
    db.push_avail(9999 % 256 + 256)  # head index >= queue size
    bad.t.notify(0)
    assert bad.status() & mmio.STATUS_NEEDS_RESET
    c = dg.add_chain(writable=[16])
    good.t.notify(0)
    assert dg.used() == [(c.head, 16)]
    assert not good.status() & mmio.STATUS_NEEDS_RESET and good.events == []


def test_event_sink_failure_does_not_escape(mem):
    r = Rig(mem)

    def boom(kind, detail):
        raise RuntimeError("event log is down")

    r.t.on_event = boom
    (d,) = r.setup()
    d.set_avail_idx(1000)  # jump
    r.t.notify(0)
    assert r.t.stats["event_errors"] == 1 and r.status() & mmio.STATUS_NEEDS_RESET


def test_notify_ignored_for_bad_or_unready_queue(mem):
    r = Rig(mem)
    r.t.notify(0)  # before setup
    r.setup()
    r.t.notify(1)
    r.t.notify(0xFFFF_FFFF)
    assert r.t.stats["notify_ignored"] == 3


def test_runtime_helpers(mem):
    r = Rig(mem)
    assert r.t.ioeventfd_queues() == [(0x50, 0)]
    assert kernel_cmdline_entry(0xD000_0000, 5) == "virtio_mmio.device=0x200@0xd0000000:5"
    assert r.t.poll_fds() == [] and r.t.next_deadline() is None


def test_config_generation_and_config_interrupt(mem):
    r = Rig(mem)
    r.setup()
    g = r.t.read(mmio.CONFIG_GENERATION, 4)
    r.irq.take()
    r.t.config_changed()
    assert r.t.read(mmio.CONFIG_GENERATION, 4) == g + 1
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) & 2 and r.irq.take() == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 0x1FF),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, 0xFFFF_FFFF),
        ),
        max_size=60,
    )
)
def test_random_register_traffic_never_raises(mem, ops):
    r = Rig(mem)
    for is_write, off, size, value in ops:
        if off + size > 0x200:
            continue
        if is_write:
            r.t.write(off, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= r.t.read(off, size) < 1 << (8 * size)
    assert r.status() & ~0xCF == 0


def test_surfaces_cover_every_virtio_slot():
    from bulkhead import surface
    from bulkhead.memory.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_STRIDE

    mods = [f"bulkhead.devices.virtio.{m}" for m in ("mmio", "queue", "block", "net", "rng")]
    assert set(mods) <= set(surface.discover())
    entries = surface.collect(mods)
    slots = [
        (VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_SIZE, f"v{i}") for i in range(mmio.MAX_SLOTS)
    ]
    assert surface.uncovered("mmio", slots, entries) == []
    names = {e["name"] for e in entries}
    assert {"virtio-blk-requestq", "virtio-net-rxq", "virtio-net-txq", "virtio-rng-requestq"} <= names
    for e in entries:
        if "fuzz" in e:
            assert (Path(__file__).resolve().parent.parent / str(e["fuzz"])).exists(), e["fuzz"]


# -- driver errors in the queue configuration (virtio 1.2 §2.1.2, §2.7, §4.2.3.2) -------------------

GOOD_RINGS = (16, 0x10000, 0x11000, 0x12000)  # size, desc, avail, used


def _configure(t: MmioTransport, size: int, desc: int, avail: int, used: int) -> int:
    t.write(mmio.QUEUE_SEL, 4, 0)
    t.write(mmio.QUEUE_NUM, 4, size)
    for low, addr in (
        (mmio.QUEUE_DESC_LOW, desc),
        (mmio.QUEUE_DRIVER_LOW, avail),
        (mmio.QUEUE_DEVICE_LOW, used),
    ):
        t.write(low, 4, addr & 0xFFFF_FFFF)
        t.write(low + 4, 4, addr >> 32)
    t.write(mmio.QUEUE_READY, 4, 1)
    return t.read(mmio.QUEUE_READY, 4)


@pytest.mark.parametrize(
    ("rings", "reason"),
    [
        ((0, 0x10000, 0x11000, 0x12000), FaultReason.QUEUE_SIZE_INVALID),
        ((12, 0x10000, 0x11000, 0x12000), FaultReason.QUEUE_SIZE_INVALID),
        ((512, 0x10000, 0x11000, 0x12000), FaultReason.QUEUE_SIZE_INVALID),  # > QueueNumMax 256
        ((16, 0x10008, 0x11000, 0x12000), FaultReason.RING_UNALIGNED),
        ((16, 0x10000, 0x11001, 0x12000), FaultReason.RING_UNALIGNED),
        ((16, 0x10000, 0x11000, 0x12002), FaultReason.RING_UNALIGNED),
        ((16, 0xC000_0000, 0x11000, 0x12000), FaultReason.RING_OUTSIDE_RAM),  # MMIO hole
        ((16, 0x10000, (4 << 20) - 8, 0x12000), FaultReason.RING_OUTSIDE_RAM),  # runs past the end of RAM
        ((16, (1 << 64) - 128, 0x11000, 0x12000), FaultReason.RING_OUTSIDE_RAM),  # wraps 2**64
        ((16, 0x10000, 0x10010, 0x12000), FaultReason.RING_OVERLAP),  # desc / avail
        ((16, 0x10000, 0x11000, 0x11004), FaultReason.RING_OVERLAP),  # avail / used
        ((16, 0x10000, 0x11000, 0x10000), FaultReason.RING_OVERLAP),  # desc / used
    ],
)
def test_bad_queue_configuration_needs_reset_and_is_never_used(mem, rings, reason):
    r = Rig(mem)
    to_features_ok(r.t)
    assert _configure(r.t, *rings) == 0  # QueueReady refused ...
    assert r.status() == ACK | DRV | FOK | mmio.STATUS_NEEDS_RESET  # ... and NEEDS_RESET set
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) == 0 and r.irq.take() == 0  # no notification before DRIVER_OK
    assert r.events[-1][1]["reason"] == reason.value and r.t.stats[f"fault.{reason.value}"] == 1
    # The driver goes on regardless: DRIVER_OK keeps NEEDS_RESET and now sends the config-change
    # notification (§2.1.2 "if DRIVER_OK is set"); a notify does nothing with the rejected rings.
    r.t.write(mmio.STATUS, 4, ACK | DRV | FOK | DOK)
    assert r.status() == ACK | DRV | FOK | DOK | mmio.STATUS_NEEDS_RESET
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) & mmio.INT_CONFIG_CHANGE and r.irq.take() == 1
    r.t.write(mmio.QUEUE_NOTIFY, 4, 0)
    assert r.dev.stats.get("bytes", 0) == 0 and r.t.stats["guest_faults"] == 1
    (d,) = r.setup()  # a reset recovers the device
    c = d.add_chain(writable=[4])
    r.t.notify(0)
    assert d.used() == [(c.head, 4)] and r.status() == ACK | DRV | FOK | DOK


def test_needs_reset_is_cleared_only_by_reset(mem):
    r = Rig(mem)
    to_features_ok(r.t)
    _configure(r.t, 12, 0x10000, 0x11000, 0x12000)
    assert r.status() & mmio.STATUS_NEEDS_RESET
    r.t.write(mmio.STATUS, 4, ACK | DRV | FOK)  # written back without the bit: it stays
    assert r.status() & mmio.STATUS_NEEDS_RESET
    r.t.write(mmio.STATUS, 4, ACK | DRV | FOK | DOK)
    assert r.status() & mmio.STATUS_NEEDS_RESET
    r.t.write(mmio.STATUS, 4, 0)
    assert r.status() == 0


def test_configuration_is_checked_again_at_the_first_notification(mem):
    r = Rig(mem)
    (d,) = r.setup()
    r.t.queues[0].used_ring = 0xC000_0000  # what a bug elsewhere in bulkhead would look like
    d.add_chain(writable=[4])
    r.t.notify(0)
    assert r.status() & mmio.STATUS_NEEDS_RESET and d.used() == []
    assert r.events[-1][1]["reason"] == FaultReason.RING_OUTSIDE_RAM
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) & mmio.INT_CONFIG_CHANGE


@pytest.mark.parametrize(
    "reg", [mmio.QUEUE_NUM, mmio.QUEUE_DESC_LOW, mmio.QUEUE_DRIVER_HIGH, mmio.QUEUE_DEVICE_HIGH]
)
@pytest.mark.parametrize("after_driver_ok", [False, True])
def test_queue_register_write_on_a_ready_queue_needs_reset(mem, reg, after_driver_ok):
    """§4.2.2.2: "When QueueReady is not zero, the driver MUST NOT access QueueNum, QueueDescLow, ...".
    The write is not applied (the validated rings stay), and the device needs a reset (§2.1.2)."""
    r = Rig(mem)
    to_features_ok(r.t)
    d = MockVirtqueueDriver(mem, 16, 0x10000, 0x8000)
    assert _configure(r.t, 16, d.desc_table, d.avail_ring, d.used_ring) == 1
    if after_driver_ok:
        r.t.write(mmio.STATUS, 4, ACK | DRV | FOK | DOK)
    r.t.write(mmio.QUEUE_SEL, 4, 0)
    r.t.write(reg, 4, 4)
    q = r.t.queues[0]
    assert (q.size, q.desc_table, q.avail_ring, q.used_ring) == (16, d.desc_table, d.avail_ring, d.used_ring)
    assert r.status() & mmio.STATUS_NEEDS_RESET
    assert r.events[-1][1]["reason"] == FaultReason.QUEUE_WRITE_WHILE_READY
    if not after_driver_ok:
        r.t.write(mmio.STATUS, 4, ACK | DRV | FOK | DOK)
    assert r.t.read(mmio.INTERRUPT_STATUS, 4) & mmio.INT_CONFIG_CHANGE
    d.add_chain(writable=[4])
    r.t.notify(0)
    assert d.used() == []  # no work until the reset


def test_queue_ready_again_and_writes_after_driver_ok_are_dropped(mem):
    """QueueReady=1 on an enabled queue, and queue registers of a disabled queue after DRIVER_OK
    (§3.1.1 configures queues before DRIVER_OK), are dropped and counted; the device keeps working."""
    r = Rig(mem)
    to_features_ok(r.t)
    d = MockVirtqueueDriver(mem, 16, 0x10000, 0x8000)
    assert _configure(r.t, 16, d.desc_table, d.avail_ring, d.used_ring) == 1
    r.t.write(mmio.QUEUE_READY, 4, 1)
    r.t.write(mmio.STATUS, 4, ACK | DRV | FOK | DOK)
    r.t.write(mmio.QUEUE_READY, 4, 1)
    assert r.t.stats["queue_write_refused"] == 2
    c = d.add_chain(writable=[4])
    r.t.notify(0)
    assert d.used() == [(c.head, 4)] and r.status() == ACK | DRV | FOK | DOK
    r.t.write(mmio.QUEUE_READY, 4, 0)  # the driver may stop its queue ...
    r.t.write(mmio.QUEUE_NUM, 4, 8)  # ... but not reconfigure it after DRIVER_OK
    r.t.write(mmio.QUEUE_READY, 4, 1)
    assert r.t.read(mmio.QUEUE_READY, 4) == 0 and r.t.stats["queue_write_refused"] == 4
    assert not r.status() & mmio.STATUS_NEEDS_RESET


@pytest.mark.parametrize(
    ("writes", "expect"),
    [
        ([DOK], 0),  # DRIVER_OK before ACKNOWLEDGE
        ([ACK, ACK | DRV, ACK | DRV | DOK], ACK | DRV),  # DRIVER_OK before FEATURES_OK
        ([ACK, ACK | FOK], ACK),  # FEATURES_OK before DRIVER
        ([ACK, ACK | DRV, ACK], ACK | DRV),  # clearing a bit without reset
        ([ACK, ACK | DRV, ACK | DRV | mmio.STATUS_NEEDS_RESET], ACK | DRV),  # only the device sets it
        ([ACK, ACK | DRV, ACK | DRV | mmio.STATUS_FAILED], ACK | DRV | mmio.STATUS_FAILED),
    ],
)
def test_out_of_order_status_writes(mem, writes, expect):
    """§2.1.1/§3.1.1: the driver sets the bits in order and never clears one (only a reset does);
    bulkhead keeps the last valid status (QEMU stores any byte: tests/conformance)."""
    r = Rig(mem)
    for w in writes:
        r.t.write(mmio.STATUS, 4, w)
    assert r.status() == expect


def test_features_ok_with_unoffered_feature_is_not_retained(mem):
    """§2.2.1 (the driver MUST NOT accept an unoffered feature) / §2.2.2 (the device MUST then fail to
    set FEATURES_OK)."""
    r = Rig(mem)
    to_features_ok(r.t, 1 << VIRTIO_F_VERSION_1 | 1 << 63)
    assert r.status() == ACK | DRV
    assert r.t.stats["features_rejected"] == 1


def test_status_transition_is_the_spec_state_machine() -> None:
    """virtio 1.2 §3.1.1 order, §2.1.2 NEEDS_RESET (device-only, cleared by reset), FEATURES_OK refused
    without VERSION_1 or beyond the offer: the pure machine MmioTransport applies."""
    ack, drv, fok, dok = mmio.STATUS_ACKNOWLEDGE, mmio.STATUS_DRIVER, mmio.STATUS_FEATURES_OK, mmio.STATUS_DRIVER_OK
    v1 = 1 << VIRTIO_F_VERSION_1
    t = mmio.status_transition
    assert t(ack | drv, 0, v1, v1) == ("reset", 0)
    assert t(0, ack, v1, 0) == ("set", ack)
    assert t(0, ack | drv, v1, 0) == ("status_rejected", 0)  # skips ACKNOWLEDGE
    assert t(ack, ack | mmio.STATUS_NEEDS_RESET, v1, 0) == ("status_rejected", ack)  # the driver may not set it
    assert t(ack | drv, ack | drv | fok, v1, 0) == ("features_rejected", ack | drv)  # no VERSION_1
    assert t(ack | drv, ack | drv | fok, v1, v1 | 1) == ("features_rejected", ack | drv)  # beyond the offer
    assert t(ack | drv, ack | drv | fok, v1, v1) == ("set", ack | drv | fok)
    broken = ack | drv | fok | mmio.STATUS_NEEDS_RESET
    assert t(broken, ack | drv | fok | dok, v1, v1) == ("driver-ok", broken | dok)  # NEEDS_RESET is kept
    assert t(ack, mmio.STATUS_FAILED, v1, 0) == ("set", ack | mmio.STATUS_FAILED)
    assert t(ack | mmio.STATUS_FAILED, ack | drv, v1, 0) == ("status_rejected", ack | mmio.STATUS_FAILED)


@pytest.mark.parametrize("high_first", [True, False])
def test_64_bit_queue_addresses_in_either_register_order(mem, high_first):
    """virtio 1.2 §4.2.2: QueueDesc/QueueDriver/QueueDevice are 64-bit, written as two 32-bit halves
    in any order; writing one half keeps the other."""
    r = Rig(mem)
    to_features_ok(r.t)
    regs = ((mmio.QUEUE_DESC_LOW, mmio.QUEUE_DESC_HIGH, 0x1_0000_1000),
            (mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DRIVER_HIGH, 0x2_0000_2000),
            (mmio.QUEUE_DEVICE_LOW, mmio.QUEUE_DEVICE_HIGH, 0x3_0000_3000))
    for low, high, value in regs:
        halves = [(high, value >> 32), (low, value & 0xFFFF_FFFF)]
        for reg, v in halves if high_first else halves[::-1]:
            r.t.write(reg, 4, v)
    q = r.t.queues[0]
    assert (q.desc_table, q.avail_ring, q.used_ring) == (0x1_0000_1000, 0x2_0000_2000, 0x3_0000_3000)
