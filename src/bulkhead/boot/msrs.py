"""Boot-time MSR values for every vCPU (pure): what the runtime sets with KVM_SET_MSRS.

The syscall/sysenter MSRs, KERNEL_GS_BASE and the TSC start at 0 (the guest programs its own);
MISC_ENABLE turns on fast string operations (as real firmware does); MTRRdefType enables MTRRs
with write-back as the default memory type, so the guest does not run uncached.
"""

from __future__ import annotations

__all__ = [
    "MCE_BANKS_DEF",
    "MCG_CTL_P",
    "MCG_SER_P",
    "MSR_CSTAR",
    "MSR_IA32_MISC_ENABLE",
    "MSR_IA32_SYSENTER_CS",
    "MSR_IA32_SYSENTER_EIP",
    "MSR_IA32_SYSENTER_ESP",
    "MSR_IA32_TSC",
    "MSR_KERNEL_GS_BASE",
    "MSR_LSTAR",
    "MSR_MTRR_DEF_TYPE",
    "MSR_STAR",
    "MSR_SYSCALL_MASK",
    "boot_msrs",
    "mcg_cap_for",
]

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

# MCG_CAP (IA32_MCG_CAP, MSR 0x179) as QEMU configures it (target/i386/cpu.c mce_init with
# MCE_CAP_DEF = MCG_CTL_P | MCG_SER_P and MCE_BANKS_DEF = 10; target/i386/kvm/kvm.c masks it with
# KVM_X86_GET_MCE_CAP_SUPPORTED and sets it with KVM_X86_SETUP_MCE). LMCE is off, QEMU's default
# (its "lmce" CPU property is false). Without KVM_X86_SETUP_MCE, KVM leaves 32 banks (KVM_MAX_MCE_BANKS).
MCG_CTL_P = 1 << 8
MCG_SER_P = 1 << 24
MCG_BANKS_MASK = 0xFF
MCE_BANKS_DEF = 10

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WB = 6


def boot_msrs() -> list[tuple[int, int]]:
    """(MSR index, value) pairs to set on each vCPU before it first runs."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]


def mcg_cap_for(supported: int, max_banks: int) -> int:
    """The MCG_CAP to give every vCPU from KVM_X86_GET_MCE_CAP_SUPPORTED's flags and KVM_CAP_MCE's bank
    count (QEMU's rule: (MCG_CTL_P | MCG_SER_P) & supported, banks = min(max_banks, 10)); 0 means
    "no MCE emulation: leave KVM's default"."""
    banks = min(max_banks & MCG_BANKS_MASK, MCE_BANKS_DEF)
    if not banks:
        return 0
    return (supported & (MCG_CTL_P | MCG_SER_P)) | banks


def declare_surfaces() -> None:
    """Declare guest MSR access (see `bulkhead.surface`)."""
    from bulkhead.surface import declare

    declare(
        "msr",
        "msr-access",
        owner=__name__,
        boundary="guest-vmm",
        accepts="RDMSR/WRMSR of any index: handled by KVM in the host kernel (no user-space MSR "
        "exits are enabled, so bulkhead never sees them); MSRs KVM does not emulate raise #GP "
        "in the guest; boot values come from boot_msrs()",
        handler="KVM in-kernel MSR emulation; boot_msrs (KVM_SET_MSRS)",
        boot_msrs=[hex(i) for i, _ in boot_msrs()],
    )
