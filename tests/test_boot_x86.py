"""Identity page tables, GDT descriptor bits, segments, boot MSRs."""

from __future__ import annotations

import struct

from bulkhead.boot import layout as L
from bulkhead.boot.msrs import boot_msrs
from bulkhead.boot.x86 import build_gdt, build_page_tables, gdt_entry, segment_from_descriptor, segments_for


def q(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", buf, off)[0])


def walk(pt: bytes, base: int, vaddr: int) -> int:
    """Translate `vaddr` through tables written at `base` (page walk as the MMU does it)."""
    pml4e = q(pt, ((vaddr >> 39) & 0x1FF) * 8)
    assert pml4e & 1
    pdpte = q(pt, (pml4e & ~0xFFF) - base + ((vaddr >> 30) & 0x1FF) * 8)
    assert pdpte & 1
    assert not pdpte & 0x80
    pde = q(pt, (pdpte & ~0xFFF) - base + ((vaddr >> 21) & 0x1FF) * 8)
    assert pde & 1 and pde & 2 and pde & 0x80
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (vaddr & 0x1FFFFF)


def test_page_tables_identity_map_4g() -> None:
    pt = build_page_tables(L.PML4_START)
    assert len(pt) == L.PAGE_TABLES_END - L.PML4_START
    assert q(pt, 0) == L.PDPTE_START | 3
    for i in range(4):
        assert q(pt, 0x1000 + 8 * i) == (L.PDE_START + 0x1000 * i) | 3
    assert q(pt, 0x1000 + 8 * 4) == 0  # nothing above 4 GiB
    assert q(pt, 8) == 0  # single PML4 entry
    for addr in (0, 0x1234, 0x20_0000, 0x123_4567, 0xBFFF_FFFF, 0xFEE0_0000, 0xFFFF_FFFF):
        assert walk(pt, L.PML4_START, addr) == addr
    # every one of the 2048 PD entries maps the next 2 MiB
    for n in range(2048):
        assert q(pt, 0x2000 + 8 * n) == (n << 21) | 0x83


def test_gdt_descriptor_bits() -> None:
    gdt = build_gdt()
    assert len(gdt) == 8 * L.GDT_ENTRIES
    assert q(gdt, 0) == 0
    assert q(gdt, L.SEL_CODE64) == 0x00AF9B000000FFFF  # 64-bit code: L=1, D=0, G=1, P, S, type 0xb
    assert q(gdt, L.SEL_CODE32) == 0x00CF9B000000FFFF  # 32-bit flat code: D=1, G=1
    assert q(gdt, L.SEL_DATA) == 0x00CF93000000FFFF  # flat data: read/write, accessed
    tss = q(gdt, L.SEL_TSS)
    assert (tss >> 40) & 0xF == 0xB and (tss >> 47) & 1 and not (tss >> 44) & 1
    assert tss == 0x008F8B000000FFFF  # G=1, limit 0xfffff, base 0 (Firecracker's gdt.rs)
    assert q(gdt, L.SEL_TSS + 8) == 0


def test_gdt_entry_roundtrip_base_limit() -> None:
    d = gdt_entry(0xC093, 0x12345678, 0xABCDE)
    s = segment_from_descriptor(0x18, d)
    assert s.base == 0x12345678
    assert s.limit == (0xABCDE << 12) | 0xFFF
    d2 = gdt_entry(0x0093, 0x12345678, 0xABCDE)
    assert segment_from_descriptor(0x18, d2).limit == 0xABCDE


def test_segments_long_and_protected() -> None:
    lm = segments_for(True)
    assert lm["cs"].selector == 0x10 and lm["cs"].l == 1 and lm["cs"].db == 0 and lm["cs"].type == 0xB
    pm = segments_for(False)
    assert pm["cs"].selector == 0x08 and pm["cs"].l == 0 and pm["cs"].db == 1
    for segs in (lm, pm):
        for name in ("ds", "es", "fs", "gs", "ss"):
            s = segs[name]
            assert (s.selector, s.base, s.limit, s.type, s.present, s.s, s.db, s.g) == (
                0x18, 0, 0xFFFF_FFFF, 3, 1, 1, 1, 1)
        assert segs["cs"].limit == 0xFFFF_FFFF and segs["cs"].present == 1 and segs["cs"].s == 1
        tr = segs["tr"]
        # Firecracker's boot TSS descriptor (gdt_entry(0x808b, 0, 0xfffff)): base 0, 4 GiB, busy TSS
        assert (tr.selector, tr.type, tr.s, tr.present, tr.base, tr.g, tr.limit) == (
            0x20, 0xB, 0, 1, 0, 1, 0xFFFF_FFFF)


def test_boot_msrs() -> None:
    msrs = dict(boot_msrs())
    assert msrs[0x1A0] & 1  # fast strings
    assert msrs[0x2FF] == (1 << 11) | 6  # MTRRs on, default write-back
    for idx in (0x10, 0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102):
        assert msrs[idx] == 0
    assert len(msrs) == len(boot_msrs())  # no duplicates


def test_mcg_cap_follows_qemu() -> None:
    from bulkhead.boot.msrs import MCG_CTL_P, MCG_SER_P, mcg_cap_for

    lmce = 1 << 27
    # this machine's KVM: flags CTL_P | SER_P, KVM_CAP_MCE = 32 banks -> QEMU's 0x100010a
    assert mcg_cap_for(MCG_CTL_P | MCG_SER_P, 32) == 0x100010A
    assert mcg_cap_for(MCG_CTL_P | MCG_SER_P | lmce, 32) == 0x100010A  # LMCE stays off (QEMU's default)
    assert mcg_cap_for(MCG_CTL_P, 6) == MCG_CTL_P | 6  # fewer banks than 10: all of them
    assert mcg_cap_for(0, 0) == 0  # no MCE emulation: leave KVM alone
