"""One description, two VMMs: build a conformance payload the ordinary way and run it on QEMU microvm
(the oracle) and on bulkhead's default path (`bulkhead run`, jailed when run as root).

Payloads (tests/conformance/payloads, format in README.md there) are built with the toolchain's
defaults: `gcc -ffreestanding -nostdlib -static` and GNU ld's default linker script, no private linker
script. Variants:

    ttext    -Wl,-Ttext=0x100000: the first PT_LOAD (ELF + program headers) sits at 0xff000
    default  GNU ld's default placement (0x400000), headers in the first segment
    vmlinux  -Ttext=0x100000 without the PVH note: a Linux 64-bit ELF entered at e_entry (vmlinux-style)
    bzimage  the vmlinux link as a flat image wrapped in a bzImage (bulkhead.guests.bzimage)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAYLOADS = Path(__file__).resolve().parent / "payloads"
CACHE = ROOT / "tests" / ".build" / "conformance"
RUNTIME = ("crt.S", "rt.c", "rt.h")
CFLAGS = (
    "-ffreestanding", "-nostdlib", "-static", "-no-pie", "-fno-pic", "-mno-red-zone",
    "-mgeneral-regs-only", "-fno-stack-protector", "-fcf-protection=none", "-O2", "-Wall",
)  # fmt: skip
VARIANTS: dict[str, tuple[str, ...]] = {
    "ttext": ("-Wl,-Ttext=0x100000",),
    "default": (),
    "vmlinux": ("-Wl,-Ttext=0x100000", "-DNO_PVH_NOTE"),
}
TIMEOUT = 60


def _tool_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def build(name: str, variant: str = "ttext") -> Path:
    """Build payloads/NAME.c with the runtime in `variant` (cached by the hash of every input)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    elf_variant = "vmlinux" if variant == "bzimage" else variant
    flags = (*CFLAGS, *VARIANTS[elf_variant])
    key = hashlib.sha256()
    for part in (*flags, _tool_version("gcc"), _tool_version("ld"), variant):
        key.update(part.encode() + b"\0")
    for src in (*RUNTIME, f"{name}.c"):
        key.update((PAYLOADS / src).read_bytes() + b"\0")
    if variant == "bzimage":
        key.update((ROOT / "src" / "bulkhead" / "guests" / "bzimage.py").read_bytes())
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{name}-{variant}-{key.hexdigest()[:24]}.{'bzImage' if variant == 'bzimage' else 'elf'}"
    if out.is_file():
        return out
    elf = out.with_suffix(".tmp.elf")
    cmd = ["gcc", *flags, "crt.S", "rt.c", f"{name}.c", "-o", str(elf)]
    proc = subprocess.run(cmd, cwd=PAYLOADS, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise AssertionError(f"payload build failed: {' '.join(cmd)}\n{proc.stderr}")
    if variant == "bzimage":
        elf = _wrap_bzimage(elf)
    os.replace(elf, out)
    return out


def _wrap_bzimage(elf: Path) -> Path:
    from bulkhead.guests.bzimage import LOAD_ADDRESS, make_bzimage_flat

    syms = dict(
        (parts[2], int(parts[0], 16))
        for parts in (line.split() for line in subprocess.run(
            ["nm", str(elf)], capture_output=True, text=True, check=True).stdout.splitlines())
        if len(parts) == 3
    )  # fmt: skip
    assert syms["_start32"] == LOAD_ADDRESS and syms["_start"] == LOAD_ADDRESS + 0x200, syms
    flat = elf.with_suffix(".bin")
    subprocess.run(["objcopy", "-O", "binary", "-R", ".note*", str(elf), str(flat)], check=True)
    image = make_bzimage_flat(flat.read_bytes(), syms["_end"] - LOAD_ADDRESS)
    out = elf.with_suffix(".bz")
    out.write_bytes(image)
    flat.unlink()
    elf.unlink()
    return out


@dataclass
class Outcome:
    """What one VMM did with one guest: process status, COM1 lines, stderr."""

    vmm: str
    status: int
    lines: list[str]
    stderr: str = ""

    def facts(self, prefix: str) -> dict[str, str]:
        """key=value words of every line starting with `prefix` (later lines win)."""
        out: dict[str, str] = {}
        for line in self.lines:
            if line.split(" ", 1)[0] == prefix:
                out.update(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.split(" ", 1)[0] == prefix]

    @property
    def passed(self) -> bool:
        return "PASS" in self.lines and self.status == 1  # debug-exit code 0 -> status 1


@dataclass
class Guest:
    """The description both VMMs run: image, command line, vCPUs, memory, devices."""

    image: Path
    cmdline: str = ""
    cpus: int = 1
    mem_mib: int = 128
    rng: bool = False
    extra_qemu: tuple[str, ...] = field(default_factory=tuple)


def _lines(raw: bytes) -> list[str]:
    return [line.rstrip("\r") for line in raw.decode("ascii", "replace").splitlines()]


def run_qemu(g: Guest) -> Outcome:
    cmd = [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", f"{g.mem_mib}M", "-smp", str(g.cpus),
        "-kernel", str(g.image), "-append", g.cmdline, *g.extra_qemu,
    ]  # fmt: skip
    if g.rng:
        cmd += ["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-rng-device"]
    p = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    return Outcome("qemu", p.returncode, _lines(p.stdout), p.stderr.decode(errors="replace"))


def run_bulkhead(g: Guest) -> Outcome:
    """`bulkhead run` on its default path: jailed when this process is root."""
    cmd = [sys.executable, "-m", "bulkhead", "run", "-q", "--kernel", str(g.image), "--cmdline", g.cmdline,
           "--cpus", str(g.cpus), "--mem", str(g.mem_mib)]  # fmt: skip
    if g.rng:
        cmd.append("--rng")
    p = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    err = p.stderr.decode(errors="replace")
    if os.geteuid() == 0:
        assert "unjailed" not in err and "--no-jail" not in err, err
    return Outcome("bulkhead", p.returncode, _lines(p.stdout), err)


def run_both(g: Guest) -> tuple[Outcome, Outcome]:
    """(QEMU's outcome, bulkhead's outcome) for the same guest description."""
    return run_qemu(g), run_bulkhead(g)
