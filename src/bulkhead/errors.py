"""The error taxonomy. Every failure bulkhead reports belongs to exactly one of these families.

- ConfigError: the user's input is wrong (CLI flag, config, API body, image file). Reported in one
  clear line; nothing is lost; exit status 2 from the CLI.
- HostError: the host cannot do what is asked (no /dev/kvm, missing KVM capability, no permission).
- GuestFault: the guest did something hostile or broken. Contained: it may stop a device or the VM,
  never the VMM, and it is recorded as a security event.
"""

from __future__ import annotations

__all__ = [
    "BulkheadError",
    "ConfigError",
    "DaemonUnreachable",
    "GuestFault",
    "GuestMemoryError",
    "HostError",
    "ImageError",
    "RefusedError",
    "SnapshotError",
    "SnapshotRestoredBefore",
    "StartRefused",
    "VmNotRunning",
]


class BulkheadError(Exception):
    """Base of every error bulkhead raises on purpose."""


class ConfigError(BulkheadError):
    """Invalid user input: CLI flags, configuration, API requests."""


class ImageError(ConfigError):
    """A kernel, initrd or disk image is malformed or does not fit the VM."""


class SnapshotError(ImageError):
    """A snapshot file is malformed, altered, truncated, foreign (another host or VM), of another version,
    or not allowed (its launch digest, or a second restore without --clone). Nothing is restored."""


class SnapshotRestoredBefore(SnapshotError):
    """A second restore of the same snapshot without asking for a clone (it would duplicate the guest's
    secrets and RNG state: docs/SNAPSHOT.md "Clones")."""


class StartRefused(ConfigError):
    """The VMM refused the VM before its guest ran (the loader rejected the image, or the configuration).
    `kind` is "image-invalid" (ImageError) or "config-invalid" (any other ConfigError)."""

    def __init__(self, message: str, *, kind: str = "config-invalid") -> None:
        super().__init__(message)
        self.kind = kind

    @classmethod
    def of(cls, exc: ConfigError) -> StartRefused:
        """The refusal for a ConfigError, its kind decided by its type."""
        if isinstance(exc, StartRefused):
            return exc
        return cls(str(exc), kind="image-invalid" if isinstance(exc, ImageError) else "config-invalid")


class HostError(BulkheadError):
    """The host lacks something bulkhead needs (KVM, a capability, a permission)."""


class VmNotRunning(HostError):
    """A lifecycle operation needs a running (or paused) VMM and there is none."""


class DaemonUnreachable(HostError):
    """No daemon answered at any of the endpoints tried (the message names each one). Exit status 3."""


class RefusedError(BulkheadError):
    """The other side refused a request (e.g. the daemon's API answered with an error status)."""


class GuestFault(BulkheadError):
    """The guest violated a device or memory contract. Contained and audited, never fatal to the VMM."""

    def __init__(self, message: str, *, device: str = "", kind: str = "guest-fault") -> None:
        super().__init__(message)
        self.device = device
        self.kind = kind


class GuestMemoryError(GuestFault):
    """A guest-supplied address range is not wholly inside one guest RAM region."""

    def __init__(self, message: str, *, addr: int = 0, length: int = 0) -> None:
        super().__init__(message, kind="guest-memory")
        self.addr = addr
        self.length = length
