"""Build freestanding guest payloads with gcc into cached, reproducible images.

`build(program, fmt)` compiles one payload (a C file) together with the common guest library in
`bulkhead/guests/lib` and returns the path of the image in the cache:

    $BULKHEAD_CACHE, else ~/.cache/bulkhead/guests, file <sha256>.<elf|bzImage>

The key is the SHA-256 of every input (library, payload and extra sources, linker script, flags,
this file, format) and of the gcc and ld version strings, so a changed input or toolchain gives a
new image. Builds are reproducible: sources are compiled from a scratch directory under fixed
relative names, without debug info, build ids or timestamps.

CLI: python -m bulkhead.guests.build PROGRAM [--format elf|bzimage] [-o OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bulkhead.errors import ConfigError, HostError

__all__ = ["FORMATS", "GUESTS_DIR", "LIB_SOURCES", "build", "cache_dir", "main"]

GUESTS_DIR = Path(__file__).resolve().parent
LIB_DIR = GUESTS_DIR / "lib"
LIB_SOURCES = ("entry.S", "lib.c", "bootinfo.c", "smp.c")
LIB_OTHER = ("guest.h", "guest.ld")
FORMATS = ("elf", "bzimage")
_SUFFIX = {"elf": "elf", "bzimage": "bzImage"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

CFLAGS = (
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-mcmodel=small",
    "-O2",
    "-Wall",
    "-Wextra",
    "-std=gnu11",
)
LDFLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=4096",
)


def cache_dir() -> Path:
    """The image cache directory ($BULKHEAD_CACHE or ~/.cache/bulkhead/guests); not created here."""
    env = os.environ.get("BULKHEAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bulkhead" / "guests"


def _resolve_program(program: str) -> Path:
    """Map a program name to its source. Raises ConfigError when it does not name an existing C file."""
    if os.path.isabs(program):
        path = Path(program)
    else:
        name = program if program.endswith(".c") else program + ".c"
        if not _NAME_RE.match(name):
            raise ConfigError(f"guest program name {program!r} must be a file name in {GUESTS_DIR}")
        path = GUESTS_DIR / name
    if path.suffix != ".c" or not path.is_file():
        raise ConfigError(f"guest program {program!r} is not an existing C source file")
    return path


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise HostError(
            f"{name} is not installed; install the Debian packages gcc and binutils to build guests"
        )
    return found


def _version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostError(f"cannot run {exe} --version: {exc}") from exc
    return out.stdout.splitlines()[0] if out.stdout else ""


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise ConfigError(f"guest build failed: {' '.join(cmd[:1] + cmd[-3:])}: {detail}")


def build(
    program: str,
    fmt: str = "elf",
    *,
    extra_sources: Sequence[Path] = (),
    cflags: Sequence[str] = (),
) -> Path:
    """Compile `program` with the guest library into an image of format `fmt`; return its cached path.

    `program` is a C file name in bulkhead/guests (".c" optional, e.g. "demo") or an absolute path.
    `fmt` is "elf" (ELF64: Linux 64-bit entry + PVH note) or "bzimage" (Linux boot protocol 2.15).
    Raises ConfigError for an unknown format, a missing source or a compile error, HostError when
    gcc or ld is missing.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"guest image format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    prog = _resolve_program(program)
    extras = [Path(p) for p in extra_sources]
    for extra in extras:
        if not extra.is_file() or extra.suffix not in (".c", ".S"):
            raise ConfigError(f"extra guest source {str(extra)!r} is not an existing .c or .S file")
    names = [prog.name, *(e.name for e in extras)]
    if len(set(names)) != len(names):
        raise ConfigError("guest program and extra source file names must be distinct")
    gcc = _tool("gcc")
    ld = _tool("ld")

    inputs: list[tuple[str, bytes]] = [
        (f"lib/{n}", (LIB_DIR / n).read_bytes()) for n in LIB_SOURCES + LIB_OTHER
    ]
    inputs.append((f"prog/{prog.name}", prog.read_bytes()))
    inputs += [(f"prog/{e.name}", e.read_bytes()) for e in extras]
    digest = _cache_key(fmt, cflags, gcc, ld, inputs)
    cache = cache_dir()
    out = cache / f"{prog.stem}-{digest[:32]}.{_SUFFIX[fmt]}"
    if out.is_file():
        return out
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(f"cannot create the guest cache directory {cache}: {exc}") from exc

    _compile(cache, out, inputs, names, gcc, cflags, fmt)
    return out


def _cache_key(fmt: str, cflags: Sequence[str], gcc: str, ld: str, inputs: list[tuple[str, bytes]]) -> str:
    """The image's cache key: every input byte, the flags, the tool versions and this builder's code."""
    key = hashlib.sha256()
    for part in (
        "bulkhead-guest-v1",
        fmt,
        "\0".join(cflags),
        _version(gcc),
        _version(ld),
        Path(__file__).read_text(),
        (GUESTS_DIR / "bzimage.py").read_text(),
    ):
        key.update(part.encode() + b"\0\0")
    for name, data in inputs:
        key.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return key.hexdigest()


def _compile(cache: Path, out: Path, inputs: list[tuple[str, bytes]], names: list[str], gcc: str,
             cflags: Sequence[str], fmt: str) -> None:
    """Compile and link in a private directory of the cache, then rename the image into place (atomic:
    a concurrent build of the same key finds a whole image or none)."""
    with tempfile.TemporaryDirectory(prefix="bh-guest-", dir=cache) as tmp:
        work = Path(tmp)
        (work / "lib").mkdir()
        (work / "prog").mkdir()
        (work / "obj").mkdir()
        for name, data in inputs:
            (work / name).write_bytes(data)
        objs: list[str] = []
        sources = [f"lib/{n}" for n in LIB_SOURCES] + [f"prog/{n}" for n in names]
        for i, src in enumerate(sources):
            obj = f"obj/{i:02d}-{Path(src).stem}.o"
            _run(
                [gcc, *CFLAGS, *cflags, f"-ffile-prefix-map={work}=.", "-Ilib", "-c", src, "-o", obj],
                work,
            )
            objs.append(obj)
        _run([gcc, *LDFLAGS, "-Wl,-T,lib/guest.ld", "-o", "image.elf", *objs], work)
        image = (work / "image.elf").read_bytes()
        if fmt == "bzimage":
            from bulkhead.guests.bzimage import make_bzimage

            image = make_bzimage(image)
        staged = work / "image.out"
        staged.write_bytes(image)
        os.replace(staged, out)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: build a guest and print (or copy to -o) the image path. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bulkhead.guests.build", description="Build a bulkhead guest."
    )
    parser.add_argument("program", help="C file in bulkhead/guests (e.g. demo) or an absolute path")
    parser.add_argument("--format", choices=FORMATS, default="elf")
    parser.add_argument("-o", "--output", help="copy the image here")
    args = parser.parse_args(argv)
    try:
        path = build(args.program, args.format)
        if args.output:
            shutil.copyfile(path, args.output)
            path = Path(args.output)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (HostError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
