"""Virtio devices over the virtio-mmio v2 transport, treating the guest as hostile.

queue.py (split virtqueue parser), mmio.py (transport register file), faults.py (typed driver-error
reasons), block.py, net.py, rng.py
(device models), ratelimit.py (token buckets). All pure except for the file descriptors the block
device and the net backend are handed.
"""

from __future__ import annotations

from bulkhead.devices.virtio.block import BlockDevice
from bulkhead.devices.virtio.device import VirtioDevice
from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.mmio import MmioTransport, kernel_cmdline_entry
from bulkhead.devices.virtio.net import NetBackend, NetDevice
from bulkhead.devices.virtio.queue import DescriptorChain, Queue
from bulkhead.devices.virtio.ratelimit import RateLimiter, TokenBucket
from bulkhead.devices.virtio.rng import RngDevice

__all__ = [
    "BlockDevice",
    "DescriptorChain",
    "FaultReason",
    "MmioTransport",
    "NetBackend",
    "NetDevice",
    "Queue",
    "RateLimiter",
    "RngDevice",
    "TokenBucket",
    "VirtioDevice",
    "VirtioFault",
    "kernel_cmdline_entry",
]
