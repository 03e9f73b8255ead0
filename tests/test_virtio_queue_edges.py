"""Split virtqueues (virtio 1.2 §2.7) at their exact limits (issue 15 mutation survivors).

Every limit is hit exactly and one past it: a chain of exactly `size` steps (and of exactly an
indirect table's length), a chain carrying exactly `max_chain_bytes`, rings ending exactly at the end
of RAM, adjacent rings in both orders, used entries written all the way round the ring, the power-on
state after reset (§2.4), the first used-buffer notification after activation (§2.7.10), and the
zero-length readable-after-writable rule (§2.7.4.2)."""

from __future__ import annotations

import struct

import pytest

from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.queue import (
    MAX_INDIRECT_ENTRIES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    slice_buffers,
)
from bulkhead.memory import GuestMemory
from bulkhead.testing.virtqueue import MockVirtqueueDriver

MEM_SIZE = 1 << 20
BASE = 0x1000
N, W, IND = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
ALL = 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory([(0, MEM_SIZE)])
    yield m
    m.close()


def make(mem, size=16, features=ALL, max_chain_bytes=None):
    d = MockVirtqueueDriver(mem, size, BASE)
    q = Queue(256) if max_chain_bytes is None else Queue(256, max_chain_bytes=max_chain_bytes)
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, d.desc_table, d.avail_ring, d.used_ring
    q.set_features(features)
    q.activate(mem)
    return d, q


def reason_of(fn) -> FaultReason:
    with pytest.raises(VirtioFault) as info:
        fn()
    return info.value.reason


# ---------------------------------------------------------------- construction and reset


def test_queue_max_size_and_chain_cap_limits():
    for ok in (1, 2, 4, 256, 32768):
        assert Queue(ok).max_size == ok
    for bad in (0, 3, 6, 65536, 32769):
        with pytest.raises(ValueError, match="power of two between 1 and 32768"):
            Queue(bad)
    assert Queue(8, max_chain_bytes=1).max_chain_bytes == 1
    assert Queue(8, max_chain_bytes=0xFFFF_FFFF).max_chain_bytes == 0xFFFF_FFFF
    for bad in (0, -1, 1 << 32):
        with pytest.raises(ValueError, match="max_chain_bytes must be between"):
            Queue(8, max_chain_bytes=bad)


POWER_ON = {"size": 8, "ready": False, "desc_table": 0, "avail_ring": 0, "used_ring": 0, "event_idx": False,
            "indirect": False, "next_avail": 0, "next_used": 0, "signalled_used": 0, "signalled_valid": False,
            "dirty": False, "broken": False, "chains_popped": 0, "notified": False}


def test_reset_restores_every_field_of_the_power_on_state(mem):
    q = Queue(8)
    assert {k: getattr(q, k) for k in POWER_ON} == POWER_ON
    for k, v in {"size": 4, "ready": True, "desc_table": 0x1000, "avail_ring": 0x2000, "used_ring": 0x3000,
                 "event_idx": True, "indirect": True, "next_avail": 5, "next_used": 6, "signalled_used": 7,
                 "signalled_valid": True, "dirty": True, "broken": True, "chains_popped": 9,
                 "notified": True}.items():
        setattr(q, k, v)
    q.reset()
    got = {k: getattr(q, k) for k in POWER_ON}
    assert got == POWER_ON and all(type(got[k]) is type(v) for k, v in POWER_ON.items())


def test_set_features_reads_exactly_bits_28_and_29():
    q = Queue(8)
    for features, want in ((0, (False, False)), (1 << 28, (False, True)), (1 << 29, (True, False)),
                           (3 << 28, (True, True)), (1 << 30 | 1 << 27 | 1 << 32, (False, False))):
        q.set_features(features)
        assert (q.event_idx, q.indirect) == want, hex(features)


def test_activate_forgets_notification_state(mem):
    _d, q = make(mem)
    q.signalled_used, q.signalled_valid, q.notified = 3, True, True
    q.activate(mem)
    assert (q.signalled_valid, q.notified, q.next_avail, q.next_used) == (False, False, 0, 0)


# ---------------------------------------------------------------- ring placement


def test_size_one_is_a_power_of_two(mem):
    d, q = make(mem, size=1)
    d.add_chain([b"x"])
    assert q.pop(mem).read_len == 1


def test_rings_may_end_exactly_at_the_end_of_ram(mem):
    size = 16
    q = Queue(size)
    q.desc_table, q.used_ring = MEM_SIZE - 16 * size, 0x1000
    q.avail_ring = q.desc_table - (6 + 2 * size)  # avail ring, then the table up to the last byte
    q.validate(mem)
    q.desc_table, q.avail_ring = 0x2000, MEM_SIZE - (6 + 2 * size)  # the avail ring's used_event is the last
    q.validate(mem)
    q.avail_ring += 2
    assert reason_of(lambda: q.validate(mem)) is FaultReason.RING_OUTSIDE_RAM


def test_adjacent_rings_in_both_orders(mem):
    size = 16
    q = Queue(size)
    q.size, q.desc_table = size, 0x1000
    q.used_ring = 0x4000
    q.avail_ring = q.used_ring + 6 + 8 * size  # used ring, then the avail ring
    q.validate(mem)
    q.avail_ring = 0x4002
    q.used_ring = q.avail_ring - (6 + 8 * size)  # 0x3f7c: the used ring ends where the avail ring starts
    q.validate(mem)
    q.desc_table, q.avail_ring, q.used_ring = 0x8000, 0x8000 - (6 + 2 * size), 0x4000  # avail then table
    q.validate(mem)
    q.avail_ring += 2
    assert reason_of(lambda: q.validate(mem)) is FaultReason.RING_OVERLAP


@pytest.mark.parametrize("which", ["descriptor table", "available ring", "used ring"])
def test_ring_outside_ram_names_the_area(mem, which):
    q = Queue(16)
    q.desc_table, q.avail_ring, q.used_ring = 0x1000, 0x2000, 0x3000
    setattr(q, {"descriptor table": "desc_table", "available ring": "avail_ring", "used ring": "used_ring"}[which],
            MEM_SIZE)
    with pytest.raises(VirtioFault, match=f"^{which}: ") as info:  # the message starts with the area
        q.validate(mem)
    assert info.value.reason is FaultReason.RING_OUTSIDE_RAM


def test_a_buffer_ending_exactly_at_2_pow_64_is_outside_ram_not_wrapping(mem):
    d, q = make(mem)
    d.write_desc(0, (1 << 64) - 16, 16, 0)
    d.push_avail(0)
    with pytest.raises(VirtioFault) as info:
        q.pop(mem)
    assert info.value.reason is FaultReason.DESC_OUTSIDE_RAM and "wraps" not in str(info.value)
    d, q = make(mem)
    d.write_desc(0, (1 << 64) - 16, 17, 0)
    d.push_avail(0)
    with pytest.raises(VirtioFault, match="wraps the 64-bit address space") as info:
        q.pop(mem)
    assert info.value.reason is FaultReason.DESC_OUTSIDE_RAM


# ---------------------------------------------------------------- chains at their limits


def test_a_chain_of_exactly_size_descriptors_is_accepted(mem):
    d, q = make(mem, size=16)
    c = d.add_chain([bytes([i]) for i in range(16)])
    chain = q.pop(mem)
    assert chain.head == c.head and chain.descriptors == 16 and chain.read_len == 16


def test_an_indirect_chain_of_exactly_its_table_length_is_accepted(mem):
    d, q = make(mem, size=4)
    table = d.alloc(16 * 8)
    bufs = [d.alloc(4) for _ in range(8)]
    for i, b in enumerate(bufs):
        d.write_desc_at(table + 16 * i, b, 4, W | (N if i < 7 else 0), i + 1 if i < 7 else 0)
    d.write_desc(0, table, 16 * 8, IND)
    d.push_avail(0)
    chain = q.pop(mem)
    assert chain.descriptors == 9 and chain.write_len == 32  # the indirect descriptor and its 8 entries


def test_a_chain_of_exactly_the_byte_cap_is_accepted(mem):
    d, q = make(mem, max_chain_bytes=1000)
    d.add_chain([b"a" * 600, b"b" * 400])
    assert q.pop(mem).read_len == 1000
    d.add_chain([b"a" * 600, b"b" * 401])
    assert reason_of(lambda: q.pop(mem)) is FaultReason.CHAIN_TOO_LARGE


def test_indirect_table_limits_and_alignment(mem):
    d, q = make(mem)
    d.write_desc(0, 0x8000, 16 * (MAX_INDIRECT_ENTRIES + 1), IND)
    d.push_avail(0)
    with pytest.raises(VirtioFault, match=f"has {MAX_INDIRECT_ENTRIES + 1} entries") as info:
        q.pop(mem)
    assert info.value.reason is FaultReason.INDIRECT_TOO_LARGE
    d, q = make(mem)
    d.write_desc(0, 0x8008, 32, IND)  # 8-aligned: refused
    d.push_avail(0)
    assert reason_of(lambda: q.pop(mem)) is FaultReason.INDIRECT_UNALIGNED
    d, q = make(mem)
    d.write_desc(0, MEM_SIZE - 16, 32, IND)
    d.push_avail(0)
    with pytest.raises(VirtioFault, match=r"^indirect table: ") as info:
        q.pop(mem)
    assert info.value.reason is FaultReason.DESC_OUTSIDE_RAM


def test_zero_length_descriptors_and_the_readable_after_writable_rule(mem):
    d, q = make(mem)
    a = d.alloc(8)
    d.write_desc(0, a, 4, W | N, 1)
    d.write_desc(1, a + 4, 0, 0)  # zero-length device-readable after a writable one
    d.push_avail(0)
    assert reason_of(lambda: q.pop(mem)) is FaultReason.DESC_ORDER
    d, q = make(mem)
    d.write_desc(0, a, 4, W | N, 1)
    d.write_desc(1, a + 4, 0, W)  # zero-length writable after writable: fine, dropped
    d.push_avail(0)
    chain = q.pop(mem)
    assert chain.writable == [(a, 4)] and chain.descriptors == 2
    assert [bytes(v) for v in chain.write_views(mem)] == [bytes(mem.read(a, 4))]


# ---------------------------------------------------------------- available and used rings


def test_pop_counts_and_undo_pop_gives_the_same_chain_back(mem):
    d, q = make(mem)
    c1 = d.add_chain([b"one"])
    c2 = d.add_chain([b"two"])
    assert q.pop(mem).head == c1.head and q.chains_popped == 1
    q.undo_pop()
    assert (q.next_avail, q.chains_popped, q.pending(mem)) == (0, 0, 2)
    assert q.pop(mem).head == c1.head and q.pop(mem).head == c2.head and q.chains_popped == 2
    q.next_avail = 0  # wrap: undoing the pop of index 0xFFFF
    q.undo_pop()
    assert q.next_avail == 0xFFFF


def test_used_entries_go_round_the_whole_ring(mem):
    d, q = make(mem, size=4)
    got = []
    for i in range(11):
        d.add_chain([bytes([i])])
        chain = q.pop(mem)
        q.add_used(mem, chain.head, 100 + i)
        got += d.used()
        raw = struct.unpack("<II", mem.read(d.used_ring + 4 + 8 * (i % 4), 8))
        assert raw == (chain.head, 100 + i)
    assert [n for _h, n in got] == [100 + i for i in range(11)] and d.used_idx() == 11


def test_the_first_notification_after_activation_is_always_sent(mem):
    d, q = make(mem)
    d.set_used_event(5)  # would suppress an interrupt for entry 1
    d.add_chain([b"x"])
    q.add_used(mem, q.pop(mem).head, 1)
    assert q.dirty is True
    assert q.needs_notification(mem) is True and q.dirty is False
    d.add_chain([b"y"])
    q.add_used(mem, q.pop(mem).head, 1)
    assert q.needs_notification(mem) is False  # now used_event counts


def test_a_broken_queue_asks_for_no_notification(mem):
    d, q = make(mem)
    d.add_chain([b"x"])
    q.broken = True
    assert q.enable_notification(mem) is False and q.pop(mem) is None


def test_slice_buffers_known_answers():
    bufs = [(0x100, 4), (0x200, 4), (0x300, 4)]
    assert slice_buffers(bufs, 2, 4) == [(0x102, 2), (0x200, 2)]
    assert slice_buffers(bufs, 4, 4) == [(0x200, 4)]
    assert slice_buffers(bufs, 0, 100) == bufs
    assert slice_buffers(bufs, 12, 4) == []
