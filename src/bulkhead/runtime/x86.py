"""Turn a BootPlan into KVM vCPU state: registers, segments, FPU, MSRs, CPUID, LAPIC.

Edge code (it calls vCPU ioctls), but every value comes from the pure boot package.
"""

from __future__ import annotations

import struct
from typing import Any

from bulkhead.hypervisor.kvm import constants as c
from bulkhead.hypervisor.kvm import structs as s
from bulkhead.hypervisor.kvm.system import Vcpu

__all__ = ["setup_vcpu"]

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _segment(desc: Any) -> s.KvmSegment:
    seg = s.KvmSegment()
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl"):
        setattr(seg, name, int(getattr(desc, name)))
    seg.unusable = int(getattr(desc, "unusable", 0))
    return seg


def _set_lint(lapic: s.KvmLapicState) -> None:
    raw = memoryview(lapic.regs).cast("B")
    for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (val,) = struct.unpack_from("<I", raw, off)
        struct.pack_into("<I", raw, off, (val & ~0x700) | (mode << 8))


def setup_vcpu(
    vcpu: Vcpu,
    plan: Any,
    cpuid: list[tuple[int, int, int, int, int, int, int]],
    msrs: list[tuple[int, int]],
    *,
    boot_cpu: bool,
    mcg_cap: int = 0,
) -> list[int]:
    """Program one vCPU. The boot CPU gets the plan's entry state; APs keep their reset state and wait for
    INIT/SIPI from the guest, as on real hardware. `mcg_cap` (bulkhead.boot.msrs.mcg_cap_for) is set
    with KVM_X86_SETUP_MCE when non-zero, before CPUID and MSRs (QEMU's order, kvm_arch_init_vcpu).
    FPU: FCW 0x37f and MXCSR 0x1f80, the x87/SSE reset values (Intel SDM vol. 1 8.1.5, 10.2.3.1), as
    Firecracker (arch/x86_64/regs.rs setup_fpu) and QEMU (x86_cpu_reset) hand over."""
    if mcg_cap:
        vcpu.setup_mce(mcg_cap)
    vcpu.set_cpuid(cpuid)
    refused = apply_msrs(vcpu, msrs)
    fpu = s.KvmFpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    _set_lint(lapic)
    vcpu.set_lapic(lapic)
    if not boot_cpu:
        return refused
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        setattr(sregs, name, _segment(getattr(plan, name)))
    sregs.gdt.base, sregs.gdt.limit = plan.gdt
    sregs.idt.base, sregs.idt.limit = plan.idt
    sregs.cr0 = plan.cr0
    sregs.cr3 = plan.cr3
    sregs.cr4 = plan.cr4
    sregs.efer = plan.efer
    vcpu.set_sregs(sregs)
    regs = s.KvmRegs()
    regs.rip = plan.rip
    regs.rsp = plan.rsp
    regs.rbp = plan.rsp
    regs.rsi = plan.rsi
    regs.rbx = plan.rbx
    regs.rflags = plan.rflags
    vcpu.set_regs(regs)
    if vcpu.get_mp_state() != c.KVM_MP_STATE_RUNNABLE:
        vcpu.set_mp_state(c.KVM_MP_STATE_RUNNABLE)
    return refused


def apply_msrs(vcpu: Vcpu, msrs: list[tuple[int, int]]) -> list[int]:
    """Set every MSR KVM accepts; return the indices it refused (Vcpu.set_msrs_each). (Filtering by
    KVM_GET_MSR_INDEX_LIST instead silently dropped MSRs KVM emulates but does not list, such as MTRRdefType.)"""
    return vcpu.set_msrs_each(msrs)
