"""virtio-net with an in-memory backend, a socketpair backend, and (as root) a real tap in a netns."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.devices.virtio.net import NET_HDR_SIZE, RXQ, TXQ, NetDevice, parse_mac
from bulkhead.devices.virtio.ratelimit import RateLimiter
from bulkhead.memory import GuestMemory
from bulkhead.runtime.tap import FdFrameBackend
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import setup_transport

MAC = parse_mac("52:54:00:12:34:56")
FRAME = bytes.fromhex("ffffffffffff525400123456 0806".replace(" ", "")) + bytes(range(46))


class FakeBackend:
    """Frames as bytes including the 12-byte header; records writes."""

    def __init__(self):
        self.inbox: collections.deque[bytes] = collections.deque()
        self.sent: list[bytes] = []

    def fileno(self) -> int:
        return 99

    def read_frame_into(self, views):
        if not self.inbox:
            return None
        data = self.inbox.popleft()
        pos = 0
        for v in views:
            k = min(len(v), len(data) - pos)
            v[:k] = data[pos : pos + k]
            pos += k
        return len(data)

    def write_frame(self, views):
        self.sent.append(b"".join(bytes(v) for v in views))


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 << 20)])
    yield m
    m.close()


class Rig:
    def __init__(self, mem, backend=None, **kw):
        self.be = backend or FakeBackend()
        self.dev = NetDevice(self.be, mac=MAC, **kw)
        self.irq = FakeIrq()
        self.events: list = []
        self.t = MmioTransport(self.dev, mem, self.irq, on_event=lambda k, d: self.events.append(d))
        self.rx, self.tx = setup_transport(self.t, data_size=0x20000)

    def readable(self):
        ((_fd, cb),) = self.t.poll_fds()
        cb()

    def faulted(self):
        return bool(self.t.read(mmio.STATUS, 4) & mmio.STATUS_NEEDS_RESET)


def hdr(num_buffers=0, flags=0):
    return bytes([flags]) + bytes(9) + num_buffers.to_bytes(2, "little")


def test_config_and_features(mem):
    r = Rig(mem)
    assert bytes(r.t.read(0x100 + i, 1) for i in range(6)) == MAC
    assert r.dev.features >> 5 & 1 and r.dev.features >> 16 & 1
    assert NetDevice(FakeBackend()).features >> 5 & 1 == 0


def test_tx_replaces_header_and_sends_frame(mem):
    r = Rig(mem)
    c = r.tx.add_chain([b"\x01" + bytes(11), FRAME[:20], FRAME[20:]])
    r.t.notify(TXQ)
    assert r.be.sent == [bytes(NET_HDR_SIZE) + FRAME]  # guest's header flags are not passed on
    assert r.tx.used() == [(c.head, 0)]
    assert r.irq.take() == 1


def test_rx_delivers_one_frame_per_chain(mem):
    r = Rig(mem)
    r.be.inbox.extend([hdr() + FRAME, hdr() + FRAME[::-1]])
    c1 = r.rx.add_chain(writable=[NET_HDR_SIZE + 1514])
    c2 = r.rx.add_chain(writable=[6, 6, 1514])  # header split over descriptors
    r.readable()
    used = r.rx.used()
    assert used == [(c1.head, NET_HDR_SIZE + len(FRAME)), (c2.head, NET_HDR_SIZE + len(FRAME))]
    got1 = r.rx.read(c1.writable[0][0], NET_HDR_SIZE + len(FRAME))
    assert got1 == hdr(num_buffers=1) + FRAME  # num_buffers = 1
    got2 = b"".join(r.rx.read(a, n) for a, n in c2.writable)[: NET_HDR_SIZE + len(FRAME)]
    assert got2 == hdr(num_buffers=1) + FRAME[::-1]


def test_rx_without_buffers_keeps_frame_pending(mem):
    r = Rig(mem)
    r.be.inbox.append(hdr() + FRAME)
    r.readable()
    assert len(r.be.inbox) == 1 and r.dev.stats["rx_no_buffers"] == 1
    c = r.rx.add_chain(writable=[2048])
    r.t.notify(RXQ)  # the guest adding buffers resumes reception
    assert r.rx.used() == [(c.head, NET_HDR_SIZE + len(FRAME))] and not r.be.inbox


def test_rx_oversized_frame_truncated_to_buffer(mem):
    r = Rig(mem)
    r.be.inbox.append(hdr() + bytes(3000))
    c = r.rx.add_chain(writable=[1000])
    r.readable()
    assert r.rx.used() == [(c.head, 1000)] and r.dev.stats["rx_truncated"] == 1


@pytest.mark.parametrize(
    ("queue", "readable", "writable"),
    [
        (RXQ, [b"x" * 20], [2048]),  # RX chain with device-readable part
        (RXQ, [], [11]),  # RX buffer smaller than the header
        (TXQ, [bytes(12) + FRAME], [16]),  # TX chain with device-writable part
        (TXQ, [bytes(11)], []),  # TX shorter than the header
    ],
)
def test_malformed_chains_fault(mem, queue, readable, writable):
    r = Rig(mem)
    r.be.inbox.append(hdr() + FRAME)
    drv = r.rx if queue == RXQ else r.tx
    drv.add_chain(readable, writable)
    r.t.notify(queue)
    assert r.faulted() and r.events[-1]["device"] == "virtio-net"
    assert r.be.sent == []


def test_tx_bad_lengths_dropped_not_fault(mem):
    r = Rig(mem)
    r.tx.add_chain([bytes(12)])  # header only
    r.t.notify(TXQ)
    assert r.be.sent == [] and r.dev.stats["tx_dropped_bad_length"] == 1 and not r.faulted()


def test_tx_rate_limit(mem):
    now = [0.0]
    r = Rig(mem, tx_limiter=RateLimiter(ops_per_sec=1, clock=lambda: now[0]))
    for _ in range(3):
        r.tx.add_chain([bytes(12) + FRAME])
    r.t.notify(TXQ)
    assert len(r.be.sent) == 1
    d = r.t.next_deadline()
    assert d is not None
    now[0] = d
    r.t.timer_due(now[0])
    assert len(r.be.sent) == 2


def test_rx_rate_limit(mem):
    now = [0.0]
    r = Rig(mem, rx_limiter=RateLimiter(ops_per_sec=1, clock=lambda: now[0]))
    r.be.inbox.extend([hdr() + FRAME] * 3)
    for _ in range(3):
        r.rx.add_chain(writable=[2048])
    r.readable()
    assert len(r.rx.used()) == 1 and len(r.be.inbox) == 2
    now[0] = r.t.next_deadline()
    r.t.timer_due(now[0])
    assert len(r.rx.used()) == 1


def test_socketpair_backend_zero_copy_path(mem):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        be = FdFrameBackend(a.detach())
        r = Rig(mem, backend=be)
        r.tx.add_chain([bytes(12) + FRAME])
        r.t.notify(TXQ)
        assert b.recv(4096) == bytes(12) + FRAME
        c = r.rx.add_chain(writable=[2048])
        r.readable()  # nothing there yet: the chain goes back
        assert r.rx.used() == []
        b.send(hdr() + FRAME)
        r.readable()
        assert r.rx.used() == [(c.head, 12 + len(FRAME))]
        assert r.rx.read(c.writable[0][0], 12 + len(FRAME)) == hdr(1) + FRAME
        be.close()
    finally:
        b.close()


TAP_SCRIPT = textwrap.dedent(
    """
    import socket, subprocess, select
    from bulkhead.runtime.tap import open_tap, TapBackend
    tap = open_tap("bhtap0")
    assert TapBackend.adopt(tap.fd).name == "bhtap0"
    subprocess.run(["ip", "link", "set", "bhtap0", "up"], check=True)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    s.bind(("bhtap0", 0))
    frame = bytes.fromhex("02000000000152540012345688b5") + b"hello tap" + bytes(40)
    tap.write_frame([memoryview(bytes(12)), memoryview(frame)])
    s.settimeout(5)
    assert s.recv(2048) == frame, "tx"
    s.send(bytes.fromhex("525400123456020000000001" "88b5") + b"to guest" + bytes(40))
    select.select([tap.fd], [], [], 5)
    buf = bytearray(2048)
    while True:
        n = tap.read_frame_into([memoryview(buf)])
        assert n is not None, "rx"
        if buf[12 + 12 : 12 + 14] == b"\\x88\\xb5":
            break
    assert bytes(buf[12 + 14 : 12 + 22]) == b"to guest"
    print("TAP-OK")
    """
)


@pytest.mark.root
def test_real_tap_in_network_namespace():
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", TAP_SCRIPT], capture_output=True, text=True, timeout=60
    )
    if "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip("cannot create a network namespace here")
    assert "TAP-OK" in proc.stdout, proc.stderr


def test_backend_read_error_is_counted_not_raised(mem):
    class Broken(FakeBackend):
        def read_frame_into(self, views):
            raise OSError(5, "EIO")

    r = Rig(mem, backend=Broken())
    r.rx.add_chain(writable=[2048])
    r.readable()
    assert r.dev.stats["rx_errors"] == 1 and r.rx.used() == [] and not r.faulted()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frames=st.lists(st.binary(max_size=3000), max_size=4),
    rx_bufs=st.lists(st.lists(st.integers(0, 2000), min_size=1, max_size=3), max_size=4),
    tx=st.lists(st.lists(st.binary(min_size=0, max_size=200), min_size=1, max_size=3), max_size=4),
)
def test_random_traffic(mem, frames, rx_bufs, tx):
    r = Rig(mem)
    r.be.inbox.extend(frames)
    chains = [r.rx.add_chain(writable=b) for b in rx_bufs]
    for parts in tx:
        r.tx.add_chain(parts)
    r.t.notify(TXQ)
    r.readable()
    if r.faulted():
        return
    for (head, n), c in zip(r.rx.used(), chains, strict=False):
        assert head == c.head and n <= sum(x for _, x in c.writable)
    for sent in r.be.sent:
        assert sent[:12] == bytes(12) and 0 < len(sent) - 12 <= 65550


def test_parse_mac_known_answers_and_refusals():
    assert parse_mac("52:54:00:12:34:56") == bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
    for bad in ("52:54:00:12:34", "52:54:00:12:34:5", "525400123456", "52:54:00:12:34:56:78"):
        with pytest.raises(ValueError, match="is not a MAC address"):
            parse_mac(bad)


def test_config_space_is_mac_then_link_up_status(mem):
    """virtio 1.2 §5.1.4: struct virtio_net_config { u8 mac[6]; le16 status; } with VIRTIO_NET_S_LINK_UP."""
    r = Rig(mem)
    assert r.dev.config_bytes() == MAC + b"\x01\x00"
    assert NetDevice(FakeBackend()).config_bytes() == bytes(6) + b"\x01\x00"


def test_rx_counts_payload_bytes_and_one_operation_per_frame(mem):
    now = [0.0]
    r = Rig(mem, rx_limiter=RateLimiter(ops_per_sec=2, clock=lambda: now[0]))
    r.be.inbox.extend([hdr() + FRAME] * 3)
    for _ in range(3):
        r.rx.add_chain(writable=[2048])
    r.readable()
    assert len(r.rx.used()) == 2  # a burst of 2 operations admits 2 frames, one each
    assert r.dev.stats["rx_frames"] == 2 and r.dev.stats["rx_bytes"] == 2 * len(FRAME)
