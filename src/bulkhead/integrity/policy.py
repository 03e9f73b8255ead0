"""Attestation policy and AK enrollment records (pure): parsing and evaluation of measured events.

Policy (JSON)::

    {"format": "bulkhead-policy/1",
     "ek_sha256": "<SHA-256 hex of the trusted TPM's EK TPMT_PUBLIC>",
     "pcrs": {"host": 14, "vm": 15},
     "allowed": {"manifest":  ["<digest>", ...],     # golden values, per event kind
                 "config":    ["<digest>", ...],
                 "vm-launch": ["<digest>", ...]},
     "max_age_s": 300,                               # gate: no passing attestation for this long = untrusted
     "interval_s": 30,                               # gate: how often the daemon attests itself
     "running_vms_when_untrusted": "keep"}           # or "stop"

Enrollment (JSON, produced by `bulkhead attest enroll`, held by the verifier)::

    {"format": "bulkhead-enrollment/1", "ek_public": "<hex TPMT_PUBLIC>", "ak_public": "<hex TPMT_PUBLIC>",
     "ak_name": "<hex>", "activation": {"method": "TPM2_MakeCredential/TPM2_ActivateCredential",
                                        "verified": true, "challenge_sha256": "<hex>"}}

Every function raises IntegrityError with one clear sentence on malformed input.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from bulkhead.integrity.errors import IntegrityError
from bulkhead.integrity.eventlog import KINDS, MAX_PCR, Event

__all__ = [
    "ENROLL_FORMAT",
    "POLICY_FORMAT",
    "Enrollment",
    "Policy",
    "evaluate_events",
    "parse_enrollment",
    "parse_policy",
]

POLICY_FORMAT = "bulkhead-policy/1"
ENROLL_FORMAT = "bulkhead-enrollment/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
KIND_PCR_ROLE = {"manifest": "host", "config": "host", "vm-launch": "vm"}


@dataclass(frozen=True)
class Policy:
    ek_sha256: str
    host_pcr: int
    vm_pcr: int
    allowed: dict[str, frozenset[str]]
    max_age_s: float
    interval_s: float
    running_vms_when_untrusted: str

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(sorted({self.host_pcr, self.vm_pcr}))

    def pcr_for(self, kind: str) -> int:
        return self.host_pcr if KIND_PCR_ROLE[kind] == "host" else self.vm_pcr

    def to_dict(self) -> dict[str, object]:
        return {
            "format": POLICY_FORMAT,
            "ek_sha256": self.ek_sha256,
            "pcrs": {"host": self.host_pcr, "vm": self.vm_pcr},
            "allowed": {k: sorted(v) for k, v in sorted(self.allowed.items())},
            "max_age_s": self.max_age_s,
            "interval_s": self.interval_s,
            "running_vms_when_untrusted": self.running_vms_when_untrusted,
        }


def _load(data: str | bytes | dict[str, object], what: str) -> dict[str, object]:
    if isinstance(data, dict):
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        raise IntegrityError(f"the {what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"the {what} is not a JSON object")
    return obj


def _number(obj: dict[str, object], key: str, default: float, lo: float, hi: float) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise IntegrityError(f"policy {key} must be a number between {lo} and {hi}")
    return float(v)


def parse_policy(data: str | bytes | dict[str, object]) -> Policy:
    """Parse and validate a policy document. Raises IntegrityError when malformed."""
    obj = _load(data, "policy")
    if obj.get("format") != POLICY_FORMAT:
        raise IntegrityError(f"the policy format must be {POLICY_FORMAT}")
    unknown = set(obj) - {"format", "ek_sha256", "pcrs", "allowed", "max_age_s", "interval_s",
                          "running_vms_when_untrusted"}
    if unknown:
        raise IntegrityError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
    ek = obj.get("ek_sha256")
    if not isinstance(ek, str) or not _HEX64.match(ek):
        raise IntegrityError("policy ek_sha256 must be the SHA-256 (64 lowercase hex) of the trusted EK")
    pcrs = obj.get("pcrs", {"host": 14, "vm": 15})
    if not isinstance(pcrs, dict) or set(pcrs) != {"host", "vm"}:
        raise IntegrityError("policy pcrs must be {\"host\": N, \"vm\": M}")
    for v in pcrs.values():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_PCR:
            raise IntegrityError(f"policy PCR indexes must be integers 0..{MAX_PCR}")
    allowed_raw = obj.get("allowed")
    if not isinstance(allowed_raw, dict) or not set(allowed_raw) <= set(KINDS):
        raise IntegrityError(f"policy allowed must map event kinds ({', '.join(KINDS)}) to digest lists")
    allowed: dict[str, frozenset[str]] = {}
    for kind in KINDS:
        values = allowed_raw.get(kind, [])
        if not isinstance(values, list) or not all(isinstance(d, str) and _HEX64.match(d) for d in values):
            raise IntegrityError(f"policy allowed.{kind} must be a list of SHA-256 hex digests")
        allowed[kind] = frozenset(values)
    mode = obj.get("running_vms_when_untrusted", "keep")
    if mode not in ("keep", "stop"):
        raise IntegrityError("policy running_vms_when_untrusted must be keep or stop")
    max_age = _number(obj, "max_age_s", 300, 1, 86400)
    interval = _number(obj, "interval_s", 30, 0.05, 86400)
    if interval >= max_age:
        raise IntegrityError("policy interval_s must be shorter than max_age_s")
    return Policy(ek, int(pcrs["host"]), int(pcrs["vm"]), allowed, max_age, interval, str(mode))


@dataclass(frozen=True)
class Enrollment:
    ek_public: bytes
    ak_public: bytes
    ak_name: bytes
    activation_verified: bool
    challenge_sha256: str

    @property
    def ek_sha256(self) -> str:
        return hashlib.sha256(self.ek_public).hexdigest()

    def to_dict(self) -> dict[str, object]:
        return {
            "format": ENROLL_FORMAT,
            "ek_public": self.ek_public.hex(),
            "ak_public": self.ak_public.hex(),
            "ak_name": self.ak_name.hex(),
            "activation": {
                "method": "TPM2_MakeCredential/TPM2_ActivateCredential",
                "verified": self.activation_verified,
                "challenge_sha256": self.challenge_sha256,
            },
        }


def parse_enrollment(data: str | bytes | dict[str, object]) -> Enrollment:
    """Parse an enrollment record. Raises IntegrityError when malformed."""
    obj = _load(data, "enrollment")
    if obj.get("format") != ENROLL_FORMAT:
        raise IntegrityError(f"the enrollment format must be {ENROLL_FORMAT}")
    fields: dict[str, bytes] = {}
    for key in ("ek_public", "ak_public", "ak_name"):
        v = obj.get(key)
        if not isinstance(v, str) or not _HEX.match(v) or len(v) > 4096:
            raise IntegrityError(f"enrollment {key} must be hex")
        fields[key] = bytes.fromhex(v)
    act = obj.get("activation")
    if not isinstance(act, dict):
        raise IntegrityError("enrollment activation record is missing")
    verified = act.get("verified") is True
    challenge = act.get("challenge_sha256", "")
    if not isinstance(challenge, str):
        raise IntegrityError("enrollment activation challenge_sha256 must be a string")
    return Enrollment(fields["ek_public"], fields["ak_public"], fields["ak_name"], verified, challenge)


def evaluate_events(policy: Policy, events: Iterable[Event]) -> list[str]:
    """Check every event against the policy: right PCR for its kind, digest in the golden values.

    Returns one reason per violation (empty = every measurement allowed).
    """
    reasons: list[str] = []
    for n, e in enumerate(events, 1):
        want = policy.pcr_for(e.kind)
        if e.pcr != want:
            reasons.append(f"event {n} ({e.kind}) was extended into PCR {e.pcr}, policy puts {e.kind} in PCR {want}")
        if e.digest not in policy.allowed.get(e.kind, frozenset()):
            reasons.append(f"event {n} ({e.kind}) digest {e.digest} is not allowed by the policy")
    return reasons
