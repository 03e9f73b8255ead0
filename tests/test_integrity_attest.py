"""Attestation against a REAL swtpm: the positive path and every refusal the verifier owes.

Each test starts its own swtpm process(es) on free ports in a temp dir and kills them afterwards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")
if shutil.which("swtpm") is None:
    pytest.skip("swtpm is not installed", allow_module_level=True)

from bulkhead.integrity import IntegrityError
from bulkhead.integrity.attest import verify_evidence
from bulkhead.integrity.cli import attest_main
from bulkhead.integrity.eventlog import Event
from bulkhead.integrity.host import append_event, make_evidence, read_event_log
from bulkhead.integrity.policy import Enrollment
from bulkhead.integrity.tpm import SwTpm, Tpm, activate_challenge, enroll, make_challenge
from bulkhead.integrity.tpmwire import public_name

PCRS = [14, 15]
MANIFEST, CONFIG, LAUNCH = "a1" * 32, "b2" * 32, "c3" * 32


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwTpm]:
    sw = SwTpm(str(tmp_path / "tpm-a")).start()
    yield sw
    sw.cleanup()


@pytest.fixture
def swtpm_b(tmp_path: Path) -> Iterator[SwTpm]:
    sw = SwTpm(str(tmp_path / "tpm-b")).start()
    yield sw
    sw.cleanup()


class Host:
    """A measured host: TPM + event log + the verifier's enrollment and policy for it."""

    def __init__(self, sw: SwTpm, tmp: Path) -> None:
        self.tpm = Tpm(sw.tcti)
        self.enrollment = enroll(self.tpm)
        self.log = tmp / f"events-{sw.port}.jsonl"
        for ev in (Event(14, "manifest", MANIFEST, "m"), Event(14, "config", CONFIG, "c"),
                   Event(15, "vm-launch", LAUNCH, "vm")):
            self.measure(ev)
        self.policy: dict[str, Any] = {
            "format": "bulkhead-policy/1", "ek_sha256": self.enrollment.ek_sha256,
            "allowed": {"manifest": [MANIFEST], "config": [CONFIG], "vm-launch": [LAUNCH]},
        }

    def measure(self, ev: Event) -> None:
        append_event(self.log, ev)
        self.tpm.extend(ev.pcr, ev.extend_value)

    def quote(self, nonce: str) -> dict[str, Any]:
        return make_evidence(self.tpm, PCRS, nonce, read_event_log(self.log))


@pytest.fixture
def host(swtpm: SwTpm, tmp_path: Path) -> Iterator[Host]:
    h = Host(swtpm, tmp_path)
    yield h
    h.tpm.close()


def test_clean_host_attests(host: Host) -> None:
    verdict = verify_evidence(host.quote("nonce-1"), host.policy, host.enrollment.to_dict(), "nonce-1")
    assert verdict.trusted, verdict.reasons
    assert verdict.reasons == [] and len(verdict.passed) == 6
    from bulkhead.integrity.attest import ak_qualified_name
    from bulkhead.integrity.tpmwire import parse_quote_attest

    info = parse_quote_attest(bytes.fromhex(host.quote("x")["attest"]))
    assert info.qualified_signer == ak_qualified_name(host.enrollment.ak_name)
    # the PCRs in the TPM are what the log replays to
    from bulkhead.integrity.eventlog import replay

    assert host.tpm.read_pcrs(PCRS) == {i: replay(read_event_log(host.log))[i] for i in PCRS}


def test_ek_ak_swap_cannot_be_enrolled(host: Host, swtpm_b: SwTpm) -> None:
    """CVE-2022-1053: an AK from TPM B claimed under TPM A's EK must fail credential activation."""
    with Tpm(swtpm_b.tcti) as other:
        blob, enc, secret = make_challenge(host.tpm.ek_public(), public_name(other.ak_public()))
        with pytest.raises(IntegrityError, match="binding refused"):
            activate_challenge(other, blob, enc, secret)
        with pytest.raises(IntegrityError, match="binding refused"):
            enroll(other, ek_public=host.tpm.ek_public())
        # and TPM A cannot answer a challenge made for TPM B's AK name either
        blob, enc, secret = make_challenge(host.tpm.ek_public(), public_name(other.ak_public()))
        with pytest.raises(IntegrityError, match="binding refused"):
            activate_challenge(host.tpm, blob, enc, secret)


def test_quote_from_a_different_tpm_is_refused(host: Host, swtpm_b: SwTpm, tmp_path: Path) -> None:
    """A second swtpm with identical measurements quotes; the verifier trusts only TPM A."""
    other = Host(swtpm_b, tmp_path)
    try:
        evidence = other.quote("n")
        # B's quote checked against A's enrollment: signature does not verify with A's AK
        v = verify_evidence(evidence, host.policy, host.enrollment.to_dict(), "n")
        assert not v.trusted
        assert any("signature" in r for r in v.reasons) and any("not the enrolled AK" in r for r in v.reasons)
        # B's own (genuine) enrollment against A's policy: the EK is not the expected one
        v = verify_evidence(evidence, host.policy, other.enrollment.to_dict(), "n")
        assert not v.trusted and any("not the policy's expected EK" in r for r in v.reasons)
        # a forged enrollment pairing A's EK with B's AK claims a binding that never happened:
        # it cannot be produced by enroll() (see above); a hand-written one without activation is refused
        forged = Enrollment(host.tpm.ek_public(), other.tpm.ak_public(), public_name(other.tpm.ak_public()),
                            False, "")
        v = verify_evidence(evidence, host.policy, forged, "n")
        assert not v.trusted and any("credential activation" in r for r in v.reasons)
    finally:
        other.tpm.close()


def test_replayed_quote_with_old_nonce_is_refused(host: Host) -> None:
    old = host.quote("nonce-old")
    assert verify_evidence(old, host.policy, host.enrollment.to_dict(), "nonce-old").trusted
    v = verify_evidence(old, host.policy, host.enrollment.to_dict(), "nonce-new")
    assert not v.trusted and any("nonce" in r for r in v.reasons)
    # editing the nonce field of the evidence does not help: the signed attest carries the old one
    old["nonce"] = "nonce-new"
    assert not verify_evidence(old, host.policy, host.enrollment.to_dict(), "nonce-new").trusted


@pytest.mark.parametrize("where", ["signature-r", "signature-s", "attest-body", "truncated"])
def test_corrupted_quote_signature_is_refused(host: Host, where: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """CVE-2023-3674: a bad signature is a refusal (untrusted verdict, non-zero exit), not a log line."""
    ev = host.quote("n")
    if where.startswith("signature"):
        sig = bytearray(bytes.fromhex(ev["signature"]))
        sig[8 if where == "signature-r" else -3] ^= 0x01
        ev["signature"] = sig.hex()
    elif where == "attest-body":
        att = bytearray(bytes.fromhex(ev["attest"]))
        att[-1] ^= 0x01  # the quoted PCR digest
        ev["attest"] = att.hex()
    else:
        ev["signature"] = ev["signature"][:-8]
    v = verify_evidence(ev, host.policy, host.enrollment.to_dict(), "n")
    assert not v.trusted
    assert any("signature" in r for r in v.reasons)
    assert "quote signature verifies with the enrolled AK" not in v.passed
    paths = _write_docs(tmp_path, ev, host)
    assert attest_main(["verify", paths["ev"], "--policy", paths["pol"], "--enrollment", paths["enr"],
                        "--nonce", "n"]) == 1
    assert "verdict: untrusted" in capsys.readouterr().out


def test_tampered_event_log_does_not_replay(host: Host) -> None:
    ev = host.quote("n")
    ev["events"] = ev["events"][:-1]  # hide the VM launch
    v = verify_evidence(ev, host.policy, host.enrollment.to_dict(), "n")
    assert not v.trusted and any("does not reproduce" in r for r in v.reasons)


def test_measurement_not_in_policy_is_refused(host: Host) -> None:
    host.measure(Event(15, "vm-launch", "dd" * 32, "unknown guest"))
    v = verify_evidence(host.quote("n"), host.policy, host.enrollment.to_dict(), "n")
    assert not v.trusted and any("not allowed by the policy" in r for r in v.reasons)


def test_pcr_extended_outside_the_log_is_refused(host: Host) -> None:
    host.tpm.extend(14, b"\x66" * 32)  # something measured without a log record
    v = verify_evidence(host.quote("n"), host.policy, host.enrollment.to_dict(), "n")
    assert not v.trusted and any("does not reproduce" in r for r in v.reasons)


def _write_docs(tmp: Path, evidence: dict[str, Any], host: Host) -> dict[str, str]:
    paths = {"ev": tmp / "quote.json", "pol": tmp / "policy.json", "enr": tmp / "enrollment.json"}
    paths["ev"].write_text(json.dumps(evidence))
    paths["pol"].write_text(json.dumps(host.policy))
    paths["enr"].write_text(json.dumps(host.enrollment.to_dict()))
    return {k: str(v) for k, v in paths.items()}


def test_cli_enroll_quote_verify(swtpm: SwTpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enr, log, q, pol = (str(tmp_path / n) for n in ("enr.json", "log.jsonl", "q.json", "pol.json"))
    assert attest_main(["enroll", "--tcti", swtpm.tcti, "-o", enr]) == 0
    with Tpm(swtpm.tcti) as tpm:
        for e in (Event(14, "manifest", MANIFEST), Event(15, "vm-launch", LAUNCH)):
            append_event(log, e)
            tpm.extend(e.pcr, e.extend_value)
    assert attest_main(["policy-init", "--enrollment", enr, "--log", log, "-o", pol]) == 0
    assert attest_main(["quote", "--tcti", swtpm.tcti, "--nonce", "cli-nonce", "--log", log, "-o", q]) == 0
    capsys.readouterr()
    assert attest_main(["verify", q, "--policy", pol, "--enrollment", enr, "--nonce", "cli-nonce"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("verdict: trusted") and "FAIL" not in out
    assert attest_main(["verify", q, "--policy", pol, "--enrollment", enr, "--nonce", "other", "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "untrusted" and verdict["reasons"]
    # no TPM at that address: host error, exit 4 (bulkhead.exitstatus)
    assert attest_main(["quote", "--tcti", "swtpm:host=127.0.0.1,port=1", "--nonce", "x", "--log", log]) == 4
