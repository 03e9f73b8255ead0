"""virtio-blk at its edges (issue 15): the §5.2.4 config layout and §5.2.3 feature bits as known answers,
every request limit accepted exactly and refused one past (§5.2.6), the counters each outcome is
recorded under, and host I/O failures (a truncated image, a host fd that fails every call, a file
system without FALLOC_FL_ZERO_RANGE) completing with VIRTIO_BLK_S_IOERR, never a traceback."""

from __future__ import annotations

import os
import struct

import pytest
from tests.test_virtio_blk import DISK, FakeClock, Rig, make_image, mem  # noqa: F401  (mem: the fixture)

from bulkhead.devices.virtio import block as blk
from bulkhead.devices.virtio.block import BlockDevice
from bulkhead.devices.virtio.ratelimit import RateLimiter
from bulkhead.errors import ConfigError

SECTORS = DISK // 512


@pytest.fixture
def rig(mem, tmp_path):  # noqa: F811
    p = tmp_path / "disk.img"
    make_image(p)
    r = Rig(mem, p)
    yield r
    r.close()


def _image(a: int, b: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(a, b))  # make_image's contents


def _stats(r: Rig) -> dict[str, int]:
    return {k: v for k, v in r.dev.stats.items() if v}


def test_config_space_is_the_virtio_blk_config_layout_byte_for_byte(mem, tmp_path):  # noqa: F811
    """virtio 1.2 §5.2.4: capacity, size_max, seg_max, geometry, blk_size, topology, writeback,
    unused0, num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
    max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]."""
    p = tmp_path / "d.img"
    make_image(p)
    rw = BlockDevice.open(str(p))
    ro = BlockDevice.open(str(p), read_only=True)
    try:
        want_rw = (struct.pack("<QII", SECTORS, 0, 254) + bytes(4) + struct.pack("<I", 512) + bytes(8)
                   + bytes(2) + struct.pack("<H", 1) + struct.pack("<III", 65536, 1, 1)
                   + struct.pack("<II", 65536, 1) + b"\x01" + bytes(3))
        assert len(want_rw) == 60 and rw.config_bytes() == want_rw
        want_ro = want_rw[:36] + struct.pack("<III", 0, 1, 1) + struct.pack("<II", 0, 1) + b"\x01" + bytes(3)
        assert ro.config_bytes() == want_ro
        base = 1 << 2 | 1 << 6 | 1 << 9 | 1 << 28 | 1 << 29  # SEG_MAX, BLK_SIZE, FLUSH; INDIRECT_DESC, EVENT_IDX
        assert rw.features & ~(0xFFFFFFFF << 32) == base | 1 << 13 | 1 << 14  # + DISCARD, WRITE_ZEROES
        assert ro.features & ~(0xFFFFFFFF << 32) == base | 1 << 5  # + RO
    finally:
        os.close(rw.fd)
        os.close(ro.fd)


def test_the_disk_id_is_at_most_20_bytes(tmp_path):
    p = tmp_path / "d.img"
    make_image(p)
    dev = BlockDevice.open(str(p), disk_id="x" * 20)
    os.close(dev.fd)
    assert dev.disk_id == b"x" * 20
    with pytest.raises(ConfigError, match="is not usable: disk id is at most 20 bytes"):
        BlockDevice.open(str(p), disk_id="x" * 21)


def test_open_names_a_missing_file_and_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"^drive \S+/nope does not exist$"):
        BlockDevice.open(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^drive \S+ is a directory, not a disk image$"):
        BlockDevice.open(str(tmp_path))


def test_a_request_ending_exactly_at_the_end_of_the_disk_succeeds_and_one_sector_more_fails(rig):
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=SECTORS - 2, in_len=1024)
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=SECTORS, in_len=0)  # empty, at the very end: in range
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    assert _stats(rig) == {"read_bytes": 1024}
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=SECTORS - 1, in_len=1024)
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=SECTORS + 1, in_len=0)
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    c = rig.request(blk.VIRTIO_BLK_T_OUT, sector=0, out=b"x" * 100)
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    assert _stats(rig) == {"read_bytes": 1024, "out_of_range": 2, "unaligned": 1, "errors": 3}


def test_each_outcome_is_counted_under_its_name(rig):
    for rtype, kw in [(blk.VIRTIO_BLK_T_OUT, {"out": b"w" * 512}), (blk.VIRTIO_BLK_T_IN, {"in_len": 512}),
                      (blk.VIRTIO_BLK_T_FLUSH, {}), (99, {})]:
        rig.request(rtype, **kw)
    seg = struct.pack("<QII", 2, 1, 0)
    rig.request(blk.VIRTIO_BLK_T_WRITE_ZEROES, out=seg)
    rig.request(blk.VIRTIO_BLK_T_DISCARD, out=seg)
    rig.request(blk.VIRTIO_BLK_T_DISCARD, out=seg * 2)
    assert _stats(rig) == {"write_bytes": 512, "read_bytes": 512, "flushes": 1, "unsupported": 1,
                           "write_zeroes": 1, "discards": 1, "bad_segments": 1, "errors": 2}


def test_the_status_byte_is_the_last_writable_byte_when_it_shares_a_descriptor(rig):
    c = rig.d.add_chain([struct.pack("<IIQ", blk.VIRTIO_BLK_T_IN, 0, 1)], [513])
    rig.t.notify(0)
    got = rig.d.read(c.writable[0][0], 513)
    assert got[:512] == _image(512, 1024) and got[512] == blk.VIRTIO_BLK_S_OK
    assert rig.d.used() == [(c.head, 513)]


def test_a_discard_punches_a_hole_and_reserved_discard_flags_are_unsupported(rig):
    c = rig.request(blk.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 1))
    assert rig.status(c) == blk.VIRTIO_BLK_S_UNSUPP  # §5.2.6.2: flags are reserved for discard
    assert os.pread(rig.dev.fd, 16, 0) != bytes(16)
    c = rig.request(blk.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 0))
    assert rig.status(c) == blk.VIRTIO_BLK_S_OK
    assert os.pread(rig.dev.fd, 4096, 0) == bytes(4096)
    assert os.lseek(rig.dev.fd, 0, os.SEEK_DATA) >= 4096  # a hole, not written zeros


def test_write_zeroes_takes_one_to_max_zero_sectors(mem, tmp_path):  # noqa: F811
    p = tmp_path / "big.img"
    with open(p, "wb") as f:
        f.truncate((blk.MAX_ZERO_SECTORS + 8) * 512)
    r = Rig(mem, p)
    try:
        for nsec, want in [(1, blk.VIRTIO_BLK_S_OK), (0, blk.VIRTIO_BLK_S_IOERR),
                           (blk.MAX_ZERO_SECTORS, blk.VIRTIO_BLK_S_OK),
                           (blk.MAX_ZERO_SECTORS + 1, blk.VIRTIO_BLK_S_IOERR)]:
            c = r.request(blk.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, nsec, 0))
            assert r.status(c) == want, nsec
    finally:
        r.close()


def test_write_zeroes_falls_back_to_writing_zeros_where_zero_range_is_unsupported(mem):  # noqa: F811
    """tmpfs has no FALLOC_FL_ZERO_RANGE (EOPNOTSUPP): the device writes the zeros itself, in 1 MiB
    pieces, and a discard there still punches its hole."""
    path = f"/dev/shm/bulkhead-blk-{os.getpid()}.img"
    size = (3 << 20) + 4096
    with open(path, "wb") as f:
        f.write(b"\xaa" * size)
    r = Rig(mem, path)
    try:
        c = r.request(blk.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 1, (size - 1024) // 512, 0))
        assert r.status(c) == blk.VIRTIO_BLK_S_OK
        with open(path, "rb") as f:
            now = f.read()
        assert now[:512] == b"\xaa" * 512 and now[512:-512] == bytes(size - 1024) and now[-512:] == b"\xaa" * 512
        assert _stats(r) == {"write_zeroes": 1}
    finally:
        r.close()
        os.unlink(path)


def test_a_read_past_a_truncated_image_is_a_short_read_ioerr(rig):
    os.ftruncate(rig.dev.fd, 2048)  # the image shrank under the device (its size is fixed at open)
    c = rig.request(blk.VIRTIO_BLK_T_IN, sector=2, in_len=2048)  # 1 KiB left, then end of file
    assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR
    assert _stats(rig) == {"short_io": 1, "errors": 1}
    c = rig.d.add_chain([struct.pack("<IIQ", blk.VIRTIO_BLK_T_IN, 0, 2)], [256, 256, 2048, 1])
    rig.t.notify(0)  # 1 KiB left for 2.5 KiB in 3 buffers: two whole buffers and half the third, then EOF
    assert rig.d.read(c.writable[-1][0], 1)[0] == blk.VIRTIO_BLK_S_IOERR
    assert rig.d.read(c.writable[0][0], 256) == _image(1024, 1280)
    assert rig.d.read(c.writable[1][0], 256) == _image(1280, 1536)
    assert rig.d.read(c.writable[2][0], 512) == _image(1536, 2048)
    assert _stats(rig) == {"short_io": 2, "errors": 2}


def test_a_failing_host_fd_completes_every_request_with_ioerr(rig):
    r, w = os.pipe()
    os.dup2(r, rig.dev.fd)  # every call on the image fd now fails (ESPIPE / EINVAL)
    os.close(r)
    os.close(w)
    seg = struct.pack("<QII", 0, 1, 0)
    for rtype, kw in [(blk.VIRTIO_BLK_T_IN, {"in_len": 512}), (blk.VIRTIO_BLK_T_OUT, {"out": b"x" * 512}),
                      (blk.VIRTIO_BLK_T_FLUSH, {}), (blk.VIRTIO_BLK_T_WRITE_ZEROES, {"out": seg}),
                      (blk.VIRTIO_BLK_T_DISCARD, {"out": seg})]:
        c = rig.request(rtype, **kw)
        assert rig.status(c) == blk.VIRTIO_BLK_S_IOERR, rtype
    assert _stats(rig) == {"host_io_errors": 5, "errors": 5}
    assert not rig.faulted()


def test_the_rate_limiter_is_charged_the_data_bytes_only(mem, tmp_path):  # noqa: F811
    p = tmp_path / "d.img"
    make_image(p)
    clock = FakeClock()
    r = Rig(mem, p, limiter=RateLimiter(bytes_per_sec=1024, clock=clock))
    try:
        r.request(blk.VIRTIO_BLK_T_IN, sector=0, in_len=1024, notify=False)  # 1024 data bytes: the whole budget
        r.request(blk.VIRTIO_BLK_T_IN, sector=0, in_len=512, notify=False)  # the bucket is empty: deferred
        r.t.notify(0)
        assert len(r.d.used()) == 1 and _stats(r) == {"read_bytes": 1024, "throttled": 1}
    finally:
        r.close()
