"""Linux x86 bzImage setup header: parsing and validation (pure).

Follows Documentation/arch/x86/boot.rst and arch/x86/include/uapi/asm/bootparam.h. The setup header
starts at file offset 0x1f1; the real-mode setup code occupies (setup_sects + 1) * 512 bytes (a
setup_sects of 0 means 4), and the protected-mode kernel follows it. Fields introduced after the
image's protocol version read as 0.

Everything the image says is hostile: every offset and length is checked against the file before
use. Any malformed or unsupported image raises bulkhead.errors.ImageError with one clear sentence.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from bulkhead.errors import ImageError

__all__ = [
    "BOOT_FLAG",
    "HDRS_MAGIC",
    "LOADED_HIGH",
    "MIN_PROTOCOL",
    "SETUP_HEADER_OFFSET",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "XLF_KERNEL_64",
    "BzImage",
    "SetupHeader",
    "is_bzimage",
    "parse_bzimage",
]

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
MIN_PROTOCOL = 0x0206
# Header end in boot_params: hdr starts at 0x1f1, _pad7 runs to 0x290 (bootparam.h).
SETUP_HEADER_MAX_END = 0x290
# The fixed part every 2.06 header has (it ends with cmdline_size at 0x238..0x23c).
SETUP_HEADER_206_END = 0x23C

LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# (name, file offset, struct code, minimum protocol version that defines it)
_FIELDS: tuple[tuple[str, int, str, int], ...] = (
    ("setup_sects", 0x1F1, "B", 0),
    ("root_flags", 0x1F2, "H", 0),
    ("syssize", 0x1F4, "I", 0x0204),
    ("ram_size", 0x1F8, "H", 0),
    ("vid_mode", 0x1FA, "H", 0),
    ("root_dev", 0x1FC, "H", 0),
    ("boot_flag", 0x1FE, "H", 0),
    ("jump", 0x200, "H", 0x0200),
    ("header", 0x202, "I", 0x0200),
    ("version", 0x206, "H", 0x0200),
    ("realmode_swtch", 0x208, "I", 0x0200),
    ("start_sys_seg", 0x20C, "H", 0x0200),
    ("kernel_version", 0x20E, "H", 0x0200),
    ("type_of_loader", 0x210, "B", 0x0200),
    ("loadflags", 0x211, "B", 0x0200),
    ("setup_move_size", 0x212, "H", 0x0200),
    ("code32_start", 0x214, "I", 0x0200),
    ("ramdisk_image", 0x218, "I", 0x0200),
    ("ramdisk_size", 0x21C, "I", 0x0200),
    ("bootsect_kludge", 0x220, "I", 0x0200),
    ("heap_end_ptr", 0x224, "H", 0x0201),
    ("ext_loader_ver", 0x226, "B", 0x0202),
    ("ext_loader_type", 0x227, "B", 0x0202),
    ("cmd_line_ptr", 0x228, "I", 0x0202),
    ("initrd_addr_max", 0x22C, "I", 0x0203),
    ("kernel_alignment", 0x230, "I", 0x0205),
    ("relocatable_kernel", 0x234, "B", 0x0205),
    ("min_alignment", 0x235, "B", 0x020A),
    ("xloadflags", 0x236, "H", 0x020C),
    ("cmdline_size", 0x238, "I", 0x0206),
    ("hardware_subarch", 0x23C, "I", 0x0207),
    ("hardware_subarch_data", 0x240, "Q", 0x0207),
    ("payload_offset", 0x248, "I", 0x0208),
    ("payload_length", 0x24C, "I", 0x0208),
    ("setup_data", 0x250, "Q", 0x0209),
    ("pref_address", 0x258, "Q", 0x020A),
    ("init_size", 0x260, "I", 0x020A),
    ("handover_offset", 0x264, "I", 0x020B),
    ("kernel_info_offset", 0x268, "I", 0x020F),
)
FIELD_OFFSETS: dict[str, int] = {name: off for name, off, _, _ in _FIELDS}


class SetupHeader(NamedTuple):
    """The decoded setup header (field names as in bootparam.h's struct setup_header)."""

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: int
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int

    @property
    def kernel_64(self) -> bool:
        """True when the image has a 64-bit entry point (XLF_KERNEL_64, protocol >= 2.12)."""
        return bool(self.xloadflags & XLF_KERNEL_64)


class BzImage(NamedTuple):
    """A validated bzImage: its header, where the pieces are in the file, and what it needs."""

    header: SetupHeader
    setup_size: int  # bytes of real-mode code (setup_sects + 1) * 512; the kernel starts here
    header_end: int  # file offset just past the setup header (0x202 + the jump's displacement)
    kernel_offset: int  # == setup_size
    kernel_size: int  # bytes of protected-mode kernel (syssize * 16); trailing file bytes are ignored
    load_address: int  # where the protected-mode kernel goes in guest memory
    entry64: int  # load_address + 0x200
    memory_needed: int  # bytes reserved from load_address (max(init_size, kernel_size))

    def header_bytes(self, image: bytes) -> bytes:
        """The raw setup header [0x1f1, header_end) to copy into boot_params."""
        return bytes(image[SETUP_HEADER_OFFSET : self.header_end])


def is_bzimage(data: bytes) -> bool:
    """True when `data` carries the boot flag 0xAA55 at 0x1fe and "HdrS" at 0x202."""
    if len(data) < 0x206:
        return False
    (boot_flag,) = struct.unpack_from("<H", data, 0x1FE)
    (magic,) = struct.unpack_from("<I", data, 0x202)
    return bool(boot_flag == BOOT_FLAG and magic == HDRS_MAGIC)


def _decode(data: bytes, header_end: int, version: int) -> SetupHeader:
    values: dict[str, int] = {}
    for name, off, code, min_version in _FIELDS:
        size = struct.calcsize("<" + code)
        if version < min_version or off + size > header_end:
            values[name] = 0
        else:
            values[name] = int(struct.unpack_from("<" + code, data, off)[0])
    return SetupHeader(**values)


def parse_bzimage(data: bytes) -> BzImage:
    """Parse and validate a bzImage for the 64-bit boot protocol.

    Raises ImageError when the image is truncated, lacks the magic numbers, uses a boot protocol
    older than 2.06, is not LOADED_HIGH, has no 64-bit entry point, or when any size or offset in
    the header is inconsistent with the file.
    """
    data = bytes(data)
    hdr, header_end, version = _setup_header(data)
    setup_size, kernel_size = _kernel_extent(data, hdr)
    load, init_size = _check_load(hdr, version, kernel_size)
    memory_needed = max(init_size, kernel_size)
    return BzImage(
        header=hdr,
        setup_size=setup_size,
        header_end=header_end,
        kernel_offset=setup_size,
        kernel_size=kernel_size,
        load_address=load,
        entry64=load + 0x200,
        memory_needed=memory_needed,
    )


def _setup_header(data: bytes) -> tuple[SetupHeader, int, int]:
    """The real-mode setup header (boot.rst "The Real-Mode Kernel Header"): (header, its end, version)."""
    if len(data) < 0x206:
        raise ImageError(f"bzImage is truncated: {len(data)} bytes cannot hold a setup header")
    if not is_bzimage(data):
        raise ImageError("not a bzImage: boot flag 0xAA55 at 0x1fe or 'HdrS' at 0x202 is missing")
    version = struct.unpack_from("<H", data, 0x206)[0] if len(data) >= 0x208 else 0
    if version < MIN_PROTOCOL:
        raise ImageError(f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.06")
    if data[0x200] != 0xEB:
        raise ImageError("bzImage setup header does not start with a short jump at 0x200")
    header_end = 0x202 + data[0x201]
    if header_end < SETUP_HEADER_206_END or header_end > SETUP_HEADER_MAX_END:
        raise ImageError(f"bzImage setup header length is inconsistent: it would end at {header_end:#x}")
    if len(data) < header_end:
        raise ImageError("bzImage is truncated inside its setup header")
    hdr = _decode(data, header_end, version)

    return hdr, header_end, version


def _kernel_extent(data: bytes, hdr: SetupHeader) -> tuple[int, int]:
    """(setup size, protected-mode kernel size) in the file, from setup_sects and syssize."""
    sects = hdr.setup_sects or 4
    setup_size = (sects + 1) * 512
    if len(data) <= setup_size:
        raise ImageError(
            f"bzImage is truncated: {len(data)} bytes, but its setup code alone takes {setup_size} bytes"
        )
    # syssize (16-byte paragraphs) is the protected-mode kernel; bytes after it (e.g. an appended
    # UEFI signature, as in distribution kernels) are not part of what gets loaded.
    # The kernel's tools/build.c rounds syssize up to whole paragraphs ((size + 15 + 4) / 16), so the file may
    # end up to 15 bytes before syssize * 16: accept that, and load what is there.
    kernel_size = hdr.syssize * 16
    available = len(data) - setup_size
    if kernel_size - 15 <= available < kernel_size:
        kernel_size = available
    if kernel_size > available:
        raise ImageError(
            f"bzImage is truncated: syssize says {kernel_size} bytes of kernel, the file has "
            f"{len(data) - setup_size}"
        )
    if kernel_size <= 0x200:
        raise ImageError(
            f"bzImage kernel is only {kernel_size} bytes: its 64-bit entry at offset 0x200 lies outside it"
        )
    return setup_size, kernel_size


def _check_load(hdr: SetupHeader, version: int, kernel_size: int) -> tuple[int, int]:
    """The loading flags and addresses the 64-bit protocol needs; returns (load address, init_size)."""
    if not hdr.loadflags & LOADED_HIGH:
        raise ImageError("bzImage is not LOADED_HIGH (a zImage): only high-loaded kernels are supported")
    if not hdr.kernel_64:
        raise ImageError("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear or protocol < 2.12)")
    if hdr.cmdline_size == 0:
        raise ImageError("bzImage declares a command line size of 0")
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment
        if align < 0x1000 or align & (align - 1):
            raise ImageError(f"bzImage kernel_alignment {align:#x} is not a power of two of at least 4 KiB")
    if version >= 0x0208 and (hdr.payload_offset or hdr.payload_length):
        end = hdr.payload_offset + hdr.payload_length
        if end > kernel_size:
            raise ImageError(
                f"bzImage payload [{hdr.payload_offset:#x}, +{hdr.payload_length:#x}) lies outside its "
                f"{kernel_size}-byte kernel"
            )
    if version >= 0x020A:
        load = hdr.pref_address
        if load >> 32:
            raise ImageError(f"bzImage pref_address {load:#x} is above 4 GiB")
        if hdr.init_size == 0:
            raise ImageError("bzImage declares an init_size of 0")
        init_size = hdr.init_size
    else:
        load = hdr.code32_start or 0x100000
        init_size = 0
    if hdr.relocatable_kernel and load % hdr.kernel_alignment:
        raise ImageError(
            f"bzImage load address {load:#x} is not aligned to kernel_alignment {hdr.kernel_alignment:#x}"
        )
    return load, init_size


def declare_surfaces() -> None:
    """Declare the bzImage setup-header parser (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "boot-parser",
        "bzimage-setup-header",
        owner=__name__,
        boundary="image-vmm",
        accepts="a bzImage file: boot flag, HdrS magic, protocol >= 2.06, setup_sects, loadflags, "
        "xloadflags and sizes, each offset checked against the file; malformed -> ImageError",
        handler="parse_bzimage",
        fuzz="fuzz/fuzz_boot_images.py",
        spec="Documentation/arch/x86/boot.rst",
    )
