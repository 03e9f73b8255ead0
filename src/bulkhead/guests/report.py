"""Parse the line-based output of bulkhead guest payloads (pure; format in tests/payloads/README.md).

Shared by the QEMU reference tests and bulkhead's own boot tests, so both assert the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["E820Entry", "GuestReport", "parse_report"]


@dataclass(frozen=True)
class E820Entry:
    """One memory-map entry as the guest saw it."""

    addr: int
    size: int
    type: int


@dataclass
class GuestReport:
    """Facts a payload printed. Fields stay None / empty when the matching line is absent."""

    lines: list[str] = field(default_factory=list)
    protocol: str | None = None
    cmdline: str | None = None
    e820_count: int | None = None
    e820: list[E820Entry] = field(default_factory=list)
    mptable: int | None = None  # address of the MP floating pointer, None if absent or "none"
    cpus: int | None = None
    mp_cpus: list[tuple[int, str]] = field(default_factory=list)  # (APIC id, "bsp" | "ap")
    apics: list[tuple[int, str]] = field(default_factory=list)  # APIC lines of smp.c
    cpus_up: int | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def usable_bytes(self) -> int:
        """Total size of the e820 entries of type 1 (usable RAM)."""
        return sum(e.size for e in self.e820 if e.type == 1)


def _int(text: str) -> int:
    return int(text, 0)


def parse_report(text: str) -> GuestReport:
    """Parse serial output (CRLF or LF line ends). Unknown lines are kept in `lines` only.

    Raises ValueError when a known line is malformed (a number that does not parse).
    """
    rep = GuestReport()
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        rep.lines.append(line)
        key, _, rest = line.partition(" ")
        words = rest.split()
        if key == "BOOT":
            for word in words:
                name, _, value = word.partition("=")
                if name == "protocol":
                    rep.protocol = value
        elif key == "CMDLINE":
            rep.cmdline = rest
        elif key == "E820_COUNT":
            rep.e820_count = _int(words[0])
        elif key == "E820" and len(words) >= 3:
            rep.e820.append(E820Entry(_int(words[0]), _int(words[1]), _int(words[2])))
        elif key == "MPTABLE" and words:
            rep.mptable = None if words[0] == "none" else _int(words[0])
        elif key == "CPUS" and words and words[0].isdigit():
            rep.cpus = int(words[0])
        elif key == "MPCPU" and len(words) >= 2:
            rep.mp_cpus.append((_int(words[0]), words[1]))
        elif key == "APIC" and words:
            rep.apics.append((_int(words[0]), words[1] if len(words) > 1 else ""))
        elif key == "CPUS_UP":
            rep.cpus_up = _int(words[0])
        elif line == "PASS":
            rep.passed = True
        elif key == "FAIL":
            rep.failures.append(rest)
    return rep
