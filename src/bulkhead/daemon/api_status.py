"""The one table from exception type to HTTP status and `kind` (docs/API.md "Errors" prints it).

Every domain error an operation lets reach the API is answered through `status_of`: the handler in
app.py renders it, and `ApiError.of(exc, detail)` (service.py) uses it where an operation words the
detail itself. No call site chooses a status for a domain exception, and nothing reads a message to
decide one (issue 14, "typed errors"). tests/test_api_status.py checks the doc prints `markdown_table()`.

Most specific first: the first isinstance match wins (LifecycleError is a ConfigError, CodeMismatch
may also be a HostError: the worker's pre-import refusal).
"""

from __future__ import annotations

from typing import NamedTuple

from bulkhead.control.lifecycle import LifecycleError
from bulkhead.daemon.auditlog import AuditUnavailable
from bulkhead.daemon.store import StateUnavailable
from bulkhead.errors import (
    BulkheadError,
    ConfigError,
    HostError,
    ImageError,
    SnapshotError,
    SnapshotRestoredBefore,
    StartRefused,
    VmNotRunning,
)
from bulkhead.integrity.errors import (
    CodeMismatch,
    HostUntrusted,
    IntegrityError,
    LaunchDigestMismatch,
    LaunchNotAllowed,
)

__all__ = ["TABLE", "Status", "markdown_table", "status_of"]


class Status(NamedTuple):
    exc: type[BaseException]
    status: int
    kind: str
    meaning: str


TABLE: tuple[Status, ...] = (
    Status(LaunchDigestMismatch, 409, "launch-digest-mismatch",
           "the VM's launch digest differs from the one it was created with (e.g. its kernel was swapped)"),
    Status(LaunchNotAllowed, 409, "launch-refused", "the launch digest is not a golden value of the policy"),
    Status(HostUntrusted, 503, "host-untrusted", "the host's integrity is not shown: no VM may start"),
    Status(CodeMismatch, 503, "code-mismatch", "bulkhead's installed code differs from the signed manifest"),
    Status(IntegrityError, 503, "launch-refused", "integrity could not be shown (an image, the TPM, the gate)"),
    Status(AuditUnavailable, 503, "audit-unavailable", "the audit log cannot take the record: nothing was done"),
    Status(StateUnavailable, 503, "state-unavailable",
           "the state database cannot take the change (a full or locked disk): nothing was changed"),
    Status(LifecycleError, 409, "lifecycle", "the operation is not allowed in the VM's state"),
    Status(VmNotRunning, 409, "vm-not-running", "the operation needs a running (or paused) VMM"),
    Status(SnapshotRestoredBefore, 409, "snapshot-clone-required",
           "the snapshot was restored before: a second restore duplicates guest secrets, ask for a clone"),
    Status(SnapshotError, 422, "snapshot-invalid",
           "the snapshot file is altered, truncated, foreign, of another version, or does not match its record"),
    Status(StartRefused, 422, "config-invalid",
           "the loader or the VMM refused the VM before its guest ran (kind image-invalid or config-invalid)"),
    Status(ImageError, 422, "image-invalid", "a kernel, initrd or disk image is malformed or does not fit"),
    Status(ConfigError, 422, "config-invalid", "invalid input: a semantic check of the request failed"),
    Status(HostError, 503, "host-error", "the host could not do it (start a VMM, realise a network, read a file)"),
)


def status_of(exc: BaseException) -> tuple[int, str] | None:
    """(HTTP status, kind) for a domain exception, or None when it is not one (a bug: 500).
    A StartRefused carries its own kind (image-invalid | config-invalid)."""
    if not isinstance(exc, BulkheadError):
        return None
    for row in TABLE:
        if isinstance(exc, row.exc):
            if isinstance(exc, StartRefused):
                return row.status, exc.kind
            return row.status, row.kind
    return None


def markdown_table() -> str:
    """The table as docs/API.md prints it."""
    rows = ["| exception | status | kind | meaning |", "|---|---|---|---|"]
    for r in TABLE:
        rows.append(f"| `{r.exc.__module__}.{r.exc.__name__}` | {r.status} | `{r.kind}` | {r.meaning} |")
    return "\n".join(rows)
