"""Why a VM stopped, and the exit status `bulkhead run` returns for it (pure).

Debug-exit statuses are always odd ((v << 1) | 1, as QEMU's isa-debug-exit), so every other reason
uses an even status and the two can never be confused.
"""

from __future__ import annotations

from typing import NamedTuple

from bulkhead.exitstatus import STATUS

__all__ = ["EXIT_STATUS", "ExitReason"]

EXIT_STATUS: dict[str, int] = {
    "poweroff": 0,  # the guest powered off (KVM system event)
    "config-error": STATUS["config-error"],  # 2, user error: bad flag, config or image (bulkhead.exitstatus)
    "host-error": STATUS["host-error"],  # 4, host lacks something (KVM, capability, permission)
    "reset": 6,  # guest reset (i8042 0xfe, KVM system event reset)
    "triple-fault": 8,  # KVM_EXIT_SHUTDOWN
    "halted": 10,  # every vCPU halted with interrupts disabled: nothing can ever wake the guest
    "internal-error": 12,  # KVM internal error, emulation failure, failed VM entry
    "guest-fault": 14,  # the guest broke a contract the VMM cannot contain by stopping a device
    "worker-crash": 16,  # the worker process died (jailed mode)
    "seccomp-kill": 18,  # the worker was killed by its seccomp filter (jailed mode)
    "oom-kill": 20,  # the worker hit its cgroup memory limit (jailed mode)
    "protocol-violation": 22,  # the worker sent a malformed or oversized message and was ended (jailed mode)
    "snapshotted": 24,  # the host stopped the VM and it was saved to a snapshot (bulkhead run --snapshot-on-exit)
    "migrated": 26,  # the VM was live-migrated to another host and runs there now (runtime/migrate.py)
    "interrupted": 130,  # SIGINT/SIGTERM from the host
}


class ExitReason(NamedTuple):
    """kind is a key of EXIT_STATUS or "debug-exit"; status is what the process exits with."""

    kind: str
    status: int
    detail: str = ""

    @classmethod
    def of(cls, kind: str, detail: str = "") -> ExitReason:
        return cls(kind, EXIT_STATUS[kind], detail)

    @classmethod
    def debug_exit_status(cls, status: int) -> ExitReason:
        """The guest wrote v to the debug-exit port; status is ((v << 1) | 1) & 0xff."""
        return cls(
            "debug-exit",
            status & 0xFF,
            f"guest wrote {(status >> 1) & 0x7F:#x} (mod 128) to the debug-exit port",
        )

    def describe(self) -> str:
        text = f"VM stopped: {self.kind} (exit status {self.status})"
        return f"{text}: {self.detail}" if self.detail else text
