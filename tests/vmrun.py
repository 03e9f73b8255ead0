"""Helpers for tests that boot guests through the real `bulkhead run` command line."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bulkhead.guests.build import build

PAYLOADS = Path(__file__).resolve().parent / "payloads"


@dataclass
class Run:
    status: int
    out: str
    err: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.out.splitlines() if line.startswith(prefix)]


def payload(name: str, fmt: str = "elf") -> Path:
    """Build tests/payloads/<name>.c (cached) and return the image path."""
    return build(str(PAYLOADS / f"{name}.c"), fmt)


def run(*args: str, timeout: float = 60) -> Run:
    """Run `bulkhead run --no-jail ARGS` and capture what the guest printed on COM1."""
    cmd = [sys.executable, "-m", "bulkhead", "run", "--no-jail", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout, p.stderr)
