"""Split virtqueue parser: valid chains, every malformed-queue case from issue 3, and property tests."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.queue import (
    MAX_INDIRECT_ENTRIES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    gather,
    scatter,
    slice_buffers,
    vring_need_event,
)
from bulkhead.errors import GuestFault
from bulkhead.memory import GuestMemory
from bulkhead.testing.virtqueue import MockVirtqueueDriver

MEM_SIZE = 1 << 20
BASE = 0x1000
N, W, IND = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
ALL_FEATURES = 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX


@contextmanager
def fault(reason: FaultReason) -> Iterator[None]:
    """Expect a VirtioFault with exactly this typed reason (never the message text)."""
    with pytest.raises(VirtioFault) as info:
        yield
    assert info.value.reason is reason, (info.value.reason, str(info.value))
    assert isinstance(info.value, GuestFault) and info.value.kind == "virtqueue"


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory([(0, MEM_SIZE)])
    yield m
    m.close()


def make(mem: GuestMemory, size: int = 16, features: int = ALL_FEATURES, max_size: int = 256):
    d = MockVirtqueueDriver(mem, size, BASE)
    q = Queue(max_size)
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, d.desc_table, d.avail_ring, d.used_ring
    q.set_features(features)
    q.activate(mem)
    return d, q


# -- valid chains -------------------------------------------------------------------------------


def test_direct_chain_readable_then_writable(mem):
    d, q = make(mem)
    c = d.add_chain([b"hello", b"world!"], [100, 1])
    chain = q.pop(mem)
    assert chain is not None and chain.head == c.head
    assert chain.readable == c.readable and chain.writable == c.writable
    assert (chain.read_len, chain.write_len) == (11, 101)
    assert b"".join(bytes(v) for v in chain.read_views(mem)) == b"helloworld!"
    assert q.pop(mem) is None


def test_indirect_chain(mem):
    d, q = make(mem)
    c = d.add_chain([b"x" * 16], [512, 1], indirect=True)
    chain = q.pop(mem)
    assert chain is not None and chain.head == c.head
    assert chain.readable == c.readable and chain.writable == c.writable


def test_direct_then_indirect_tail_is_accepted(mem):
    d, q = make(mem)
    buf = d.alloc(8)
    table = d.alloc(32)
    d.write_desc_at(table, buf, 4, W | N, 1)
    d.write_desc_at(table + 16, buf + 4, 4, W)
    d.write_desc(0, buf, 2, N, 1)
    d.write_desc(1, table, 32, IND)
    d.push_avail(0)
    chain = q.pop(mem)
    assert chain is not None
    assert chain.readable == [(buf, 2)] and chain.writable == [(buf, 4), (buf + 4, 4)]


def test_used_ring_and_index(mem):
    d, q = make(mem)
    a = d.add_chain([b"a"])
    b = d.add_chain([b"b"])
    ca, cb = q.pop(mem), q.pop(mem)
    assert ca is not None and cb is not None
    q.add_used(mem, cb.head, 7)
    q.add_used(mem, ca.head, 0)
    assert d.used() == [(b.head, 7), (a.head, 0)]


def test_avail_index_wraps_at_u16(mem):
    d, q = make(mem, size=4)
    d.avail_idx = 0xFFFE
    d.set_avail_idx(0xFFFE)
    q.next_avail = 0xFFFE
    heads = [d.add_chain([bytes([i])]).head for i in range(3)]
    got = [q.pop(mem) for _ in range(3)]
    assert [c.head for c in got if c] == heads
    assert q.next_avail == 1 and q.pop(mem) is None


def test_zero_length_descriptor_is_skipped(mem):
    d, q = make(mem)
    buf = d.alloc(4)
    d.write_desc(0, 0xFFFF_FFFF_FFFF_0000, 0, N, 1)  # no bytes: the address is never touched
    d.write_desc(1, buf, 4, W)
    d.push_avail(0)
    chain = q.pop(mem)
    assert chain is not None and chain.writable == [(buf, 4)] and chain.readable == []


def test_buffer_helpers(mem):
    bufs = [(0x100, 4), (0x200, 4), (0x300, 4)]
    assert slice_buffers(bufs, 2, 5) == [(0x102, 2), (0x200, 3)]
    assert slice_buffers(bufs, 11, 10) == [(0x303, 1)]
    assert slice_buffers(bufs, 12, 1) == []
    assert scatter(mem, bufs, 3, b"ABCDEFGHIJ") == 9
    assert gather(mem, bufs, 0, 12)[3:] == b"ABCDEFGHI"


# -- malformed queue configuration -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 12, 255, 512, 0x10000, 0xFFFF_FFFF])
def test_bad_queue_size(mem, size):
    q = Queue(256)
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, 0x1000, 0x3000, 0x4000
    with fault(FaultReason.QUEUE_SIZE_INVALID):
        q.validate(mem)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(0x1008, 0x3000, 0x4000), (0x1000, 0x3001, 0x4000), (0x1000, 0x3000, 0x4002)],
)
def test_unaligned_rings(mem, desc, avail, used):
    q = Queue(16)
    q.size, q.desc_table, q.avail_ring, q.used_ring = 16, desc, avail, used
    with fault(FaultReason.RING_UNALIGNED):
        q.validate(mem)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (MEM_SIZE - 16 * 8, 0x3000, 0x4000),  # table runs past the end of RAM
        (0x1000, MEM_SIZE - 4, 0x4000),  # avail ring header fits, the ring does not
        (0x1000, 0x3000, MEM_SIZE - 8),
        ((1 << 64) - 16, 0x3000, 0x4000),  # would wrap the address space
        (0xC000_0000, 0x3000, 0x4000),  # not RAM at all
    ],
)
def test_rings_outside_memory(mem, desc, avail, used):
    q = Queue(16)
    q.size, q.desc_table, q.avail_ring, q.used_ring = 16, desc, avail, used
    with fault(FaultReason.RING_OUTSIDE_RAM):
        q.validate(mem)


# -- malformed chains --------------------------------------------------------------------------


def test_head_index_out_of_range(mem):
    d, q = make(mem, size=8)
    d.push_avail(8)
    with fault(FaultReason.AVAIL_HEAD_OUT_OF_RANGE):
        q.pop(mem)


def test_next_index_out_of_range(mem):
    d, q = make(mem, size=8)
    d.write_desc(0, d.alloc(4), 4, N, 9)
    d.push_avail(0)
    with fault(FaultReason.DESC_NEXT_OUT_OF_RANGE):
        q.pop(mem)


@pytest.mark.parametrize("cycle", [[0], [0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_loops_terminate(mem, cycle):
    d, q = make(mem, size=8)
    buf = d.alloc(4)
    for i, idx in enumerate(cycle):
        d.write_desc(idx, buf, 4, N, cycle[(i + 1) % len(cycle)])
    d.push_avail(cycle[0])
    with fault(FaultReason.DESC_CHAIN_LOOP):
        q.pop(mem)


def test_loop_inside_indirect_table(mem):
    d, q = make(mem)
    table = d.alloc(32)
    buf = d.alloc(4)
    d.write_desc_at(table, buf, 4, N, 1)
    d.write_desc_at(table + 16, buf, 4, N, 0)
    d.write_desc(0, table, 32, IND)
    d.push_avail(0)
    with fault(FaultReason.DESC_CHAIN_LOOP):
        q.pop(mem)


def test_nested_indirect_rejected(mem):
    d, q = make(mem)
    inner = d.alloc(16)
    d.write_desc_at(inner, d.alloc(4), 4, 0)
    outer = d.alloc(16)
    d.write_desc_at(outer, inner, 16, IND)
    d.write_desc(0, outer, 16, IND)
    d.push_avail(0)
    with fault(FaultReason.INDIRECT_NESTED):
        q.pop(mem)


def test_indirect_with_next_rejected(mem):
    d, q = make(mem)
    table = d.alloc(16)
    d.write_desc_at(table, d.alloc(4), 4, 0)
    d.write_desc(0, table, 16, IND | N, 1)
    d.write_desc(1, d.alloc(4), 4, 0)
    d.push_avail(0)
    with fault(FaultReason.INDIRECT_WITH_NEXT):
        q.pop(mem)


@pytest.mark.parametrize("length", [0, 8, 17, 16 * (MAX_INDIRECT_ENTRIES + 1), 0xFFFF_FFF0])
def test_indirect_table_length(mem, length):
    d, q = make(mem)
    d.write_desc(0, d.alloc(16), length, IND)
    d.push_avail(0)
    bad_length = length == 0 or length % 16
    with fault(FaultReason.INDIRECT_BAD_LENGTH if bad_length else FaultReason.INDIRECT_TOO_LARGE):
        q.pop(mem)


def test_indirect_needs_feature(mem):
    d, q = make(mem, features=0)
    d.add_chain([b"x"], indirect=True)
    with fault(FaultReason.INDIRECT_WITHOUT_FEATURE):
        q.pop(mem)


def test_indirect_table_outside_memory(mem):
    d, q = make(mem)
    d.write_desc(0, MEM_SIZE - 16, 32, IND)
    d.push_avail(0)
    with fault(FaultReason.DESC_OUTSIDE_RAM):
        q.pop(mem)


def test_indirect_next_out_of_table(mem):
    d, q = make(mem)
    table = d.alloc(32)
    d.write_desc_at(table, d.alloc(4), 4, N, 2)
    d.write_desc(0, table, 32, IND)
    d.push_avail(0)
    with fault(FaultReason.DESC_NEXT_OUT_OF_RANGE):
        q.pop(mem)


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x8000, 0xFFFF_FFFF),  # 4 GiB - 1 from a small address: outside RAM
        ((1 << 64) - 8, 16),  # wraps the address space
        (MEM_SIZE - 4, 8),  # straddles the end of RAM
    ],
)
def test_huge_or_wrapping_buffers(mem, addr, length):
    d, q = make(mem)
    d.write_desc(0, addr, length, 0)
    d.push_avail(0)
    with fault(FaultReason.DESC_OUTSIDE_RAM):
        q.pop(mem)


def test_total_chain_length_capped(mem):
    d = MockVirtqueueDriver(mem, 16, BASE)
    q = Queue(16, max_chain_bytes=1000)
    q.size, q.desc_table, q.avail_ring, q.used_ring = 16, d.desc_table, d.avail_ring, d.used_ring
    q.activate(mem)
    d.add_chain([b"a" * 600, b"b" * 600])
    with fault(FaultReason.CHAIN_TOO_LARGE):
        q.pop(mem)


def test_default_cap_is_below_4gib():
    """One 4 MiB buffer listed 1024 times through an indirect table sums to 4 GiB: refused."""
    with GuestMemory([(0, 8 << 20)]) as big:
        d, q = make(big)
        buf, n, table = 4 << 20, MAX_INDIRECT_ENTRIES, 0x40000
        entries = [struct.pack("<QIHH", buf, 4 << 20, N, i + 1) for i in range(n - 1)]
        big.write(table, b"".join([*entries, struct.pack("<QIHH", buf, 4 << 20, 0, 0)]))
        d.write_desc(0, table, 16 * n, IND)
        d.push_avail(0)
        with fault(FaultReason.CHAIN_TOO_LARGE):
            q.pop(big)


def test_readable_after_writable_rejected(mem):
    d, q = make(mem)
    d.write_desc(0, d.alloc(4), 4, W | N, 1)
    d.write_desc(1, d.alloc(4), 4, 0)
    d.push_avail(0)
    with fault(FaultReason.DESC_ORDER):
        q.pop(mem)


@pytest.mark.parametrize("jump", [17, 0x8000, 0xFFFF])
def test_avail_index_jump(mem, jump):
    d, q = make(mem, size=16)
    d.set_avail_idx(jump)
    with fault(FaultReason.AVAIL_INDEX_JUMP):
        q.pop(mem)


def test_avail_index_full_queue_is_fine(mem):
    d, q = make(mem, size=4)
    for i in range(4):
        d.add_chain([bytes([i])])
    assert q.pending(mem) == 4
    assert sum(1 for _ in iter(lambda: q.pop(mem), None)) == 4


# -- notifications ------------------------------------------------------------------------------


def test_no_interrupt_flag(mem):
    d, q = make(mem, features=0)
    d.add_chain([b"a"])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head, 0)
    assert q.needs_notification(mem)
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(mem, c.head, 0)
    assert not q.needs_notification(mem)


def test_event_idx_used_event(mem):
    d, q = make(mem)
    for _ in range(4):
        d.add_chain([b"a"])
    chains = [q.pop(mem) for _ in range(4)]
    q.add_used(mem, chains[0].head, 0)
    assert q.needs_notification(mem)  # first signal always goes out
    d.set_used_event(2)  # "interrupt me when entry 2 is used" (used idx passes 3)
    q.add_used(mem, chains[1].head, 0)  # used idx 2
    assert not q.needs_notification(mem)
    q.add_used(mem, chains[2].head, 0)  # used idx 3: crosses used_event + 1
    assert q.needs_notification(mem)
    q.add_used(mem, chains[3].head, 0)
    assert not q.needs_notification(mem)


def test_enable_notification_writes_avail_event_and_reports_races(mem):
    d, q = make(mem)
    d.add_chain([b"a"])
    assert q.pop(mem) is not None
    assert q.enable_notification(mem) is False
    assert d.avail_event() == 1
    d.add_chain([b"b"])
    assert q.enable_notification(mem) is True


def test_disable_enable_notification_without_event_idx(mem):
    d, q = make(mem, features=0)
    q.disable_notification(mem)
    assert d.used_flags() == 1
    assert q.enable_notification(mem) is False
    assert d.used_flags() == 0


def test_vring_need_event_matches_linux_definition():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 5, 4)
    assert vring_need_event(0xFFFF, 0, 0xFFFF)  # wraps


# -- properties ---------------------------------------------------------------------------------

desc_st = st.tuples(
    st.one_of(st.integers(0, MEM_SIZE), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 0x2000), st.integers(0, 2**32 - 1)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(desc_st, min_size=8, max_size=8),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
)
def test_hostile_tables_only_raise_guestfault(mem, descs, heads, avail_idx):
    d, q = make(mem, size=8)
    for i, (a, n, f, nx) in enumerate(descs):
        d.write_desc(i, a, n, f, nx)
    for h in heads:
        d.push_avail(h, publish=False)
    d.set_avail_idx(avail_idx)
    for _ in range(10):
        try:
            chain = q.pop(mem)
        except GuestFault:
            return
        if chain is None:
            return
        for a, n in chain.readable + chain.writable:
            assert mem.contains(a, n) and n > 0
        assert chain.read_len + chain.write_len < 2**32
        assert chain.descriptors <= 8 + MAX_INDIRECT_ENTRIES


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    readable=st.lists(st.binary(min_size=1, max_size=64), max_size=4),
    writable=st.lists(st.integers(1, 256), max_size=4),
    indirect=st.booleans(),
)
def test_well_formed_chains_roundtrip(mem, readable, writable, indirect):
    if not readable and not writable:
        writable = [1]
    d, q = make(mem)
    c = d.add_chain(readable, writable, indirect=indirect)
    chain = q.pop(mem)
    assert chain is not None
    assert chain.readable == c.readable and chain.writable == c.writable
    assert gather(mem, chain.readable, 0, chain.read_len) == b"".join(readable)


def test_indices_start_at_zero_whatever_the_ring_holds(mem):
    d = MockVirtqueueDriver(mem, 8, BASE)
    mem.write_u16(d.used_ring + 2, 0x1234)  # garbage left by a previous user of the memory
    q = Queue(8)
    q.size, q.desc_table, q.avail_ring, q.used_ring = 8, d.desc_table, d.avail_ring, d.used_ring
    q.activate(mem)
    assert (q.next_avail, q.next_used) == (0, 0)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (0x1000, 0x3000, 0x1000),  # used ring on top of the descriptor table
        (0x1000, 0x1000 + 16 * 16 - 2, 0x4000),  # avail ring starts inside the table's last entry
        (0x1000, 0x3000, 0x3000 + 6 + 2 * 16 - 6),  # used ring overlaps avail's tail (used_event)
    ],
)
def test_overlapping_rings_rejected(mem, desc, avail, used):
    q = Queue(16)
    q.size, q.desc_table, q.avail_ring, q.used_ring = 16, desc, avail, used
    with fault(FaultReason.RING_OVERLAP):
        q.validate(mem)


def test_adjacent_rings_accepted(mem):
    q = Queue(16)
    q.size, q.desc_table, q.avail_ring = 16, 0x1000, 0x1000 + 16 * 16
    q.used_ring = q.avail_ring + 6 + 2 * 16 + 2  # the first 4-aligned address after the avail ring
    q.validate(mem)


# -- the whole configuration against an independent statement of the rules -------------------------

_LOW, _HIGH = (0, 1 << 20), (1 << 32, 1 << 20)
_EDGE = st.sampled_from([0, _LOW[1], 0xC000_0000, _HIGH[0], _HIGH[0] + _HIGH[1], 1 << 64])
_ADDR = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.builds(lambda e, d: (e + d) % (1 << 64), _EDGE, st.integers(-0x1000, 0x1000)),
    st.integers(0, 0x4000),
)


def _rules(size: int, areas: list[tuple[int, int]]) -> bool:
    """virtio 1.2 §2.7 / rust-vmm Queue::is_valid, written without queue.py."""
    (desc, _), (avail, _), (used, _) = areas
    if not 0 < size <= 256 or size & (size - 1) or desc % 16 or avail % 2 or used % 4:
        return False
    inside = all(any(b <= a and a + n <= b + ln for b, ln in (_LOW, _HIGH)) for a, n in areas)
    apart = all(
        a1 + n1 <= a2 or a2 + n2 <= a1 for i, (a1, n1) in enumerate(areas) for a2, n2 in areas[i + 1 :]
    )
    return inside and apart


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.sampled_from([0, 1, 2, 12, 16, 255, 256, 512]), st.integers(0, 1 << 32)),
       desc=_ADDR, avail=_ADDR, used=_ADDR)  # fmt: skip
def test_validate_accepts_exactly_the_valid_configurations(size, desc, avail, used):
    mem = GuestMemory([_LOW, _HIGH])
    try:
        q = Queue(256)
        q.size, q.desc_table, q.avail_ring, q.used_ring = size, desc, avail, used
        areas = [(desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)]
        try:
            q.validate(mem)
            accepted = True
        except VirtioFault as exc:
            assert isinstance(exc.reason, FaultReason)
            accepted = False
        assert accepted == _rules(size, areas)
    finally:
        mem.close()
