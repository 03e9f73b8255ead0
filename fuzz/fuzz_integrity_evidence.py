"""atheris harness for the attestation verifier (bulkhead.integrity.attest.verify_evidence) and the event
log / policy parsers. Crash = verify_evidence raising anything, or saying "trusted" for fuzzed evidence
(there is no valid AK signature in random input, so a trusted verdict is a fail-open bug), or a parser
raising anything but IntegrityError.

Input: bytes split on the first two 0xff bytes into (evidence JSON, event log JSON lines, policy JSON).

Run: .venv/bin/python fuzz/fuzz_integrity_evidence.py -runs=50000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.integrity.attest import verify_evidence
    from bulkhead.integrity.errors import IntegrityError
    from bulkhead.integrity.eventlog import parse_event_log, replay
    from bulkhead.integrity.policy import parse_policy

POLICY = {"format": "bulkhead-policy/1", "ek_sha256": "00" * 32, "allowed": {"manifest": ["11" * 32]}}
ENROLLMENT = {"format": "bulkhead-enrollment/1", "ek_public": "00", "ak_public": "00", "ak_name": "00",
              "activation": {"verified": True, "challenge_sha256": ""}}


def run(data: bytes) -> None:
    parts = [*data.split(b"\xff", 2), b"", b""]
    evidence, log, policy = parts[0], parts[1], parts[2]
    verdict = verify_evidence(evidence, POLICY, ENROLLMENT, "nonce")
    if verdict.trusted:
        raise AssertionError(f"fuzzed evidence was trusted: {verdict}")
    try:
        replay(parse_event_log(log.decode("utf-8", "replace")))
    except IntegrityError:
        pass
    try:
        parse_policy(policy)
    except IntegrityError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
