"""Intel MP spec 1.4 table: checksums, entries, limits."""

from __future__ import annotations

import struct

import pytest

from bulkhead.boot.mptable import MAX_CPUS, build_mptable, mptable_size
from bulkhead.errors import ConfigError
from bulkhead.memory.layout import EBDA_START, IOAPIC_BASE, LAPIC_BASE

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(blob: bytes, base: int = EBDA_START) -> tuple[dict[str, int], list[bytes]]:
    """An independent MP table reader, checking what Linux's smp_check_mpc() checks."""
    assert blob[:4] == b"_MP_"
    assert sum(blob[:16]) % 256 == 0
    physptr, length16, spec = struct.unpack_from("<IBB", blob, 4)
    assert length16 == 1 and spec == 4
    assert blob[11] == 0  # feature1 = 0: a configuration table is present
    off = physptr - base
    sig, length, mspec, _chk, oem, prod, _oemptr, _oemsz, count, lapic, _res = struct.unpack_from(
        "<4sHBB8s12sIHHII", blob, off)
    assert sig == b"PCMP" and mspec == 4
    assert oem.isascii() and prod.isascii()
    assert sum(blob[off : off + length]) % 256 == 0
    entries = []
    pos = off + 44
    while pos < off + length:
        size = ENTRY_SIZES[blob[pos]]
        entries.append(blob[pos : pos + size])
        pos += size
    assert pos == off + length
    assert len(entries) == count
    return {"lapic": lapic, "length": length, "end": off + length}, entries


@pytest.mark.parametrize("cpus", [1, 2, 5, MAX_CPUS])
def test_mptable_entries(cpus: int) -> None:
    blob = build_mptable(cpus)
    assert len(blob) == mptable_size(cpus)
    assert EBDA_START + len(blob) <= 0xA0000
    hdr, entries = parse(blob)
    assert hdr["lapic"] == LAPIC_BASE
    procs = [e for e in entries if e[0] == 0]
    assert [p[1] for p in procs] == list(range(cpus))
    assert [p[3] for p in procs] == [3] + [1] * (cpus - 1)  # enabled, BSP flag only on APIC id 0
    buses = [e for e in entries if e[0] == 1]
    assert buses == [struct.pack("<BB6s", 1, 0, b"ISA   ")]
    ioapics = [e for e in entries if e[0] == 2]
    assert len(ioapics) == 1
    _, ioapic_id, ver, flags, addr = struct.unpack("<BBBBI", ioapics[0])
    assert (ioapic_id, ver, flags, addr) == (cpus, 0x14, 1, IOAPIC_BASE)
    assert ioapic_id not in [p[1] for p in procs]
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(t, irqtype, bus, srcirq, dst, pin) for t, irqtype, _f, bus, srcirq, dst, pin in ints] == [
        (3, 0, 0, i, cpus, i) for i in range(24)
    ]
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(irqtype, dest, lint) for _t, irqtype, _f, _b, _i, dest, lint in lints] == [(3, 0, 0), (1, 0xFF, 1)]


def test_mptable_limits() -> None:
    for bad in (0, -1, MAX_CPUS + 1, 255):
        with pytest.raises(ConfigError, match="the MP table supports 1 to 32 vCPUs, not"):
            build_mptable(bad)


def test_checksum_detects_corruption() -> None:
    blob = bytearray(build_mptable(2))
    blob[60] ^= 1  # first processor entry, inside the configuration table
    with pytest.raises(AssertionError):
        parse(bytes(blob))
