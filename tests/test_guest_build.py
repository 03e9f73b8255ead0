"""Guest image builder and bzImage wrapper: reproducibility, cache, errors, and the image layout
(ELF entry, PVH note, bzImage setup header fields per Documentation/arch/x86/boot.rst)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from bulkhead.errors import ConfigError, HostError
from bulkhead.guests import build as guest_build
from bulkhead.guests.build import build, main
from bulkhead.guests.bzimage import elf_flat_image, make_bzimage
from bulkhead.guests.report import E820Entry, parse_report

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

PAYLOADS = Path(__file__).resolve().parent / "payloads"


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BULKHEAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _phdrs(elf: bytes) -> list[tuple[int, int, int, int, int, int, int]]:
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phnum = struct.unpack_from("<H", elf, 0x38)[0]
    return [struct.unpack_from("<IIQQQQQ", elf, phoff + 56 * i) for i in range(phnum)]


def _symbol(elf: bytes, name: str) -> int:
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shnum = struct.unpack_from("<H", elf, 0x3C)[0]
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + 64 * i) for i in range(shnum)]
    for sh in sections:
        if sh[1] == 2:  # SHT_SYMTAB
            strtab = sections[sh[6]]
            for off in range(sh[4], sh[4] + sh[5], 24):
                st_name, _info, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", elf, off)
                start = strtab[4] + st_name
                if elf[start : elf.index(b"\0", start)] == name.encode():
                    return int(value)
    raise AssertionError(f"symbol {name} not found")


def test_build_is_reproducible_and_cached(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build("demo")
    assert first.parent == cache and first.suffix == ".elf"
    mtime = first.stat().st_mtime_ns
    assert build("demo.c") == first  # cache hit: same key, no rebuild
    assert first.stat().st_mtime_ns == mtime
    monkeypatch.setenv("BULKHEAD_CACHE", str(tmp_path / "other"))
    second = build("demo")
    assert second != first and second.read_bytes() == first.read_bytes()


def test_cache_key_follows_inputs(cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "prog.c"
    src.write_text('#include "guest.h"\nint main(const struct bh_bootinfo *bi) { (void)bi; return 1; }\n')
    a = build(str(src))
    src.write_text('#include "guest.h"\nint main(const struct bh_bootinfo *bi) { (void)bi; return 2; }\n')
    b = build(str(src))
    c = build(str(src), cflags=["-DX=1"])
    assert len({a, b, c}) == 3
    assert a.read_bytes() != b.read_bytes()


def test_elf_layout_entries_and_pvh_note(cache: Path) -> None:
    elf = build("demo").read_bytes()
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 0x12)[0] == 62  # EM_X86_64
    entry = struct.unpack_from("<Q", elf, 0x18)[0]
    assert entry == 0x100200 == _symbol(elf, "_start64")
    loads = [p for p in _phdrs(elf) if p[0] == 1]
    assert len(loads) == 1 and loads[0][4] == 0x100000
    notes = [p for p in _phdrs(elf) if p[0] == 4]
    assert len(notes) == 1
    off = notes[0][2]
    namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
    assert (namesz, descsz, ntype) == (4, 8, 18)  # "Xen", XEN_ELFNOTE_PHYS32_ENTRY
    assert elf[off + 12 : off + 16] == b"Xen\0"
    pvh_entry = struct.unpack_from("<Q", elf, off + 16)[0]
    assert pvh_entry == _symbol(elf, "_start_pvh")
    _t, _f, _o, _v, paddr, _filesz, memsz = loads[0]
    assert paddr <= pvh_entry < paddr + memsz
    assert b"build-id" not in elf and b"GCC:" not in elf  # no build id, no .comment


def test_bzimage_header_matches_boot_protocol(cache: Path) -> None:
    elf = build("demo").read_bytes()
    bz = build("demo", "bzimage")
    assert bz.suffix == ".bzImage"
    img = bz.read_bytes()
    u8 = lambda o: img[o]  # noqa: E731
    u16 = lambda o: struct.unpack_from("<H", img, o)[0]  # noqa: E731
    u32 = lambda o: struct.unpack_from("<I", img, o)[0]  # noqa: E731
    assert img[0x202:0x206] == b"HdrS"
    assert u16(0x206) == 0x020F  # protocol 2.15
    assert u16(0x1FE) == 0xAA55  # boot_flag
    setup_sects = u8(0x1F1)
    assert setup_sects >= 1
    setup_len = (setup_sects + 1) * 512
    flat, memsz = elf_flat_image(elf)
    pm = img[setup_len:]  # protected-mode part: the flat image padded to whole paragraphs
    assert pm[: len(flat)] == flat and not any(pm[len(flat) :])
    assert u32(0x1F4) * 16 == len(pm) < len(flat) + 16  # syssize
    assert u8(0x211) & 0x01  # LOADED_HIGH
    assert u16(0x236) & 0x01 and not u16(0x236) & 0x02  # XLF_KERNEL_64, not above 4 GiB
    assert u8(0x234) == 0  # not relocatable
    assert u32(0x214) == 0x100000  # code32_start
    assert struct.unpack_from("<Q", img, 0x258)[0] == 0x100000  # pref_address
    assert u32(0x238) == 2048  # cmdline_size
    assert u32(0x22C) == 0x7FFFFFFF  # initrd_addr_max
    assert u32(0x260) >= memsz and u32(0x260) % 4096 == 0  # init_size covers .bss and stacks
    assert u32(0x248) == 0 and u32(0x24C) == 0  # payload not compressed
    version = 0x200 + u16(0x20E)
    assert img[version : img.index(b"\0", version)] == b"bulkhead guest"
    # the jump at 0x200 lands inside the setup area
    assert img[0x200] == 0xEB and 0x202 + img[0x201] < setup_len
    # +0x200 of the protected-mode part is the ELF's 64-bit entry
    elf_off = next(p for p in _phdrs(elf) if p[0] == 1)[2]
    assert img[setup_len + 0x200 : setup_len + 0x240] == elf[elf_off + 0x200 : elf_off + 0x240]


def test_flat_image_rejects_malformed_elves() -> None:
    with pytest.raises(ConfigError):
        elf_flat_image(b"MZ" + bytes(100))
    with pytest.raises(ConfigError):
        elf_flat_image(b"\x7fELF\x02\x01" + bytes(10))
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, 2)
    two_loads = bytes(hdr) + struct.pack("<IIQQQQQQ", 1, 7, 0, 0, 0x100000, 0, 0, 0) * 2
    with pytest.raises(ConfigError, match="exactly one PT_LOAD"):
        elf_flat_image(two_loads)
    one_load_wrong_addr = bytes(hdr[:0x38]) + struct.pack("<H", 1) + bytes(hdr[0x3A:])
    one_load_wrong_addr += struct.pack("<IIQQQQQQ", 1, 7, 0, 0, 0x200000, 16, 16, 0)
    with pytest.raises(ConfigError):
        make_bzimage(one_load_wrong_addr)
    truncated = bytes(hdr[:0x38]) + struct.pack("<H", 1) + bytes(hdr[0x3A:])
    truncated += struct.pack("<IIQQQQQQ", 1, 7, 0, 0, 0x100000, 1 << 20, 1 << 20, 0)
    with pytest.raises(ConfigError):
        elf_flat_image(truncated)


@pytest.mark.parametrize("program", ["nosuch", "../lib/lib", "/nonexistent/x.c", "guest.h"])
def test_bad_program_is_a_config_error(cache: Path, program: str) -> None:
    with pytest.raises(ConfigError):
        build(program)


def test_bad_format_and_compile_error(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format"):
        build("demo", "pe")
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return undefined_symbol; }\n")
    with pytest.raises(ConfigError, match="guest build failed"):
        build(str(bad))


def test_missing_gcc_is_a_host_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_build.shutil, "which", lambda _name: None)
    with pytest.raises(HostError, match="gcc is not installed"):
        build("demo")


def test_cli(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.bzImage"
    assert main([str(PAYLOADS / "bootinfo.c"), "--format", "bzimage", "-o", str(out)]) == 0
    assert out.read_bytes()[0x202:0x206] == b"HdrS"
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["nosuch"]) == 2
    assert "error:" in capsys.readouterr().err


def test_report_parser() -> None:
    text = (
        "BOOT protocol=linux64 info=0x7000 valid=1\r\nCMDLINE  a  b\r\nE820_COUNT 2\r\n"
        "E820 0x0 0x9fc00 1\r\nE820 0x100000 0x1000000 1\r\nMPTABLE none\r\nCPUS 2\r\n"
        "MPCPU 0 bsp\r\nMPCPU 1 ap\r\nAPIC 1 ap\r\nCPUS_UP 2\r\nFAIL x y\r\nPASS\r\n"
    )
    rep = parse_report(text)
    assert rep.protocol == "linux64" and rep.cmdline == " a  b"
    assert rep.e820 == [E820Entry(0, 0x9FC00, 1), E820Entry(0x100000, 0x1000000, 1)]
    assert rep.e820_count == 2 and rep.usable_bytes() == 0x9FC00 + 0x1000000
    assert rep.mptable is None and rep.cpus == 2 and rep.mp_cpus == [(0, "bsp"), (1, "ap")]
    assert rep.apics == [(1, "ap")] and rep.cpus_up == 2
    assert rep.passed and rep.failures == ["x y"]
    with pytest.raises(ValueError):
        parse_report("E820 0xzz 0x1 1\n")
