"""Wrap a bulkhead guest ELF into a Linux bzImage (pure: bytes in, bytes out).

Layout follows Documentation/arch/x86/boot.rst (protocol 2.15):

    setup (real-mode part, (1 + setup_sects) * 512 bytes)
      0x000..0x1f0   boot sector, zero except the setup header and boot_flag 0xAA55 at 0x1fe
      0x1f1..0x26b   setup header ("HdrS" at 0x202, version 0x020f)
      0x200          2-byte jump to the real-mode stub (the real-mode entry, CS = setup segment + 0x20)
      0x280          real-mode stub: loads a flat GDT (__BOOT_CS 0x10, __BOOT_DS 0x18), enters protected
                     mode with ESI = boot_params (the setup segment) and jumps to code32_start
    protected-mode part (loaded at code32_start = pref_address = 0x100000, not relocatable)
      +0x000         32-bit entry (Linux 32-bit boot protocol, ESI = boot_params)
      +0x200         64-bit entry (Linux 64-bit boot protocol, RSI = boot_params)

The real-mode stub makes no BIOS calls, so a boot loader that enters through real mode (QEMU's
linuxboot) leaves the guest without an e820 map; the 32/64-bit boot protocols carry the VMM's map.
payload_offset/payload_length are 0: the protected-mode part is not compressed.
"""

from __future__ import annotations

import struct

from bulkhead.errors import ConfigError

__all__ = [
    "CMDLINE_SIZE",
    "HEADER_VERSION",
    "INITRD_ADDR_MAX",
    "LOAD_ADDRESS",
    "SETUP_SECTS",
    "XLF_KERNEL_64",
    "elf_flat_image",
    "make_bzimage",
    "make_bzimage_flat",
]

LOAD_ADDRESS = 0x100000
HEADER_VERSION = 0x020F
SETUP_SECTS = 1
CMDLINE_SIZE = 2048
INITRD_ADDR_MAX = 0x7FFFFFFF
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
KERNEL_VERSION = b"bulkhead guest\0"

_STUB_OFFSET = 0x280
_GDT_OFFSET = 0x2C0
_GDTPTR_OFFSET = 0x2E0
_VERSION_OFFSET = 0x300
_PT_LOAD = 1


def elf_flat_image(elf: bytes) -> tuple[bytes, int]:
    """Return (flat image loaded at LOAD_ADDRESS, memory size in bytes) of a guest ELF64.

    Raises ConfigError when the ELF is not a single-PT_LOAD x86-64 image at LOAD_ADDRESS.
    """
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ConfigError("guest image is not a little-endian ELF64 file")
    (e_phoff,) = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    if e_phentsize != 56 or e_phoff + 56 * e_phnum > len(elf):
        raise ConfigError("guest ELF has a malformed program header table")
    loads = []
    for i in range(e_phnum):
        p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", elf, e_phoff + 56 * i
        )
        if p_type == _PT_LOAD:
            loads.append((off, paddr, filesz, memsz))
    if len(loads) != 1:
        raise ConfigError(f"guest ELF must have exactly one PT_LOAD segment, found {len(loads)}")
    off, paddr, filesz, memsz = loads[0]
    if paddr != LOAD_ADDRESS or off + filesz > len(elf) or memsz < filesz:
        raise ConfigError("guest ELF segment is not a valid image loaded at 0x100000")
    return elf[off : off + filesz], memsz


def _real_mode_stub() -> bytes:
    """16-bit code: flat GDT, protected mode, ESI = boot_params, jump to code32_start (hand-assembled)."""
    code = bytearray()
    code += b"\xfa"  # cli
    code += b"\x8c\xd8"  # mov ax, ds
    code += b"\x66\x0f\xb7\xc0"  # movzx eax, ax
    code += b"\x66\xc1\xe0\x04"  # shl eax, 4          ; linear address of boot_params
    code += b"\x66\x89\xc6"  # mov esi, eax
    code += b"\x66\x05" + struct.pack("<I", _GDT_OFFSET)  # add eax, GDT_OFFSET
    code += b"\x66\xa3" + struct.pack("<H", _GDTPTR_OFFSET + 2)  # mov [gdtptr.base], eax
    code += b"\x66\x0f\x01\x16" + struct.pack("<H", _GDTPTR_OFFSET)  # lgdtd [gdtptr]
    code += b"\x0f\x20\xc0"  # mov eax, cr0
    code += b"\x66\x83\xc8\x01"  # or eax, 1 (PE)
    code += b"\x0f\x22\xc0"  # mov cr0, eax
    code += b"\xb8\x18\x00"  # mov ax, 0x18 (__BOOT_DS)
    code += b"\x8e\xd8\x8e\xc0\x8e\xd0"  # mov ds, ax; mov es, ax; mov ss, ax
    code += b"\x66\xea" + struct.pack("<IH", LOAD_ADDRESS, 0x10)  # jmp dword 0x10:code32_start
    return bytes(code)


def make_bzimage(elf: bytes) -> bytes:
    """Build a bzImage (protocol 2.15, 64-bit, loaded high, not relocatable) from a guest ELF.

    Raises ConfigError when the ELF is unsuitable (see elf_flat_image).
    """
    flat, memsz = elf_flat_image(elf)
    return make_bzimage_flat(flat, memsz)


def make_bzimage_flat(flat: bytes, memsz: int) -> bytes:
    """Build the bzImage from a flat protected-mode image loaded at LOAD_ADDRESS (32-bit entry at +0,
    64-bit entry at +0x200) that needs `memsz` bytes of memory (its .bss included)."""
    flat = bytes(flat) + bytes(-len(flat) % 16)  # whole paragraphs: the file is exactly syssize * 16 bytes long
    setup = bytearray((1 + SETUP_SECTS) * 512)
    stub = _real_mode_stub()
    setup[_STUB_OFFSET : _STUB_OFFSET + len(stub)] = stub
    gdt = struct.pack("<4Q", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    setup[_GDT_OFFSET : _GDT_OFFSET + len(gdt)] = gdt
    struct.pack_into("<HI", setup, _GDTPTR_OFFSET, len(gdt) - 1, 0)
    setup[_VERSION_OFFSET : _VERSION_OFFSET + len(KERNEL_VERSION)] = KERNEL_VERSION
    init_size = (max(memsz, len(flat)) + 0xFFF) & ~0xFFF

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into("<" + fmt, setup, offset, value)

    put("B", 0x1F1, SETUP_SECTS)  # setup_sects
    put("I", 0x1F4, (len(flat) + 15) // 16)  # syssize (16-byte paragraphs)
    put("H", 0x1FA, 0xFFFF)  # vid_mode: normal
    put("H", 0x1FE, 0xAA55)  # boot_flag
    setup[0x200] = 0xEB  # jump (short) to the real-mode stub
    setup[0x201] = _STUB_OFFSET - 0x202
    setup[0x202:0x206] = b"HdrS"
    put("H", 0x206, HEADER_VERSION)  # version
    put("H", 0x20E, _VERSION_OFFSET - 0x200)  # kernel_version
    put("B", 0x211, LOADED_HIGH)  # loadflags
    put("H", 0x212, 0x8000)  # setup_move_size
    put("I", 0x214, LOAD_ADDRESS)  # code32_start
    put("I", 0x22C, INITRD_ADDR_MAX)  # initrd_addr_max
    put("I", 0x230, LOAD_ADDRESS)  # kernel_alignment
    put("B", 0x234, 0)  # relocatable_kernel
    put("B", 0x235, 12)  # min_alignment (log2)
    put("H", 0x236, XLF_KERNEL_64)  # xloadflags
    put("I", 0x238, CMDLINE_SIZE)  # cmdline_size
    put("Q", 0x258, LOAD_ADDRESS)  # pref_address
    put("I", 0x260, init_size)  # init_size
    return bytes(setup) + flat
