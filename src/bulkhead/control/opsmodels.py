"""API models of the operations routes: per-VM stats, the image store, the attestation policy (pure).

Kept apart from control/models.py (the resource models) so the operations features stay in their own
modules; the same conventions: requests forbid unknown fields, names follow models.ImageName.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from bulkhead.control.models import Digest, ImageName, _Req

__all__ = ["DigestChange", "ImageImport", "ImageOut", "PolicyOut", "VmStatsOut"]


class VmStatsOut(BaseModel):
    id: str
    name: str
    tenant: str
    tenant_name: str | None
    state: str
    available: bool = Field(description="false when no counters are known yet (the VM never ran)")
    exits: list[int] = Field(default_factory=list, description="vCPU exits, per vCPU")
    exits_total: int = 0
    io_bytes: dict[str, dict[str, int]] = Field(default_factory=dict, description="device -> rx/tx/read/write bytes")
    virtqueue_faults: dict[str, dict[str, int]] = Field(default_factory=dict, description="device -> reason -> count")
    throttled: dict[str, dict[str, int]] = Field(default_factory=dict, description="device -> direction -> count")
    contained_accesses: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="pio/mmio -> read/write accesses to unclaimed addresses (contained)")
    counters: dict[str, Any] = Field(default_factory=dict, description="every counter, as `bulkhead run --stats`")


class ImageImport(_Req):
    name: ImageName
    staged: str = Field(min_length=1, max_length=128, pattern=r"^\.import-[A-Za-z0-9_-]{1,100}$",
                        description="the staging file the CLI copied into <state-dir>/images/")
    sha256: Digest = Field(description="what the importer computed; the daemon hashes again and compares")
    initrd: bool = Field(default=False, description="an initrd (no kernel validation)")


class ImageOut(BaseModel):
    name: str
    kind: str = Field(description="bzImage | ELF | PVH | initrd | unknown (copied in by hand)")
    size: int
    sha256: str | None
    imported: str | None = None
    by: str | None = None


class PolicyOut(BaseModel):
    path: str
    format: str
    allowed: dict[str, list[str]]
    max_age_s: float | int | None = None
    interval_s: float | int | None = None
    pcrs: dict[str, int] = Field(default_factory=dict)


class DigestChange(_Req):
    digest: Digest
    kind: str = Field(default="vm-launch", pattern=r"^(vm-launch|manifest|config)$")
