"""Typed reasons for virtio driver errors (pure).

Every way a guest driver can break the virtio contract that bulkhead detects has one `FaultReason`;
`VirtioFault` (a GuestFault) carries it, the transport counts it per reason (`fault.<reason>` in the
transport's stats, hence in `--stats`) and puts it in the guest-fault event that reaches the audit log.
Tests and callers decide on the reason, never on the message text (rust-vmm `virtio_queue::Error` is
the model: one variant per violation).

A `GuestMemoryError` raised by guest memory while a device walks a request (a buffer that left RAM) is
classified as `FaultReason.GUEST_MEMORY` by `reason_of()`; the queue itself turns range errors on its
rings and descriptors into their specific reasons.
"""

from __future__ import annotations

from enum import StrEnum

from bulkhead.errors import GuestFault

__all__ = ["FaultReason", "VirtioFault", "reason_of"]


class FaultReason(StrEnum):
    """One value per detected driver error. The value is the stable, machine-readable name."""

    # queue configuration (virtio 1.2 §2.7, §4.2.2; rust-vmm Queue::is_valid)
    QUEUE_SIZE_INVALID = "queue-size-invalid"  # 0, not a power of two, or above QueueNumMax
    RING_UNALIGNED = "ring-unaligned"  # §2.7 table: desc 16, avail 2, used 4
    RING_OUTSIDE_RAM = "ring-outside-ram"  # MMIO hole, past the end of RAM, or wrapping 2**64
    RING_OVERLAP = "ring-overlap"  # two of the three areas share bytes
    QUEUE_WRITE_WHILE_READY = "queue-write-while-ready"  # §4.2.2.2 driver MUST NOT
    # available ring (§2.7.6; QEMU virtqueue_num_heads / virtqueue_get_head)
    AVAIL_INDEX_JUMP = "avail-index-jump"  # idx moved ahead by more than the queue size
    AVAIL_HEAD_OUT_OF_RANGE = "avail-head-out-of-range"
    # descriptors (§2.7.5, §2.7.5.3)
    DESC_NEXT_OUT_OF_RANGE = "desc-next-out-of-range"
    DESC_CHAIN_LOOP = "desc-chain-loop"
    DESC_OUTSIDE_RAM = "desc-outside-ram"
    DESC_ORDER = "desc-order"  # device-readable after device-writable (§2.7.4.2)
    CHAIN_TOO_LARGE = "chain-too-large"
    INDIRECT_WITHOUT_FEATURE = "indirect-without-feature"
    INDIRECT_NESTED = "indirect-nested"
    INDIRECT_WITH_NEXT = "indirect-with-next"
    INDIRECT_BAD_LENGTH = "indirect-bad-length"
    INDIRECT_TOO_LARGE = "indirect-too-large"
    INDIRECT_UNALIGNED = "indirect-unaligned"
    # device requests (§5.2.6, §5.1.6, §5.4.6)
    BLK_HEADER_SHORT = "blk-header-short"
    BLK_NO_STATUS = "blk-no-status"
    BLK_DATA_DIRECTION = "blk-data-direction"
    NET_RX_READABLE = "net-rx-readable"
    NET_RX_SHORT = "net-rx-short"
    NET_TX_WRITABLE = "net-tx-writable"
    NET_TX_SHORT = "net-tx-short"
    RNG_READABLE = "rng-readable"
    VSOCK_RX_READABLE = "vsock-rx-readable"  # §5.10.6: rx buffers are device-writable
    VSOCK_RX_SHORT = "vsock-rx-short"  # an rx buffer must hold the 44-byte header
    # anything else guest memory refused while a request was being served
    GUEST_MEMORY = "guest-memory"
    OTHER = "other"


class VirtioFault(GuestFault):
    """A virtio driver error with its typed `reason` (kind "virtqueue")."""

    def __init__(self, reason: FaultReason, message: str, *, device: str = "") -> None:
        super().__init__(message, device=device, kind="virtqueue")
        self.reason = reason


def reason_of(exc: GuestFault) -> FaultReason:
    """The typed reason of any GuestFault a virtio device or queue raised."""
    if isinstance(exc, VirtioFault):
        return exc.reason
    if exc.kind == "guest-memory":
        return FaultReason.GUEST_MEMORY
    return FaultReason.OTHER
