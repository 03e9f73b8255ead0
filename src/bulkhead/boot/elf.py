"""ELF64 / ELF32 executable parsing for kernel loading (pure).

Only what a loader needs is decoded: the file header, PT_LOAD segments (loaded at their physical
address p_paddr) and the notes in PT_NOTE segments. All arithmetic on file-supplied numbers is
checked: a segment's file range must lie inside the file, filesz <= memsz, and address + size may not
wrap. Placement checks against guest RAM and reserved ranges are in `check_placement`.

Anything malformed raises bulkhead.errors.ImageError with one clear sentence.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from bulkhead.errors import ImageError

__all__ = [
    "ELF_MAGIC",
    "EM_386",
    "EM_X86_64",
    "ElfImage",
    "LoadSegment",
    "Note",
    "check_entry",
    "check_placement",
    "is_elf",
    "parse_elf",
]

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
MAX_PHNUM = 256
MAX_NOTES = 1024
U64_MAX = (1 << 64) - 1


class LoadSegment(NamedTuple):
    """One PT_LOAD program header: file bytes [offset, offset+filesz) go to guest paddr; the rest of
    memsz is zero-filled."""

    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


class Note(NamedTuple):
    """One ELF note (name without its terminating NUL)."""

    name: bytes
    type: int
    desc: bytes


class ElfImage(NamedTuple):
    """A parsed ELF executable."""

    elf_class: int  # 32 or 64
    machine: int
    entry: int
    segments: tuple[LoadSegment, ...]
    notes: tuple[Note, ...]

    @property
    def loaded_range(self) -> tuple[int, int]:
        """(lowest paddr, highest paddr+memsz) over the non-empty segments."""
        segs = [s for s in self.segments if s.memsz]
        return (min(s.paddr for s in segs), max(s.end for s in segs))


def is_elf(data: bytes) -> bool:
    """True when `data` starts with the ELF magic."""
    return bytes(data[:4]) == ELF_MAGIC


def _walk_notes(data: bytes, start: int, size: int, align: int, out: list[Note]) -> None:
    pos = start
    end = start + size
    while pos < end:
        if end - pos < 12:
            raise ImageError(f"ELF note at file offset {pos:#x} is truncated")
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_off = pos + 12
        desc_off = name_off + ((namesz + align - 1) & ~(align - 1))
        next_pos = desc_off + ((descsz + align - 1) & ~(align - 1))
        if name_off + namesz > end or desc_off + descsz > end:
            raise ImageError(f"ELF note at file offset {pos:#x} runs past the end of its segment")
        if len(out) >= MAX_NOTES:
            raise ImageError(f"ELF image has more than {MAX_NOTES} notes")
        name = bytes(data[name_off : name_off + namesz])
        if name.endswith(b"\0"):
            name = name[:-1]
        out.append(Note(name=name, type=ntype, desc=bytes(data[desc_off : desc_off + descsz])))
        pos = min(next_pos, end)


def parse_elf(data: bytes) -> ElfImage:
    """Parse an x86 ELF executable (ELF64 x86-64 or ELF32 i386, little endian, ET_EXEC).

    Raises ImageError for a bad magic, class, byte order, type or machine, a truncated header or
    program header table, a segment whose file range leaves the file, filesz > memsz, an address
    range that wraps, or a malformed note. No PT_LOAD segment with memory is also an error.
    """
    data = bytes(data)
    is64, e_machine, e_entry, e_phoff, e_phnum = _elf_header(data)
    segments, notes = _program_headers(data, is64, e_phoff, e_phnum)
    if not any(s.memsz for s in segments):
        raise ImageError("ELF image has no loadable segment")
    return ElfImage(
        elf_class=64 if is64 else 32,
        machine=e_machine,
        entry=e_entry,
        segments=tuple(segments),
        notes=tuple(notes),
    )


def _elf_header(data: bytes) -> tuple[bool, int, int, int, int]:
    """The ELF header's checks (System V gABI, "ELF Header"); returns (is64, e_machine, e_entry,
    e_phoff, e_phnum)."""
    if len(data) < 16 or not is_elf(data):
        raise ImageError("not an ELF image: the ELF magic is missing")
    ei_class, ei_data, ei_version = data[4], data[5], data[6]
    if ei_class not in (ELFCLASS32, ELFCLASS64):
        raise ImageError(f"ELF class {ei_class} is neither ELF32 nor ELF64")
    if ei_data != ELFDATA2LSB:
        raise ImageError("ELF image is not little endian")
    if ei_version != 1:
        raise ImageError(f"ELF identification version {ei_version} is not 1")
    is64 = ei_class == ELFCLASS64
    ehdr_fmt = "<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH"
    ehsize_min = 64 if is64 else 52
    if len(data) < ehsize_min:
        raise ImageError(
            f"ELF image is truncated: {len(data)} bytes cannot hold its {ehsize_min}-byte header"
        )
    (
        e_type,
        e_machine,
        e_version,
        e_entry,
        e_phoff,
        _shoff,
        _flags,
        _ehsize,
        e_phentsize,
        e_phnum,
        _shentsize,
        _shnum,
        _shstrndx,
    ) = struct.unpack_from(ehdr_fmt, data, 16)
    if e_type != ET_EXEC:
        raise ImageError(f"ELF type {e_type} is not an executable (ET_EXEC)")
    want_machine = EM_X86_64 if is64 else EM_386
    if e_machine != want_machine:
        raise ImageError(
            f"ELF machine {e_machine} does not match its class (expected {want_machine} for ELF{64 if is64 else 32})"
        )
    if e_version != 1:
        raise ImageError(f"ELF version {e_version} is not 1")
    phentsize = 56 if is64 else 32
    if e_phnum == 0:
        raise ImageError("ELF image has no program headers")
    if e_phnum == PN_XNUM or e_phnum > MAX_PHNUM:
        raise ImageError(f"ELF image has too many program headers ({e_phnum}, at most {MAX_PHNUM})")
    if e_phentsize != phentsize:
        raise ImageError(f"ELF program header size {e_phentsize} is not {phentsize}")
    if e_phoff + e_phnum * phentsize > len(data):
        raise ImageError("ELF image is truncated: its program header table runs past the end of the file")

    return is64, e_machine, e_entry, e_phoff, e_phnum


def _program_headers(data: bytes, is64: bool, e_phoff: int, e_phnum: int) -> tuple[list[LoadSegment], list[Note]]:
    """PT_LOAD segments and the notes of PT_NOTE segments (gABI "Program Header"); others are skipped."""
    phentsize = 56 if is64 else 32
    segments: list[LoadSegment] = []
    notes: list[Note] = []
    for i in range(e_phnum):
        off = e_phoff + i * phentsize
        if is64:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
                "<IIQQQQQQ", data, off
            )
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = struct.unpack_from(
                "<IIIIIIII", data, off
            )
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if p_filesz and p_offset + p_filesz > len(data):
            raise ImageError(
                f"ELF program header {i} points at file bytes [{p_offset:#x}, +{p_filesz:#x}) outside the "
                f"{len(data)}-byte file"
            )
        if p_type == PT_NOTE:
            _walk_notes(data, p_offset, p_filesz, 8 if p_align == 8 else 4, notes)
            continue
        if p_filesz > p_memsz:
            raise ImageError(f"ELF segment {i} has filesz {p_filesz:#x} larger than memsz {p_memsz:#x}")
        if p_paddr + p_memsz > U64_MAX:
            raise ImageError(
                f"ELF segment {i} at {p_paddr:#x} with size {p_memsz:#x} wraps the address space"
            )
        segments.append(LoadSegment(p_offset, p_paddr, p_vaddr, p_filesz, p_memsz, p_flags))
    return segments, notes


def check_entry(image: ElfImage, entry: int, what: str = "entry point") -> None:
    """Raise ImageError unless `entry` lies in the file-backed part of a PT_LOAD segment."""
    for s in image.segments:
        if s.paddr <= entry < s.paddr + s.filesz:
            return
    raise ImageError(f"ELF {what} {entry:#x} is not inside the file-backed part of a loadable segment")


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def check_placement(
    segments: Iterable[LoadSegment],
    ram: Sequence[tuple[int, int]],
    *,
    low_limit: int = 0,
    reserved: Sequence[tuple[int, int, str]] = (),
) -> None:
    """Raise ImageError unless every non-empty segment lies wholly inside one RAM region
    (given as (base, size) pairs), at or above `low_limit`, does not overlap another segment, and
    avoids each reserved (start, end, what) range (the error names it and its range). The loader
    passes no low limit: it checks the segments against its loader table instead."""
    segs = sorted((s for s in segments if s.memsz), key=lambda s: s.paddr)
    for s in segs:
        if s.paddr < low_limit:
            raise ImageError(f"ELF segment at {s.paddr:#x} overlaps the boot structures below {low_limit:#x}")
        if not any(base <= s.paddr and s.end <= base + size for base, size in ram):
            raise ImageError(f"ELF segment [{s.paddr:#x}, {s.end:#x}) is not inside guest RAM")
        for r0, r1, what in reserved:
            if _overlaps(s.paddr, s.end, r0, r1):
                raise ImageError(
                    f"ELF segment [{s.paddr:#x}, {s.end:#x}) overlaps the {what} [{r0:#x}, {r1:#x})"
                )
    for a, b in itertools.pairwise(segs):
        if b.paddr < a.end:
            raise ImageError(f"ELF segments at {a.paddr:#x} and {b.paddr:#x} overlap")


def declare_surfaces() -> None:
    """Declare the ELF parser (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "boot-parser",
        "elf-executable",
        owner=__name__,
        boundary="image-vmm",
        accepts=f"ELF32/ELF64 executables: header, up to {MAX_PHNUM} program headers (PT_LOAD, PT_NOTE), "
        f"up to {MAX_NOTES} notes; file ranges, filesz <= memsz and address wrap checked; malformed -> ImageError",
        handler="parse_elf/check_entry/check_placement",
        fuzz="fuzz/fuzz_boot_images.py",
        spec="System V ABI, ELF-64 Object File Format",
    )
