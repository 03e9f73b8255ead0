"""Quote verification (pure): evidence + policy + enrollment + expected nonce -> Verdict.

Evidence (JSON, produced by `bulkhead attest quote`)::

    {"format": "bulkhead-quote/1", "nonce": "<the verifier's nonce>",
     "attest": "<hex TPMS_ATTEST>", "signature": "<hex TPMT_SIGNATURE>",
     "ak_name": "<hex name of the AK that signed>", "events": [<event objects>]}

Checks, all of which must pass (each failure is a reason; the verdict is trusted only with none):
  1. the enrollment's EK is the policy's expected EK (`ek_sha256`), and the AK was bound to it by a
     credential-activation round trip at enrollment (Keylime CVE-2022-1053: never trust an AK on its own word);
  2. the enrolled AK is a restricted, fixedTPM, fixedParent signing key whose name matches its public area;
  3. the quote signature verifies with the enrolled AK (a bad signature is a refusal, not a log line:
     Keylime CVE-2023-3674);
  4. the quote is a TPM-generated TPMS_ATTEST whose extraData is SHA-256(expected nonce) (freshness);
  5. the quote covers exactly the policy's PCRs in the SHA-256 bank;
  6. replaying the event log reproduces the quoted PCR digest;
  7. every measured digest is allowed by the policy, in its kind's PCR.
Any exception while verifying makes the verdict untrusted (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field

from bulkhead.integrity.errors import IntegrityError
from bulkhead.integrity.eventlog import ZERO_PCR, parse_event_log, replay
from bulkhead.integrity.policy import Enrollment, Policy, evaluate_events, parse_enrollment, parse_policy
from bulkhead.integrity.tpmwire import (
    ALG_SHA256,
    ATTR_DECRYPT,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    parse_public,
    parse_quote_attest,
    pcr_composite_digest,
    public_name,
    verify_signature,
)

__all__ = ["EVIDENCE_FORMAT", "Verdict", "ak_qualified_name", "nonce_digest", "verify_evidence"]

EVIDENCE_FORMAT = "bulkhead-quote/1"
MAX_NONCE = 1024
TPM_RH_ENDORSEMENT = 0x4000000B
# A trusted verdict needs every one of these checks to have passed, not merely "no failure recorded".
REQUIRED_CHECKS = 6


def ak_qualified_name(ak_name: bytes) -> bytes:
    """Qualified name of an AK that is a primary key of the endorsement hierarchy (TPM_RH_ENDORSEMENT):
    nameAlg || SHA-256(handle 0x4000000B || AK name), as the TPM reports it in TPMS_ATTEST.qualifiedSigner."""
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(struct.pack(">I", TPM_RH_ENDORSEMENT) + ak_name).digest()


def nonce_digest(nonce: str) -> bytes:
    """What goes into the quote's qualifyingData: SHA-256 of the UTF-8 nonce."""
    return hashlib.sha256(nonce.encode("utf-8")).digest()


@dataclass
class Verdict:
    """`trusted` only when `reasons` (failures) is empty; `passed` lists the checks that passed."""

    trusted: bool
    reasons: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"verdict": "trusted" if self.trusted else "untrusted", "reasons": self.reasons,
                "passed": self.passed}


def _check_enrollment(policy: Policy, enr: Enrollment, reasons: list[str], passed: list[str]) -> bool:
    ok = True
    if not hmac.compare_digest(enr.ek_sha256, policy.ek_sha256):
        reasons.append(f"the enrolled EK (sha256 {enr.ek_sha256}) is not the policy's expected EK "
                       f"({policy.ek_sha256}): quote from a different TPM")
        ok = False
    else:
        passed.append("enrolled EK is the policy's expected EK")
    if not enr.activation_verified:
        reasons.append("the AK was never bound to the EK by credential activation")
        ok = False
    ak = parse_public(enr.ak_public)
    need = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_SIGN
    if ak.attributes & need != need or ak.attributes & ATTR_DECRYPT:
        reasons.append("the enrolled AK is not a restricted fixedTPM/fixedParent signing-only key")
        ok = False
    if not hmac.compare_digest(public_name(enr.ak_public), enr.ak_name):
        reasons.append("the enrolled AK name does not match its public area")
        ok = False
    if ok:
        passed.append("AK is a restricted TPM-resident signing key bound to the EK by credential activation")
    return ok


def _verify(evidence: dict[str, object], policy: Policy, enr: Enrollment, nonce: str,
            reasons: list[str], passed: list[str]) -> None:
    if evidence.get("format") != EVIDENCE_FORMAT:
        raise IntegrityError(f"the evidence format must be {EVIDENCE_FORMAT}")
    attest_hex, sig_hex = evidence.get("attest"), evidence.get("signature")
    if not isinstance(attest_hex, str) or not isinstance(sig_hex, str):
        raise IntegrityError("the evidence lacks attest/signature hex strings")
    attest, sig = bytes.fromhex(attest_hex), bytes.fromhex(sig_hex)
    enrolled = _check_enrollment(policy, enr, reasons, passed)
    claimed = evidence.get("ak_name")
    if isinstance(claimed, str) and claimed != enr.ak_name.hex():
        reasons.append("the quote was signed by an AK that is not the enrolled AK (different TPM or key)")
    # Signature first: nothing in an unsigned attest structure is believed.
    try:
        verify_signature(parse_public(enr.ak_public), sig, attest)
    except IntegrityError as exc:
        reasons.append(f"quote signature check failed: {exc}")
        return
    passed.append("quote signature verifies with the enrolled AK")
    if not enrolled:
        return
    info = parse_quote_attest(attest)
    if not hmac.compare_digest(info.qualified_signer, ak_qualified_name(enr.ak_name)):
        reasons.append("the quote's signer is not the enrolled AK as a primary of the endorsement hierarchy")
    if hmac.compare_digest(info.extra_data, nonce_digest(nonce)):
        passed.append("quote is fresh (qualifyingData = SHA-256(nonce))")
    else:
        reasons.append("the quote's nonce is not the expected nonce (replayed or stale quote)")
    want = policy.pcrs
    sel = [s for s in info.selections if s.pcrs]
    if len(sel) != 1 or sel[0].hash_alg != ALG_SHA256 or tuple(sel[0].pcrs) != want:
        got = [(hex(s.hash_alg), list(s.pcrs)) for s in sel]
        reasons.append(f"the quote covers PCRs {got}, the policy needs SHA-256 PCRs {list(want)}")
        return
    events = parse_event_log(_events_list(evidence))
    pcrs = replay(events)
    expected = pcr_composite_digest([pcrs.get(i, ZERO_PCR) for i in want])
    if hmac.compare_digest(expected, info.pcr_digest):
        passed.append(f"event log ({len(events)} events) replays to the quoted PCR digest")
    else:
        reasons.append("replaying the event log does not reproduce the quoted PCR digest "
                       "(log tampered, truncated, or PCRs extended outside the log)")
    violations = evaluate_events(policy, events)
    if violations:
        reasons.extend(violations)
    else:
        passed.append("every measured digest is allowed by the policy")


def _events_list(evidence: dict[str, object]) -> list[object]:
    events = evidence.get("events")
    if not isinstance(events, list):
        raise IntegrityError("the evidence has no event list")
    return events


def verify_evidence(
    evidence: str | bytes | dict[str, object],
    policy: str | bytes | dict[str, object] | Policy,
    enrollment: str | bytes | dict[str, object] | Enrollment,
    expected_nonce: str,
) -> Verdict:
    """Verify a quote. Never raises: any error is a reason and the verdict is untrusted (fail closed)."""
    reasons: list[str] = []
    passed: list[str] = []
    try:
        if not isinstance(expected_nonce, str) or not expected_nonce or len(expected_nonce) > MAX_NONCE:
            raise IntegrityError("an expected nonce (1..1024 characters) is required")
        ev = evidence if isinstance(evidence, dict) else json.loads(evidence)
        if not isinstance(ev, dict):
            raise IntegrityError("the evidence is not a JSON object")
        pol = policy if isinstance(policy, Policy) else parse_policy(policy)
        enr = enrollment if isinstance(enrollment, Enrollment) else parse_enrollment(enrollment)
        _verify(ev, pol, enr, expected_nonce, reasons, passed)
    except Exception as exc:  # fail closed: whatever went wrong, the host is not shown to be trusted
        reasons.append(f"verification error: {type(exc).__name__}: {exc}")
    if not reasons and len(passed) != REQUIRED_CHECKS:
        reasons.append(f"only {len(passed)} of {REQUIRED_CHECKS} checks ran")
    return Verdict(trusted=not reasons, reasons=reasons, passed=passed)
