"""Per-vCPU CPUID filtering (pure): KVM_GET_SUPPORTED_CPUID's list in, the vCPU's table out.

Policy (what changes, and why):

- Leaf 0x1: ECX bit 31 (hypervisor present) set, so the guest knows it is virtualised and uses
  paravirtual clocks and the KVM leaves. EBX[31:24] = this vCPU's initial APIC id, EBX[23:16] =
  logical processor count (`cpus`), EBX[7:0] brand index 0. EDX bit 28 (HTT) set iff cpus > 1.
  ECX bit 5 (VMX) cleared: no nested virtualisation (a large attack surface we do not offer).
  EDX bit 18 (processor serial number) cleared.
- Leaf 0x3 (processor serial number): zeroed, it identifies the host part.
- Leaf 0x4 (cache topology): EAX[31:26] = cores per package - 1 = cpus - 1 (one thread per core),
  EAX[25:14] = logical processors sharing the cache - 1: 0 for L1/L2, cpus - 1 for L3 and beyond.
- Leaf 0x6 (thermal and power management): zeroed except EAX bit 2 (ARAT, APIC timer always
  running, which KVM emulates). Turbo/HWP/thermal capabilities describe the host's power
  management, are not emulated, and help fingerprint the host model.
- Leaf 0x7.0: EBX bit 2 (SGX), EBX bit 25 (Intel PT) and ECX bit 30 (SGX launch control) cleared,
  and leaves 0x12 (SGX) and 0x14 (Intel PT) zeroed: bulkhead exposes neither feature, and
  processor trace would leak timing of host activity.
- Leaf 0xA (architectural performance monitoring): zeroed. No vPMU: counters are a side channel
  on the host and another emulated surface.
- Leaves 0xB and 0x1F (x2APIC topology): regenerated for a package of `cpus` cores with one thread
  each: SMT level (1 logical processor, shift 0), core level (cpus logical processors, shift
  ceil(log2 cpus)), then an invalid level; EDX = x2APIC id = vCPU id in every subleaf.
- Leaf 0x16 (processor frequency): zeroed, it names the host's base and turbo frequencies.
- Leaves 0x40000000.. (KVM signature "KVMKVMKVM" and KVM features): kept as KVM reports them.
- Leaf 0x80000001: ECX bit 2 (SVM) cleared (no nested virtualisation).
- Leaves 0x80000002-0x80000004 (brand string): replaced by a policy string, default
  "bulkhead virtual CPU". The host's brand string names the exact host CPU model; a tenant has no
  need for it and it helps target host-specific attacks.
- AMD/Hygon only: leaf 0x80000008 ECX[7:0] = cpus - 1 (NC), ECX[15:12] = 0; leaf 0x8000001E
  reports extended APIC id = vCPU id, compute unit id = vCPU id, one thread per unit, node 0.
- Family/model/stepping (leaf 1 EAX) are kept: guests apply errata workarounds based on them, and
  hiding them breaks more than it protects (the instruction set already identifies the family).

Every register value is masked to 32 bits. Raises ConfigError for an impossible topology or a bad
brand string.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from bulkhead.errors import ConfigError

__all__ = [
    "DEFAULT_BRAND",
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    "MAX_VCPUS",
    "CpuidEntry",
    "brand_registers",
    "filter_cpuid",
]

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
DEFAULT_BRAND = "bulkhead virtual CPU"
MAX_VCPUS = 254  # xAPIC ids 0..253, one left for the I/O APIC
U32 = 0xFFFF_FFFF

L1_ECX_VMX = 1 << 5
L1_ECX_HYPERVISOR = 1 << 31
L1_EDX_PSN = 1 << 18
L1_EDX_HTT = 1 << 28
L6_EAX_ARAT = 1 << 2
L7_EBX_SGX = 1 << 2
L7_EBX_INTEL_PT = 1 << 25
L7_ECX_SGX_LC = 1 << 30
E1_ECX_SVM = 1 << 2
ZEROED_LEAVES = frozenset({0x3, 0xA, 0x12, 0x14, 0x16})
TOPOLOGY_LEAVES = (0xB, 0x1F)
BRAND_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)
AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


class CpuidEntry(NamedTuple):
    """One CPUID table entry, as in KVM's struct kvm_cpuid_entry2."""

    function: int
    index: int  # type: ignore[assignment]  # the KVM field name; shadows tuple.index
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def brand_registers(brand: str) -> list[tuple[int, int, int, int]]:
    """The (eax, ebx, ecx, edx) of leaves 0x80000002..4 for `brand` (NUL-padded to 48 bytes).

    Raises ConfigError unless the brand is printable ASCII of at most 47 characters.
    """
    if not brand.isascii() or not brand.isprintable() or len(brand) > 47:
        raise ConfigError("the CPU brand string must be printable ASCII of at most 47 characters")
    raw = brand.encode("ascii").ljust(48, b"\0")
    return [struct.unpack_from("<IIII", raw, 16 * i) for i in range(3)]


def _vendor(entries: dict[tuple[int, int], CpuidEntry]) -> bytes:
    leaf0 = entries.get((0, 0))
    if leaf0 is None:
        return b""
    return struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx)


def _topology(function: int, vcpu_id: int, cpus: int) -> list[CpuidEntry]:
    core_shift = (cpus - 1).bit_length()
    flag = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flag, 0, 1, 0 | (1 << 8), vcpu_id),
        CpuidEntry(function, 1, flag, core_shift, cpus, 1 | (2 << 8), vcpu_id),
        CpuidEntry(function, 2, flag, 0, 0, 2, vcpu_id),
    ]


def _filter_one(e: CpuidEntry, vcpu_id: int, cpus: int, amd: bool) -> CpuidEntry:
    f = e.function
    if f == 0x1:
        ebx = (e.ebx & 0x0000_FF00) | (cpus & 0xFF) << 16 | (vcpu_id & 0xFF) << 24
        ecx = (e.ecx | L1_ECX_HYPERVISOR) & ~L1_ECX_VMX
        edx = e.edx & ~(L1_EDX_PSN | L1_EDX_HTT)
        if cpus > 1:
            edx |= L1_EDX_HTT
        return e._replace(ebx=ebx, ecx=ecx & U32, edx=edx & U32)
    if f in ZEROED_LEAVES:
        return e._replace(eax=0, ebx=0, ecx=0, edx=0)
    if f == 0x4:
        if e.eax & 0x1F == 0:  # no more caches
            return e
        level = (e.eax >> 5) & 0x7
        sharing = cpus - 1 if level >= 3 else 0
        eax = (e.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (min(cpus - 1, 0x3F) << 26)
        return e._replace(eax=eax)
    if f == 0x6:
        return e._replace(eax=e.eax & L6_EAX_ARAT, ebx=0, ecx=0, edx=0)
    if f == 0x7 and e.index == 0:
        return e._replace(ebx=e.ebx & ~(L7_EBX_SGX | L7_EBX_INTEL_PT) & U32, ecx=e.ecx & ~L7_ECX_SGX_LC & U32)
    if f == 0x8000_0001:
        return e._replace(ecx=e.ecx & ~E1_ECX_SVM & U32)
    if amd and f == 0x8000_0008:
        return e._replace(ecx=(e.ecx & ~0xF0FF & U32) | ((cpus - 1) & 0xFF))
    if amd and f == 0x8000_001E:
        return e._replace(eax=vcpu_id, ebx=vcpu_id & 0xFF, ecx=0)
    return e


def filter_cpuid(
    supported: Iterable[CpuidEntry], vcpu_id: int, cpus: int, *, brand: str | None = None
) -> list[CpuidEntry]:
    """The CPUID table for vCPU `vcpu_id` of `cpus`, derived from KVM's supported list.

    `brand` None means DEFAULT_BRAND. Pure: the input is not modified. See the module docstring
    for the policy. Raises ConfigError unless 1 <= cpus <= MAX_VCPUS and 0 <= vcpu_id < cpus, or
    when the brand string is not printable ASCII of at most 47 characters.
    """
    if not 1 <= cpus <= MAX_VCPUS:
        raise ConfigError(f"a VM has 1 to {MAX_VCPUS} vCPUs, not {cpus}")
    if not 0 <= vcpu_id < cpus:
        raise ConfigError(f"vCPU id {vcpu_id} is outside 0..{cpus - 1}")
    brand_regs = brand_registers(DEFAULT_BRAND if brand is None else brand)

    table: dict[tuple[int, int], CpuidEntry] = {}
    for raw in supported:
        e = CpuidEntry(
            raw.function & U32,
            raw.index & U32,
            raw.flags & U32,
            raw.eax & U32,
            raw.ebx & U32,
            raw.ecx & U32,
            raw.edx & U32,
        )
        table.setdefault((e.function, e.index), e)
    amd = _vendor(table) in AMD_VENDORS
    max_ext = table[(0x8000_0000, 0)].eax if (0x8000_0000, 0) in table else 0

    out: list[CpuidEntry] = []
    topo_done: set[int] = set()
    for (function, _index), e in table.items():
        if function in TOPOLOGY_LEAVES:
            if function not in topo_done:
                topo_done.add(function)
                out.extend(_topology(function, vcpu_id, cpus))
            continue
        if function in BRAND_LEAVES:
            continue
        out.append(_filter_one(e, vcpu_id, cpus, amd))
    if max_ext >= BRAND_LEAVES[-1]:
        for leaf, (a, b, c, d) in zip(BRAND_LEAVES, brand_regs, strict=True):
            out.append(CpuidEntry(leaf, 0, 0, a, b, c, d))
    out.sort(key=lambda x: (x.function, x.index))
    return out


def declare_surfaces() -> None:
    """Declare the guest-visible CPUID table (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "cpuid",
        "cpuid-table",
        owner=__name__,
        boundary="guest-vmm",
        accepts="the CPUID instruction with any leaf/subleaf: answered by KVM from the table "
        "filter_cpuid built at boot (no exit to bulkhead); host brand string, serial number, "
        "frequency, PMU, SGX, PT and nested virtualisation are hidden, the hypervisor bit is set",
        handler="filter_cpuid (table set with KVM_SET_CPUID2)",
        fuzz="fuzz/fuzz_cpuid.py",
        policy_brand=DEFAULT_BRAND,
        hidden_leaves=[hex(x) for x in sorted(ZEROED_LEAVES)],
    )
