"""The loader table (bulkhead.boot.layout): what the loaders refuse, what they accept, and that
docs/GUEST_KERNEL.md prints the table and the boot CPU state generated from the code."""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.boot import layout as L
from bulkhead.boot import load_kernel
from bulkhead.boot.craft import make_bzimage, make_elf
from bulkhead.boot.docs import SECTIONS, rewrite, sections
from bulkhead.errors import ImageError
from bulkhead.memory import GuestMemory

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CODE = b"\xf4" * 64


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.for_size(64 * MIB)
    yield m  # type: ignore[misc]
    m.close()


def test_doc_prints_the_generated_tables() -> None:
    text = (ROOT / "docs" / "GUEST_KERNEL.md").read_text()
    found = sections(text)
    assert set(found) == set(SECTIONS)
    for name, render in SECTIONS.items():
        assert found[name] == render(), f"docs/GUEST_KERNEL.md {name} is stale: python -m bulkhead.boot.docs"
    assert rewrite(text) == text


def test_slots_do_not_overlap_within_a_protocol() -> None:
    for proto in (L.PVH, *L.LINUX):
        slots = sorted((s for s in L.LOADER_TABLE if proto in s.protocols), key=lambda s: s.start)
        for a, b in itertools.pairwise(slots):
            assert a.end <= b.start, (proto, a.name, b.name)
        assert all(s.end <= L.BOOT_STRUCTS_END for s in slots)


def _written(protocol_image: bytes, mem: GuestMemory) -> list[tuple[str, int, int]]:
    return list(load_kernel(mem, protocol_image, initrd=b"\1" * 100, cmdline="abc", cpus=2).structures)


@pytest.mark.parametrize("pvh", [True, False])
def test_every_written_structure_refuses_an_overlapping_segment(mem: GuestMemory, pvh: bool) -> None:
    ok = make_elf([(0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100000 if pvh else None)
    written = _written(ok, mem)
    assert {n for n, _, _ in written} == {
        s.name for s in L.LOADER_TABLE if (L.PVH if pvh else "linux-elf") in s.protocols
    }
    for name, start, end in written:
        # one segment touching the last byte of the structure, entry in a second, clean segment
        seg = (end - 1) & ~0xF
        img = make_elf([(seg, CODE[:16], 16), (0x100000, CODE, 0x1000)], 0x100000,
                       pvh_entry=0x100000 if pvh else None)
        with pytest.raises(ImageError, match=re.escape(f"overlaps the {name} [{start:#x}, {end:#x})")):
            load_kernel(mem, img, initrd=b"\1" * 100, cmdline="abc", cpus=2)
        # and right after it, where nothing else is written, the segment loads
        gap_free = all(not (end <= s0 < end + 16 or s0 < end + 16 <= s1) for _, s0, s1 in written if s0 >= end)
        if gap_free and end + 16 <= 0x9FC00:
            img = make_elf([(end, CODE[:16], 16), (0x100000, CODE, 0x1000)], 0x100000,
                           pvh_entry=0x100000 if pvh else None)
            load_kernel(mem, img, initrd=b"\1" * 100, cmdline="abc", cpus=2)


def test_only_what_is_written_is_reserved(mem: GuestMemory) -> None:
    # The command line slot is 64 KiB, but only its bytes are written: a segment after them loads.
    img = make_elf([(0x20100, CODE, 0x100), (0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100000)
    plan = load_kernel(mem, img, initrd=None, cmdline="short", cpus=1)
    assert ("command line", 0x20000, 0x20006) in plan.structures
    assert mem.read(0x20100, 64) == CODE
    # The Linux page tables are not written for PVH: a PVH image may load there, a Linux one not.
    pvh = make_elf([(0xA000, CODE, 0x100), (0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100000)
    load_kernel(mem, pvh, initrd=None, cmdline="", cpus=1)
    lnx = make_elf([(0xA000, CODE, 0x100), (0x100000, CODE, 0x1000)], 0x100000)
    with pytest.raises(ImageError, match="page tables"):
        load_kernel(mem, lnx, initrd=None, cmdline="", cpus=1)


def test_headers_segment_below_1mib_loads(mem: GuestMemory) -> None:
    """What `ld -Ttext=0x100000` produces: a first PT_LOAD at 0xff000 holding the headers."""
    img = make_elf([(0xFF000, b"\x7fELF" + bytes(0x1C4), 0x1C8), (0x100000, CODE, 0x1000)], 0x100000,
                   pvh_entry=0x100000)
    plan = load_kernel(mem, img, initrd=None, cmdline="", cpus=1)
    assert plan.kernel_range == (0xFF000, 0x101000)
    assert mem.read(0xFF000, 4) == b"\x7fELF"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_real_ld_ttext_image_loads(mem: GuestMemory, tmp_path: Path) -> None:
    src = tmp_path / "a.S"
    src.write_text('.section .note.Xen,"a",@note\n.balign 4\n.long 4,4,18\n.asciz "Xen"\n.long _start\n'
                   ".text\n.globl _start\n_start: hlt\n.section .note.GNU-stack,\"\",@progbits\n")
    out = tmp_path / "a.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x100000", str(src), "-o", str(out)],
                   check=True, capture_output=True)
    data = out.read_bytes()
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    first_load = next(
        struct.unpack_from("<Q", data, phoff + 56 * i + 24)[0]
        for i in range(struct.unpack_from("<H", data, 0x38)[0])
        if struct.unpack_from("<I", data, phoff + 56 * i)[0] == 1
    )
    assert first_load == 0xFF000  # GNU ld put the headers below 1 MiB
    plan = load_kernel(mem, data, initrd=None, cmdline="", cpus=1)
    assert plan.protocol == "pvh" and plan.rip == 0x100000


def test_ram_errors_name_the_reason() -> None:
    with GuestMemory.for_size(3 * 1024 * MIB + 512 * MIB) as big:
        hole = make_elf([(0xC000_0000, CODE, 0x1000)], 0xC000_0000)
        with pytest.raises(ImageError, match=r"MMIO hole \[0xc0000000, 0x100000000\)"):
            load_kernel(big, hole, initrd=None, cmdline="", cpus=1)
    with GuestMemory.for_size(64 * MIB) as m:
        past = make_elf([(0x3FF_0000, CODE, 0x20000)], 0x3FF_0000)
        with pytest.raises(ImageError, match="not inside guest RAM"):
            load_kernel(m, past, initrd=None, cmdline="", cpus=1)
        bz = make_bzimage(CODE, pref_address=0x9F000, init_size=0x2000)
        with pytest.raises(ImageError, match=r"overlaps the MP table \[0x9fc00, "):
            load_kernel(m, bz, initrd=None, cmdline="", cpus=1)


def test_rsdp_address_in_start_info_and_boot_params(mem: GuestMemory) -> None:
    pvh = load_kernel(mem, make_elf([(0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100000),
                      initrd=None, cmdline="", cpus=1)
    assert mem.read_u64(pvh.boot_info + 32) == L.ACPI_RSDP_START == pvh.acpi_rsdp
    lnx = load_kernel(mem, make_bzimage(CODE), initrd=None, cmdline="", cpus=1)
    assert mem.read_u64(lnx.boot_info + 0x70) == L.ACPI_RSDP_START
    assert mem.read(L.ACPI_RSDP_START, 8) == b"RSD PTR "


@pytest.mark.kvm
@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm")
def test_cli_refusal_names_the_structure(tmp_path: Path) -> None:
    """`bulkhead run` stops with exit 2 and the loader's sentence, before the guest runs."""
    img = tmp_path / "bad.elf"
    img.write_bytes(make_elf([(0x9FC00, CODE, 0x100), (0x100000, CODE, 0x1000)], 0x100000, pvh_entry=0x100000))
    p = subprocess.run([sys.executable, "-m", "bulkhead", "run", "--no-jail", "-q", "--kernel", str(img)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2, p
    assert "ELF segment [0x9fc00, 0x9fd00) overlaps the MP table [0x9fc00, 0x9fd30)" in p.stderr
