"""bzImage setup header parsing and validation (Documentation/arch/x86/boot.rst)."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.bzimage import FIELD_OFFSETS, is_bzimage, parse_bzimage
from bulkhead.boot.craft import make_bzimage
from bulkhead.errors import ImageError

PAYLOAD = b"\x90" * 300 + b"\xf4"


def patch(img: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_field_offsets_match_bootparam_h() -> None:
    # Offsets from boot.rst's "The Real-Mode Kernel Header" table.
    expected = {
        "setup_sects": 0x1F1, "root_flags": 0x1F2, "syssize": 0x1F4, "ram_size": 0x1F8, "vid_mode": 0x1FA,
        "root_dev": 0x1FC, "boot_flag": 0x1FE, "jump": 0x200, "header": 0x202, "version": 0x206,
        "realmode_swtch": 0x208, "start_sys_seg": 0x20C, "kernel_version": 0x20E, "type_of_loader": 0x210,
        "loadflags": 0x211, "setup_move_size": 0x212, "code32_start": 0x214, "ramdisk_image": 0x218,
        "ramdisk_size": 0x21C, "bootsect_kludge": 0x220, "heap_end_ptr": 0x224, "ext_loader_ver": 0x226,
        "ext_loader_type": 0x227, "cmd_line_ptr": 0x228, "initrd_addr_max": 0x22C,
        "kernel_alignment": 0x230, "relocatable_kernel": 0x234, "min_alignment": 0x235,
        "xloadflags": 0x236, "cmdline_size": 0x238, "hardware_subarch": 0x23C,
        "hardware_subarch_data": 0x240, "payload_offset": 0x248, "payload_length": 0x24C,
        "setup_data": 0x250, "pref_address": 0x258, "init_size": 0x260, "handover_offset": 0x264,
        "kernel_info_offset": 0x268,
    }
    assert expected == FIELD_OFFSETS


def test_parse_valid_image() -> None:
    img = make_bzimage(PAYLOAD, pref_address=0x200000, init_size=0x10000, cmdline_size=1000,
                       initrd_addr_max=0x3FFF_FFFF, payload=(0x10, 0x20))
    bz = parse_bzimage(img)
    h = bz.header
    assert is_bzimage(img)
    assert h.boot_flag == 0xAA55
    assert h.header == 0x53726448
    assert h.version == 0x020F
    assert h.setup_sects == 4
    assert bz.setup_size == 5 * 512
    assert bz.kernel_offset == 5 * 512
    assert bz.kernel_size == len(img) - 5 * 512
    assert h.kernel_64
    assert h.cmdline_size == 1000
    assert h.initrd_addr_max == 0x3FFF_FFFF
    assert (h.payload_offset, h.payload_length) == (0x10, 0x20)
    assert bz.load_address == 0x200000
    assert bz.entry64 == 0x200200
    assert bz.memory_needed == 0x10000
    assert bz.header_end == 0x26C
    assert bz.header_bytes(img) == img[0x1F1:0x26C]
    # the payload's first byte is the 64-bit entry
    assert img[bz.kernel_offset + 0x200 : bz.kernel_offset + 0x200 + len(PAYLOAD)] == PAYLOAD


def test_trailing_bytes_after_syssize_are_not_kernel() -> None:
    # Distribution kernels append a UEFI signature after the syssize paragraphs.
    img = make_bzimage(PAYLOAD)
    bz = parse_bzimage(img + b"SIGNATURE" * 100)
    assert bz.kernel_size == parse_bzimage(img).kernel_size == bz.header.syssize * 16


def test_setup_sects_zero_means_four() -> None:
    img = make_bzimage(PAYLOAD, setup_sects=0)
    assert parse_bzimage(img).setup_size == 5 * 512


def test_setup_sects_honoured() -> None:
    img = make_bzimage(PAYLOAD, setup_sects=7)
    bz = parse_bzimage(img)
    assert bz.setup_size == 8 * 512
    assert bz.kernel_size == len(img) - 8 * 512


def test_fields_newer_than_protocol_read_as_zero() -> None:
    # A 2.06 image: xloadflags (2.12) must read as 0 even if bytes are there -> no 64-bit entry.
    img = make_bzimage(PAYLOAD, version=0x0206)
    with pytest.raises(ImageError, match="64-bit"):
        parse_bzimage(img)


def test_relocatable_alignment() -> None:
    img = make_bzimage(PAYLOAD, relocatable=True, kernel_alignment=0x200000, pref_address=0x1000000)
    assert parse_bzimage(img).header.relocatable_kernel == 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda i: i[:0x100], "truncated"),
        (lambda i: patch(i, 0x1FE, "<H", 0x1234), "not a bzImage"),
        (lambda i: patch(i, 0x202, "<I", 0x12345678), "not a bzImage"),
        (lambda i: patch(i, 0x206, "<H", 0x0205), "older than 2.06"),
        (lambda i: patch(i, 0x206, "<H", 0x0100), "older than 2.06"),
        (lambda i: patch(i, 0x200, "<B", 0x90), "short jump"),
        (lambda i: patch(i, 0x201, "<B", 0x10), "header length"),
        (lambda i: patch(i, 0x201, "<B", 0xF0), "header length"),
        (lambda i: i[: 5 * 512], "truncated"),
        (lambda i: i[: 5 * 512 + 0x100], "truncated"),
        (lambda i: patch(i, 0x1F4, "<I", 0x20), "entry"),
        (lambda i: patch(i, 0x1F4, "<I", 0), "entry"),
        (lambda i: i[:-64], "syssize"),
        (lambda i: patch(i, 0x211, "<B", 0), "LOADED_HIGH"),
        (lambda i: patch(i, 0x236, "<H", 0), "64-bit entry"),
        (lambda i: patch(i, 0x238, "<I", 0), "command line size"),
        (lambda i: patch(i, 0x248, "<I", 0x10_0000), "payload"),
        (lambda i: patch(i, 0x24C, "<I", 0xFFFF_FFFF), "payload"),
        (lambda i: patch(i, 0x258, "<Q", 1 << 40), "above 4 GiB"),
        (lambda i: patch(i, 0x260, "<I", 0), "init_size"),
        (lambda i: patch(patch(i, 0x234, "<B", 1), 0x230, "<I", 0x3000), "power of two"),
        (lambda i: patch(patch(i, 0x234, "<B", 1), 0x258, "<Q", 0x101000), "not aligned"),
    ],
)
def test_rejects_malformed(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    img = make_bzimage(PAYLOAD)
    parse_bzimage(img)  # the base image is valid
    with pytest.raises(ImageError, match=message):
        parse_bzimage(mutate(img))


def test_rejects_garbage_and_empty() -> None:
    for data, why in ((b"", "truncated: 0 bytes"), (b"\0" * 10, "truncated: 10 bytes"),
                      (b"\xff" * 4096, "not a bzImage: boot flag 0xAA55")):
        with pytest.raises(ImageError, match=why):
            parse_bzimage(data)
