"""verify_evidence end to end without a TPM: a software AK (P-256) with the attributes a TPM AK has,
an enrollment, an event log, a TPMS_ATTEST quote marshalled by hand (TPM 2.0 Part 2, 10.12.12) and
signed by that AK. Each check of docs/INTEGRITY.md is broken once and must make the verdict untrusted
with its reason; the clean evidence must pass exactly the six checks. Written for the mutation floors
(issue 15); the swtpm-backed tests are tests/test_integrity_attest.py."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.test_integrity_tpmwire import attest, ecc_public, ecdsa_sig

from bulkhead.integrity import attest as a
from bulkhead.integrity import tpmwire as w
from bulkhead.integrity.eventlog import ZERO_PCR, Event, replay

NONCE = "n-0123456789"
EK = b"\x01software EK public area"
AK_ATTRS = (w.ATTR_FIXED_TPM | w.ATTR_FIXED_PARENT | w.ATTR_SENSITIVE_DATA_ORIGIN | w.ATTR_RESTRICTED
            | w.ATTR_SIGN)
EVENTS = [Event(14, "manifest", "a" * 64), Event(14, "config", "b" * 64)]
PASSED = [
    "enrolled EK is the policy's expected EK",
    "AK is a restricted TPM-resident signing key bound to the EK by credential activation",
    "quote signature verifies with the enrolled AK",
    "quote is fresh (qualifyingData = SHA-256(nonce))",
    "event log (2 events) replays to the quoted PCR digest",
    "every measured digest is allowed by the policy",
]
AK = ec.generate_private_key(ec.SECP256R1())
_NOT_AK = "the enrolled AK is not a restricted fixedTPM/fixedParent signing-only key"
_ERR = "verification error: IntegrityError: "
_ENROLLMENT_CASES = {"other EK", "never activated", "AK not restricted", "AK not fixedTPM", "AK can decrypt",
                     "AK name wrong"}


def policy(**over: Any) -> dict[str, Any]:
    return {"format": "bulkhead-policy/1", "ek_sha256": hashlib.sha256(EK).hexdigest(),
            "allowed": {"manifest": ["a" * 64], "config": ["b" * 64]}, **over}


def enrollment(attrs: int = AK_ATTRS, verified: bool = True, name: bytes | None = None) -> dict[str, Any]:
    pub = ecc_public(AK.public_key(), attrs=attrs)
    return {"format": "bulkhead-enrollment/1", "ek_public": EK.hex(), "ak_public": pub.hex(),
            "ak_name": (name or w.public_name(pub)).hex(),
            "activation": {"verified": verified, "challenge_sha256": "c" * 64}}


def evidence(events: list[Event] = EVENTS, quoted: list[Event] = EVENTS, nonce: str = NONCE,
             sel: bytes = b"\x00\xc0\x00", signer: bytes | None = None, **over: Any) -> dict[str, Any]:
    name = w.public_name(ecc_public(AK.public_key(), attrs=AK_ATTRS))
    pcrs = replay(quoted)
    digest = w.pcr_composite_digest([pcrs.get(i, ZERO_PCR) for i in (14, 15)])
    att = attest(signer=signer or a.ak_qualified_name(name), extra=a.nonce_digest(nonce),
                 sels=[(w.ALG_SHA256, sel)], digest=digest)
    return {"format": a.EVIDENCE_FORMAT, "attest": att.hex(), "signature": ecdsa_sig(AK, att).hex(),
            "ak_name": name.hex(), "events": [e.to_dict() for e in events], **over}


def test_clean_evidence_passes_exactly_the_six_checks() -> None:
    v = a.verify_evidence(evidence(), policy(), enrollment(), NONCE)
    assert v.trusted and v.reasons == [] and v.passed == PASSED and len(PASSED) == a.REQUIRED_CHECKS
    assert v.to_dict() == {"verdict": "trusted", "reasons": [], "passed": PASSED}
    assert a.verify_evidence(json.dumps(evidence()), json.dumps(policy()), json.dumps(enrollment()), NONCE).trusted
    assert a.verify_evidence(evidence(nonce="x" * 1024), policy(), enrollment(), "x" * 1024).trusted


BROKEN: dict[str, tuple[Any, Any, Any, str, str]] = {
    "other EK": (evidence(), policy(ek_sha256="e" * 64), enrollment(), NONCE, "the enrolled EK (sha256 "),
    "never activated": (evidence(), policy(), enrollment(verified=False), NONCE, "the AK was never bound to the EK by credential activation"),
    "AK not restricted": (evidence(), policy(), enrollment(attrs=AK_ATTRS & ~w.ATTR_RESTRICTED), NONCE,
                          _NOT_AK),
    "AK not fixedTPM": (evidence(), policy(), enrollment(attrs=AK_ATTRS & ~w.ATTR_FIXED_TPM), NONCE, _NOT_AK),
    "AK can decrypt": (evidence(), policy(), enrollment(attrs=AK_ATTRS | w.ATTR_DECRYPT), NONCE, _NOT_AK),
    "AK name wrong": (evidence(), policy(), enrollment(name=b"\x00\x0b" + bytes(32)), NONCE,
                      "the enrolled AK name does not match its public area"),
    "claimed other AK": (evidence(ak_name="00" * 34), policy(), enrollment(), NONCE, "the quote was signed by an AK that is not the enrolled AK (different TPM or key)"),
    "signer": (evidence(signer=b"\x00\x0b" + bytes(32)), policy(), enrollment(), NONCE, "the quote's signer is not the enrolled AK as a primary of the endorsement hierarchy"),
    "stale nonce": (evidence(nonce="old"), policy(), enrollment(), NONCE, "the quote's nonce is not the expected nonce (replayed or stale quote)"),
    "PCR selection": (evidence(sel=b"\x00\x40\x00"), policy(), enrollment(), NONCE, "the quote covers PCRs [('0xb', [14])], the policy needs SHA-256 PCRs [14, 15]"),
    "log tampered": (evidence(events=EVENTS[:1]), policy(), enrollment(), NONCE, "replaying the event log does not reproduce the quoted PCR digest"),
    "not in policy": (evidence(events=[Event(14, "manifest", "f" * 64)], quoted=[Event(14, "manifest", "f" * 64)]),
                      policy(), enrollment(), NONCE, "event 1 (manifest) digest " + "f" * 64 + " is not allowed by the policy"),
    "format": (evidence(format="bulkhead-quote/2"), policy(), enrollment(), NONCE, _ERR + "the evidence format must be bulkhead-quote/1"),
    "no signature": (evidence(signature=None), policy(), enrollment(), NONCE, _ERR + "the evidence lacks attest/signature hex strings"),
    "no attest": (evidence(attest=5), policy(), enrollment(), NONCE, _ERR + "the evidence lacks attest/signature hex strings"),
    "no events": ({**evidence(), "events": "x"}, policy(), enrollment(), NONCE, _ERR + "the evidence has no event list"),
    "empty nonce": (evidence(), policy(), enrollment(), "", _ERR + "an expected nonce (1..1024 characters) is required"),
    "long nonce": (evidence(nonce="x" * 1025), policy(), enrollment(), "x" * 1025, _ERR + "an expected nonce (1..1024 characters) is required"),
    "not an object": ("[1]", policy(), enrollment(), NONCE, _ERR + "the evidence is not a JSON object"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_check_makes_the_verdict_untrusted(case: str) -> None:
    ev, pol, enr, nonce, why = BROKEN[case]
    v = a.verify_evidence(ev, pol, enr, nonce)
    assert not v.trusted and any(r.startswith(why) for r in v.reasons), v.reasons
    assert not any(r.startswith("only ") for r in v.reasons)  # the check-count guard is for clean verdicts
    if case in _ENROLLMENT_CASES:  # an AK that fails enrollment: nothing past the signature is believed
        assert PASSED[1] not in v.passed and PASSED[3] not in v.passed
    assert v.to_dict()["verdict"] == "untrusted"


def test_unenrolled_ak_stops_after_the_signature_check() -> None:
    """A failed enrollment check: nothing in the quote is believed past the signature."""
    v = a.verify_evidence(evidence(nonce="old"), policy(), enrollment(verified=False), NONCE)
    assert v.passed == [*PASSED[:1], "quote signature verifies with the enrolled AK"]
    assert not any("nonce" in r for r in v.reasons)
