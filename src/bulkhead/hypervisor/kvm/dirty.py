"""Dirty-page tracking of guest memory slots, for live migration's pre-copy (runtime/migrate.py).

Linux Documentation/virt/kvm/api.rst:
- §4.35 KVM_SET_USER_MEMORY_REGION: "The flags field supports two flags: KVM_MEM_LOG_DIRTY_PAGES and
  KVM_MEM_READONLY. The former can be set to instruct KVM to keep track of writes to memory within the
  slot." A slot's flags are changed by issuing the ioctl again with the same slot, base, size and address.
- §4.8 KVM_GET_DIRTY_LOG: "Given a memory slot, return a bitmap containing any pages dirtied since the
  last call to this ioctl. Bit 0 is the first page in the memory slot." Without
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled, the call also clears the log and write-protects the pages
  again, so each call returns the pages written since the previous one.

Only writes by the guest (vCPUs) are logged. Writes by the VMM itself (device emulation writing guest
RAM: virtio used rings, block reads) are not, which is why VMs with virtio devices are not migrated yet.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from bulkhead.hypervisor.kvm import constants as c
from bulkhead.hypervisor.kvm import structs as s

if TYPE_CHECKING:
    from bulkhead.hypervisor.kvm.system import Vm

__all__ = ["KVM_GET_DIRTY_LOG", "KVM_MEM_LOG_DIRTY_PAGES", "DirtyLog", "Slot"]

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
PAGE = 4096


class _KvmDirtyLog(ctypes.Structure):
    """struct kvm_dirty_log (linux/kvm.h): slot, padding, then a union of the bitmap pointer and a u64."""

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


assert ctypes.sizeof(_KvmDirtyLog) == 16
KVM_GET_DIRTY_LOG = c._iow(0x42, ctypes.sizeof(_KvmDirtyLog))


class Slot:
    """One memory slot as it was registered: slot number, guest base, size, host address."""

    __slots__ = ("base", "bitmap", "host_addr", "size", "slot")

    def __init__(self, slot: int, base: int, size: int, host_addr: int) -> None:
        self.slot, self.base, self.size, self.host_addr = slot, base, size, host_addr
        pages = size // PAGE
        self.bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()  # long-aligned, as api.rst §4.8 asks


class DirtyLog:
    """Dirty logging on every slot of a VM. enable() turns it on (re-registering each slot with
    KVM_MEM_LOG_DIRTY_PAGES); collect() returns the guest page frames written since the previous call
    (or since enable()); disable() turns it off again (a migration that failed leaves the VM as it was).
    Raises HostError (from the ioctl) when KVM refuses."""

    def __init__(self, vm: Vm, slots: Sequence[tuple[int, int, int]]) -> None:
        """`slots`: (guest base, size, host address) in registration order: slot i is the i-th
        (hypervisor/kvm/system.py Vm.set_user_memory_region numbers them from 0)."""
        self.vm = vm
        self.slots = [Slot(i, base, size, addr) for i, (base, size, addr) in enumerate(slots)]
        self.enabled = False

    def _set_flags(self, flags: int) -> None:
        for sl in self.slots:
            region = s.KvmUserspaceMemoryRegion(sl.slot, flags, sl.base, sl.size, sl.host_addr)
            self.vm.ioctl(c.KVM_SET_USER_MEMORY_REGION, region, "SET_USER_MEMORY_REGION (dirty log)")

    def enable(self) -> None:
        self._set_flags(KVM_MEM_LOG_DIRTY_PAGES)
        self.enabled = True

    def disable(self) -> None:
        if self.enabled:
            self._set_flags(0)
            self.enabled = False

    def collect(self) -> list[int]:
        """Guest page frame numbers written since the last call, ascending within each slot."""
        out: list[int] = []
        for sl in self.slots:
            req = _KvmDirtyLog(sl.slot, 0, ctypes.addressof(sl.bitmap))
            self.vm.ioctl(KVM_GET_DIRTY_LOG, req, "GET_DIRTY_LOG")
            out.extend(sl.base // PAGE + i for i in _bits(sl.bitmap))
        return out


def _bits(bitmap: ctypes.Array[ctypes.c_uint64]) -> Iterator[int]:
    for word_index, word in enumerate(bitmap):
        while word:
            low = word & -word
            yield word_index * 64 + low.bit_length() - 1
            word ^= low
