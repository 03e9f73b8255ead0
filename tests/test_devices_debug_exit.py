"""isa-debug-exit compatibility: exit status values, reads, containment; QEMU cross-check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bulkhead.devices import DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, DebugExit
from bulkhead.devices.debug_exit import exit_status

# (value, width, 8-bit status). Worked by hand from QEMU's (v << 1) | 1, truncated by the OS.
CASES = [
    (0, 1, 0x01),
    (1, 1, 0x03),
    (0x7F, 1, 0xFF),
    (0x80, 1, 0x01),
    (0xFF, 1, 0xFF),
    (0x1234, 2, 0x69),
    (0x10, 4, 0x21),
    (0xFFFF_FFFF, 4, 0xFF),
]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.dev = DebugExit(self.calls.append)


def test_port_matches_qemu_command_line() -> None:
    assert (DEBUG_EXIT_BASE, DEBUG_EXIT_LEN) == (0xF4, 4)


@pytest.mark.parametrize(("value", "size", "status"), CASES)
def test_write_reports_qemu_exit_status(value: int, size: int, status: int) -> None:
    r = Recorder()
    r.dev.write(0, size, value)
    assert r.calls == [status]
    assert exit_status(value) == status
    assert r.dev.value == value
    assert r.dev.code == (value << 1) | 1


def test_value_is_masked_to_access_width() -> None:
    r = Recorder()
    r.dev.write(0, 1, 0x1234)  # a byte write can only carry 0x34
    assert r.calls == [0x69] and r.dev.value == 0x34


def test_any_offset_in_range_exits() -> None:
    for off in range(4):
        r = Recorder()
        r.dev.write(off, 1, 2)
        assert r.calls == [5]


def test_first_write_wins() -> None:
    r = Recorder()
    r.dev.write(0, 1, 3)
    r.dev.write(0, 1, 9)
    assert r.calls == [7]
    assert r.dev.late_writes == 1 and r.dev.status == 7


def test_reads_return_zero() -> None:
    r = Recorder()
    assert [r.dev.read(0, n) for n in (1, 2, 4)] == [0, 0, 0]
    assert r.calls == []


@pytest.mark.parametrize(("offset", "size"), [(0, 3), (0, 8), (0, 0), (2, 4), (3, 2), (4, 1), (-1, 1)])
def test_bad_accesses_are_contained(offset: int, size: int) -> None:
    r = Recorder()
    r.dev.write(offset, size, 1)
    assert r.dev.read(offset, size) == ((1 << (8 * size)) - 1 if size > 0 else 0)
    assert r.calls == [] and r.dev.bad_access == 2


PAYLOAD = r"""
/* PVH payload: read the debug-exit port, add 0x40, write the sum back with a 32-bit out.
   QEMU then exits with (((read + 0x40) << 1) | 1) & 0xff: 0x81 if reads return 0. */
    .section .note.pvh, "a"
    .p2align 2
    .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start
    .text
    .code32
    .globl _start
_start:
    movw $0xf4, %dx
    inl %dx, %eax
    addl $0x40, %eax
    outl %eax, %dx
1:  hlt
    jmp 1b
"""

LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD; note PT_NOTE; }
SECTIONS {
  . = 0x100000;
  .text : { *(.text) } :text
  .note.pvh : { *(.note.pvh) } :text :note
}
"""


@pytest.mark.qemu
@pytest.mark.kvm
def test_qemu_isa_debug_exit_agrees(tmp_path: Path) -> None:
    """Run QEMU's own isa-debug-exit and compare its exit status with our model."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    (tmp_path / "p.S").write_text(PAYLOAD)
    (tmp_path / "p.lds").write_text(LDS)
    elf = tmp_path / "p.elf"
    subprocess.run(
        [
            "gcc",
            "-m32",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-T",
            str(tmp_path / "p.lds"),
            "-o",
            str(elf),
            str(tmp_path / "p.S"),
        ],
        check=True,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            "qemu-system-x86_64",
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
            str(elf),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    r = Recorder()
    r.dev.write(0, 4, r.dev.read(0, 4) + 0x40)
    assert proc.returncode == r.calls[0] == 0x81, proc.stderr.decode(errors="replace")
