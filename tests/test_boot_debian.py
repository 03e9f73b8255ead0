"""Real-kernel tests against Debian's linux-image-amd64 (fetched with apt-get, cached).

Parsing and loading only: booting it is the runtime's test. Skips only when apt cannot provide the
package.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bulkhead.boot import load_kernel
from bulkhead.boot.bzimage import XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64, parse_bzimage
from bulkhead.boot.elf import EM_X86_64, parse_elf
from bulkhead.boot.pvh import find_pvh_entry
from bulkhead.memory import GuestMemory
from kernels import KernelUnavailable, debian_bzimage, debian_vmlinux

pytestmark = pytest.mark.slow
MIB = 1 << 20


@pytest.fixture(scope="module")
def bzimage() -> Path:
    try:
        return debian_bzimage()
    except KernelUnavailable as exc:
        pytest.skip(f"Debian kernel unavailable: {exc}")


@pytest.fixture(scope="module")
def vmlinux(bzimage: Path) -> Path:
    try:
        return debian_vmlinux()
    except KernelUnavailable as exc:
        pytest.skip(f"Debian vmlinux unavailable: {exc}")


def test_debian_bzimage_header(bzimage: Path) -> None:
    data = bzimage.read_bytes()
    bz = parse_bzimage(data)
    h = bz.header
    assert h.boot_flag == 0xAA55
    assert h.header == 0x53726448
    assert h.version >= 0x020F  # Linux 6.1 speaks boot protocol 2.15
    assert h.setup_sects > 0
    assert bz.setup_size == (h.setup_sects + 1) * 512
    assert h.loadflags & 1  # LOADED_HIGH
    assert h.xloadflags & XLF_KERNEL_64 and h.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G
    assert h.relocatable_kernel == 1
    assert h.kernel_alignment >= 2 * MIB and h.kernel_alignment & (h.kernel_alignment - 1) == 0
    assert h.pref_address == 16 * MIB  # LOAD_PHYSICAL_ADDR of x86-64 defconfigs
    assert h.pref_address % h.kernel_alignment == 0
    assert h.cmdline_size == 2047
    assert h.initrd_addr_max == 0x7FFF_FFFF
    # syssize counts 16-byte paragraphs of the protected-mode kernel
    # syssize counts 16-byte paragraphs of the protected-mode kernel; Debian appends a UEFI
    # signature after it, which is not part of the kernel
    assert bz.kernel_size == h.syssize * 16
    assert 0 <= len(data) - bz.setup_size - bz.kernel_size < 64 * 1024
    # the payload is the xz stream, inside the protected-mode kernel; init_size covers decompression
    start = bz.kernel_offset + h.payload_offset
    assert data[start : start + 6] == b"\xfd7zXZ\x00"
    assert h.payload_offset + h.payload_length <= bz.kernel_size
    assert h.init_size > h.payload_length
    # kernel_version points (less 0x200) at the human-readable version string
    version = data[h.kernel_version + 0x200 :].split(b"\0", 1)[0].decode()
    assert version.startswith(bzimage.name.removeprefix("vmlinuz-"))
    assert bz.entry64 == h.pref_address + 0x200


def test_debian_vmlinux_elf_with_pvh_note(bzimage: Path, vmlinux: Path) -> None:
    img = parse_elf(vmlinux.read_bytes())
    assert img.elf_class == 64 and img.machine == EM_X86_64
    assert img.entry == 16 * MIB  # phys_startup_64 at LOAD_PHYSICAL_ADDR
    assert all(s.paddr >= 16 * MIB for s in img.segments if s.memsz)
    pvh = find_pvh_entry(img)
    assert pvh is not None
    seg = next(s for s in img.segments if s.paddr <= pvh < s.paddr + s.filesz)
    assert seg.flags & 1  # executable
    # the kernel proper is larger than the bzImage's compressed payload
    lo, hi = img.loaded_range
    assert hi - lo > bzimage.stat().st_size


@pytest.mark.parametrize(("protocol", "expected"), [("auto", "pvh"), ("pvh", "pvh"), ("linux", "linux-elf")])
def test_debian_vmlinux_loads(vmlinux: Path, protocol: str, expected: str) -> None:
    data = vmlinux.read_bytes()
    img = parse_elf(data)
    with GuestMemory.for_size(256 * MIB) as mem:
        plan = load_kernel(mem, data, initrd=b"\x00" * 4096, cmdline="earlyprintk=serial console=ttyS0",
                           cpus=2, protocol=protocol)
        assert plan.protocol == expected
        assert plan.rip == (find_pvh_entry(img) if expected == "pvh" else img.entry)
        assert plan.kernel_range == img.loaded_range
        seg = next(s for s in img.segments if s.paddr <= plan.rip < s.paddr + s.filesz)
        off = seg.offset + plan.rip - seg.paddr
        assert mem.read(plan.rip, 64) == data[off : off + 64]
        assert plan.initrd_range is not None and plan.initrd_range[0] >= plan.kernel_range[1]
        assert plan.initrd_range[1] <= 256 * MIB


def test_debian_bzimage_loads(bzimage: Path) -> None:
    data = bzimage.read_bytes()
    bz = parse_bzimage(data)
    with GuestMemory.for_size(256 * MIB) as mem:
        plan = load_kernel(mem, data, initrd=None, cmdline="console=ttyS0", cpus=1)
        assert plan.protocol == "linux-bzimage"
        assert plan.rip == bz.header.pref_address + 0x200
        assert plan.kernel_range == (bz.header.pref_address, bz.header.pref_address + bz.header.init_size)
        assert mem.read(bz.header.pref_address, 4096) == data[bz.kernel_offset : bz.kernel_offset + 4096]
        zp = plan.rsi
        assert mem.read_u32(zp + 0x238) == 2047
        assert struct.unpack("<H", mem.read(zp + 0x206, 2))[0] == bz.header.version
