"""Fetch and cache Debian's x86-64 kernel for real-kernel tests (test helper; does I/O).

debian_bzimage() -> Path of Debian's /boot/vmlinuz-* (a bzImage), from the package that
    linux-image-amd64 depends on (resolved with apt-cache depends; apt-get update is tried once if
    the name cannot be resolved), fetched with apt-get download and unpacked with dpkg-deb -x.
debian_vmlinux() -> Path of the uncompressed vmlinux ELF, taken from the bzImage's xz payload
    (setup header payload_offset/payload_length) with Python's lzma.

Both are cached under /var/cache/bulkhead-tests (or ~/.cache/bulkhead-tests when that is not
writable) and written atomically, so concurrent test runs do not see half-written files.
KernelUnavailable is raised, with the reason, when apt cannot provide the package; tests skip on it.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

__all__ = ["KernelUnavailable", "cache_dir", "debian_bzimage", "debian_vmlinux", "xz_payload"]

META_PACKAGE = "linux-image-amd64"
_PKG_RE = re.compile(r"Depends:\s*(linux-image-\d[\w.+-]*-amd64)\s*$", re.MULTILINE)


class KernelUnavailable(Exception):
    """Debian's kernel package cannot be fetched here (no apt, no network, no such package)."""


def cache_dir() -> Path:
    for candidate in (Path("/var/cache/bulkhead-tests"), Path.home() / ".cache" / "bulkhead-tests"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise KernelUnavailable("no writable cache directory for the test kernel")


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise KernelUnavailable(f"{cmd[0]} is not installed")
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KernelUnavailable(f"{' '.join(cmd)} timed out") from exc


def _package_name() -> str:
    for attempt in range(2):
        out = _run(["apt-cache", "depends", META_PACKAGE])
        m = _PKG_RE.search(out.stdout)
        if m:
            return m.group(1)
        if attempt == 0:
            _run(["apt-get", "update"], timeout=900)
    raise KernelUnavailable(f"apt cannot resolve the kernel package {META_PACKAGE} depends on")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def debian_bzimage() -> Path:
    """Path of Debian's bzImage (downloaded and cached on first use). Raises KernelUnavailable."""
    cache = cache_dir()
    cached = sorted(cache.glob("vmlinuz-*"))
    if cached:
        return cached[-1]
    pkg = _package_name()
    with tempfile.TemporaryDirectory(dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        out = _run(["apt-get", "download", pkg], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if out.returncode != 0 or not debs:
            reason = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no .deb"]
            raise KernelUnavailable(f"apt-get download {pkg} failed: {reason[0]}")
        tree = tmp / "x"
        ext = _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        if ext.returncode != 0:
            raise KernelUnavailable(f"dpkg-deb -x failed: {ext.stderr.strip()}")
        found = sorted((tree / "boot").glob("vmlinuz-*"))
        if not found:
            raise KernelUnavailable(f"{pkg} has no /boot/vmlinuz-*")
        target = cache / found[0].name
        _atomic_write(target, found[0].read_bytes())
        return target


def xz_payload(bzimage: bytes) -> bytes:
    """The compressed payload of a bzImage, located by its setup header."""
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start : start + length]


def debian_vmlinux() -> Path:
    """Path of the uncompressed vmlinux ELF from Debian's bzImage (cached). Raises KernelUnavailable."""
    bz = debian_bzimage()
    target = bz.with_name(bz.name.replace("vmlinuz-", "vmlinux-", 1))
    if target.exists():
        return target
    payload = xz_payload(bz.read_bytes())
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = dec.decompress(payload)  # the 4 bytes after the xz stream (the size) land in unused_data
    if not dec.eof or not elf.startswith(b"\x7fELF"):
        raise KernelUnavailable(f"{bz.name} does not carry an xz-compressed vmlinux")
    _atomic_write(target, elf)
    return target
