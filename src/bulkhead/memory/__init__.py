"""Guest memory: the only way device and boot code touch guest RAM."""

from bulkhead.memory.guest import GuestAddress, GuestMemory, GuestRegion
from bulkhead.memory.layout import ram_regions

__all__ = ["GuestAddress", "GuestMemory", "GuestRegion", "ram_regions"]
