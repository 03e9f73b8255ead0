"""API request and response models (pydantic). Every request field has a type, a size limit and a
pattern where it is a name, so bad input is a clear 422 and never reaches the store or a VMM process."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from bulkhead.config import MAX_CPUS, MAX_MEM_MIB, MIN_MEM_MIB

__all__ = [
    "AssignmentCreate",
    "AssignmentOut",
    "AuditRecordOut",
    "ConsoleOut",
    "CounterOut",
    "DiskCreate",
    "DiskOut",
    "DriveSpec",
    "ErrorOut",
    "IntegrityOut",
    "MeasurementOut",
    "NetworkCountersOut",
    "NetworkCreate",
    "NetworkOut",
    "NicOut",
    "NicRateSpec",
    "NicSpec",
    "PrincipalIssue",
    "PrincipalIssued",
    "PrincipalOut",
    "RoleCreate",
    "RoleOut",
    "ShutdownOutcome",
    "TenantCreate",
    "TenantOut",
    "VerifyOut",
    "VmCreate",
    "VmEventOut",
    "VmOut",
    "VmShutdownOut",
    "WhoAmI",
]

Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ImageName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z*][a-z*/]*$")]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^/[a-z0-9/-]*$")]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]
NetName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$")]
Subnet4 = Annotated[str, StringConstraints(min_length=9, max_length=18, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")]
Prefix6 = Annotated[str, StringConstraints(min_length=4, max_length=43, pattern=r"^[0-9a-fA-F:]+/[0-9]{1,3}$")]
Addr4 = Annotated[str, StringConstraints(min_length=7, max_length=15, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")]
Mac = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F][02468aceACE](:[0-9a-fA-F]{2}){5}$")]
Cmdline = Annotated[str, StringConstraints(max_length=4095, pattern=r"^[^\x00]*$")]
Digest = Annotated[str, StringConstraints(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(_Req):
    name: Name


class TenantOut(BaseModel):
    id: str
    name: str
    created: str


class PrincipalIssue(_Req):
    name: Name
    csr_pem: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    days: int = Field(default=365, ge=1, le=825)


class PrincipalOut(BaseModel):
    id: str
    name: str
    kind: str
    fingerprint: str
    serial: str
    not_after: str
    revoked: bool


class PrincipalIssued(BaseModel):
    principal: PrincipalOut
    certificate_pem: str
    ca_pem: str


class RoleCreate(_Req):
    name: Name
    description: Annotated[str, StringConstraints(max_length=256)] = ""
    actions: list[Pattern] = Field(min_length=1, max_length=64)
    not_actions: list[Pattern] = Field(default_factory=list, max_length=64)
    assignable_scopes: list[Scope] = Field(min_length=1, max_length=16)


class RoleOut(BaseModel):
    id: str
    name: str
    description: str
    actions: list[str]
    not_actions: list[str]
    assignable_scopes: list[str]
    builtin: bool


class AssignmentCreate(_Req):
    principal: Ref = Field(description="principal id or name")
    role: Ref = Field(description="role id or name")
    scope: Scope


class AssignmentOut(BaseModel):
    id: str
    principal_id: str
    role_id: str
    role_name: str
    scope: str


class DiskCreate(_Req):
    name: Name
    size_mib: int = Field(ge=1, le=1024 * 1024)


class DiskOut(BaseModel):
    id: str
    tenant: str
    name: str
    size_mib: int
    created: str


class DriveSpec(_Req):
    disk: UUID
    read_only: bool = False


class NetworkCreate(_Req):
    name: NetName
    ipv4_subnet: Subnet4 = Field(description="private IPv4 subnet without host bits, /16../29, e.g. 10.1.0.0/24")
    ipv6_prefix: Prefix6 | None = Field(default=None, description="optional unicast IPv6 /64")
    egress: StrictBool = Field(default=False, description="allow traffic to the outside (NAT); off by default")


class NetworkOut(BaseModel):
    id: str
    tenant: str
    name: str
    ipv4_subnet: str
    ipv4_gateway: str
    ipv6_prefix: str | None
    egress: bool
    created: str


class CounterOut(BaseModel):
    packets: int
    bytes: int


class NetworkCountersOut(BaseModel):
    network: str
    counters: dict[str, CounterOut] = Field(description="named drop counters of the network's NICs and tenant")


class NicRateSpec(_Req):
    bytes_per_sec: int = Field(default=0, ge=0, le=(1 << 40) - 1, description="0 = unlimited")
    ops_per_sec: int = Field(default=0, ge=0, le=(1 << 40) - 1, description="0 = unlimited")


class NicSpec(_Req):
    network: UUID = Field(description="a network of the VM's own tenant")
    ipv4: Addr4 | None = Field(default=None, description="a free address of the network (default: lowest free)")
    mac: Mac | None = None
    rate: NicRateSpec | None = None


class NicOut(BaseModel):
    index: int
    network: str
    mac: str
    ipv4: str
    ipv6: str | None
    rate: NicRateSpec


class VmCreate(_Req):
    tenant: UUID | Name = Field(description="tenant id or name")
    name: Name
    kernel: ImageName = Field(description="name of a kernel image in the daemon's image directory")
    initrd: ImageName | None = None
    cmdline: Cmdline = ""
    mem_mib: int = Field(default=128, ge=MIN_MEM_MIB, le=MAX_MEM_MIB)
    cpus: int = Field(default=1, ge=1, le=MAX_CPUS)
    drives: list[DriveSpec] = Field(default_factory=list, max_length=8)
    nics: list[NicSpec] = Field(default_factory=list, max_length=4)
    rng: bool = False
    vsock_cid: int | None = Field(
        default=None, ge=3, le=0xFFFF_FFFE,
        description="give the VM a virtio-vsock device with this guest CID (virtio 1.2 section 5.10; 0-2 and "
        "U32_MAX are reserved), unique on the host. The host side is a unix socket under the VM's state "
        "directory (vsock_socket in the answer), in Firecracker's model: docs/VSOCK.md.")
    expected_digest: Digest | None = Field(
        default=None, description="SHA-256 launch digest (lower-case hex) the VM must have to start; "
        "see GET /vms/{id}/measurement. A start with any other digest is refused (409, audited).")


class VmOut(BaseModel):
    id: str
    tenant: str
    name: str
    state: str
    kernel: str
    initrd: str | None
    cmdline: str
    mem_mib: int
    cpus: int
    drives: list[DriveSpec]
    nics: list[NicOut]
    rng: bool
    exit_status: int | None
    created: str
    updated: str
    expected_digest: str | None = None
    vsock_cid: int | None = None
    vsock_socket: str | None = Field(default=None, description="the VM's host-side vsock socket (root only)")


class ShutdownOutcome(BaseModel):
    graceful: bool  # the guest powered off by itself within the timeout (else it was stopped by force)
    method: str | None  # how the guest was asked ("ctrl-alt-del"), None when it could not be asked
    exit_status: int | None


class VmShutdownOut(VmOut):
    shutdown: ShutdownOutcome


class VmEventOut(BaseModel):
    time: str
    event: str
    detail: str


class ConsoleOut(BaseModel):
    offset: int
    next_offset: int
    data: str


class MeasurementOut(BaseModel):
    """A VM's guest launch digest, computed now from its current kernel/initrd files and configuration
    (docs/INTEGRITY.md), next to the digest it was created with (if any) and the last measured launch."""

    vm: str
    digest: str
    expected_digest: str | None
    matches_expected: bool | None
    last_launch_digest: str | None = Field(description="digest of the last start since the daemon started")
    components: dict[str, str | int | list[str] | None]


class IntegrityOut(BaseModel):
    """Host integrity: `trusted` (a passing attestation within max_age_s), `untrusted` (with every
    reason; no VM starts) or `off` (test harness / fake backend only; no guest can run)."""

    state: str
    mode: str
    reasons: list[str]
    last_success_age_s: float | None
    max_age_s: float | None
    attempts: int
    failures: int
    running_vms_when_untrusted: str
    code: dict[str, str | bool | None]


class ErrorOut(BaseModel):
    detail: str


class WhoAmI(BaseModel):
    id: str
    name: str
    kind: str


class AuditRecordOut(BaseModel):
    seq: int
    time: str
    kind: str
    principal: str
    action: str
    scope: str
    decision: str
    result: str
    request_id: str
    vm: str
    detail: str
    leaf: str | None = None  # base64 leaf input (RFC 9162 tree, docs/AUDIT.md), with ?leaf=true


class InclusionProofOut(BaseModel):
    leaf_index: int
    tree_size: int
    leaf_hash: str
    path: list[str]
    root_hash: str


class ConsistencyProofOut(BaseModel):
    old_size: int
    new_size: int
    old_root: str
    new_root: str
    path: list[str]


class CheckpointOut(BaseModel):
    note: str
    origin: str
    tree_size: int
    root_hash: str
    verifier_key: str


class VerifyOut(BaseModel):
    ok: bool
    records: int
    first_bad: int | None
    problem: str
    checkpoints_checked: int
