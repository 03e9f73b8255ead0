"""Fail-closed integrity gate: a pure state machine plus a small periodic driver thread.

States: "trusted" and "untrusted", each with reasons. The gate starts untrusted ("no attestation yet").
Transitions:
  - a trusted Verdict                     -> trusted (this is the only way in)
  - an untrusted Verdict or an error      -> untrusted, with every reason
  - no trusted Verdict within max_age_s   -> untrusted ("stale"), checked on every query, so a driver that
    died or hangs cannot keep the host trusted (Keylime CVE-2022-3500)
can_start_vm(now) is True only in the trusted state after the staleness check.

Running VMs when the host becomes untrusted: the policy's `running_vms_when_untrusted` says "keep"
(default: they keep running, no new VM starts, the API and audit log say so) or "stop" (the daemon
stops them); should_stop_running() tells the daemon which.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bulkhead.integrity.attest import Verdict

__all__ = ["GateCore", "GateDriver", "Transition"]

TRUSTED = "trusted"
UNTRUSTED = "untrusted"


@dataclass(frozen=True)
class Transition:
    old: str
    new: str
    reasons: tuple[str, ...]
    at: float


@dataclass
class GateCore:
    """Pure state machine. Every method takes `now` (monotonic seconds); none does I/O."""

    max_age_s: float
    running_vms_when_untrusted: str = "keep"
    state: str = UNTRUSTED
    reasons: list[str] = field(default_factory=lambda: ["no attestation yet"])
    last_success: float | None = None
    last_attempt: float | None = None
    attempts: int = 0
    failures: int = 0

    def _set(self, new: str, reasons: list[str], now: float) -> Transition | None:
        old, old_reasons = self.state, self.reasons
        self.state, self.reasons = new, list(reasons)
        if old != new or (new == UNTRUSTED and old_reasons != self.reasons):
            return Transition(old, new, tuple(reasons), now)
        return None

    def record(self, verdict: Verdict, now: float) -> Transition | None:
        """Apply an attestation result. Returns the transition (for the audit log) or None."""
        self.attempts += 1
        self.last_attempt = now
        if verdict.trusted and not verdict.reasons:
            self.last_success = now
            return self._set(TRUSTED, [], now)
        self.failures += 1
        return self._set(UNTRUSTED, verdict.reasons or ["attestation failed without a reason"], now)

    def record_error(self, reason: str, now: float) -> Transition | None:
        """An attestation could not even be attempted (TPM gone, timeout, crash): untrusted."""
        return self.record(Verdict(False, [reason]), now)

    def tick(self, now: float) -> Transition | None:
        """Apply staleness: no successful attestation within max_age_s -> untrusted."""
        if self.state == TRUSTED and (self.last_success is None or now - self.last_success > self.max_age_s):
            age = "never" if self.last_success is None else f"{now - self.last_success:.1f} s ago"
            return self._set(UNTRUSTED, [f"attestation is stale: last success {age}, max age "
                                         f"{self.max_age_s:g} s"], now)
        return None

    def can_start_vm(self, now: float) -> bool:
        self.tick(now)
        return self.state == TRUSTED

    def should_stop_running(self, now: float) -> bool:
        """True when untrusted and the policy says running VMs must be stopped."""
        self.tick(now)
        return self.state == UNTRUSTED and self.running_vms_when_untrusted == "stop"

    def status(self, now: float) -> dict[str, object]:
        self.tick(now)
        return {
            "state": self.state,
            "reasons": list(self.reasons),
            "last_success_age_s": None if self.last_success is None else round(now - self.last_success, 3),
            "max_age_s": self.max_age_s,
            "attempts": self.attempts,
            "failures": self.failures,
            "running_vms_when_untrusted": self.running_vms_when_untrusted,
        }


class GateDriver:
    """Runs `attest()` every `interval_s` in a daemon thread and feeds the result to `core`.

    Each attempt runs in its own helper thread bounded by `timeout_s`: a hung TPM is an error, not a
    stall. `on_transition` is called (from the driver thread) for every state change, e.g. to audit it.
    All access to `core` goes through `lock`.
    """

    def __init__(
        self,
        core: GateCore,
        attest: Callable[[], Verdict],
        interval_s: float,
        timeout_s: float = 10.0,
        on_transition: Callable[[Transition], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.lock = threading.Lock()
        self._attest = attest
        self._interval = interval_s
        self._timeout = timeout_s
        self._on_transition = on_transition
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _emit(self, tr: Transition | None) -> None:
        if tr is not None and self._on_transition is not None:
            try:
                self._on_transition(tr)
            except Exception as exc:  # an audit sink failure must not stop the gate from gating
                print(f"bulkhead: integrity transition callback failed: {exc!r}", file=sys.stderr)

    def run_once(self) -> Verdict:
        """One attestation round, synchronously. Never raises; returns the verdict it recorded."""
        box: list[Verdict] = []

        def target() -> None:
            try:
                box.append(self._attest())
            except Exception as exc:
                box.append(Verdict(False, [f"attestation error: {type(exc).__name__}: {exc}"]))

        t = threading.Thread(target=target, name="bulkhead-attest", daemon=True)
        t.start()
        t.join(self._timeout)
        verdict = box[0] if box else Verdict(False, [f"attestation timed out after {self._timeout:g} s "
                                                     "(TPM unresponsive)"])
        with self.lock:
            tr = self.core.record(verdict, self._clock())
        self._emit(tr)
        return verdict

    def check(self) -> Transition | None:
        """Apply staleness now (call it from status queries too)."""
        with self.lock:
            tr = self.core.tick(self._clock())
        self._emit(tr)
        return tr

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.run_once()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bulkhead-gate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(self._timeout + self._interval + 1)
