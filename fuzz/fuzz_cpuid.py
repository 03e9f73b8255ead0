"""atheris harness for the CPUID filter (bulkhead.boot.cpuid.filter_cpuid): the table KVM reports
(host-derived, so partly host-controlled) in, the guest-visible table out.

Input: byte 0 -> cpus (1..8), byte 1 -> vCPU id (mod cpus); then 28-byte records, each one
kvm_cpuid_entry2 (function, index, flags, eax, ebx, ecx, edx as little-endian u32). A crash is any
exception other than ConfigError, or an output that breaks the policy: the host brand string visible,
the hypervisor bit clear, VMX/SVM offered, a zeroed leaf non-zero, a value over 32 bits, or
APIC id / logical count not this vCPU's.

Run: .venv/bin/python fuzz/fuzz_cpuid.py -max_total_time=60 /tmp/bh-fuzz/cpuid fuzz/corpus/cpuid
Regenerate the seeds: .venv/bin/python fuzz/fuzz_cpuid.py --write-seeds
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.boot.cpuid import (
        BRAND_LEAVES,
        E1_ECX_SVM,
        L1_ECX_HYPERVISOR,
        L1_ECX_VMX,
        ZEROED_LEAVES,
        CpuidEntry,
        brand_registers,
        filter_cpuid,
    )
    from bulkhead.errors import ConfigError

REC = struct.Struct("<7I")
POLICY = brand_registers("bulkhead virtual CPU")


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    cpus = data[0] % 8 + 1
    vcpu = data[1] % cpus
    entries = [CpuidEntry(*REC.unpack_from(data, o)) for o in range(2, len(data) - REC.size + 1, REC.size)]
    try:
        out = filter_cpuid(entries, vcpu, cpus)
    except ConfigError:
        return
    seen = set()
    for e in out:
        for v in (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx):
            if not 0 <= v <= 0xFFFF_FFFF:
                raise AssertionError(f"value over 32 bits in {e}")
        seen.add((e.function, e.index))
        if e.function == 1:
            if not e.ecx & L1_ECX_HYPERVISOR or e.ecx & L1_ECX_VMX:
                raise AssertionError(f"leaf 1 ECX policy broken: {e}")
            if e.ebx >> 24 != vcpu or (e.ebx >> 16) & 0xFF != cpus:
                raise AssertionError(f"leaf 1 EBX topology wrong: {e}")
        if e.function in ZEROED_LEAVES and (e.eax or e.ebx or e.ecx or e.edx):
            raise AssertionError(f"leaf {e.function:#x} not zeroed: {e}")
        if e.function == 0x8000_0001 and e.ecx & E1_ECX_SVM:
            raise AssertionError("SVM offered")
        if e.function in BRAND_LEAVES and (e.eax, e.ebx, e.ecx, e.edx) != POLICY[e.function - BRAND_LEAVES[0]]:
            raise AssertionError(f"brand leaf {e.function:#x} is not the policy string: {e}")
    if len(seen) != len(out):
        raise AssertionError("duplicate (function, index) in the output table")


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    host = [
        (0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65),  # AuthenticAMD, max leaf 0xd
        (1, 0, 0, 0xA10F11, 0x00100800, 0x7EF8320B, 0x178BFBFF),
        (3, 0, 0, 1, 2, 3, 4),
        (4, 0, 1, 0x121, 0x1C0003F, 0x3F, 0),
        (4, 3, 1, 0x163, 0x3C0003F, 0x3FFF, 6),
        (6, 0, 0, 0x77, 2, 9, 0),
        (7, 0, 1, 0, 0xF1BF03AB | 4 | (1 << 25), 0x5F46 | (1 << 30), 0),
        (0xB, 0, 1, 1, 2, 0x100, 3),
        (0x16, 0, 0, 2600, 3700, 100, 0),
        (0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0),
        (0x8000_0001, 0, 0, 0, 0, 0x75C237FF, 0x2FD3FBFF),
        (0x8000_0002, 0, 0, 0x20444D41, 0x43595045, 0, 0),
        (0x8000_0008, 0, 0, 0x3030, 0, 0x7007, 0),
    ]
    body = b"".join(REC.pack(*e) for e in host)
    (directory / "amd_host_2cpu").write_bytes(bytes([1, 1]) + body)
    (directory / "amd_host_1cpu").write_bytes(bytes([0, 0]) + body)
    (directory / "intel_vendor").write_bytes(
        bytes([3, 2]) + REC.pack(0, 0, 0, 0x16, 0x756E6547, 0x6C65746E, 0x49656E69) + body[REC.size :]
    )


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "cpuid")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
