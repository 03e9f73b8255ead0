"""Helpers for the red-team guests: build a payload from tests/redteam, boot it through the real
`bulkhead run --no-jail` command line with `--stats`, and read what the guest printed and what the
VMM recorded (exit reason, contained accesses, device counters, events)."""

from __future__ import annotations

import hashlib
import json
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulkhead.guests.build import build

REDTEAM = Path(__file__).resolve().parent
PAYLOADS = REDTEAM.parent / "payloads"
CACHE = REDTEAM.parent / ".build" / "guests"


def guest(name: str, *, virtio: bool = False) -> Path:
    """Build tests/redteam/NAME.c (or tests/payloads/NAME.c) with the guest library; with `virtio`,
    also with the payloads' virtio driver (tests/payloads/virtio_lib.c)."""
    src = REDTEAM / f"{name}.c"
    if not src.is_file():
        src = PAYLOADS / f"{name}.c"
    if not virtio:
        return build(str(src), "elf")
    digest = hashlib.sha256((PAYLOADS / "virtio.h").read_bytes()).hexdigest()[:16]
    return build(
        str(src),
        "elf",
        extra_sources=[PAYLOADS / "virtio_lib.c"],
        cflags=[f"-I{PAYLOADS}", f"-DBH_VIRTIO_H_DIGEST=0x{digest}"],
    )


@dataclass
class Result:
    status: int
    out: str
    err: str
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self, prefix: str = "") -> list[str]:
        return [ln.rstrip("\r") for ln in self.out.splitlines() if ln.startswith(prefix)]

    @property
    def passed(self) -> bool:
        return "PASS" in self.lines("PASS") and not self.lines("FAIL")

    @property
    def exit_kind(self) -> str | None:
        ex = self.stats.get("exit")
        return None if ex is None else str(ex["kind"])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.stats.get("events", []) if e.get("event") == name]

    def why(self) -> str:
        return f"status={self.status}\nstdout tail:\n{self.out[-1500:]}\nstderr tail:\n{self.err[-1500:]}"


class Vm:
    """One `bulkhead run --no-jail --stats` process (started at once; `wait()` collects it).

    With `jail=True`: `bulkhead run --stats` in its default, jailed mode (root only; the worker sends its
    counters over the worker protocol)."""

    def __init__(self, image: Path, *args: str, cmdline: str = "", mem: int = 64, jail: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bh-redteam-")
        self.stats_path = Path(self._tmp.name) / "stats.json"
        cmd = [sys.executable, "-m", "bulkhead", "run", *(() if jail else ("--no-jail",))]
        cmd += ["--kernel", str(image), "--mem", str(mem), "--cmdline", cmdline, *args]
        cmd += ["--stats", str(self.stats_path)]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._out = bytearray()

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """Read stdout until a line starting with `prefix` arrives. Raises TimeoutError."""
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        import os

        while time.monotonic() < deadline:
            for line in self._out.decode("ascii", "replace").splitlines():
                if line.startswith(prefix):
                    return line.rstrip("\r")
            if sel.select(timeout=0.2):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._out += chunk
        raise TimeoutError(f"no line starting with {prefix!r}; got {self._out[-500:]!r}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 120) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        seconds = time.monotonic() - self.start
        stats: dict[str, Any] = {}
        if self.stats_path.is_file():
            stats = json.loads(self.stats_path.read_text())
        self._tmp.cleanup()
        text = (bytes(self._out) + out).decode("ascii", "replace")
        return Result(self.proc.returncode, text, err.decode(errors="replace"), stats, seconds)


def boot(
    image: Path, *args: str, cmdline: str = "", mem: int = 64, timeout: float = 120, jail: bool = False
) -> Result:
    return Vm(image, *args, cmdline=cmdline, mem=mem, jail=jail).wait(timeout)


def declared(kind: str) -> list[tuple[int, int, str]]:
    """(base, length, name) of every declared `kind` (pio/mmio) surface, from the running code."""
    from bulkhead import surface

    try:
        entries = surface.collect()
    finally:
        surface.clear()
    return [(int(e["base"]), int(e["length"]), str(e["name"])) for e in entries if e["kind"] == kind]  # type: ignore[call-overload]


def inside(addr: int, width: int, ranges: list[tuple[int, int, str]]) -> str | None:
    """The name of the declared range holding [addr, addr+width), or None."""
    for base, length, name in ranges:
        if base <= addr and addr + width <= base + length:
            return name
    return None
