"""virtio-rng and the token buckets."""

from __future__ import annotations

import pytest

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.devices.virtio.ratelimit import RateLimiter, TokenBucket
from bulkhead.devices.virtio.rng import MAX_REQUEST, RngDevice
from bulkhead.memory import GuestMemory
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import setup_transport


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 << 20)])
    yield m
    m.close()


def rig(mem, **kw):
    dev = RngDevice(**kw)
    t = MmioTransport(dev, mem, FakeIrq())
    (d,) = setup_transport(t, data_size=0x40000)
    return dev, t, d


def test_fills_buffers_from_getrandom(mem):
    _dev, t, d = rig(mem)
    c = d.add_chain(writable=[64, 64], indirect=True)
    t.notify(0)
    assert d.used() == [(c.head, 128)]
    a = d.read(c.writable[0][0], 64)
    b = d.read(c.writable[1][0], 64)
    assert a != bytes(64) and b != bytes(64) and a != b


def test_request_capped(mem):
    asked = []
    _dev, t, d = rig(mem, source=lambda n: (asked.append(n), b"\xab" * n)[1])
    c = d.add_chain(writable=[MAX_REQUEST + 4096])
    t.notify(0)
    assert asked == [MAX_REQUEST] and d.used() == [(c.head, MAX_REQUEST)]
    end = c.writable[0][0] + MAX_REQUEST
    assert d.read(end - 1, 2) == b"\xab\x00"


def test_readable_buffer_is_fault(mem):
    _dev, t, d = rig(mem)
    d.add_chain([b"x"], [16])
    t.notify(0)
    assert t.read(mmio.STATUS, 4) & mmio.STATUS_NEEDS_RESET


def test_rate_limited_bytes(mem):
    now = [0.0]
    _dev, t, d = rig(mem, limiter=RateLimiter(bytes_per_sec=100, clock=lambda: now[0]))
    for _ in range(3):
        d.add_chain(writable=[60])
    t.notify(0)
    assert len(d.used()) == 1  # 100 tokens: 60 pass, the 40 left do not cover the next 60
    deadline = t.next_deadline()
    assert deadline == pytest.approx(0.2)
    now[0] = deadline
    t.timer_due(now[0])
    assert len(d.used()) == 1


def test_token_bucket_math():
    now = [0.0]
    b = TokenBucket(1000, lambda: now[0])
    assert b.can(1000)
    b.take(1000)
    assert not b.can(1)
    assert b.wait(500) == pytest.approx(0.5)
    now[0] = 0.5
    assert b.can(500)
    b.take(5000)  # larger than the burst: admitted when the bucket is full, then in debt
    now[0] = 5.0
    assert not b.can(1000)
    now[0] = 5.9
    assert not b.can(1000)
    now[0] = 6.0
    assert b.can(1000)
    assert TokenBucket(0, lambda: 0.0).can(10**12)


def test_limiter_admits_both_or_neither():
    now = [0.0]
    lim = RateLimiter(bytes_per_sec=1000, ops_per_sec=1, clock=lambda: now[0])
    assert lim.try_consume(10)
    assert not lim.try_consume(10)  # ops empty; bytes must not be charged
    assert lim.bytes.tokens == pytest.approx(990)
    assert lim.deadline == pytest.approx(1.0)
    now[0] = 1.0
    assert lim.try_consume(10) and lim.deadline is None


def test_concurrent_registers_and_notifications(mem):
    """vCPU threads reading registers while the I/O thread processes: the lock keeps it consistent."""
    import threading

    _dev, t, d = rig(mem)
    stop = threading.Event()
    errors: list[BaseException] = []

    def vcpu():
        try:
            while not stop.is_set():
                assert t.read(mmio.STATUS, 4) == 0x0F
                t.read(mmio.INTERRUPT_STATUS, 4)
                t.write(mmio.INTERRUPT_ACK, 4, 1)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=vcpu)
    th.start()
    total = 0
    for _ in range(200):
        d.add_chain(writable=[32])
        t.notify(0)
        total += len(d.used())
    stop.set()
    th.join()
    assert errors == [] and total == 200


def test_zero_length_request_gets_zero_bytes_and_bytes_are_counted(mem):
    """virtio 1.2 §5.4.6: the used length is the bytes written; a request with no writable bytes gets 0."""
    asked = []
    dev, t, d = rig(mem, source=lambda n: (asked.append(n), b"\x5a" * n)[1])
    c0 = d.add_chain(writable=[0])
    c1 = d.add_chain(writable=[100])
    t.notify(0)
    assert d.used() == [(c0.head, 0), (c1.head, 100)] and asked == [100]
    assert dev.stats["bytes"] == 100


def test_a_queue_that_is_not_ready_is_not_processed(mem):
    dev, _t, d = rig(mem)
    d.add_chain(writable=[16])
    dev.queues[0].ready = False  # e.g. the driver cleared QueueReady
    dev.process_queue(0)
    assert d.used() == [] and "bytes" not in dev.stats
