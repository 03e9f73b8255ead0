"""Kvm (the /dev/kvm system handle), Vm and Vcpu objects over ioctls. The only code that touches /dev/kvm.

ioctls go through libc's ioctl via ctypes (the call releases the GIL, so vCPU threads run in parallel
with the I/O thread). Errors become HostError with the ioctl's name and errno text; a missing or
inaccessible /dev/kvm, a wrong API version or a missing capability is one clear sentence.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Sequence

from bulkhead.errors import HostError
from bulkhead.hypervisor.kvm import constants as c
from bulkhead.hypervisor.kvm import structs as s

__all__ = ["REQUIRED_CAPS", "Kvm", "Vcpu", "Vm"]

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library would spawn ldconfig
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int

# Capabilities the VMM relies on, with what they are for (named in the error when missing).
REQUIRED_CAPS: dict[int, str] = {
    c.KVM_CAP_USER_MEMORY: "USER_MEMORY (guest RAM from anonymous mappings)",
    c.KVM_CAP_IRQCHIP: "IRQCHIP (in-kernel LAPIC/IOAPIC/PIC)",
    c.KVM_CAP_PIT2: "PIT2 (in-kernel timer)",
    c.KVM_CAP_IOEVENTFD: "IOEVENTFD (queue notifications without a userspace exit)",
    c.KVM_CAP_IRQFD: "IRQFD (interrupts from the I/O thread)",
    c.KVM_CAP_EXT_CPUID: "EXT_CPUID (CPUID filtering)",
    c.KVM_CAP_MP_STATE: "MP_STATE (SMP bring-up and halt detection)",
    c.KVM_CAP_IMMEDIATE_EXIT: "IMMEDIATE_EXIT (stopping vCPUs promptly)",
}


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise HostError(f"KVM {what} failed: {os.strerror(err)} (errno {err})")
    return ret


class _Fd:
    """An owned file descriptor with ioctl helpers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ioctl(self, request: int, arg: object = 0, what: str = "") -> int:
        if isinstance(arg, ctypes.Structure | ctypes.Array | ctypes._SimpleCData):
            ret = _ioctl(self.fd, ctypes.c_ulong(request), ctypes.byref(arg))
        else:
            ret = _ioctl(self.fd, ctypes.c_ulong(request), ctypes.c_ulong(int(arg)))  # type: ignore[call-overload]
        return _check(ret, what or hex(request))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd


class Kvm(_Fd):
    """The KVM system handle. Opening it checks the API version and every required capability."""

    def __init__(self, path: str = "/dev/kvm", *, required: dict[int, str] | None = None) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd or enable nested virtualization)"
            ) from None
        except PermissionError:
            raise HostError(
                f"{path} is not accessible to uid {os.getuid()}: run as root or add the user to the kvm group"
            ) from None
        except OSError as exc:
            raise HostError(f"cannot open {path}: {exc.strerror}") from None
        super().__init__(fd)
        version = _ioctl(fd, ctypes.c_ulong(c.KVM_GET_API_VERSION), ctypes.c_ulong(0))
        if version != c.KVM_API_VERSION:
            self.close()
            raise HostError(f"{path} speaks KVM API version {version}, bulkhead needs {c.KVM_API_VERSION}")
        req = REQUIRED_CAPS if required is None else required
        missing = [name for cap, name in req.items() if self.check_extension(cap) <= 0]
        if missing:
            self.close()
            raise HostError("KVM lacks capabilities bulkhead needs: " + "; ".join(missing))
        self.vcpu_mmap_size = self.ioctl(c.KVM_GET_VCPU_MMAP_SIZE, 0, "GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        return int(_ioctl(self.fd, ctypes.c_ulong(c.KVM_CHECK_EXTENSION), ctypes.c_ulong(cap)))

    def max_vcpus(self) -> int:
        n = self.check_extension(c.KVM_CAP_MAX_VCPUS)
        return n if n > 0 else max(self.check_extension(c.KVM_CAP_NR_VCPUS), 1)

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        n = 64
        while n <= 4096:
            buf = s.cpuid2_type(n)()
            buf.nent = n
            ret = _ioctl(self.fd, ctypes.c_ulong(c.KVM_GET_SUPPORTED_CPUID), ctypes.byref(buf))
            if ret >= 0:
                return [
                    (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[: buf.nent]
                ]
            if ctypes.get_errno() != errno.E2BIG:
                _check(ret, "GET_SUPPORTED_CPUID")
            n *= 2
        raise HostError("KVM GET_SUPPORTED_CPUID returned too many entries")

    def mce_cap_supported(self) -> tuple[int, int]:
        """(MCG_CAP flag bits KVM can emulate (KVM_X86_GET_MCE_CAP_SUPPORTED), maximum bank count
        (KVM_CHECK_EXTENSION(KVM_CAP_MCE))); (0, 0) when the host has no KVM_CAP_MCE. Raises HostError."""
        banks = self.check_extension(c.KVM_CAP_MCE)
        if banks <= 0:
            return 0, 0
        value = ctypes.c_uint64(0)
        self.ioctl(c.KVM_X86_GET_MCE_CAP_SUPPORTED, value, "X86_GET_MCE_CAP_SUPPORTED")
        return int(value.value), banks

    def create_vm(self) -> Vm:
        fd = self.ioctl(c.KVM_CREATE_VM, 0, "CREATE_VM")
        return Vm(self, fd)


class Vm(_Fd):
    """One KVM VM: memory slots, irqchip, PIT, ioeventfds, irqfds, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        os.set_inheritable(fd, False)
        self.kvm = kvm
        self._slot = 0
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(self, guest_phys: int, size: int, host_addr: int) -> int:
        region = s.KvmUserspaceMemoryRegion(self._slot, 0, guest_phys, size, host_addr)
        self.ioctl(c.KVM_SET_USER_MEMORY_REGION, region, "SET_USER_MEMORY_REGION")
        self._slot += 1
        return self._slot - 1

    def set_tss_addr(self, addr: int) -> None:
        self.ioctl(c.KVM_SET_TSS_ADDR, addr, "SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        self.ioctl(c.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr), "SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        self.ioctl(c.KVM_CREATE_IRQCHIP, 0, "CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        self.ioctl(c.KVM_CREATE_PIT2, s.KvmPitConfig(0), "CREATE_PIT2")

    def irqfd(self, eventfd: int, gsi: int) -> None:
        self.ioctl(c.KVM_IRQFD, s.KvmIrqfd(eventfd, gsi, 0, 0), "IRQFD")

    def ioeventfd(
        self, eventfd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None
    ) -> None:
        flags = c.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= c.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = s.KvmIoeventfd(datamatch or 0, addr, length, eventfd, flags)
        self.ioctl(c.KVM_IOEVENTFD, req, "IOEVENTFD")

    def register_coalesced(self, addr: int, size: int, *, pio: bool) -> None:
        self.ioctl(
            c.KVM_REGISTER_COALESCED_MMIO,
            s.KvmCoalescedMmioZone(addr, size, 1 if pio else 0),
            "REGISTER_COALESCED_MMIO",
        )

    def create_vcpu(self, index: int) -> Vcpu:
        fd = self.ioctl(c.KVM_CREATE_VCPU, index, "CREATE_VCPU")
        os.set_inheritable(fd, False)
        vcpu = Vcpu(self, fd, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        super().close()


class Vcpu(_Fd):
    """One vCPU: register state and the shared kvm_run page."""

    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.index = index
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = s.KvmRunHeader.from_buffer(self.run_map)
        self.run_addr = ctypes.addressof(self.run)

    def get_regs(self) -> s.KvmRegs:
        regs = s.KvmRegs()
        self.ioctl(c.KVM_GET_REGS, regs, "GET_REGS")
        return regs

    def set_regs(self, regs: s.KvmRegs) -> None:
        self.ioctl(c.KVM_SET_REGS, regs, "SET_REGS")

    def get_sregs(self) -> s.KvmSregs:
        sregs = s.KvmSregs()
        self.ioctl(c.KVM_GET_SREGS, sregs, "GET_SREGS")
        return sregs

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        self.ioctl(c.KVM_SET_SREGS, sregs, "SET_SREGS")

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        self.ioctl(c.KVM_SET_FPU, fpu, "SET_FPU")

    def set_cpuid(self, entries: Sequence[tuple[int, int, int, int, int, int, int]]) -> None:
        buf = s.cpuid2_type(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = s.KvmCpuidEntry2(*e)
        self.ioctl(c.KVM_SET_CPUID2, buf, "SET_CPUID2")

    def set_msrs(self, msrs: Iterable[tuple[int, int]]) -> int:
        items = list(msrs)
        buf = s.msrs_type(len(items))()
        buf.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            buf.entries[i] = s.KvmMsrEntry(index, 0, value)
        return self.ioctl(c.KVM_SET_MSRS, buf, "SET_MSRS")

    def set_msrs_each(self, msrs: Iterable[tuple[int, int]]) -> list[int]:
        """Set every MSR KVM accepts; return the indices it refused. KVM_SET_MSRS stops at the first MSR
        it refuses and returns how many it set, so the rest are retried after skipping that one."""
        pending = list(msrs)
        refused: list[int] = []
        while pending:
            done = self.set_msrs(pending)
            if done >= len(pending):
                break
            refused.append(pending[done][0])
            pending = pending[done + 1 :]
        return refused

    def get_lapic(self) -> s.KvmLapicState:
        st = s.KvmLapicState()
        self.ioctl(c.KVM_GET_LAPIC, st, "GET_LAPIC")
        return st

    def set_lapic(self, st: s.KvmLapicState) -> None:
        self.ioctl(c.KVM_SET_LAPIC, st, "SET_LAPIC")

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: set this vCPU's MCG_CAP (bank count in bits 0-7). Raises HostError."""
        self.ioctl(c.KVM_X86_SETUP_MCE, ctypes.c_uint64(mcg_cap), "X86_SETUP_MCE")

    def get_mp_state(self) -> int:
        st = s.KvmMpState()
        self.ioctl(c.KVM_GET_MP_STATE, st, "GET_MP_STATE")
        return int(st.mp_state)

    def set_mp_state(self, state: int) -> None:
        self.ioctl(c.KVM_SET_MP_STATE, s.KvmMpState(state), "SET_MP_STATE")

    def close(self) -> None:
        if self.fd >= 0:
            del self.run
            self.run_map.close()
        super().close()
