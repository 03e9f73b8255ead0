"""PVH entry point lookup: the XEN_ELFNOTE_PHYS32_ENTRY note (pure).

A PVH-capable ELF carries a note named "Xen" of type 18 whose descriptor is the 32-bit physical
address of its protected-mode entry (Linux emits it as a 64-bit quad, 32-bit payloads as a word;
both are accepted, the value must fit in 32 bits). See xen/include/public/elfnote.h.
"""

from __future__ import annotations

import struct

from bulkhead.boot.elf import ElfImage
from bulkhead.errors import ImageError

__all__ = ["XEN_ELFNOTE_PHYS32_ENTRY", "find_pvh_entry"]

XEN_ELFNOTE_PHYS32_ENTRY = 18


def find_pvh_entry(image: ElfImage) -> int | None:
    """The PVH 32-bit entry address, or None when the image has no PHYS32_ENTRY note.

    Raises ImageError when the note exists but its descriptor is not 4 or 8 bytes, or its value does
    not fit in 32 bits.
    """
    for note in image.notes:
        if note.name != b"Xen" or note.type != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if len(note.desc) == 4:
            return int(struct.unpack("<I", note.desc)[0])
        if len(note.desc) == 8:
            value = int(struct.unpack("<Q", note.desc)[0])
            if value >> 32:
                raise ImageError(f"PVH entry point {value:#x} does not fit in 32 bits")
            return value
        raise ImageError(f"PVH entry note has a {len(note.desc)}-byte descriptor (expected 4 or 8)")
    return None


def declare_surfaces() -> None:
    """Declare the PVH entry-note lookup (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "boot-parser",
        "pvh-entry-note",
        owner=__name__,
        boundary="image-vmm",
        accepts="the Xen PHYS32_ENTRY ELF note: a 4- or 8-byte descriptor whose value must fit in 32 bits; "
        "anything else -> ImageError",
        handler="find_pvh_entry",
        fuzz="fuzz/fuzz_boot_images.py",
        spec="xen/include/public/elfnote.h",
    )
