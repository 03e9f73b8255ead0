"""The daemon's integrity gate (edge): measurements into the TPM, the event log file, self-attestation.

Daemon wiring (see docs/INTEGRITY.md):

    gate = IntegrityGate.start(tcti, policy_path, enrollment_path, event_log_path,
                               manifest_digest=require_integrity("daemon").digest,
                               config_digest=sha256(canonical daemon config), on_transition=audit)
    gate.status()                       # for GET /integrity (state, reasons, ages)
    digest = gate.check_vm_start(cfg)   # before a VM starts: raises IntegrityError -> refuse + audit
    gate.stop()

start() never raises for TPM problems: a missing or broken TPM leaves the gate untrusted with the reason.
It raises IntegrityError only for unusable local files (policy, enrollment unreadable/malformed).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bulkhead.config import VmConfig
from bulkhead.integrity.attest import EVIDENCE_FORMAT, Verdict, nonce_digest, verify_evidence
from bulkhead.integrity.canonical import canonical_json
from bulkhead.integrity.errors import HostUntrusted, IntegrityError, LaunchNotAllowed, TpmError
from bulkhead.integrity.eventlog import (
    UNVERIFIED_MANIFEST_DIGEST,
    ZERO_PCR,
    Event,
    format_event,
    parse_event_log,
    replay,
)
from bulkhead.integrity.gate import GateCore, GateDriver, Transition
from bulkhead.integrity.launch import check_expected_digest, launch_digest_for_config
from bulkhead.integrity.policy import Enrollment, Policy, parse_enrollment, parse_policy
from bulkhead.integrity.tpm import Tpm

__all__ = ["IntegrityGate", "append_event", "config_digest", "make_evidence", "read_event_log"]

TPM_LOCK_TIMEOUT_S = 15.0


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of the daemon configuration (what the gate measures at start).

    Leave secrets (key material) out of `config` or replace them by their own digests.
    Raises IntegrityError if the config holds non-JSON values (floats included).
    """
    return hashlib.sha256(canonical_json(dict(config))).hexdigest()


def read_event_log(path: str | os.PathLike[str]) -> list[Event]:
    """Events from a JSON-lines file ([] when it does not exist). Raises IntegrityError when malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"cannot read the event log {path}: {exc}") from None
    return parse_event_log(text)


def append_event(path: str | os.PathLike[str], event: Event) -> None:
    """Append one event line and fsync it (the log must survive a crash right after the extend)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (format_event(event) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def make_evidence(tpm: Tpm, pcrs: list[int], nonce: str, events: list[Event]) -> dict[str, Any]:
    """Quote `pcrs` with `nonce` and bundle it with the event log. Raises TpmError when the TPM fails."""
    attest, sig = tpm.quote(pcrs, nonce_digest(nonce))
    from bulkhead.integrity.tpmwire import public_name

    return {
        "format": EVIDENCE_FORMAT,
        "nonce": nonce,
        "attest": attest.hex(),
        "signature": sig.hex(),
        "ak_name": public_name(tpm.ak_public()).hex(),
        "events": [e.to_dict() for e in events],
    }


def _load_json_file(path: str | os.PathLike[str], what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"cannot read the {what} {path}: {exc}") from None


class IntegrityGate:
    """Host integrity for the daemon. Build with IntegrityGate.start(...)."""

    def __init__(self, tcti: str, policy: Policy, enrollment: Enrollment | None, log_path: str,
                 on_transition: Callable[[Transition], None] | None, timeout_s: float) -> None:
        self.tcti = tcti
        self.policy = policy
        self.enrollment = enrollment
        self.log_path = log_path
        self.core = GateCore(policy.max_age_s, policy.running_vms_when_untrusted)
        self.driver = GateDriver(self.core, self._attest_once, policy.interval_s, timeout_s, on_transition)
        self._tpm_lock = threading.Lock()
        self._tpm: Tpm | None = None
        self.setup_error: str | None = None

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tcti: str,
        policy_path: str | os.PathLike[str],
        enrollment_path: str | os.PathLike[str] | None,
        event_log_path: str | os.PathLike[str],
        *,
        manifest_digest: str | None,
        config_digest: str,
        on_transition: Callable[[Transition], None] | None = None,
        timeout_s: float = 10.0,
        run_driver: bool = True,
    ) -> IntegrityGate:
        """Measure the daemon (manifest, config) into the TPM, attest once, start periodic attestation.

        `manifest_digest` None means the manifest check was skipped (dev): an "unverified" digest is
        measured, which no policy should allow. Raises IntegrityError only for unusable policy/enrollment.
        """
        policy = parse_policy(_load_json_file(policy_path, "policy"))
        enrollment = None
        if enrollment_path is not None and Path(enrollment_path).exists():
            enrollment = parse_enrollment(_load_json_file(enrollment_path, "enrollment"))
        gate = cls(tcti, policy, enrollment, str(event_log_path), on_transition, timeout_s)
        try:
            gate._measure_start(manifest_digest or UNVERIFIED_MANIFEST_DIGEST, config_digest)
        except IntegrityError as exc:
            gate.setup_error = f"start-up measurement failed: {exc}"
        gate.driver.run_once()
        if run_driver:
            gate.driver.start()
        return gate

    def _open(self) -> Tpm:
        if self._tpm is None:
            self._tpm = Tpm(self.tcti)
        return self._tpm

    def _drop_tpm(self) -> None:
        tpm, self._tpm = self._tpm, None
        if tpm is not None:
            tpm.close()

    def _with_tpm(self, fn: Callable[[Tpm], Any], *, untrust_on_failure: bool = False) -> Any:
        """Run fn on the open TPM (one at a time). Raises TpmError. `untrust_on_failure`: a failed TPM
        call outside an attestation round makes the host untrusted at once (fail closed: GET /integrity
        must not say trusted with a dead TPM until the next attestation; issue 12 soak finding E)."""
        if not self._tpm_lock.acquire(timeout=TPM_LOCK_TIMEOUT_S):
            raise TpmError("the TPM is busy (another TPM operation is hung)")
        try:
            try:
                return fn(self._open())
            except TpmError as exc:
                self._drop_tpm()  # reconnect next time; the TPM may come back (and will not replay)
                if untrust_on_failure:
                    with self.driver.lock:
                        tr = self.core.record_error(f"TPM unavailable: {exc}", time.monotonic())
                    self.driver._emit(tr)
                raise
        finally:
            self._tpm_lock.release()

    def _extend_logged(self, tpm: Tpm, event: Event) -> None:
        # Log first, then extend: a crash in between leaves a log that does not replay (untrusted),
        # never a PCR value with no record of what produced it being trusted.
        append_event(self.log_path, event)
        tpm.extend(event.pcr, event.extend_value)

    def _measure_start(self, manifest_digest: str, config_digest: str) -> None:
        def measure(tpm: Tpm) -> None:
            pcrs = self.policy.pcrs
            current = tpm.read_pcrs(list(pcrs))
            events = read_event_log(self.log_path)
            replayed = replay(events)
            if all(v == ZERO_PCR for v in current.values()) and events:
                # The TPM was reset (reboot / fresh swtpm): the old log describes a previous boot.
                os.replace(self.log_path, self.log_path + f".{int(time.time())}.old")
            elif any(replayed.get(i, ZERO_PCR) != current[i] for i in pcrs):
                # Keep going: the measurements below are still recorded, but attestation will refuse.
                self.setup_error = "the existing event log does not replay to the TPM's current PCRs"
            p = self.policy
            self._extend_logged(tpm, Event(p.host_pcr, "manifest", manifest_digest, "bulkhead manifest"))
            self._extend_logged(tpm, Event(p.host_pcr, "config", config_digest, "bulkhead daemon config"))

        self._with_tpm(measure)

    # ---- attestation ---------------------------------------------------------------------------

    def _attest_once(self) -> Verdict:
        if self.enrollment is None:
            return Verdict(False, ["no AK enrollment: run `bulkhead attest enroll` at provisioning"])
        nonce = secrets.token_hex(16)

        def quote(tpm: Tpm) -> dict[str, Any]:
            return make_evidence(tpm, list(self.policy.pcrs), nonce, read_event_log(self.log_path))

        try:
            evidence = self._with_tpm(quote)
        except IntegrityError as exc:
            return Verdict(False, [f"TPM unavailable: {exc}"])
        verdict = verify_evidence(evidence, self.policy, self.enrollment, nonce)
        if self.setup_error:
            verdict.reasons.append(self.setup_error)
            verdict.trusted = False
        return verdict

    # ---- the daemon's API ------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """State, reasons and ages for the API (GET /integrity). Applies staleness first."""
        self.driver.check()
        with self.driver.lock:
            return self.core.status(time.monotonic())

    def can_start_vm(self) -> bool:
        self.driver.check()
        with self.driver.lock:
            return self.core.can_start_vm(time.monotonic())

    def should_stop_running(self) -> bool:
        with self.driver.lock:
            return self.core.should_stop_running(time.monotonic())

    def check_vm_start(self, config: VmConfig, kernel: bytes | None = None, initrd: bytes | None = None) -> str:
        """Gate + measure a VM launch; returns its launch digest.

        Pass the kernel/initrd bytes the runtime will load (avoids a TOCTOU swap). Raises IntegrityError
        when the host is untrusted or the digest is not a policy golden value, LaunchDigestMismatch when the digest differs from
        config.expected_digest, TpmError when the measurement cannot be extended.
        """
        if not self.can_start_vm():
            reasons = "; ".join(self.core.reasons)
            raise HostUntrusted(f"VM start refused: the host is untrusted ({reasons})")
        digest = launch_digest_for_config(config, kernel, initrd)
        check_expected_digest(config, digest)
        if digest not in self.policy.allowed["vm-launch"]:
            raise LaunchNotAllowed(f"VM start refused: launch digest {digest} is not allowed by the policy")
        event = Event(self.policy.vm_pcr, "vm-launch", digest, f"vm kernel={Path(config.kernel).name}")
        self._with_tpm(lambda tpm: self._extend_logged(tpm, event), untrust_on_failure=True)
        return digest

    def check_vm_restore(self, digest: str | None) -> str:
        """Gate a restore (docs/SNAPSHOT.md "The daemon"): the snapshot's launch digest must be a golden
        value of the policy as it is now, and is extended like a launch. Raises IntegrityError
        (HostUntrusted, LaunchNotAllowed) or TpmError."""
        if not self.can_start_vm():
            raise HostUntrusted(f"VM restore refused: the host is untrusted ({'; '.join(self.core.reasons)})")
        if digest is None or digest not in self.policy.allowed["vm-launch"]:
            raise LaunchNotAllowed(f"VM restore refused: the snapshot's launch digest {digest} is not allowed by "
                                   "the policy")
        event = Event(self.policy.vm_pcr, "vm-launch", digest, "vm restore")
        self._with_tpm(lambda tpm: self._extend_logged(tpm, event), untrust_on_failure=True)
        return digest

    def attest_now(self) -> Verdict:
        """Run one attestation round immediately (e.g. after an operator fixed something)."""
        return self.driver.run_once()

    def stop(self) -> None:
        self.driver.stop()
        with self._tpm_lock:
            self._drop_tpm()
