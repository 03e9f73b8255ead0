"""CPUID filtering: hypervisor bit, topology, masking, brand policy."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.boot.cpuid import DEFAULT_BRAND, CpuidEntry, filter_cpuid
from bulkhead.errors import ConfigError


def regs(s: str) -> tuple[int, int, int]:
    b = s.encode()
    return struct.unpack("<III", b)  # type: ignore[return-value]


def host(vendor: str = "GenuineIntel") -> list[CpuidEntry]:
    ebx, edx, ecx = regs(vendor)
    brand = b"Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\0\0\0"
    b = [struct.unpack_from("<IIII", brand, 16 * i) for i in range(3)]
    return [
        CpuidEntry(0, 0, 0, 0x1F, ebx, ecx, edx),
        CpuidEntry(1, 0, 0, 0x000606A6, 0x0B_40_08_00 | (7 << 24), 0xFFFA3223 | (1 << 5), 0x1F8BFBFF | (1 << 18)),
        CpuidEntry(3, 0, 0, 1, 2, 3, 4),
        CpuidEntry(4, 0, 1, 0x1C004121, 0x01C0003F, 0x3F, 0),
        CpuidEntry(4, 1, 1, 0x1C004122, 0x01C0003F, 0x3F, 0),
        CpuidEntry(4, 3, 1, 0x1C03C163, 0x02C0003F, 0xBFFF, 4),
        CpuidEntry(4, 4, 1, 0, 0, 0, 0),
        CpuidEntry(6, 0, 0, 0x77, 2, 9, 0),
        CpuidEntry(7, 0, 1, 0, 0xD39FFFFF, 0x40000000 | 0x8, 0xBC000400),
        CpuidEntry(0xA, 0, 0, 0x07300805, 0, 0, 0x603),
        CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 7),
        CpuidEntry(0xB, 1, 1, 6, 0x40, 0x201, 7),
        CpuidEntry(0x12, 0, 1, 1, 0, 0, 0),
        CpuidEntry(0x16, 0, 0, 2900, 3500, 100, 0),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, *regs("KVMKVMKVM\0\0\0")),
        CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0),
        CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, 0x121 | 4, 0x2C100800),
        *[CpuidEntry(0x80000002 + i, 0, 0, *b[i]) for i in range(3)],
        CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x55, 0),
    ]


def get(table: list[CpuidEntry], f: int, i: int = 0) -> CpuidEntry:
    [e] = [x for x in table if x.function == f and x.index == i]
    return e


def brand_of(table: list[CpuidEntry]) -> str:
    raw = b"".join(struct.pack("<IIII", *(lambda e: (e.eax, e.ebx, e.ecx, e.edx))(get(table, 0x80000002 + i)))
                   for i in range(3))
    return raw.rstrip(b"\0").decode()


@pytest.mark.parametrize(("vcpu", "cpus"), [(0, 1), (0, 2), (1, 2), (3, 4)])
def test_leaf1_and_topology(vcpu: int, cpus: int) -> None:
    t = filter_cpuid(host(), vcpu, cpus)
    l1 = get(t, 1)
    assert l1.ecx >> 31 == 1  # hypervisor
    assert not l1.ecx & (1 << 5)  # no VMX
    assert l1.ebx >> 24 == vcpu
    assert (l1.ebx >> 16) & 0xFF == cpus
    assert (l1.ebx >> 8) & 0xFF == 8  # CLFLUSH line size kept
    assert bool(l1.edx & (1 << 28)) == (cpus > 1)
    assert not l1.edx & (1 << 18)
    assert l1.eax == 0x000606A6
    # x2APIC topology
    b = [get(t, 0xB, i) for i in range(3)]
    assert all(e.edx == vcpu for e in b)
    assert (b[0].eax & 0x1F, b[0].ebx & 0xFFFF, (b[0].ecx >> 8) & 0xFF) == (0, 1, 1)
    assert (b[1].eax & 0x1F, b[1].ebx & 0xFFFF, (b[1].ecx >> 8) & 0xFF) == ((cpus - 1).bit_length(), cpus, 2)
    assert (b[2].ecx >> 8) & 0xFF == 0 and b[2].ecx & 0xFF == 2
    assert all(e.flags & 1 for e in b)
    # the x2APIC id space at the core level must hold every vCPU id
    assert cpus <= 1 << (b[1].eax & 0x1F)
    # deterministic cache parameters
    for idx, sharing in ((0, 0), (1, 0), (3, cpus - 1)):
        e = get(t, 4, idx)
        assert e.eax >> 26 == cpus - 1
        assert (e.eax >> 14) & 0xFFF == sharing
        assert e.eax & 0x3FFF == get(host(), 4, idx).eax & 0x3FFF
    assert get(t, 4, 4).eax == 0


def test_masked_leaves() -> None:
    t = filter_cpuid(host(), 0, 2)
    assert get(t, 0xA) == CpuidEntry(0xA, 0, 0, 0, 0, 0, 0)
    assert get(t, 3) == CpuidEntry(3, 0, 0, 0, 0, 0, 0)
    assert get(t, 0x16) == CpuidEntry(0x16, 0, 0, 0, 0, 0, 0)
    assert (get(t, 0x12).eax, get(t, 0x12).ebx) == (0, 0)
    assert get(t, 6) == CpuidEntry(6, 0, 0, 0x4, 0, 0, 0)  # only ARAT left
    l7 = get(t, 7)
    assert not l7.ebx & ((1 << 2) | (1 << 25))
    assert not l7.ecx & (1 << 30)
    assert l7.ecx & 0x8 and l7.ebx & 1  # unrelated bits untouched
    assert not get(t, 0x80000001).ecx & 4
    assert get(t, 0x80000001).ecx & 0x121 == 0x121
    # KVM leaves kept verbatim
    assert get(t, 0x40000000) == get(host(), 0x40000000)
    assert get(t, 0x40000001) == get(host(), 0x40000001)
    # Intel: 0x80000008 ECX untouched
    assert get(t, 0x80000008).ecx == 0x55


def test_brand_string_policy() -> None:
    assert "Xeon" in brand_of(host())
    assert brand_of(filter_cpuid(host(), 0, 1)) == DEFAULT_BRAND
    assert brand_of(filter_cpuid(host(), 0, 1, brand="ACME vCPU")) == "ACME vCPU"
    for bad in ("x" * 48, "caf\u00e9", "bad\nbrand"):
        with pytest.raises(ConfigError, match="the CPU brand string must be printable ASCII of at most 47"):
            filter_cpuid(host(), 0, 1, brand=bad)
    # no extended brand leaves when the max extended leaf does not reach them
    small = [e for e in host() if e.function != 0x80000000] + [CpuidEntry(0x80000000, 0, 0, 0x80000001, 0, 0, 0)]
    t = filter_cpuid([e for e in small if not 0x80000002 <= e.function <= 0x80000004], 0, 1)
    assert not [e for e in t if 0x80000002 <= e.function <= 0x80000004]


def test_amd_topology_leaves() -> None:
    h = [*host("AuthenticAMD"), CpuidEntry(0x8000001E, 0, 0, 0x55, 0x0107, 0x0300, 0)]
    t = filter_cpuid(h, 1, 2)
    assert get(t, 0x80000008).ecx & 0xFF == 1
    assert (get(t, 0x80000008).ecx >> 12) & 0xF == 0
    e = get(t, 0x8000001E)
    assert (e.eax, e.ebx, e.ecx) == (1, 1, 0)


def test_pure_and_masked() -> None:
    src = host()
    before = list(src)
    filter_cpuid(src, 0, 2)
    assert src == before
    noisy = [CpuidEntry(1, 0, 0, 1 << 40, 1 << 33, -1, 0)]
    [l1] = filter_cpuid(noisy, 0, 1)
    assert all(0 <= v <= 0xFFFF_FFFF for v in (l1.eax, l1.ebx, l1.ecx, l1.edx))


def test_bad_topology() -> None:
    for vcpu, cpus, why in ((0, 0, "a VM has 1 to 254 vCPUs, not 0"), (2, 2, r"vCPU id 2 is outside 0\.\.1"),
                            (-1, 2, r"vCPU id -1 is outside 0\.\.1"), (0, 255, "a VM has 1 to 254 vCPUs, not 255")):
        with pytest.raises(ConfigError, match=why):
            filter_cpuid(host(), vcpu, cpus)


U32S = st.integers(0, (1 << 32) - 1)
LEAVES = st.sampled_from([0, 1, 3, 4, 6, 7, 0xA, 0xB, 0xD, 0x1F, 0x16, 0x40000000, 0x80000000, 0x80000001,
                          0x80000002, 0x80000008, 0x8000001E])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.builds(CpuidEntry, LEAVES, st.integers(0, 4), st.integers(0, 1), U32S, U32S, U32S, U32S),
             max_size=40),
    st.integers(1, 8).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
)
def test_filter_properties(entries: list[CpuidEntry], vcpu_cpus: tuple[int, int]) -> None:
    vcpu, cpus = vcpu_cpus
    out = filter_cpuid(entries, vcpu, cpus)
    keys = [(e.function, e.index) for e in out]
    assert len(keys) == len(set(keys))
    assert keys == sorted(keys)
    for e in out:
        assert all(0 <= v <= 0xFFFF_FFFF for v in (e.eax, e.ebx, e.ecx, e.edx))
        if e.function == 1:
            assert e.ecx >> 31 == 1 and e.ebx >> 24 == vcpu and not e.ecx & (1 << 5)
        if e.function in (0xB, 0x1F):
            assert e.edx == vcpu
        if e.function == 0xA:
            assert (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0)
