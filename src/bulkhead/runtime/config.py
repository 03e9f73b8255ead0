"""Re-export of bulkhead.config (the one pure VM configuration declaration), kept for existing importers."""

from __future__ import annotations

from bulkhead.config import DriveConfig, NetConfig, RateLimit, VmConfig, parse_drive, parse_net

__all__ = ["DriveConfig", "NetConfig", "RateLimit", "VmConfig", "parse_drive", "parse_net"]
