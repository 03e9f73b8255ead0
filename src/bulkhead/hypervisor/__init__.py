"""Hypervisor backends. Only bulkhead.hypervisor.kvm touches /dev/kvm."""
