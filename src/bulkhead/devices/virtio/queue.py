"""Split virtqueues (virtio 1.2 §2.7) parsed as hostile input (pure: guest memory only, no I/O).

Everything the guest controls is treated as an attacker's number, following rust-vmm `virtio-queue`:

- the queue size is a power of two, non-zero and at most the device maximum;
- the descriptor table is 16-byte aligned, the available ring 2-byte aligned, the used ring 4-byte
  aligned, each area is checked against guest memory for its whole size before the queue is used,
  and the three areas may not overlap;
- descriptor indices are below the queue size (or the indirect table length);
- a chain takes at most `size` steps through the descriptor table (so loops end), and at most
  `len / 16` steps through an indirect table;
- indirect tables need VIRTIO_F_INDIRECT_DESC, a non-zero length that is a multiple of 16 and at most
  `MAX_INDIRECT_ENTRIES` entries; an indirect descriptor inside an indirect table (nesting) and
  INDIRECT together with NEXT are rejected;
- device-readable buffers come before device-writable ones (§2.7.4.2);
- the byte total of a chain is below 2**32 and below the device's own cap;
- the available index may not move ahead of the device by more than the queue size;
- every value read from the guest is masked to its width, every (addr, len) is checked by GuestMemory.

A violation raises VirtioFault (a GuestFault of kind "virtqueue") carrying a typed `FaultReason`
(devices/virtio/faults.py); the transport then sets DEVICE_NEEDS_RESET and stops
the queue. Ring and descriptor ranges outside RAM are RING_OUTSIDE_RAM / DESC_OUTSIDE_RAM; a
GuestMemoryError can still surface from the device's own buffer accesses (reason GUEST_MEMORY).

Memory ordering: the guest may run on another CPU. Buffers are published by the guest before it
increments avail->idx and we read the index before the ring entries; we write used elements before
used->idx. x86 is TSO and CPython's interpreter loop executes locked instructions between our accesses;
the one store->load pattern that needs a full barrier (avail_event / flags then re-reading avail->idx)
is covered by `enable_notification()` returning whether new work raced in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.errors import GuestMemoryError
from bulkhead.memory import GuestMemory

__all__ = [
    "MAX_INDIRECT_ENTRIES",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "DescriptorChain",
    "Queue",
    "declare_surfaces",
    "gather",
    "scatter",
    "slice_buffers",
    "vring_need_event",
]

VIRTQ_DESC_F_NEXT = 0x1
VIRTQ_DESC_F_WRITE = 0x2
VIRTQ_DESC_F_INDIRECT = 0x4
VIRTQ_AVAIL_F_NO_INTERRUPT = 0x1
VIRTQ_USED_F_NO_NOTIFY = 0x1

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # §2.7: split queue size is at most 32768
MAX_INDIRECT_ENTRIES = 1024  # the same bound Linux's IOV_MAX puts on one request
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = (1 << 64) - 1

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


def _fault(reason: FaultReason, msg: str) -> VirtioFault:
    return VirtioFault(reason, msg)


def _check(mem: GuestMemory, addr: int, length: int, reason: FaultReason, what: str) -> None:
    """[addr, addr+length) wholly inside one RAM region (never wrapping 2**64), else VirtioFault."""
    if addr + length > U64 + 1:
        raise _fault(reason, f"{what} [{addr:#x}, +{length:#x}) wraps the 64-bit address space")
    try:
        mem.check_range(addr, length)
    except GuestMemoryError as exc:
        raise _fault(reason, f"{what}: {exc}") from None


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.7.2 / Linux `vring_need_event`: did [old, new) cross `event_idx + 1`? All values are u16."""
    return ((new_idx - event_idx - 1) & U16) < ((new_idx - old_idx) & U16)


@dataclass(slots=True)
class DescriptorChain:
    """One validated descriptor chain. Buffers are (guest address, length) pairs already checked
    against guest memory; zero-length descriptors are dropped."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0
    descriptors: int = 0

    def read_views(self, mem: GuestMemory) -> list[memoryview]:
        """Views of the device-readable buffers. Raises GuestMemoryError if memory went away."""
        return [mem.view(a, n) for a, n in self.readable]

    def write_views(self, mem: GuestMemory) -> list[memoryview]:
        """Views of the device-writable buffers. Raises GuestMemoryError if memory went away."""
        return [mem.view(a, n) for a, n in self.writable]


def slice_buffers(bufs: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The sub-list of (addr, len) covering bytes [start, start+length) of the concatenated buffers.
    Returns fewer bytes when the buffers are shorter; never raises."""
    out: list[tuple[int, int]] = []
    pos = 0
    end = start + length
    for addr, n in bufs:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
        if pos >= end:
            break
    return out


def gather(mem: GuestMemory, bufs: list[tuple[int, int]], start: int, length: int) -> bytes:
    """Copy bytes [start, start+length) of the buffers (fewer if they are shorter)."""
    return b"".join(bytes(mem.view(a, n)) for a, n in slice_buffers(bufs, start, length))


def scatter(mem: GuestMemory, bufs: list[tuple[int, int]], start: int, data: bytes) -> int:
    """Write `data` at byte `start` of the buffers; returns how many bytes fitted."""
    done = 0
    for addr, n in slice_buffers(bufs, start, len(data)):
        mem.view(addr, n)[:] = data[done : done + n]
        done += n
    return done


class Queue:
    """The device side of one split virtqueue.

    The transport writes the guest's configuration (`size`, `desc_table`, `avail_ring`, `used_ring`,
    `ready`) and calls `validate()` when the driver sets QueueReady; devices call `pop()`, `add_used()`
    and `needs_notification()`. Raises GuestFault on every violation listed in the module docstring.
    """

    def __init__(self, max_size: int, *, max_chain_bytes: int = U32) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError("queue max size must be a power of two between 1 and 32768")
        if not 0 < max_chain_bytes <= U32:
            raise ValueError("max_chain_bytes must be between 1 and 2**32 - 1")
        self.max_size = max_size
        self.max_chain_bytes = max_chain_bytes
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state (§4.2.2.1 / §2.4)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self.dirty = False  # used entries added since the transport last looked
        self.broken = False  # a GuestFault stopped this queue until reset
        self.chains_popped = 0
        self.notified = False  # validated again at the first notification after activation

    # -- configuration ----------------------------------------------------------------------------

    def set_features(self, features: int) -> None:
        """Apply negotiated feature bits (EVENT_IDX, INDIRECT_DESC)."""
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)

    @property
    def avail_event_addr(self) -> int:
        return self.used_ring + 4 + 8 * self.size

    @property
    def used_event_addr(self) -> int:
        return self.avail_ring + 4 + 2 * self.size

    def validate(self, mem: GuestMemory) -> None:
        """The whole configuration, as rust-vmm `Queue::is_valid` checks it (virtio 1.2 §2.7, §4.2.2):
        size a non-zero power of two and at most QueueNumMax (`max_size`); desc 16-, avail 2-, used
        4-byte aligned (§2.7 alignment table); each area's full extent inside one guest RAM region
        (never the MMIO hole, never past the end of RAM, never wrapping 2**64); no two areas
        overlapping. Raises VirtioFault with the reason of the first violation."""
        size = self.size
        if size == 0 or size > self.max_size or size & (size - 1):
            raise _fault(
                FaultReason.QUEUE_SIZE_INVALID,
                f"queue size {size} is not a power of two in 1..{self.max_size}",
            )
        if self.desc_table & 15:
            raise _fault(
                FaultReason.RING_UNALIGNED, f"descriptor table {self.desc_table:#x} is not 16-byte aligned"
            )
        if self.avail_ring & 1:
            raise _fault(
                FaultReason.RING_UNALIGNED, f"available ring {self.avail_ring:#x} is not 2-byte aligned"
            )
        if self.used_ring & 3:
            raise _fault(FaultReason.RING_UNALIGNED, f"used ring {self.used_ring:#x} is not 4-byte aligned")
        areas = (
            ("descriptor table", self.desc_table, DESC_SIZE * size),
            ("available ring", self.avail_ring, 6 + 2 * size),  # flags, idx, ring[size], used_event
            ("used ring", self.used_ring, 6 + 8 * size),  # flags, idx, ring[size], avail_event
        )
        for name, addr, length in areas:
            _check(mem, addr, length, FaultReason.RING_OUTSIDE_RAM, name)
        # The device writes the used ring: letting it overlap the driver's areas would make the
        # device corrupt the descriptors or available ring it is about to parse.
        for i, (n1, a1, l1) in enumerate(areas):
            for n2, a2, l2 in areas[i + 1 :]:
                if a1 < a2 + l2 and a2 < a1 + l1:
                    raise _fault(FaultReason.RING_OVERLAP, f"{n1} at {a1:#x} overlaps the {n2} at {a2:#x}")

    def activate(self, mem: GuestMemory) -> None:
        """Validate and start from the guest's current indices (0 after reset)."""
        self.validate(mem)
        self.next_avail = 0
        self.next_used = 0  # §2.7: both indices start at 0 after reset, whatever the ring holds
        self.signalled_used = 0
        self.signalled_valid = False
        self.notified = False

    # -- available ring ---------------------------------------------------------------------------

    def pending(self, mem: GuestMemory) -> int:
        """Chains the driver has made available that we have not popped. Raises GuestFault when the
        available index is more than `size` ahead of us."""
        avail_idx = mem.read_u16(self.avail_ring + 2)
        n = (avail_idx - self.next_avail) & U16
        if n > self.size:
            raise _fault(
                FaultReason.AVAIL_INDEX_JUMP, f"available index jumped by {n} (> queue size {self.size})"
            )
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, fully validated, or None if there is none.
        Raises GuestFault on any malformed descriptor or ring state."""
        if self.broken:
            return None
        if self.pending(mem) == 0:
            return None
        slot = self.next_avail & (self.size - 1)
        head = mem.read_u16(self.avail_ring + 4 + 2 * slot)
        if head >= self.size:
            raise _fault(
                FaultReason.AVAIL_HEAD_OUT_OF_RANGE,
                f"available ring entry {head} is not below queue size {self.size}",
            )
        chain = self._parse_chain(mem, head)
        self.next_avail = (self.next_avail + 1) & U16
        self.chains_popped += 1
        return chain

    def undo_pop(self) -> None:
        """Give the last popped chain back (e.g. the device was throttled or had no data)."""
        self.next_avail = (self.next_avail - 1) & U16
        self.chains_popped -= 1

    def _parse_chain(self, mem: GuestMemory, head: int) -> DescriptorChain:
        chain = DescriptorChain(head)
        count = self.size
        tview = mem.view(self.desc_table, DESC_SIZE * count)  # validated at activation
        unpack = _DESC.unpack_from
        index = head
        steps = 0
        in_indirect = False
        total = 0
        while True:
            steps += 1
            if steps > count:
                raise _fault(FaultReason.DESC_CHAIN_LOOP, "descriptor chain is longer than its table (loop?)")
            addr, length, flags, nxt = unpack(tview, DESC_SIZE * index)
            chain.descriptors += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise _fault(FaultReason.INDIRECT_NESTED, "nested indirect descriptor table")
                if not self.indirect:
                    raise _fault(
                        FaultReason.INDIRECT_WITHOUT_FEATURE,
                        "indirect descriptor without VIRTIO_F_INDIRECT_DESC",
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _fault(FaultReason.INDIRECT_WITH_NEXT, "descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise _fault(
                        FaultReason.INDIRECT_BAD_LENGTH,
                        f"indirect table length {length} is not a non-zero multiple of 16",
                    )
                if length // DESC_SIZE > MAX_INDIRECT_ENTRIES:
                    raise _fault(
                        FaultReason.INDIRECT_TOO_LARGE,
                        f"indirect table has {length // DESC_SIZE} entries (> {MAX_INDIRECT_ENTRIES})",
                    )
                if addr & 15:
                    # Not required by the spec, but Linux always aligns; reading 16-byte entries
                    # straddling regions would otherwise need extra care.
                    raise _fault(
                        FaultReason.INDIRECT_UNALIGNED, f"indirect table {addr:#x} is not 16-byte aligned"
                    )
                _check(mem, addr, length, FaultReason.DESC_OUTSIDE_RAM, "indirect table")
                tview = mem.view(addr, length)
                count = length // DESC_SIZE
                index, steps, in_indirect = 0, 0, True
                continue
            if length:
                _check(mem, addr, length, FaultReason.DESC_OUTSIDE_RAM, f"descriptor {index}")
                total += length
                if total > self.max_chain_bytes:
                    raise _fault(
                        FaultReason.CHAIN_TOO_LARGE,
                        f"descriptor chain carries more than {self.max_chain_bytes} bytes",
                    )
                if flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.append((addr, length))
                    chain.write_len += length
                else:
                    if chain.writable:
                        raise _fault(
                            FaultReason.DESC_ORDER, "device-readable descriptor after a device-writable one"
                        )
                    chain.readable.append((addr, length))
                    chain.read_len += length
            elif not flags & VIRTQ_DESC_F_WRITE and chain.write_len:
                raise _fault(FaultReason.DESC_ORDER, "device-readable descriptor after a device-writable one")
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise _fault(
                    FaultReason.DESC_NEXT_OUT_OF_RANGE,
                    f"next descriptor {nxt} is not below table size {count}",
                )
            index = nxt

    # -- used ring --------------------------------------------------------------------------------

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return chain `head` with `length` bytes written. Element first, then the index."""
        slot = self.next_used & (self.size - 1)
        _USED_ELEM.pack_into(mem.view(self.used_ring + 4 + 8 * slot, 8), 0, head & U32, length & U32)
        self.next_used = (self.next_used + 1) & U16
        _U16.pack_into(mem.view(self.used_ring + 2, 2), 0, self.next_used)
        self.dirty = True

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Should the driver be interrupted for the used entries added since the last call?
        Honours VIRTIO_F_EVENT_IDX (used_event) or else VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self.dirty = False
        if self.event_idx:
            new, old = self.next_used, self.signalled_used
            self.signalled_used = new
            if not self.signalled_valid:
                self.signalled_valid = True
                return True
            used_event = mem.read_u16(self.used_event_addr)
            return vring_need_event(used_event, new, old)
        return not mem.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask the driver to notify us about new buffers; returns True when buffers are already
        pending (the caller must keep processing instead of waiting). Raises GuestFault."""
        if self.broken:
            return False
        if self.event_idx:
            _U16.pack_into(mem.view(self.avail_event_addr, 2), 0, self.next_avail)
        else:
            _U16.pack_into(mem.view(self.used_ring, 2), 0, 0)
        return self.pending(mem) > 0

    def disable_notification(self, mem: GuestMemory) -> None:
        """Tell the driver notifications are not needed while we are draining the queue."""
        if not self.event_idx:
            _U16.pack_into(mem.view(self.used_ring, 2), 0, VIRTQ_USED_F_NO_NOTIFY)


def declare_surfaces() -> None:
    """Declare the split-virtqueue parser shared by every virtio device (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "virtio-queue",
        "split-virtqueue",
        owner=__name__,
        boundary="guest-vmm",
        accepts="guest-written ring addresses, queue size, available ring and descriptor chains "
        "(direct and one level of indirect); the configuration is validated at QueueReady, DRIVER_OK and the "
        "first notify; every violation raises VirtioFault with a typed FaultReason and stops the device",
        handler="Queue.validate/Queue.pop/Queue.needs_notification",
        fuzz="fuzz/fuzz_virtio_queue.py",
        spec="virtio 1.2 section 2.7",
    )
