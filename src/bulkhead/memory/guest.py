"""Guest RAM: anonymous mappings, typed addresses, bounds-checked access. The only way to touch guest RAM.

Every guest-supplied (address, length) pair is hostile: an access is allowed only when
[addr, addr + length) lies wholly inside one region, with addr and length checked as unsigned 64-bit
values first (Python ints never wrap, so a guest "negative" length or an address near 2**64 is caught
here instead of silently becoming a huge slice).

Memory is mapped with mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE): zero-filled by construction,
never shared with another process or VM. close() scrubs every resident page, releases it and unmaps.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterable
from typing import NewType

from bulkhead.errors import GuestMemoryError
from bulkhead.memory.layout import ram_regions

__all__ = ["GuestAddress", "GuestMemory", "GuestRegion"]

GuestAddress = NewType("GuestAddress", int)

U64_MAX = (1 << 64) - 1
PAGE = 4096

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library would spawn ldconfig
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_MADV_DONTNEED = 4
_MADV_DONTDUMP = 16
_MADV_HUGEPAGE = 14

_RESIDENT_BIT = bytes(b & 1 for b in range(256))
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestRegion:
    """One contiguous range of guest physical memory backed by one anonymous host mapping."""

    __slots__ = ("base", "end", "host_addr", "mem", "owns_pages", "size")

    def __init__(self, base: int, size: int, *, fd: int = -1, offset: int = 0) -> None:
        """Anonymous private memory, or (fd >= 0) a shared mapping of `fd` at `offset`: a memfd the host
        created (runtime/snapshot.py), so that the host reads guest RAM for a snapshot without a copy and
        fills it on restore. The fd's owner scrubs such memory; this region only unmaps it."""
        if size <= 0 or size & (PAGE - 1) or base & (PAGE - 1) or offset & (PAGE - 1):
            raise ValueError("region base, size and offset must be multiples of 4 KiB")
        flags = (mmap.MAP_SHARED if fd >= 0 else mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) | _MAP_NORESERVE
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise MemoryError(f"cannot map {size >> 20} MiB of guest memory: errno {err}")
        # Guest RAM never lands in a core dump of the VMM.
        _libc.madvise(addr, size, _MADV_DONTDUMP)
        # Transparent huge pages where the host allows them (as QEMU does): measured ~3x faster 1 MiB virtio-blk
        # reads on our PVM hosts (docs/PERFORMANCE.md). Advisory: ignored where THP is off.
        _libc.madvise(addr, size, _MADV_HUGEPAGE)
        self.owns_pages = fd < 0
        self.base = base
        self.size = size
        self.end = base + size
        self.host_addr: int = addr
        self.mem: memoryview | None = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")

    def resident_runs(self) -> Iterable[tuple[int, int]]:
        """Yield (offset, length) runs of pages that are resident (touched) in this region."""
        npages = self.size // PAGE
        vec = (ctypes.c_ubyte * npages)()
        if _libc.mincore(self.host_addr, self.size, vec) != 0:
            yield (0, self.size)  # cannot tell: treat everything as resident
            return
        # Bit 0 of each byte says "resident"; map to b"\x00"/b"\x01" and find runs with C-speed searches.
        flags = bytes(vec).translate(_RESIDENT_BIT)
        i = flags.find(1)
        while i >= 0:
            j = flags.find(0, i)
            if j < 0:
                j = npages
            yield (i * PAGE, (j - i) * PAGE)
            i = flags.find(1, j)

    def scrub_and_unmap(self) -> None:
        """Zero every resident page, drop the pages, unmap. Idempotent."""
        if self.mem is None:
            return
        if self.owns_pages:
            for off, length in self.resident_runs():
                ctypes.memset(self.host_addr + off, 0, length)
            _libc.madvise(self.host_addr, self.size, _MADV_DONTNEED)
        self.mem.release()
        self.mem = None
        _libc.munmap(self.host_addr, self.size)


class GuestMemory:
    """All of a VM's RAM. Accesses are validated against the regions; violations raise GuestMemoryError."""

    def __init__(self, layout: Iterable[tuple[int, int]], *, fd: int = -1) -> None:
        """`fd` >= 0: back the regions with that file (a memfd), region after region from offset 0."""
        regions: list[GuestRegion] = []
        try:
            prev_end = 0
            offset = 0
            for base, size in sorted(layout):
                if base < prev_end:
                    raise ValueError("guest memory regions overlap")
                if base + size > U64_MAX:
                    raise ValueError("guest memory region beyond the 64-bit address space")
                regions.append(GuestRegion(base, size, fd=fd, offset=offset))
                prev_end = base + size
                offset += size
        except BaseException:
            for r in regions:
                r.scrub_and_unmap()
            raise
        if not regions:
            raise ValueError("guest memory needs at least one region")
        self.regions: tuple[GuestRegion, ...] = tuple(regions)
        self.size = sum(r.size for r in regions)
        self._closed = False

    @classmethod
    def for_size(cls, mem_bytes: int, *, fd: int = -1) -> GuestMemory:
        """RAM of `mem_bytes`, split around the 32-bit MMIO hole (backed by `fd` when >= 0)."""
        return cls(ram_regions(mem_bytes), fd=fd)

    # -- validation -------------------------------------------------------------------------------

    def find(self, addr: int, length: int) -> tuple[GuestRegion, int] | None:
        """The region holding all of [addr, addr+length) and the offset into it, or None."""
        if addr < 0 or length < 0 or addr > U64_MAX or length > U64_MAX or addr + length > U64_MAX + 1:
            return None
        for r in self.regions:
            if r.base <= addr < r.end or (length == 0 and addr == r.end):
                if addr + length <= r.end:
                    return r, addr - r.base
                return None
        return None

    def check_range(self, addr: int, length: int) -> tuple[GuestRegion, int]:
        """Like find(), but raise GuestMemoryError instead of returning None."""
        hit = self.find(addr, length)
        if hit is None:
            if self._closed:
                raise GuestMemoryError("guest memory is closed", addr=addr, length=length)
            raise GuestMemoryError(
                f"guest range [{addr:#x}, +{length:#x}) is not inside guest RAM", addr=addr, length=length
            )
        return hit

    def contains(self, addr: int, length: int) -> bool:
        return self.find(addr, length) is not None

    # -- access -----------------------------------------------------------------------------------

    def view(self, addr: int, length: int) -> memoryview:
        """A writable view of guest RAM [addr, addr+length). Keep it short-lived."""
        region, off = self.check_range(addr, length)
        mem = region.mem
        if mem is None:
            raise GuestMemoryError("guest memory is closed", addr=addr, length=length)
        return mem[off : off + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.view(addr, n)[:] = data

    def read_u8(self, addr: int) -> int:
        return self.view(addr, 1)[0]

    def read_u16(self, addr: int) -> int:
        return int(_U16.unpack(self.view(addr, 2))[0])

    def read_u32(self, addr: int) -> int:
        return int(_U32.unpack(self.view(addr, 4))[0])

    def read_u64(self, addr: int) -> int:
        return int(_U64.unpack(self.view(addr, 8))[0])

    def write_u16(self, addr: int, value: int) -> None:
        _U16.pack_into(self.view(addr, 2), 0, value & 0xFFFF)

    def write_u32(self, addr: int, value: int) -> None:
        _U32.pack_into(self.view(addr, 4), 0, value & 0xFFFF_FFFF)

    def write_u64(self, addr: int, value: int) -> None:
        _U64.pack_into(self.view(addr, 8), 0, value & U64_MAX)

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        region, off = self.check_range(addr, length)
        ctypes.memset(region.host_addr + off, byte & 0xFF, length)

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Scrub every touched page and unmap all regions. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for r in self.regions:
            r.scrub_and_unmap()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - interpreter shutdown; nothing useful to report
            pass
