"""bzImage parsing (Linux x86 boot protocol, Documentation/arch/x86/boot.rst) at its exact limits
(issue 15 mutation survivors): the shortest files that reach each check, the setup header's
shortest and longest legal lengths, fields ending exactly at the header's end, the syssize
rounding window (tools/build.c: up to 15 bytes short), the smallest kernel holding its 64-bit
entry, the smallest kernel_alignment and the 4 GiB pref_address limit."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.bzimage import (
    SETUP_HEADER_206_END,
    SETUP_HEADER_MAX_END,
    is_bzimage,
    parse_bzimage,
)
from bulkhead.boot.craft import make_bzimage
from bulkhead.errors import ImageError

PAYLOAD = b"\x90" * 0x40  # kernel = 0x200 prefix + 0x40 = 0x240 bytes, syssize 0x24


def image(**kw) -> bytes:  # type: ignore[no-untyped-def]
    return make_bzimage(PAYLOAD, **kw)


def patched(img: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_is_bzimage_at_the_shortest_length():
    img = image()
    assert is_bzimage(img[:0x206]) is True
    assert is_bzimage(img[:0x205]) is False
    assert is_bzimage(b"") is False


def test_the_shortest_files_reach_the_next_check():
    img = image()
    with pytest.raises(ImageError, match="bzImage is truncated: 517 bytes cannot hold a setup header"):
        parse_bzimage(img[:0x205])
    with pytest.raises(ImageError, match=r"boot protocol 0\.00 is older than 2\.06"):
        parse_bzimage(img[:0x206])  # no room for the version: read as 0
    with pytest.raises(ImageError, match="truncated inside its setup header"):
        parse_bzimage(img[:0x208])  # the version is read
    with pytest.raises(ImageError, match="truncated inside its setup header"):
        parse_bzimage(img[:0x26B])
    with pytest.raises(ImageError, match="its setup code alone takes 2560 bytes"):
        parse_bzimage(img[:0x26C])  # the whole header, nothing more
    with pytest.raises(ImageError, match="its setup code alone takes 2560 bytes"):
        parse_bzimage(img[:2560])


def test_an_old_protocol_is_named_in_the_error():
    with pytest.raises(ImageError, match=r"boot protocol 2\.05 is older than 2\.06"):
        parse_bzimage(patched(image(), 0x206, "<H", 0x0205))


def test_setup_header_length_limits_are_inclusive():
    longest = patched(image(), 0x201, "<B", SETUP_HEADER_MAX_END - 0x202)
    assert parse_bzimage(longest).header_end == SETUP_HEADER_MAX_END
    shortest = patched(image(), 0x201, "<B", SETUP_HEADER_206_END - 0x202)
    with pytest.raises(ImageError, match="declares an init_size of 0"):  # accepted; init_size is not in it
        parse_bzimage(shortest)
    for bad in (SETUP_HEADER_206_END - 1, SETUP_HEADER_MAX_END + 1):
        with pytest.raises(ImageError, match="setup header length is inconsistent"):
            parse_bzimage(patched(image(), 0x201, "<B", bad - 0x202))


def test_fields_are_read_up_to_exactly_the_header_end():
    img = patched(image(), 0x268, "<I", 0x1234)  # kernel_info_offset ends at 0x26c, the header end
    assert parse_bzimage(img).header.kernel_info_offset == 0x1234
    short = patched(img, 0x201, "<B", 0x268 - 0x202)  # header ends just before that field
    assert parse_bzimage(short).header.kernel_info_offset == 0
    v214 = patched(img, 0x206, "<H", 0x020E)  # a field newer than the protocol reads as 0
    assert parse_bzimage(v214).header.kernel_info_offset == 0
    v215 = patched(img, 0x206, "<H", 0x020F)  # ... and a field of exactly this protocol is read
    assert parse_bzimage(v215).header.kernel_info_offset == 0x1234


def test_syssize_rounding_window_is_fifteen_bytes():
    img = image()
    full = parse_bzimage(img)
    assert full.kernel_size == 0x240
    assert parse_bzimage(img[:-15]).kernel_size == 0x240 - 15  # tools/build.c rounding: load what is there
    with pytest.raises(ImageError, match="syssize says 576 bytes of kernel, the file has 560"):
        parse_bzimage(img[:-16])
    assert parse_bzimage(img + b"SIG").kernel_size == 0x240  # trailing bytes are not loaded


def test_the_smallest_kernel_holding_its_64_bit_entry():
    img = make_bzimage(b"\x90" * 0x10)  # kernel 0x210 bytes
    assert parse_bzimage(img[:-15]).kernel_size == 0x201
    with pytest.raises(ImageError, match="only 512 bytes"):
        parse_bzimage(make_bzimage(b"")[:])


@pytest.mark.parametrize("align", [0x1000, 0x2000, 0x20_0000])
def test_kernel_alignment_of_at_least_4_kib(align):
    img = image(relocatable=True, kernel_alignment=align, pref_address=0x100000 // align * align or align)
    assert parse_bzimage(img).header.kernel_alignment == align


@pytest.mark.parametrize("align", [0x800, 0x1800, 0x1001])
def test_kernel_alignment_below_4_kib_or_not_a_power_of_two(align):
    with pytest.raises(ImageError, match="is not a power of two of at least 4 KiB"):
        parse_bzimage(image(relocatable=True, kernel_alignment=align))


def test_pref_address_must_be_below_4_gib():
    assert parse_bzimage(image(pref_address=0xFFFF_F000)).load_address == 0xFFFF_F000
    with pytest.raises(ImageError, match="pref_address 0x100000000 is above 4 GiB"):
        parse_bzimage(image(pref_address=1 << 32))
