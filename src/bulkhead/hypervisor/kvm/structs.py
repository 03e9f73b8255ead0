"""ctypes mirrors of the x86-64 structures in linux/kvm.h and asm/kvm.h.

Sizes and field offsets are asserted against the real headers (compiled with gcc) in
tests/test_kvm_structs.py, so a mistake here fails CI instead of corrupting vCPU state.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

__all__ = [
    "KvmCoalescedMmio",
    "KvmCoalescedMmioRing",
    "KvmCoalescedMmioZone",
    "KvmCpuidEntry2",
    "KvmDtable",
    "KvmEnableCap",
    "KvmFpu",
    "KvmIoeventfd",
    "KvmIrqLevel",
    "KvmIrqfd",
    "KvmLapicState",
    "KvmMpState",
    "KvmMsrEntry",
    "KvmPitConfig",
    "KvmRegs",
    "KvmRunHeader",
    "KvmSegment",
    "KvmSregs",
    "KvmUserspaceMemoryRegion",
    "cpuid2_type",
    "msrs_type",
]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


def cpuid2_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for n entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", KvmCpuidEntry2 * n)]

    return KvmCpuid2


def msrs_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for n entries."""

    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * n)]

    return KvmMsrs


def msr_list_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_msr_list with room for n indices."""

    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]

    return KvmMsrList


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmIrqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class KvmCoalescedMmioZone(ctypes.Structure):
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class KvmCoalescedMmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("len", c_uint32), ("pio", c_uint32), ("data", c_uint8 * 8)]


class KvmCoalescedMmioRing(ctypes.Structure):
    _fields_ = [("first", c_uint32), ("last", c_uint32)]  # followed by KvmCoalescedMmio entries


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class KvmRunHeader(ctypes.Structure):
    """The fixed head of struct kvm_run; the exit union starts at offset 32."""

    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
    ]
