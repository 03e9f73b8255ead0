"""API models of snapshots (docs/API.md "Snapshots"; pure: pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool

from bulkhead.control.models import Name

__all__ = ["SnapshotCreate", "SnapshotOut", "SnapshotRestore"]


class SnapshotCreate(BaseModel):
    """POST /vms/{id}/snapshot. `then`: what the VM does once its state is saved."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    then: Literal["resume", "pause", "stop"] = "resume"


class SnapshotRestore(BaseModel):
    """POST /snapshots/{id}/restore. `clone` must be true for a second restore of one snapshot."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    clone: StrictBool = False


class SnapshotOut(BaseModel):
    id: str
    tenant: str
    vm: str
    vm_name: str
    name: str
    launch_digest: str | None
    bytes: int
    created: str
    restores: int
