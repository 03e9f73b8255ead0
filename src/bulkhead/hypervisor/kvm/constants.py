"""ioctl request numbers, capabilities and exit reasons from linux/kvm.h (x86-64).

Every number here is checked against the real header in tests/test_kvm_structs.py.
"""

from __future__ import annotations

import ctypes

from bulkhead.hypervisor.kvm import structs as s

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


sz = ctypes.sizeof

# system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_X86_GET_MCE_CAP_SUPPORTED = _ior(0x9D, 8)  # __u64
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, sz(s.KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, sz(s.KvmIrqLevel))
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, sz(s.KvmCoalescedMmioZone))
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, sz(s.KvmCoalescedMmioZone))
KVM_IRQFD = _iow(0x76, sz(s.KvmIrqfd))
KVM_CREATE_PIT2 = _iow(0x77, sz(s.KvmPitConfig))
KVM_IOEVENTFD = _iow(0x79, sz(s.KvmIoeventfd))
KVM_ENABLE_CAP = _iow(0xA3, sz(s.KvmEnableCap))
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, sz(s.KvmRegs))
KVM_SET_REGS = _iow(0x82, sz(s.KvmRegs))
KVM_GET_SREGS = _ior(0x83, sz(s.KvmSregs))
KVM_SET_SREGS = _iow(0x84, sz(s.KvmSregs))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_SET_FPU = _iow(0x8D, sz(s.KvmFpu))
KVM_GET_LAPIC = _ior(0x8E, sz(s.KvmLapicState))
KVM_SET_LAPIC = _iow(0x8F, sz(s.KvmLapicState))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MP_STATE = _ior(0x98, sz(s.KvmMpState))
KVM_SET_MP_STATE = _iow(0x99, sz(s.KvmMpState))
KVM_X86_SETUP_MCE = _iow(0x9C, 8)  # __u64 mcg_cap

KVM_API_VERSION = 12

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_COALESCED_PIO = 162

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_COALESCED_MMIO_PAGE_OFFSET = 2
KVM_RUN_EXIT_OFFSET = 32  # offset of the exit union inside struct kvm_run

EXIT_REASON_NAMES = {
    v: k[len("KVM_EXIT_") :]
    for k, v in dict(globals()).items()
    if k.startswith("KVM_EXIT_") and isinstance(v, int) and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}
