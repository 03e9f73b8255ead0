"""ELF64/ELF32 parsing, note walking, PVH entry lookup, placement checks."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.craft import make_elf
from bulkhead.boot.elf import check_entry, check_placement, parse_elf
from bulkhead.boot.pvh import find_pvh_entry
from bulkhead.errors import ImageError

CODE = b"\x90" * 64 + b"\xf4"
RAM = [(0, 64 << 20)]


def patch(img: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def elf64(**kw) -> bytes:  # type: ignore[no-untyped-def]
    return make_elf([(0x100000, CODE, 0x3000), (0x200000, b"data", 0x1000)], 0x100000, **kw)


def test_parse_elf64_segments_and_entry() -> None:
    img = parse_elf(elf64())
    assert img.elf_class == 64
    assert img.machine == 62
    assert img.entry == 0x100000
    assert [(s.paddr, s.filesz, s.memsz) for s in img.segments] == [
        (0x100000, len(CODE), 0x3000),
        (0x200000, 4, 0x1000),
    ]
    assert img.loaded_range == (0x100000, 0x201000)
    assert find_pvh_entry(img) is None
    check_entry(img, 0x100000)
    check_placement(img.segments, RAM, low_limit=0x100000)


def test_segment_bytes_are_where_the_header_says() -> None:
    raw = elf64()
    img = parse_elf(raw)
    s = img.segments[0]
    assert raw[s.offset : s.offset + s.filesz] == CODE


@pytest.mark.parametrize(("cls", "size"), [(64, 8), (64, 4), (32, 4), (32, 8)])
def test_pvh_note(cls: int, size: int) -> None:
    img = parse_elf(
        make_elf([(0x100000, CODE, 0x1000)], 0x100000, elf_class=cls, pvh_entry=0x100020, pvh_desc_size=size)
    )
    assert img.elf_class == cls
    assert img.notes[0].name == b"Xen"
    assert img.notes[0].type == 18
    assert find_pvh_entry(img) == 0x100020


def test_pvh_note_ignored_when_name_differs() -> None:
    raw = make_elf([(0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100020)
    raw = raw.replace(b"Xen\0", b"Xem\0")
    assert find_pvh_entry(parse_elf(raw)) is None


def test_pvh_entry_above_4g_rejected() -> None:
    raw = make_elf([(0x100000, CODE, 0x1000)], 0x100000, pvh_entry=1 << 33)
    with pytest.raises(ImageError, match="32 bits"):
        find_pvh_entry(parse_elf(raw))


def test_pvh_note_bad_descriptor_size() -> None:
    raw = make_elf([(0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100020, pvh_desc_size=4)
    # descsz is at note offset 4; the note is first in the body after ehdr + 2 phdrs
    note_off = 64 + 2 * 56
    raw = patch(raw, note_off + 4, "<I", 2)
    with pytest.raises(ImageError, match="descriptor"):
        find_pvh_entry(parse_elf(raw))


# Offsets inside an ELF64 file from make_elf with one note and one segment.
EH = 64
PH_NOTE = EH
PH_LOAD = EH + 56


def pvh64() -> bytes:
    return make_elf([(0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100010)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda i: b"", "magic"),
        (lambda i: b"MZ" + i[2:], "magic"),
        (lambda i: i[:40], "truncated"),
        (lambda i: patch(i, 4, "<B", 3), "class"),
        (lambda i: patch(i, 5, "<B", 2), "little endian"),
        (lambda i: patch(i, 6, "<B", 0), "identification version"),
        (lambda i: patch(i, 16, "<H", 3), "ET_EXEC"),
        (lambda i: patch(i, 18, "<H", 3), "machine"),
        (lambda i: patch(i, 20, "<I", 2), "ELF version"),
        (lambda i: patch(i, 54, "<H", 32), "program header size"),
        (lambda i: patch(i, 56, "<H", 0), "no program headers"),
        (lambda i: patch(i, 56, "<H", 0xFFFF), "too many"),
        (lambda i: patch(i, 32, "<Q", 1 << 20), "program header table"),
        (lambda i: patch(i, 32, "<Q", (1 << 64) - 8), "program header table"),
        (lambda i: i[: PH_LOAD + 56], "outside"),
        (lambda i: patch(i, PH_LOAD + 8, "<Q", (1 << 64) - 1), "outside"),
        (lambda i: patch(i, PH_LOAD + 32, "<Q", 1 << 40), "outside"),
        (lambda i: patch(i, PH_LOAD + 40, "<Q", 1), "filesz"),
        (lambda i: patch(patch(i, PH_LOAD + 24, "<Q", (1 << 64) - 0x10), PH_LOAD + 40, "<Q", 0x1000), "wraps"),
        (lambda i: patch(patch(i, PH_LOAD + 40, "<Q", 0), PH_LOAD + 32, "<Q", 0), "no loadable"),
        (lambda i: patch(i, PH_NOTE + 32, "<Q", 8), "truncated"),
        (lambda i: patch(i, EH + 2 * 56, "<I", 0xFFFF_FFF0), "past the end"),
        (lambda i: patch(i, EH + 2 * 56 + 4, "<I", 0x1000), "past the end"),
    ],
)
def test_rejects_malformed(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    img = pvh64()
    parse_elf(img)
    with pytest.raises(ImageError, match=message):
        parse_elf(mutate(img))


def test_bss_only_segment_needs_no_file_bytes() -> None:
    raw = make_elf([(0x100000, CODE, 0x1000), (0x200000, b"", 0x4000)], 0x100000)
    # a NOBITS-only segment may point anywhere in (or past) the file: nothing is read from it
    raw = patch(raw, EH + 56 + 8, "<Q", 1 << 40)
    img = parse_elf(raw)
    assert (img.segments[1].paddr, img.segments[1].filesz, img.segments[1].memsz) == (0x200000, 0, 0x4000)


def test_elf32_class_machine_mismatch() -> None:
    raw = make_elf([(0x100000, CODE, 0x1000)], 0x100000, elf_class=32)
    with pytest.raises(ImageError, match="machine"):
        parse_elf(patch(raw, 18, "<H", 62))


def test_entry_must_be_in_file_backed_segment() -> None:
    img = parse_elf(make_elf([(0x100000, CODE, 0x3000)], 0x102000))
    with pytest.raises(ImageError, match="not inside"):
        check_entry(img, img.entry)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([(0x9F000, CODE, 0x2000)], "boot structures"),
        ([(0x7000, CODE, 0x100)], "boot structures"),
        ([(0x3FF_F000, CODE, 0x2000)], "not inside guest RAM"),
        ([(0x100000, CODE, 0x2000), (0x101000, CODE, 0x1000)], "overlap"),
        ([(0x100000, CODE, 0x10000), (0x108000, CODE, 0x100), (0x200000, CODE, 0x100)], "overlap"),
    ],
)
def test_placement_rejections(segments, message: str) -> None:  # type: ignore[no-untyped-def]
    img = parse_elf(make_elf(segments, segments[0][0]))
    with pytest.raises(ImageError, match=message):
        check_placement(img.segments, RAM, low_limit=0x100000)


def test_placement_reserved_ranges_and_second_region() -> None:
    img = parse_elf(make_elf([(0x1_0000_1000, CODE, 0x1000)], 0x1_0000_1000))
    ram = [(0, 0xC000_0000), (0x1_0000_0000, 1 << 30)]
    check_placement(img.segments, ram, low_limit=0x100000)
    with pytest.raises(ImageError, match="initrd"):
        check_placement(img.segments, ram, low_limit=0x100000, reserved=[(0x1_0000_0000, 0x1_0000_2000, "initrd")])
    # a segment straddling the MMIO hole is not inside one region
    img2 = parse_elf(make_elf([(0xBFFF_F000, CODE, 0x2000)], 0xBFFF_F000))
    with pytest.raises(ImageError, match="not inside guest RAM"):
        check_placement(img2.segments, ram, low_limit=0x100000)


def test_notes_walk_multiple_and_8_aligned() -> None:
    # Two notes in one PT_NOTE with p_align 8 (gABI ELF64 style): the second must be found.
    def note8(name: bytes, t: int, desc: bytes) -> bytes:
        n = name + b"\0"
        return struct.pack("<III", len(n), len(desc), t) + n + b"\0" * (-len(n) % 8) + desc + b"\0" * (-len(desc) % 8)

    notes = note8(b"GNU", 5, b"\1\2\3\4\5") + note8(b"Xen", 18, struct.pack("<Q", 0x100004))
    base = make_elf([(0x100000, CODE, 0x1000)], 0x100000)
    # rebuild with a note segment by hand: append notes at the end, add a PT_NOTE phdr slot
    b = bytearray(base)
    note_off = len(b)
    b += notes
    # grow the program header table: replace with a new table at the end
    ph_off = len(b)
    old_ph = bytes(base[64 : 64 + 56])
    b += old_ph + struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 8)
    struct.pack_into("<Q", b, 32, ph_off)
    struct.pack_into("<H", b, 56, 2)
    img = parse_elf(bytes(b))
    assert [(n.name, n.type) for n in img.notes] == [(b"GNU", 5), (b"Xen", 18)]
    assert find_pvh_entry(img) == 0x100004
