"""x86-64 boot: image parsing and validation, boot structures, load_kernel -> BootPlan (pure).

See bulkhead.boot.layout for the low-memory layout and bulkhead.boot.loader for the protocols.
"""

from bulkhead.boot.cpuid import CpuidEntry, filter_cpuid
from bulkhead.boot.loader import BootPlan, load_kernel
from bulkhead.boot.msrs import boot_msrs
from bulkhead.boot.params import E820Entry
from bulkhead.boot.x86 import Segment

__all__ = ["BootPlan", "CpuidEntry", "E820Entry", "Segment", "boot_msrs", "filter_cpuid", "load_kernel"]
