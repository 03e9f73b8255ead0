"""The daemon's fail-closed gate (IntegrityGate) against a REAL swtpm.

Clean host -> trusted and VMs start; everything else -> untrusted/refused, with the transition reported
to the audit callback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (and libtss2) not installed")
if shutil.which("swtpm") is None:
    pytest.skip("swtpm is not installed", allow_module_level=True)

from bulkhead.integrity import IntegrityError, IntegrityGate, LaunchDigestMismatch
from bulkhead.integrity.gate import Transition
from bulkhead.integrity.host import config_digest
from bulkhead.integrity.launch import launch_digest_for_config
from bulkhead.integrity.tpm import SwTpm, Tpm, enroll
from bulkhead.runtime.config import VmConfig

MANIFEST = "5a" * 32
CONFIG = config_digest({"listen": "127.0.0.1:8443", "state": "/var/lib/bulkhead"})


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwTpm]:
    sw = SwTpm(str(tmp_path / "tpm")).start()
    yield sw
    if sw.proc is not None:
        sw.proc.send_signal(signal.SIGCONT)
    sw.cleanup()


class Env:
    def __init__(self, sw: SwTpm, tmp: Path) -> None:
        self.sw, self.tmp = sw, tmp
        self.kernel = tmp / "vmlinux"
        self.kernel.write_bytes(b"\x7fELF good guest kernel")
        self.good_vm = VmConfig(kernel=str(self.kernel), cmdline="console=ttyS0", mem_mib=64)
        self.good_digest = launch_digest_for_config(self.good_vm)
        with Tpm(sw.tcti) as tpm:
            enr = enroll(tpm)
        self.enrollment = tmp / "enrollment.json"
        self.enrollment.write_text(json.dumps(enr.to_dict()))
        self.log = tmp / "events.jsonl"
        self.events: list[Transition] = []
        self.gates: list[IntegrityGate] = []
        self.policy_doc: dict[str, Any] = {
            "format": "bulkhead-policy/1", "ek_sha256": enr.ek_sha256,
            "allowed": {"manifest": [MANIFEST], "config": [CONFIG], "vm-launch": [self.good_digest]},
            "max_age_s": 5, "interval_s": 0.1,
        }

    def start(self, manifest: str | None = MANIFEST, run_driver: bool = True, timeout_s: float = 5.0,
              **policy: Any) -> IntegrityGate:
        path = self.tmp / "policy.json"
        path.write_text(json.dumps({**self.policy_doc, **policy}))
        gate = IntegrityGate.start(self.sw.tcti, path, self.enrollment, self.log, manifest_digest=manifest,
                                   config_digest=CONFIG, on_transition=self.events.append,
                                   timeout_s=timeout_s, run_driver=run_driver)
        self.gates.append(gate)
        return gate


@pytest.fixture
def env(swtpm: SwTpm, tmp_path: Path) -> Iterator[Env]:
    e = Env(swtpm, tmp_path)
    yield e
    for g in e.gates:
        g.stop()


def _wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class _Rounds:
    """Counts the background driver's completed attestation rounds, so a test waits for the round
    itself (not for a guessed amount of time). The driver loop calls `self.run_once()`; wrapping that
    instance attribute sees every periodic round."""

    def __init__(self, gate: IntegrityGate) -> None:
        self.n = 0
        self._cv = threading.Condition()
        inner = gate.driver.run_once

        def counted() -> Any:
            v = inner()
            with self._cv:
                self.n += 1
                self._cv.notify_all()
            return v
        gate.driver.run_once = counted  # type: ignore[method-assign]

    def wait(self, more: int, timeout: float = 10.0) -> bool:
        """Wait until `more` rounds complete after this call."""
        with self._cv:
            goal = self.n + more
            return self._cv.wait_for(lambda: self.n >= goal, timeout)


def test_clean_host_attests_and_starts_vms(env: Env) -> None:
    gate = env.start()
    rounds = _Rounds(gate)
    st = gate.status()
    assert st["state"] == "trusted", st["reasons"]
    assert env.events and env.events[-1].new == "trusted"
    assert gate.check_vm_start(env.good_vm) == env.good_digest
    # the launch was measured and the log still replays: the next rounds stay trusted
    assert gate.attest_now().trusted
    assert [json.loads(x)["kind"] for x in env.log.read_text().splitlines()] == ["manifest", "config", "vm-launch"]
    assert rounds.wait(2), "the background driver ran no further rounds"
    assert gate.status()["state"] == "trusted" and gate.can_start_vm()


def test_kernel_swapped_after_create_is_refused(env: Env) -> None:
    gate = env.start()
    created = VmConfig(kernel=str(env.kernel), cmdline="console=ttyS0", mem_mib=64,
                       expected_digest=env.good_digest)
    env.kernel.write_bytes(b"\x7fELF evil guest kernel")
    with pytest.raises(LaunchDigestMismatch, match="differs from the expected digest"):
        gate.check_vm_start(created)
    # nothing was measured for the refused launch; the host stays trusted
    assert len(env.log.read_text().splitlines()) == 2
    assert gate.attest_now().trusted


def test_launch_not_in_policy_is_refused(env: Env) -> None:
    gate = env.start()
    with pytest.raises(IntegrityError, match="not allowed by the policy"):
        gate.check_vm_start(VmConfig(kernel=str(env.kernel), cmdline="init=/bin/sh", mem_mib=64))


def test_unverified_installation_never_attests(env: Env) -> None:
    """A daemon whose manifest check was skipped (dev) or failed measures an unverified digest."""
    gate = env.start(manifest=None)
    st = gate.status()
    assert st["state"] == "untrusted"
    assert any("manifest" in r and "not allowed" in r for r in st["reasons"])  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError, match="host is untrusted"):
        gate.check_vm_start(env.good_vm)


def test_missing_enrollment_is_untrusted(env: Env) -> None:
    env.enrollment.unlink()
    gate = env.start()
    assert not gate.can_start_vm()
    assert "no AK enrollment" in gate.status()["reasons"][0]  # type: ignore[index]


def test_tpm_going_away_makes_host_untrusted(env: Env) -> None:
    gate = env.start()
    rounds = _Rounds(gate)
    assert gate.can_start_vm()
    env.sw.stop()  # kill swtpm while the gate runs
    assert _wait_for(lambda: gate.status()["state"] == "untrusted", 5.0)
    reasons = " ".join(gate.status()["reasons"])  # type: ignore[arg-type]
    assert "TPM" in reasons
    assert any(t.new == "untrusted" for t in env.events)  # reported for the audit log
    with pytest.raises(IntegrityError, match="host is untrusted"):
        gate.check_vm_start(env.good_vm)
    # the TPM comes back reset (new boot): the old log no longer replays; still untrusted
    env.sw.start()  # returns once it accepts connections
    assert rounds.wait(1), "no driver round ran against the restarted TPM"
    v = gate.attest_now()
    assert not v.trusted and any("does not reproduce" in r for r in v.reasons)
    assert not gate.can_start_vm()


def test_attestation_that_stops_arriving_goes_stale(env: Env) -> None:
    """Keylime CVE-2022-3500: no periodic attestation -> untrusted after max_age, no VM starts."""
    gate = env.start(run_driver=False, max_age_s=1, interval_s=0.5)
    t0 = time.monotonic()
    assert gate.can_start_vm()
    # wait for the staleness itself: it must come, and not before max_age_s has passed
    assert _wait_for(lambda: not gate.can_start_vm(), 5.0)
    assert time.monotonic() - t0 >= 0.9
    st = gate.status()
    assert st["state"] == "untrusted" and "stale" in st["reasons"][0]  # type: ignore[index]
    assert env.events[-1].new == "untrusted" and "stale" in env.events[-1].reasons[0]
    with pytest.raises(IntegrityError, match="stale"):
        gate.check_vm_start(env.good_vm)
    assert gate.attest_now().trusted and gate.can_start_vm()  # a passing attestation restores trust


def test_hung_tpm_times_out_to_untrusted(env: Env) -> None:
    gate = env.start(run_driver=False, timeout_s=1.0)
    assert gate.can_start_vm()
    assert env.sw.proc is not None
    os.kill(env.sw.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        v = gate.attest_now()
        assert time.monotonic() - t0 < 3
        assert not v.trusted and "timed out" in v.reasons[0]
        assert not gate.can_start_vm()
    finally:
        os.kill(env.sw.proc.pid, signal.SIGCONT)


def test_running_vm_policy_is_reported(env: Env) -> None:
    gate = env.start(running_vms_when_untrusted="stop")
    assert not gate.should_stop_running()
    env.sw.stop()
    assert _wait_for(lambda: gate.should_stop_running(), 5.0)
    assert gate.status()["running_vms_when_untrusted"] == "stop"


def test_a_failed_tpm_call_makes_the_host_untrusted_at_once(env: Env) -> None:
    """Soak finding E: with the periodic attestation not running (or not due yet), a VM start whose PCR
    extend fails (swtpm killed) leaves the host untrusted at once, with the reason, and reported."""
    gate = env.start(run_driver=False)
    assert gate.status()["state"] == "trusted"
    env.sw.stop()  # the attack: the TPM dies between two attestations
    with pytest.raises(IntegrityError, match="TPM"):
        gate.check_vm_start(env.good_vm)
    st = gate.status()
    assert st["state"] == "untrusted" and "TPM unavailable" in " ".join(st["reasons"])  # type: ignore[arg-type]
    assert any(t.new == "untrusted" for t in env.events)
    with pytest.raises(IntegrityError, match="host is untrusted"):
        gate.check_vm_start(env.good_vm)
