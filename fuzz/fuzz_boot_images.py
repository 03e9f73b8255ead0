"""atheris harness for the boot loader (bulkhead.boot.load_kernel and the image parsers).

Input format: byte 0 selects the options, the rest is the kernel image.
    byte0 & 3        protocol: 0/3 "auto", 1 "pvh", 2 "linux"
    byte0 & 4        pass a 3000-byte initrd
    byte0 & 8        use a 160-byte command line instead of a short one
The image goes to load_kernel() with an 8 MiB GuestMemory. A crash is any exception other than
ImageError / ConfigError, or an accepted image whose plan breaks the layout (kernel below 1 MiB or
beyond RAM, initrd overlapping the kernel or unaligned, an entry point above 4 GiB).

Run: .venv/bin/python fuzz/fuzz_boot_images.py -runs=100000
With the seeds (the first directory receives new inputs, so keep it outside the repo):
     .venv/bin/python fuzz/fuzz_boot_images.py -runs=100000 /tmp/boot-corpus fuzz/corpus/boot
Regenerate the seeds: .venv/bin/python fuzz/fuzz_boot_images.py --write-seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.boot import load_kernel
    from bulkhead.boot.craft import make_bzimage, make_elf
    from bulkhead.errors import ConfigError
    from bulkhead.memory import GuestMemory
    from bulkhead.memory.layout import HIMEM_START

MEM_SIZE = 8 << 20
PROTOCOLS = ("auto", "pvh", "linux", "auto")
INITRD = b"\x07" * 3000
MEM = GuestMemory.for_size(MEM_SIZE)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    opts, image = data[0], data[1:]
    initrd = INITRD if opts & 4 else None
    cmdline = "console=ttyS0 " * 11 if opts & 8 else "console=ttyS0"
    try:
        plan = load_kernel(MEM, image, initrd=initrd, cmdline=cmdline, cpus=2, protocol=PROTOCOLS[opts & 3])
    except ConfigError:  # ImageError is a ConfigError
        return
    k0, k1 = plan.kernel_range
    if not HIMEM_START <= k0 <= k1 <= MEM_SIZE:
        raise AssertionError(f"kernel range {k0:#x}..{k1:#x} breaks the layout")
    if plan.initrd_range is not None:
        i0, i1 = plan.initrd_range
        if not (k1 <= i0 < i1 <= MEM_SIZE and i0 % 4096 == 0 and i1 - i0 == len(INITRD)):
            raise AssertionError(f"initrd range {i0:#x}..{i1:#x} breaks the layout")
    if plan.rip >> 32:
        raise AssertionError(f"entry point {plan.rip:#x} above 4 GiB")


def write_seeds(directory: Path) -> None:
    """Small crafted images (no real kernel): bzImage, ELF64, PVH ELF64, PVH ELF32."""
    code = b"\x90" * 32 + b"\xf4"
    seeds = {
        "bzimage": bytes([4]) + make_bzimage(code, init_size=0x4000),
        "bzimage-reloc": bytes([0]) + make_bzimage(code, relocatable=True, pref_address=0x200000),
        "elf64": bytes([2]) + make_elf([(0x100000, code, 0x2000), (0x200000, b"data", 16)], 0x100000),
        "pvh64": bytes([5]) + make_elf([(0x100000, code, 0x1000)], 0x100000, pvh_entry=0x100000),
        "pvh32": bytes([1]) + make_elf([(0x100000, code, 0x1000)], 0x100000, elf_class=32, pvh_entry=0x100000),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in seeds.items():
        (directory / name).write_bytes(blob)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "boot")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
