"""Integrity: signed code manifest, TPM measurements, launch digests, attestation, fail-closed gate.

Pure parts (fuzzable, no I/O beyond reading the files they are asked to hash): canonical, manifest,
launch, eventlog, tpmwire, policy, attest, gate. Edge: tpm (tpm2-pytss, swtpm), host (the daemon's gate),
cli. See docs/INTEGRITY.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bulkhead.integrity.errors import IntegrityError, LaunchDigestMismatch, TpmError

if TYPE_CHECKING:
    from bulkhead.integrity.host import IntegrityGate
    from bulkhead.integrity.launch import check_expected_digest, launch_digest, launch_digest_for_config
    from bulkhead.integrity.manifest import IntegrityResult, require_integrity, verify_installation

# Re-exports resolved on first use: importing bulkhead.integrity.errors (the jailed start path does)
# must not import the manifest machinery (pathlib, the gate's module) with it.
_LAZY = {
    "IntegrityGate": "bulkhead.integrity.host",  # threading and the TPM edge
    "check_expected_digest": "bulkhead.integrity.launch",
    "launch_digest": "bulkhead.integrity.launch",
    "launch_digest_for_config": "bulkhead.integrity.launch",
    "IntegrityResult": "bulkhead.integrity.manifest",
    "require_integrity": "bulkhead.integrity.manifest",
    "verify_installation": "bulkhead.integrity.manifest",
}

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
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
