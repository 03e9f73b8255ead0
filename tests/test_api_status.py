"""The one exception type -> HTTP status table (bulkhead/daemon/api_status.py, docs/API.md "Errors")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bulkhead.control.lifecycle import LifecycleError
from bulkhead.daemon import api_status
from bulkhead.daemon.auditlog import AuditUnavailable
from bulkhead.daemon.service import ApiError
from bulkhead.daemon.store import StateUnavailable
from bulkhead.errors import ConfigError, GuestFault, HostError, ImageError, StartRefused, VmNotRunning
from bulkhead.integrity.errors import (
    CodeMismatch,
    HostUntrusted,
    IntegrityError,
    LaunchDigestMismatch,
    LaunchNotAllowed,
)
from bulkhead.sandbox.supervisor import WorkerIntegrityError

ROOT = Path(__file__).resolve().parents[1]


def test_api_doc_prints_the_table() -> None:
    doc = (ROOT / "docs" / "API.md").read_text()
    assert api_status.markdown_table() in doc, "docs/API.md is out of date: paste api_status.markdown_table()"


@pytest.mark.parametrize(("exc", "status", "kind"), [
    (LaunchDigestMismatch("x", expected="a", actual="b"), 409, "launch-digest-mismatch"),
    (LaunchNotAllowed("x"), 409, "launch-refused"),
    (HostUntrusted("x"), 503, "host-untrusted"),
    (CodeMismatch("x", path="p"), 503, "code-mismatch"),
    (WorkerIntegrityError("x", path="p"), 503, "code-mismatch"),  # also a HostError: the first match wins
    (IntegrityError("x"), 503, "launch-refused"),
    (AuditUnavailable("x"), 503, "audit-unavailable"),
    (StateUnavailable("x"), 503, "state-unavailable"),
    (LifecycleError("x"), 409, "lifecycle"),  # a ConfigError, answered as a conflict
    (VmNotRunning("x"), 409, "vm-not-running"),
    (StartRefused("x", kind="image-invalid"), 422, "image-invalid"),  # its own kind
    (StartRefused("x"), 422, "config-invalid"),
    (ImageError("x"), 422, "image-invalid"),
    (ConfigError("x"), 422, "config-invalid"),
    (HostError("x"), 503, "host-error"),
])
def test_status_and_kind_by_type(exc: Exception, status: int, kind: str) -> None:
    err = ApiError.of(exc, "worded by the operation")
    assert (err.status, err.kind, err.detail) == (status, kind, "worded by the operation")
    assert ApiError.of(exc).detail == str(exc)


def test_the_message_does_not_decide() -> None:
    """Rewording a message cannot change a status: the same text under two types gets two answers."""
    text = "cannot stop the VM: not running; host is untrusted; not allowed"
    assert ApiError.of(VmNotRunning(text)).status == 409
    assert ApiError.of(HostError(text)).status == 503
    assert ApiError.of(ConfigError(text)).status == 422


def test_an_unknown_type_is_a_bug_not_a_refusal() -> None:
    assert api_status.status_of(ValueError("x")) is None
    assert api_status.status_of(GuestFault("x")) is None
    with pytest.raises(TypeError):
        ApiError.of(GuestFault("x"))


def test_no_call_site_chooses_a_status_for_a_caught_exception() -> None:
    """`ApiError(<status>, ...)` built from a caught exception's message is the table's job."""
    pat = re.compile(r"ApiError\(\s*\d{3}[^)]*\bstr\(exc\)")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "src").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line) or "in str(e" in line]
    assert not hits, hits
