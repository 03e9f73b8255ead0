"""virtio-blk (virtio 1.2 §5.2) over a raw image file descriptor.

Request layout (§5.2.6): a 16-byte device-readable header {le32 type, le32 reserved, le64 sector},
data buffers, and a device-writable status byte: the last byte of the writable part (the spec forbids
assuming any particular framing, so the status byte may share a descriptor with data).

- Malformed requests are GuestFaults: header shorter than 16 bytes, no writable byte for the status,
  data in the wrong direction for the request type.
- Well-formed but invalid requests complete with VIRTIO_BLK_S_IOERR and are counted: sector range past
  the end (checked with explicit arithmetic, so sector + length cannot wrap), a length that is not a
  multiple of 512, writes to a read-only drive (the file is opened O_RDONLY and never touched), host
  I/O errors. Unknown types complete with VIRTIO_BLK_S_UNSUPP.
- Data moves with os.preadv / os.pwritev straight between the file and guest-memory views.
- FLUSH is os.fdatasync: data the guest flushed survives a SIGKILL of the VMM.
- DISCARD punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE; ignored when unsupported: discard is a hint);
  WRITE_ZEROES uses fallocate ZERO_RANGE, falling back to writing zeros. Both are offered only for
  writable drives, one segment per request, aligned to 512 bytes and within the disk.
- Rate limiting: when the limiter refuses a request it is put back on the ring and processing stops
  until `timer_due()`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from bulkhead.devices.virtio.device import DEVICE_ID_BLOCK, ThrottledSingleQueueDevice
from bulkhead.devices.virtio.faults import FaultReason, VirtioFault
from bulkhead.devices.virtio.queue import DescriptorChain, Queue, gather, scatter, slice_buffers
from bulkhead.devices.virtio.ratelimit import RateLimiter
from bulkhead.errors import ConfigError
from bulkhead.memory import GuestMemory

__all__ = [
    "QUEUE_SIZE",
    "SECTOR_SIZE",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "BlockDevice",
    "declare_surfaces",
]

SECTOR_SIZE = 512
QUEUE_SIZE = 256
MAX_REQUEST_BYTES = 256 << 20  # per chain; far above what Linux sends, bounds the work of one request
MAX_ZERO_SECTORS = 1 << 16  # 32 MiB per DISCARD / WRITE_ZEROES request

VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

ID_BYTES = 20
_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")  # sector, num_sectors, flags
_WZ_FLAG_UNMAP = 1

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none). Raises OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library would spawn ldconfig
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlockDevice(ThrottledSingleQueueDevice):
    """virtio-blk on an open raw image fd (the caller owns and closes the fd).

    `read_only` must match how the fd was opened (O_RDONLY for read-only drives). `disk_id` is the
    serial reported by GET_ID (at most 20 bytes). Raises ValueError on a bad id, OSError when the fd
    cannot be sized. The image size is fixed at construction; a partial last sector is not exposed.
    """

    device_id = DEVICE_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        fd: int,
        *,
        read_only: bool = False,
        disk_id: str = "",
        limiter: RateLimiter | None = None,
        name: str = "virtio-blk",
    ) -> None:
        super().__init__()
        ident = disk_id.encode()
        if len(ident) > ID_BYTES:
            raise ValueError("disk id is at most 20 bytes")
        self.name = name
        self.fd = fd
        self.read_only = read_only
        self.disk_id = ident.ljust(ID_BYTES, b"\0")
        self.limiter = limiter or RateLimiter()
        # lseek(SEEK_END) sizes regular files and block devices alike; a partial last sector is unused.
        self.disk_bytes = os.lseek(fd, 0, os.SEEK_END) // SECTOR_SIZE * SECTOR_SIZE
        self.capacity = self.disk_bytes // SECTOR_SIZE
        self.features |= 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
        if read_only:
            self.features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES

    @classmethod
    def open(
        cls,
        path: str,
        *,
        read_only: bool = False,
        disk_id: str = "",
        limiter: RateLimiter | None = None,
        name: str = "virtio-blk",
    ) -> BlockDevice:
        """Open `path` (O_RDONLY for read-only drives, O_CLOEXEC always) and build the device.
        Raises ConfigError with one sentence when the image cannot be opened or used."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            mode = "read-only" if read_only else "read-write"
            if exc.errno == errno.ENOENT:
                why = "does not exist"
            elif exc.errno == errno.EISDIR:
                why = "is a directory, not a disk image"
            else:
                why = f"cannot be opened {mode} ({exc.strerror})"
            raise ConfigError(f"drive {path} {why}") from None
        try:
            return cls(fd, read_only=read_only, disk_id=disk_id, limiter=limiter, name=name)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise ConfigError(f"drive {path!r} is not usable: {exc}") from None
        except BaseException:
            os.close(fd)
            raise

    def make_queues(self) -> list[Queue]:
        return [Queue(QUEUE_SIZE, max_chain_bytes=MAX_REQUEST_BYTES)]

    def config_bytes(self) -> bytes:
        """virtio_blk_config up to write_zeroes_may_unmap (§5.2.4)."""
        seg_max = QUEUE_SIZE - 2
        zero = 0 if self.read_only else MAX_ZERO_SECTORS
        return (
            struct.pack("<QII", self.capacity, 0, seg_max)
            + struct.pack("<HBB", 0, 0, 0)  # geometry (not offered)
            + struct.pack("<I", SECTOR_SIZE)  # blk_size
            + struct.pack("<BBHI", 0, 0, 0, 0)  # topology (not offered)
            + struct.pack("<BBH", 0, 0, 1)  # writeback, unused0, num_queues
            + struct.pack("<III", zero, 1, 1)  # max_discard_sectors, max_discard_seg, alignment
            + struct.pack("<IIB3x", zero, 1, 1)  # max_write_zeroes_sectors, seg, may_unmap
        )

    # -- request processing -----------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if not self.active or self.mem is None or index != 0:
            return
        q, mem = self.queues[0], self.mem
        if not q.ready or q.broken:
            return
        while True:
            while self.limiter.deadline is None:
                chain = q.pop(mem)
                if chain is None:
                    break
                cost = max(0, chain.read_len - _HDR.size) + max(0, chain.write_len - 1)  # data bytes
                if not self.limiter.try_consume(cost):
                    q.undo_pop()
                    self.count("throttled")
                    return
                q.add_used(mem, chain.head, self.handle(mem, chain))
            if self.limiter.deadline is not None or not q.enable_notification(mem):
                return

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """Execute one request; returns the used length (bytes written to guest memory, status incl.).
        Raises GuestFault when the request is malformed."""
        if chain.read_len < _HDR.size:
            raise VirtioFault(
                FaultReason.BLK_HEADER_SHORT,
                "virtio-blk request header shorter than 16 bytes",
                device=self.name,
            )
        if chain.write_len < 1:
            raise VirtioFault(
                FaultReason.BLK_NO_STATUS, "virtio-blk request has no writable status byte", device=self.name
            )
        rtype, _reserved, sector = _HDR.unpack(gather(mem, chain.readable, 0, _HDR.size))
        last_addr, last_len = chain.writable[-1]
        status_buf = [(last_addr + last_len - 1, 1)]
        if last_len == 1:  # the usual layout (Linux): the status byte has its own descriptor
            data_in = chain.writable[:-1]
        else:
            data_in = slice_buffers(chain.writable, 0, chain.write_len - 1)  # device writes here
        if chain.readable[0][1] == _HDR.size:  # the usual layout: the header has its own descriptor
            data_out = chain.readable[1:]
        else:
            data_out = slice_buffers(chain.readable, _HDR.size, chain.read_len - _HDR.size)
        in_len, out_len = chain.write_len - 1, chain.read_len - _HDR.size
        written = 0
        if rtype == VIRTIO_BLK_T_IN:
            if out_len:
                raise VirtioFault(
                    FaultReason.BLK_DATA_DIRECTION,
                    "virtio-blk read request carries device-readable data",
                    device=self.name,
                )
            status = self._rw(mem, data_in, sector, in_len, write=False)
            written = in_len if status == VIRTIO_BLK_S_OK else 0
        elif rtype == VIRTIO_BLK_T_OUT:
            if in_len:
                raise VirtioFault(
                    FaultReason.BLK_DATA_DIRECTION,
                    "virtio-blk write request carries device-writable data",
                    device=self.name,
                )
            status = self._rw(mem, data_out, sector, out_len, write=True)
        elif rtype == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif rtype == VIRTIO_BLK_T_GET_ID:
            written = scatter(mem, data_in, 0, self.disk_id)
            status = VIRTIO_BLK_S_OK
        elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and not self.read_only:
            status = self._zero(mem, data_out, out_len, discard=rtype == VIRTIO_BLK_T_DISCARD)
        else:
            self.count("unsupported")
            status = VIRTIO_BLK_S_UNSUPP
        scatter(mem, status_buf, 0, bytes([status]))
        if status != VIRTIO_BLK_S_OK:
            self.count("errors")
        return written + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        if length % SECTOR_SIZE:
            self.count("unaligned")
            return False
        start = sector * SECTOR_SIZE  # sector is a u64 from the guest; Python ints do not wrap
        if start > self.disk_bytes or length > self.disk_bytes - start:
            self.count("out_of_range")
            return False
        return True

    def _rw(
        self, mem: GuestMemory, bufs: list[tuple[int, int]], sector: int, length: int, *, write: bool
    ) -> int:
        if write and self.read_only:
            self.count("ro_write_refused")
            return VIRTIO_BLK_S_IOERR
        if not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR
        offset = sector * SECTOR_SIZE
        views = [mem.view(a, n) for a, n in bufs]
        try:
            while views:
                n = os.pwritev(self.fd, views, offset) if write else os.preadv(self.fd, views, offset)
                if n <= 0:
                    self.count("short_io")
                    return VIRTIO_BLK_S_IOERR
                offset += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
        except OSError:
            self.count("host_io_errors")
            return VIRTIO_BLK_S_IOERR
        self.count("write_bytes" if write else "read_bytes", length)
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        if self.read_only:
            return VIRTIO_BLK_S_OK
        try:
            os.fdatasync(self.fd)
        except OSError:
            self.count("host_io_errors")
            return VIRTIO_BLK_S_IOERR
        self.count("flushes")
        return VIRTIO_BLK_S_OK

    def _zero(self, mem: GuestMemory, bufs: list[tuple[int, int]], length: int, *, discard: bool) -> int:
        if length != _SEG.size:
            self.count("bad_segments")  # we offer max_*_seg = 1
            return VIRTIO_BLK_S_IOERR
        sector, nsec, flags = _SEG.unpack(gather(mem, bufs, 0, _SEG.size))
        if nsec == 0 or nsec > MAX_ZERO_SECTORS or not self._range_ok(sector, nsec * SECTOR_SIZE):
            return VIRTIO_BLK_S_IOERR
        if discard and flags:
            return VIRTIO_BLK_S_UNSUPP  # §5.2.6.2: flags other than 0 are reserved for discard
        off, n = sector * SECTOR_SIZE, nsec * SECTOR_SIZE
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if discard
            else _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        )
        try:
            _fallocate(self.fd, mode, off, n)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.count("host_io_errors")
                return VIRTIO_BLK_S_IOERR
            if discard:
                return VIRTIO_BLK_S_OK  # discard is advisory
            try:
                zeros = bytes(min(n, 1 << 20))
                while n:
                    k = os.pwrite(self.fd, zeros[: min(n, len(zeros))], off)
                    if k <= 0:
                        return VIRTIO_BLK_S_IOERR
                    off, n = off + k, n - k
            except OSError:
                self.count("host_io_errors")
                return VIRTIO_BLK_S_IOERR
        self.count("discards" if discard else "write_zeroes")
        return VIRTIO_BLK_S_OK


def declare_surfaces() -> None:
    """Declare virtio-blk's guest-reachable entry points (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "virtio-queue",
        "virtio-blk-requestq",
        owner=__name__,
        boundary="guest-vmm",
        accepts="block requests (16-byte header, data, status byte): IN, OUT, FLUSH, GET_ID, DISCARD, "
        "WRITE_ZEROES; malformed -> GuestFault, out-of-range or read-only -> IOERR, unknown -> UNSUPP",
        handler="BlockDevice.process_queue/BlockDevice.handle",
        fuzz="fuzz/fuzz_virtio_blk.py",
        spec="virtio 1.2 section 5.2",
    )
    declare(
        "virtio-config",
        "virtio-blk-config",
        owner=__name__,
        boundary="guest-vmm",
        accepts="reads of the 60-byte virtio_blk_config; writes are refused and counted",
        handler="VirtioDevice.read_config",
    )
