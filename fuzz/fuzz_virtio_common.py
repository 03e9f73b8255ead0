"""Shared setup for the virtio atheris harnesses (not a harness itself).

Each device harness sets up a real MmioTransport through the mock driver's handshake with small
queues (8 entries at QUEUE_BASE), then copies the fuzz input over guest memory starting at the
descriptor table: the input *is* the descriptor table, the available ring (flags, idx, ring), the
used ring and the data area. Seeds are memory images of well-formed requests made by the mock driver
(`make_seed`), so the fuzzer starts from valid chains and mutates them.

A crash is any exception escaping the transport (GuestFault never does: the transport contains it),
or a hang (libFuzzer -timeout, defaulted to 10 s here).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.memory import GuestMemory
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import MockVirtqueueDriver, setup_transport

QUEUE_BASE = 0x10000
QUEUE_STRIDE = 0x4000
QUEUE_SIZE = 8
WINDOW = 0x3000  # bytes of guest memory per queue the input may overwrite
MEM_SIZE = 1 << 20

_mem: GuestMemory | None = None


def memory() -> GuestMemory:
    global _mem
    if _mem is None:
        _mem = GuestMemory([(0, MEM_SIZE)])
    return _mem


def fresh_transport(device: object) -> tuple[MmioTransport, list[MockVirtqueueDriver]]:
    """A transport for `device` after a full handshake, with zeroed queues."""
    mem = memory()
    mem.fill(0, MEM_SIZE, 0)
    t = MmioTransport(device, mem, FakeIrq())  # type: ignore[arg-type]
    drivers = setup_transport(
        t, base_addr=QUEUE_BASE, stride=QUEUE_STRIDE, queue_size=QUEUE_SIZE, data_size=0x1000
    )
    return t, drivers


def load(data: bytes, queue: int) -> None:
    """Copy the input over queue `queue`'s window of guest memory."""
    chunk = data[:WINDOW]
    memory().write(QUEUE_BASE + queue * QUEUE_STRIDE, chunk)


def make_seed(path: str, device: object, build: Callable[[list[MockVirtqueueDriver]], int]) -> None:
    """Write a seed: the memory window of queue `build(drivers)` after the mock driver built requests."""
    _t, drivers = fresh_transport(device)
    q = build(drivers)
    with open(path, "wb") as f:
        f.write(memory().read(QUEUE_BASE + q * QUEUE_STRIDE, WINDOW))


def main(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    argv = list(sys.argv)
    if not any(a.startswith("-timeout=") for a in argv[1:]):
        argv.append("-timeout=10")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
