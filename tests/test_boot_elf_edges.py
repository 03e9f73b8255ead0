"""ELF (System V gABI, ELF-64 Object File Format 1.5) and PVH (Xen ELF note PHYS32_ENTRY) parsing at
its exact limits (issue 15 mutation survivors): the smallest headers, note padding for every
descriptor length and both alignments, a name ending exactly at its segment's end, exactly
MAX_NOTES notes and MAX_PHNUM program headers, a segment ending at 2**64 - 1, entry points and
placements at the edges of their ranges, in both orders."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.elf import (
    MAX_NOTES,
    MAX_PHNUM,
    LoadSegment,
    check_entry,
    check_placement,
    parse_elf,
)
from bulkhead.boot.pvh import find_pvh_entry
from bulkhead.errors import ImageError

PT_NULL, PT_LOAD, PT_NOTE = 0, 1, 4


def ident(cls: int = 2) -> bytes:
    return b"\x7fELF" + bytes([cls, 1, 1]) + b"\0" * 9


def ehdr64(phnum: int, entry: int = 0x100000) -> bytes:
    return ident() + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 0, 0, 0)


def phdr64(p_type: int, offset: int, paddr: int, filesz: int, memsz: int, align: int = 4) -> bytes:
    return struct.pack("<IIQQQQQQ", p_type, 5, offset, paddr, paddr, filesz, memsz, align)


def elf_with(phdrs: list[tuple[int, bytes, int, int, int]], entry: int = 0x100000) -> bytes:
    """phdrs: (type, file bytes, paddr, memsz, align); the file bytes follow the header table."""
    off = 64 + 56 * len(phdrs)
    table, body = b"", b""
    for p_type, data, paddr, memsz, align in phdrs:
        table += phdr64(p_type, off + len(body), paddr, len(data), memsz, align)
        body += data
    return ehdr64(len(phdrs), entry) + table + body


CODE = (b"\x90" * 16, 0x100000, 0x1000)


def with_notes(notes: bytes, align: int = 4) -> bytes:
    return elf_with([(PT_LOAD, CODE[0], CODE[1], CODE[2], 4096), (PT_NOTE, notes, 0, 0, align)])


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    pad = lambda n: b"\0" * (-n % align)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + name + pad(len(name)) + desc + pad(len(desc))


# ---------------------------------------------------------------- headers


def test_the_smallest_headers_reach_the_program_header_check():
    with pytest.raises(ImageError, match="16 bytes cannot hold its 64-byte header"):
        parse_elf(ident())
    with pytest.raises(ImageError, match="no program headers"):
        parse_elf(ehdr64(0))  # exactly 64 bytes: a whole ELF64 header
    hdr32 = ident(1) + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0, 52, 0, 0, 52, 32, 0, 0, 0, 0)
    assert len(hdr32) == 52
    with pytest.raises(ImageError, match="no program headers"):
        parse_elf(hdr32)
    with pytest.raises(ImageError, match="not an ELF image"):
        parse_elf(ident()[:15])
    with pytest.raises(ImageError, match="ELF class 3 is neither"):
        parse_elf(ident(3) + b"\0" * 64)


def test_exactly_max_phnum_headers_and_other_types_are_skipped():
    nulls = [(PT_NULL, b"", 0, 0, 0)] * (MAX_PHNUM - 1)
    img = parse_elf(elf_with([*nulls, (PT_LOAD, *CODE, 4096)]))  # the PT_LOAD comes last
    assert [(s.paddr, s.memsz) for s in img.segments] == [(0x100000, 0x1000)]
    with pytest.raises(ImageError, match=f"too many program headers \\({MAX_PHNUM + 1}, at most"):
        parse_elf(elf_with([*nulls, (PT_NULL, b"", 0, 0, 0), (PT_LOAD, *CODE, 4096)]))
    with pytest.raises(ImageError, match="too many program headers \\(65535"):
        parse_elf(ehdr64(0xFFFF))


def test_a_segment_may_end_at_the_last_address():
    top = (1 << 64) - 1 - 0x1000
    img = parse_elf(elf_with([(PT_LOAD, b"", top, 0x1000, 4096)]))
    assert img.segments[0].end == (1 << 64) - 1
    with pytest.raises(ImageError, match="wraps the address space"):
        parse_elf(elf_with([(PT_LOAD, b"", top, 0x1001, 4096)]))


# ---------------------------------------------------------------- notes


def test_the_smallest_note_is_twelve_bytes():
    img = parse_elf(with_notes(struct.pack("<III", 0, 0, 7)))
    assert [(n.name, n.type, n.desc) for n in img.notes] == [(b"", 7, b"")]
    with pytest.raises(ImageError, match="is truncated"):
        parse_elf(with_notes(struct.pack("<III", 0, 0, 7)[:11]))


@pytest.mark.parametrize("align", [4, 8])
def test_note_padding_for_every_name_and_descriptor_length(align):
    notes = [(b"N" * k, 10 + k, bytes(range(1, k + 1))) for k in range(1, 10)]
    raw = b"".join(note(n, t, d, align) for n, t, d in notes)
    img = parse_elf(with_notes(raw, align))
    assert [(n.name, n.type, n.desc) for n in img.notes] == notes


def test_a_note_name_may_end_exactly_at_the_end_of_its_segment():
    raw = struct.pack("<III", 4, 0, 1) + b"ABCD"
    assert [(n.name, n.desc) for n in parse_elf(with_notes(raw)).notes] == [(b"ABCD", b"")]
    with pytest.raises(ImageError, match="runs past the end of its segment"):
        parse_elf(with_notes(struct.pack("<III", 5, 0, 1) + b"ABCD"))


def test_exactly_max_notes_notes():
    one = struct.pack("<III", 0, 0, 1)
    assert len(parse_elf(with_notes(one * MAX_NOTES)).notes) == MAX_NOTES
    with pytest.raises(ImageError, match=f"more than {MAX_NOTES} notes"):
        parse_elf(with_notes(one * (MAX_NOTES + 1)))


def test_pvh_entry_must_fit_in_32_bits():
    def image(desc: bytes):
        return parse_elf(with_notes(note(b"Xen\0", 18, desc)))

    assert find_pvh_entry(image(struct.pack("<Q", 0xFFFF_FFFF))) == 0xFFFF_FFFF
    with pytest.raises(ImageError, match="0x100000000 does not fit in 32 bits"):
        find_pvh_entry(image(struct.pack("<Q", 1 << 32)))
    with pytest.raises(ImageError, match="0x200000000 does not fit"):
        find_pvh_entry(image(struct.pack("<Q", 1 << 33)))


# ---------------------------------------------------------------- entry and placement


def seg(paddr: int, memsz: int, filesz: int | None = None) -> LoadSegment:
    return LoadSegment(0, paddr, paddr, memsz if filesz is None else filesz, memsz, 5)


def test_entry_must_be_in_the_file_backed_bytes():
    img = parse_elf(elf_with([(PT_LOAD, b"\x90" * 16, 0x100000, 0x1000, 4096)]))
    check_entry(img, 0x100000)
    check_entry(img, 0x10000F)
    for bad in (0x0FFFFF, 0x100010):  # one below, and one past the last file byte
        with pytest.raises(ImageError, match="not inside the file-backed part"):
            check_entry(img, bad)


def test_placement_at_the_edges_of_ram_and_reserved_ranges_in_both_orders():
    ram = [(0x100000, 0x100000)]
    check_placement([seg(0x100000, 0x100000)], ram)  # exactly the whole region
    for bad in ([seg(0xFF000, 0x1000)], [seg(0x1FF000, 0x1001)], [seg(0x100000, 0x100001)]):
        with pytest.raises(ImageError, match="not inside guest RAM"):
            check_placement(bad, ram)
    s = seg(0x140000, 0x10000)
    check_placement([s], ram, reserved=[(0x150000, 0x160000, "a"), (0x130000, 0x140000, "b")])
    for r in ((0x14FFFF, 0x160000), (0x130000, 0x140001)):
        with pytest.raises(ImageError, match="overlaps the x"):
            check_placement([s], ram, reserved=[(*r, "x")])
    check_placement([seg(0x150000, 0x1000), seg(0x140000, 0x10000)], ram)  # adjacent, either order
    with pytest.raises(ImageError, match="overlap"):
        check_placement([seg(0x14FFFF, 0x1000), seg(0x140000, 0x10000)], ram)
