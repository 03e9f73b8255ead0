"""Build small, valid boot images in memory (pure): for tests, fuzz seeds and test payloads.

- make_bzimage() wraps a 64-bit payload in a bzImage: the payload's first byte becomes the 64-bit
  entry (protected-mode code offset 0x200, as the 64-bit boot protocol defines).
- make_elf() builds an ELF64 (x86-64) or ELF32 (i386) ET_EXEC with the given PT_LOAD segments and,
  optionally, a XEN_ELFNOTE_PHYS32_ENTRY note (PVH).

These produce exactly the structures the parsers in this package read; they are not general
linkers. Raises ValueError for arguments that cannot be encoded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from bulkhead.boot.bzimage import BOOT_FLAG, HDRS_MAGIC, LOADED_HIGH, XLF_KERNEL_64

__all__ = ["make_bzimage", "make_elf"]


def make_bzimage(
    payload64: bytes,
    *,
    pref_address: int = 0x100000,
    setup_sects: int = 4,
    version: int = 0x020F,
    init_size: int | None = None,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    relocatable: bool = False,
    kernel_alignment: int = 0x20_0000,
    loadflags: int = LOADED_HIGH,
    xloadflags: int = XLF_KERNEL_64,
    payload: tuple[int, int] = (0, 0),
    pm_prefix: bytes = b"\xf4" * 0x200,
) -> bytes:
    """A bzImage whose protected-mode kernel is `pm_prefix` (0x200 bytes, the unused 32-bit entry
    area; hlt by default) followed by `payload64`, entered in long mode at load address + 0x200.
    `payload` is (payload_offset, payload_length) for the header."""
    if len(pm_prefix) != 0x200:
        raise ValueError("the protected-mode prefix must be exactly 0x200 bytes")
    pm = pm_prefix + bytes(payload64)
    pm += b"\0" * (-len(pm) % 16)
    setup = bytearray((max(setup_sects, 0) or 4) * 512 + 512)
    hdr_end = 0x26C
    struct.pack_into("<B", setup, 0x1F1, setup_sects & 0xFF)
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16)
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)
    struct.pack_into("<H", setup, 0x1FE, BOOT_FLAG)
    setup[0x200] = 0xEB
    setup[0x201] = hdr_end - 0x202
    struct.pack_into("<I", setup, 0x202, HDRS_MAGIC)
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, 1 if relocatable else 0)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, *payload)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, len(pm) if init_size is None else init_size)
    return bytes(setup) + pm


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"
    return (
        struct.pack("<III", len(n), len(desc), ntype)
        + n
        + b"\0" * (-len(n) % 4)
        + desc
        + b"\0" * (-len(desc) % 4)
    )


def make_elf(
    segments: Sequence[tuple[int, bytes, int]],
    entry: int,
    *,
    elf_class: int = 64,
    pvh_entry: int | None = None,
    pvh_desc_size: int | None = None,
) -> bytes:
    """An ELF executable: `segments` are (paddr, file bytes, memsz) loaded at paddr == vaddr.

    With `pvh_entry` a PT_NOTE holds a "Xen" note of type 18 whose descriptor is the entry as a
    4-byte (ELF32 default) or 8-byte (ELF64 default) little-endian value.
    """
    if elf_class not in (32, 64):
        raise ValueError("elf_class must be 32 or 64")
    is64 = elf_class == 64
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    notes = b""
    if pvh_entry is not None:
        size = pvh_desc_size or (8 if is64 else 4)
        desc = struct.pack("<Q" if size == 8 else "<I", pvh_entry)
        notes = _note(b"Xen", 18, desc)
    phnum = len(segments) + (1 if notes else 0)
    offset = ehsize + phnum * phentsize
    phdrs = b""
    body = b""
    if notes:
        note_off = offset
        body += notes
        offset += len(notes)
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
        else:
            phdrs += struct.pack("<IIIIIIII", 4, note_off, 0, 0, len(notes), len(notes), 4, 4)
    for paddr, data, memsz in segments:
        pad = -offset % 16
        body += b"\0" * pad
        offset += pad
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset, paddr, paddr, len(data), memsz, 16)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, offset, paddr, paddr, len(data), memsz, 7, 16)
        body += data
        offset += len(data)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + b"\0" * 9
    if is64:
        ehdr = ident + struct.pack(
            "<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
    else:
        ehdr = ident + struct.pack(
            "<HHIIIIIHHHHHH", 2, 3, 1, entry, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
    return ehdr + phdrs + body
