"""Integrity errors. Every integrity failure is an IntegrityError: callers fail closed on it."""

from __future__ import annotations

from bulkhead.errors import BulkheadError

__all__ = ["CodeMismatch", "HostUntrusted", "IntegrityError", "LaunchDigestMismatch", "LaunchNotAllowed", "TpmError"]


class IntegrityError(BulkheadError):
    """Integrity could not be shown: a file differs, a signature is bad, a quote does not verify.

    `path` names the first differing file when the failure is about one file (else "").
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CodeMismatch(IntegrityError):
    """bulkhead's own installed code differs from the signed manifest (`path`: the first differing file),
    or the manifest cannot be trusted. Audited as security/integrity/code-mismatch."""


class HostUntrusted(IntegrityError):
    """No VM may start: the host's integrity is not shown (no TPM, no recent passing attestation)."""


class LaunchNotAllowed(IntegrityError):
    """The guest's launch digest is not a golden value of the policy."""


class LaunchDigestMismatch(IntegrityError):
    """A guest's launch digest differs from the digest it was created with (e.g. kernel swapped)."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class TpmError(IntegrityError):
    """The TPM is missing, unreachable, or refused a command."""
