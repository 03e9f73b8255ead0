"""Integrity: signed code manifest, TPM measurements, launch digests, attestation, fail-closed gate.

Pure parts (fuzzable, no I/O beyond reading the files they are asked to hash): canonical, manifest,
launch, eventlog, tpmwire, policy, attest, gate. Edge: tpm (tpm2-pytss, swtpm), host (the daemon's gate),
cli. See docs/INTEGRITY.md.
"""

from __future__ import annotations

from typing import Any

from bulkhead.integrity.errors import IntegrityError, LaunchDigestMismatch, TpmError
from bulkhead.integrity.launch import check_expected_digest, launch_digest, launch_digest_for_config
from bulkhead.integrity.manifest import IntegrityResult, require_integrity, verify_installation

__all__ = [
    "IntegrityError",
    "IntegrityGate",
    "IntegrityResult",
    "LaunchDigestMismatch",
    "TpmError",
    "check_expected_digest",
    "launch_digest",
    "launch_digest_for_config",
    "require_integrity",
    "verify_installation",
]


def __getattr__(name: str) -> Any:
    if name == "IntegrityGate":  # imported lazily: it pulls in threading and the TPM edge
        from bulkhead.integrity.host import IntegrityGate

        return IntegrityGate
    raise AttributeError(name)
