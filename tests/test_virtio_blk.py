"""virtio-blk through the mmio transport and the mock driver, on real image files."""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.devices.virtio import block as blk
from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio.block import BlockDevice
from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.devices.virtio.ratelimit import RateLimiter
from bulkhead.memory import GuestMemory
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import setup_transport

DISK = 64 * 1024  # 128 sectors


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory([(0, 4 << 20)])
    yield m
    m.close()


def make_image(path, size=DISK) -> bytes:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    path.write_bytes(data)
    return data


class Rig:
    def __init__(self, mem, path, *, read_only=False, limiter=None, disk_id="disk-0"):
        self.dev = BlockDevice.open(str(path), read_only=read_only, disk_id=disk_id, limiter=limiter)
        self.events: list = []
        self.irq = FakeIrq()
        self.t = MmioTransport(self.dev, mem, self.irq, on_event=lambda k, d: self.events.append(d))
        (self.d,) = setup_transport(self.t, data_size=0x30000)

    def close(self):
        os.close(self.dev.fd)

    def request(self, rtype, sector=0, out=b"", in_len=0, *, indirect=False, notify=True):
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        readable = [hdr] + ([out] if out else [])
        writable = ([in_len] if in_len else []) + [1]
        c = self.d.add_chain(readable, writable, indirect=indirect)
        if notify:
            self.t.notify(0)
        return c

    def status(self, c) -> int:
        a, n = c.writable[-1]
        return self.d.read(a, n)[0]

    def data(self, c) -> bytes:
        a, n = c.writable[0]
        return self.d.read(a, n)

    def faulted(self) -> bool:
        return bool(self.t.read(mmio.STATUS, 4) & mmio.STATUS_NEEDS_RESET)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    return p, make_image(p)


@pytest.fixture
def rig(mem, image):
    r = Rig(mem, image[0])
    yield r
    r.close()


def test_config_space(rig):
    t = rig.t
    assert t.read(0x100, 8) == DISK // 512
    assert t.read(0x100 + 12, 4) == 254  # seg_max
    assert t.read(0x100 + 20, 4) == 512  # blk_size
    feats = rig.dev.features
    assert feats >> blk.VIRTIO_BLK_F_FLUSH & 1 and not feats >> blk.VIRTIO_BLK_F_RO & 1


def test_read(rig, image):
    _, data = image
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=3, in_len=1024)
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    assert rig.data(c) == data[3 * 512 : 5 * 512]
    assert rig.d.used() == [(c.head, 1025)]


def test_write_then_read_back_and_file_contents(rig, image):
    path, _ = image
    payload = os.urandom(2048)
    c = rig.request(blk.VIRTIO_BLK_T_OUT, sector=10, out=payload)
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    assert rig.d.used() == [(c.head, 1)]
    assert path.read_bytes()[5120 : 5120 + 2048] == payload
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=10, in_len=2048, indirect=True)
    assert rig.data(c) == payload


def test_scatter_gather_and_status_sharing_a_descriptor(rig, image):
    """Framing is not assumed: data split over 3 descriptors and the status byte in the last one."""
    _, data = image
    hdr = struct.pack("<IIQ", blk.VIRTIO_BLK_T_IN, 0, 1)
    c = rig.d.add_chain([hdr[:5], hdr[5:]], [100, 400, 13])
    rig.t.notify(0)
    got = b"".join(rig.d.read(a, n) for a, n in c.writable)
    assert got[:512] == data[512:1024] and got[512] == blk.VIRTIO_BLK_S_OK


def test_flush_is_fdatasync(rig, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    c = rig.request(blk.VIRTIO_BLK_T_FLUSH)
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK and calls == [rig.dev.fd]


def test_get_id(rig):
    c = rig.request(blk.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert rig.data(c) == b"disk-0".ljust(20, b"\0")


def test_unknown_type_unsupp(rig):
    c = rig.request(0x7777)
    assert rig.status(c) == blk.VIRTIO_BLK_S_UNSUPP and not rig.faulted()


@pytest.mark.parametrize(
    ("sector", "length"),
    [
        (DISK // 512, 512),  # first sector past the end
        (DISK // 512 - 1, 1024),  # runs past the end
        (2**64 - 1, 512),  # sector * 512 would wrap a u64
        (2**55, 512),
        (0, 100),  # not a multiple of 512
    ],
)
def test_out_of_range_is_ioerr_not_fault(rig, image, sector, length):
    path, data = image
    c = rig.request(blk.VIRTIO_BLK_T_OUT, sector=sector, out=b"\xee" * length)
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=sector, in_len=length)
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    assert not rig.faulted() and path.read_bytes() == data


def test_read_only_drive(mem, image):
    path, data = image
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    r = Rig(mem, path, read_only=True)
    try:
        assert fcntl.fcntl(r.dev.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert r.dev.features >> blk.VIRTIO_BLK_F_RO & 1
        assert not r.dev.features >> blk.VIRTIO_BLK_F_DISCARD & 1
        c = r.request(blk.VIRTIO_BLK_T_OUT, sector=0, out=b"\x00" * 512)
        assert r.status(c) == blk.VIRTIO_BLK_S_IOERR
        for t in (blk.VIRTIO_BLK_T_DISCARD, blk.VIRTIO_BLK_T_WRITE_ZEROES):
            c = r.request(t, out=struct.pack("<QII", 0, 8, 0))
            assert r.status(c) == blk.VIRTIO_BLK_S_UNSUPP
        c = r.request(blk.VIRTIO_BLK_T_IN, sector=0, in_len=512)
        assert r.status(c) == blk.VIRTIO_BLK_S_OK and r.data(c) == data[:512]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before
        assert not r.faulted()
    finally:
        r.close()


def test_write_zeroes_and_discard(rig, image):
    path, data = image
    c = rig.request(blk.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 4, 2, 0))
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    c = rig.request(blk.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 8, 8, 0))
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    now = path.read_bytes()
    assert now[2048:3072] == bytes(1024) and now[:2048] == data[:2048] and now[3072:4096] == data[3072:4096]
    assert len(now) == DISK
    c = rig.request(blk.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", DISK // 512 - 1, 2, 0))
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    c = rig.request(blk.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 1, 0) * 2)  # 2 segments
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    assert path.read_bytes()[-512:] == data[-512:]


# -- malformed requests are guest faults --------------------------------------------------------


def _expect_fault(rig, readable, writable):
    rig.d.add_chain(readable, writable)
    rig.t.notify(0)
    assert rig.faulted()
    assert rig.events and rig.events[-1]["device"] == "virtio-blk"


def test_header_too_short(rig):
    _expect_fault(rig, [b"\x00" * 15], [1])


def test_no_status_byte(rig):
    _expect_fault(rig, [struct.pack("<IIQ", 0, 0, 0)], [])


def test_read_with_device_readable_data(rig):
    _expect_fault(rig, [struct.pack("<IIQ", 0, 0, 0), b"x" * 512], [1])


def test_write_with_device_writable_data(rig):
    _expect_fault(rig, [struct.pack("<IIQ", 1, 0, 0)], [512, 1])


# -- rate limiting ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_ops_rate_limit_defers_and_resumes(mem, image):
    clock = FakeClock()
    r = Rig(mem, image[0], limiter=RateLimiter(ops_per_sec=2, clock=clock))
    try:
        cs = [r.request(blk.VIRTIO_BLK_T_IN, sector=i, in_len=512, notify=False) for i in range(5)]
        r.t.notify(0)
        assert len(r.d.used()) == 2
        deadline = r.t.next_deadline()
        assert deadline is not None and deadline > clock.now
        r.t.notify(0)  # still throttled: nothing more
        assert r.d.used() == []
        clock.now = deadline
        r.t.timer_due(clock.now)
        assert len(r.d.used()) >= 1
        clock.now += 10
        r.t.timer_due(clock.now)
        r.t.notify(0)
        assert all(r.status(c) == 0 for c in cs)
        assert r.t.next_deadline() is None
    finally:
        r.close()


def test_bytes_rate_limit(mem, image):
    clock = FakeClock()
    r = Rig(mem, image[0], limiter=RateLimiter(bytes_per_sec=4096, clock=clock))
    try:
        for i in range(4):
            r.request(blk.VIRTIO_BLK_T_IN, sector=i * 4, in_len=2048, notify=False)
        r.t.notify(0)
        assert len(r.d.used()) == 2  # 2 x 2 KiB per second
        clock.now += 1.0
        r.t.timer_due(clock.now)
        assert len(r.d.used()) == 2
    finally:
        r.close()


# -- property: hostile request headers never escape as anything but contained faults ---------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rtype=st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1)),
    sector=st.one_of(st.integers(0, 200), st.integers(0, 2**64 - 1)),
    out=st.binary(max_size=1100),
    in_lens=st.lists(st.integers(0, 1100), max_size=3),
)
def test_hostile_requests_on_read_only_drive(mem, tmp_path_factory, rtype, sector, out, in_lens):
    path = tmp_path_factory.mktemp("ro") / "d.img"
    data = make_image(path, 8192)
    r = Rig(mem, path, read_only=True)
    try:
        r.d.add_chain([struct.pack("<IIQ", rtype, 0, sector), *([out] if out else [])], in_lens)
        r.t.notify(0)
        assert path.read_bytes() == data
    finally:
        r.close()


def test_reset_clears_throttle(mem, image):
    clock = FakeClock()
    r = Rig(mem, image[0], limiter=RateLimiter(ops_per_sec=1, clock=clock))
    try:
        for _ in range(2):
            r.request(blk.VIRTIO_BLK_T_IN, in_len=512, notify=False)
        r.t.notify(0)
        assert r.t.next_deadline() is not None
        r.t.write(mmio.STATUS, 4, 0)
        assert r.t.next_deadline() is None
    finally:
        r.close()


def test_open_errors_are_config_errors(tmp_path):
    from bulkhead.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        BlockDevice.open(str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match="is a directory"):
        BlockDevice.open(str(tmp_path))
    with pytest.raises(ConfigError, match="not usable"):
        BlockDevice.open(str(make_image_path(tmp_path)), disk_id="x" * 21)
    ro = make_image_path(tmp_path)
    ro.chmod(0o444)
    if os.geteuid() != 0:  # root ignores file modes
        with pytest.raises(ConfigError, match="cannot be opened read-write"):
            BlockDevice.open(str(ro))


def make_image_path(tmp_path):
    p = tmp_path / "ok.img"
    make_image(p, 4096)
    return p


def test_partial_last_sector_not_exposed(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(1000))
    dev = BlockDevice.open(str(p), read_only=True)
    try:
        assert dev.capacity == 1 and dev.disk_bytes == 512
    finally:
        os.close(dev.fd)


DURABILITY_CHILD = """
import os, signal, struct, sys
from bulkhead.devices.virtio.block import BlockDevice
from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.memory import GuestMemory
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import setup_transport
mem = GuestMemory([(0, 4 << 20)])
t = MmioTransport(BlockDevice.open(sys.argv[1]), mem, FakeIrq())
(d,) = setup_transport(t)
d.add_chain([struct.pack("<IIQ", 1, 0, 8), b"DURABLE!" * 64], [1])
d.add_chain([struct.pack("<IIQ", 4, 0, 0)], [1])
t.notify(0)
assert [len(d.used())] == [2]
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_written_and_flushed_data_survives_sigkill(tmp_path):
    """No user-space buffering: what the guest wrote and flushed is in the file when the VMM dies."""
    import subprocess
    import sys

    path = tmp_path / "d.img"
    make_image(path, DISK)
    proc = subprocess.run(
        [sys.executable, "-c", DURABILITY_CHILD, str(path)], capture_output=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert path.read_bytes()[8 * 512 : 9 * 512] == b"DURABLE!" * 64


def test_a_file_one_byte_short_of_two_sectors_has_one(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(1023))
    dev = BlockDevice.open(str(p), read_only=True)
    try:
        assert (dev.capacity, dev.disk_bytes) == (1, 512)
    finally:
        os.close(dev.fd)


def test_a_failed_read_reports_only_the_status_byte(rig):
    """virtio 1.2 §5.2.6: the used length counts the bytes the device wrote; a failed read wrote only
    the status byte."""
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=DISK // 512, in_len=512)  # one past the end
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    assert rig.d.used() == [(c.head, 1)]


def test_header_and_data_in_one_descriptor(rig, image):
    path, data = image
    hdr = struct.pack("<IIQ", blk.VIRTIO_BLK_T_OUT, 0, 2)
    c = rig.d.add_chain([hdr + b"\x77" * 512], [1])
    rig.t.notify(0)
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    assert path.read_bytes()[2 * 512 : 3 * 512] == b"\x77" * 512
    assert path.read_bytes()[3 * 512 : 4 * 512] == data[3 * 512 : 4 * 512]


def test_open_error_names_the_mode(tmp_path):
    from bulkhead.errors import ConfigError

    (tmp_path / "file").write_bytes(b"")
    bad = str(tmp_path / "file" / "disk.img")  # ENOTDIR
    with pytest.raises(ConfigError, match=r"cannot be opened read-only \(Not a directory\)"):
        BlockDevice.open(bad, read_only=True)
    with pytest.raises(ConfigError, match=r"cannot be opened read-write \(Not a directory\)"):
        BlockDevice.open(bad)
