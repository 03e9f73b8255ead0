"""The only code that touches /dev/kvm: ctypes structures, ioctl numbers, Kvm/Vm/Vcpu objects."""

from bulkhead.hypervisor.kvm.system import REQUIRED_CAPS, Kvm, Vcpu, Vm

__all__ = ["REQUIRED_CAPS", "Kvm", "Vcpu", "Vm"]
