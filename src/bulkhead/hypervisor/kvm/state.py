"""Save and restore the KVM-held state of a vCPU and of a VM's in-kernel chips, as raw structure bytes.

The kernel's own structures (linux/kvm.h, Documentation/virt/kvm/api.rst sections 4.x) are the format:
each GET ioctl fills a fixed-size struct that the matching SET ioctl takes back on the same kind of host.
bulkhead keeps them as opaque bytes of the exact size, checked by the pure snapshot format
(bulkhead.snapshot.format) before any SET; the MSRs are kept as (index, value) pairs instead, limited
to the indices KVM_GET_MSR_INDEX_LIST reports on this host.

Order of the SET ioctls on restore follows Firecracker (vmm/src/vstate/vcpu/x86_64.rs `restore_state`):
CPUID (by the caller), MP state, regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs, vCPU events
(last, because the earlier SETs can change pending-event state). The VM side: PIT, clock, then the
three irqchips (PIC master, PIC slave, IOAPIC).

api.rst 4.3 (KVM_RUN) note on consistency: after a KVM_EXIT_IO/MMIO the instruction completes only on
the next KVM_RUN; the vCPU loop pauses by re-entering KVM_RUN with immediate_exit set, so state read here
is always at an instruction boundary.
"""

from __future__ import annotations

import fcntl
from typing import TYPE_CHECKING

from bulkhead.errors import HostError
from bulkhead.hypervisor.kvm import constants as c
from bulkhead.hypervisor.kvm import structs as s

if TYPE_CHECKING:
    from bulkhead.hypervisor.kvm.system import Kvm, Vcpu, Vm

__all__ = ["IRQCHIPS", "VCPU_BLOBS", "VM_BLOBS", "get_vcpu_state", "get_vm_state", "msr_index_list",
           "set_vcpu_state", "set_vm_state"]


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAE << 8) | nr


_R, _W, _RW = 2, 1, 3
# name -> (size, GET request, SET request). Sizes are sizeof(struct ...) on x86_64 (checked against
# linux/kvm.h by tests/test_snapshot_kvm.py with a compiled probe where gcc is present).
VCPU_BLOBS: dict[str, tuple[int, int, int]] = {
    "regs": (144, c.KVM_GET_REGS, c.KVM_SET_REGS),
    "sregs": (312, c.KVM_GET_SREGS, c.KVM_SET_SREGS),
    "xsave": (4096, _ioc(_R, 0xA4, 4096), _ioc(_W, 0xA5, 4096)),
    "xcrs": (392, _ioc(_R, 0xA6, 392), _ioc(_W, 0xA7, 392)),
    "debugregs": (128, _ioc(_R, 0xA1, 128), _ioc(_W, 0xA2, 128)),
    "lapic": (1024, c.KVM_GET_LAPIC, c.KVM_SET_LAPIC),
    "events": (64, _ioc(_R, 0x9F, 64), _ioc(_W, 0xA0, 64)),
}
VM_BLOBS: dict[str, tuple[int, int, int]] = {
    "pit2": (112, _ioc(_R, 0x9F, 112), _ioc(_W, 0xA0, 112)),
    "clock": (48, _ioc(_R, 0x7C, 48), _ioc(_W, 0x7B, 48)),
}
KVM_GET_IRQCHIP = _ioc(_RW, 0x62, 520)
KVM_SET_IRQCHIP = _ioc(_R, 0x63, 520)  # sic: _IOR in linux/kvm.h
IRQCHIPS = ("pic-master", "pic-slave", "ioapic")  # chip_id 0, 1, 2
IRQCHIP_SIZE = 520
KVM_CLOCK_TSC_STABLE = 2
_SET_ORDER = ("regs", "sregs", "xsave", "xcrs", "debugregs", "lapic")


def _get(fd: int, request: int, size: int, what: str, prefill: bytes = b"") -> bytes:
    buf = bytearray(size)
    buf[: len(prefill)] = prefill
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        raise HostError(f"KVM {what} failed: {exc.strerror} (errno {exc.errno})") from None
    return bytes(buf)


def _set(fd: int, request: int, data: bytes, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, bytearray(data), True)
    except OSError as exc:
        raise HostError(f"KVM {what} failed: {exc.strerror} (errno {exc.errno})") from None


def msr_index_list(kvm: Kvm) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST: the MSRs this host saves and restores (api.rst 4.3)."""
    n = 1024
    buf = s.msr_list_type(n)()
    buf.nmsrs = n
    kvm.ioctl(c.KVM_GET_MSR_INDEX_LIST, buf, "GET_MSR_INDEX_LIST")
    return [int(buf.indices[i]) for i in range(min(int(buf.nmsrs), n))]


def _get_msrs(vcpu: Vcpu, indices: list[int]) -> list[tuple[int, int]]:
    buf = s.msrs_type(len(indices))()
    buf.nmsrs = len(indices)
    for i, index in enumerate(indices):
        buf.entries[i].index = index
    done = vcpu.ioctl(c.KVM_GET_MSRS, buf, "GET_MSRS")
    return [(int(buf.entries[i].index), int(buf.entries[i].data)) for i in range(done)]


def get_vcpu_state(vcpu: Vcpu, msr_indices: list[int]) -> dict[str, object]:
    """Every piece of a paused vCPU's state KVM holds: blobs, MP state and MSRs."""
    state: dict[str, object] = {
        name: _get(vcpu.fd, get, size, f"GET_{name.upper()}") for name, (size, get, _) in VCPU_BLOBS.items()
    }
    state["mp_state"] = vcpu.get_mp_state()
    msrs: list[tuple[int, int]] = []
    pending = list(msr_indices)
    while pending:  # GET_MSRS stops at the first MSR it cannot read: skip it and go on
        got = _get_msrs(vcpu, pending)
        msrs.extend(got)
        pending = pending[len(got) + 1 :]
    state["msrs"] = msrs
    return state


def set_vcpu_state(vcpu: Vcpu, state: dict[str, object]) -> list[int]:
    """Program a vCPU (CPUID already set) from get_vcpu_state() output that the format layer checked.
    Returns the MSR indices KVM refused. Raises HostError."""

    vcpu.set_mp_state(int(state["mp_state"]))  # type: ignore[call-overload]
    for name in _SET_ORDER:
        setter = VCPU_BLOBS[name][2]
        _set(vcpu.fd, setter, state[name], f"SET_{name.upper()}")  # type: ignore[arg-type]
    refused = vcpu.set_msrs_each(state["msrs"])  # type: ignore[arg-type]
    _set(vcpu.fd, VCPU_BLOBS["events"][2], state["events"], "SET_VCPU_EVENTS")  # type: ignore[arg-type]
    return refused


def get_vm_state(vm: Vm) -> dict[str, bytes]:
    """PIT, kvmclock and the three in-kernel interrupt controllers."""
    state = {name: _get(vm.fd, get, size, f"GET_{name.upper()}") for name, (size, get, _) in VM_BLOBS.items()}
    for chip_id, name in enumerate(IRQCHIPS):
        state[name] = _get(vm.fd, KVM_GET_IRQCHIP, IRQCHIP_SIZE, "GET_IRQCHIP", chip_id.to_bytes(4, "little"))
    return state


def set_vm_state(vm: Vm, state: dict[str, bytes]) -> None:
    """Restore get_vm_state() output (checked by the format layer). The clock's flags are cleared: only
    KVM_CLOCK_TSC_STABLE may be read back, and SET_CLOCK takes none of the read-only flags (api.rst 4.57)."""
    _set(vm.fd, VM_BLOBS["pit2"][2], state["pit2"], "SET_PIT2")
    clock = bytearray(state["clock"])
    clock[8:12] = b"\0\0\0\0"  # flags
    _set(vm.fd, VM_BLOBS["clock"][2], bytes(clock), "SET_CLOCK")
    for chip_id, name in enumerate(IRQCHIPS):
        data = bytearray(state[name])
        data[0:4] = chip_id.to_bytes(4, "little")
        _set(vm.fd, KVM_SET_IRQCHIP, bytes(data), "SET_IRQCHIP")


