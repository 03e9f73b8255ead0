"""The daemon's view of host integrity: which gate it runs with, and how a VM launch is measured.

Three modes (docs/INTEGRITY.md, "The daemon"):

- `tpm`   -- `TpmIntegrity`: the real gate (bulkhead.integrity.host.IntegrityGate): the daemon's manifest
             and configuration digests are extended at start, every VM launch digest before the VM
             starts, the host is attested at start and periodically, and no VM starts while untrusted.
- `none`  -- `NoTpm`: no TPM was configured. The host is untrusted ("no TPM configured") and no VM
             starts. This is what `bulkhead serve` does without --tpm / --dev-tpm: fail closed.
- `off`   -- `IntegrityOff`: no gate at all. Only for a backend that runs no guest (FakeBackend), or
             inside a pytest process (the test harness); Daemon.open refuses it anywhere else. It is
             announced on stderr, audited at daemon start, and GET /integrity says `off`.

Every mode checks a VM's `expected_digest` (LaunchDigestMismatch) from the same kernel/initrd bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bulkhead.config import vsock_of
from bulkhead.errors import HostError
from bulkhead.integrity.errors import HostUntrusted, IntegrityError
from bulkhead.integrity.launch import check_expected_digest, config_devices, launch_digest_for_config
from bulkhead.runtime.config import DriveConfig, NetConfig, VmConfig

__all__ = [
    "HostIntegrity",
    "IntegrityOff",
    "IntegrityOptions",
    "NoTpm",
    "TpmIntegrity",
    "check_code",
    "daemon_config_digest",
    "launch_components",
    "measure_spec",
    "start_host_integrity",
    "vm_config_of",
]

MAX_IMAGE = 1 << 30


class HostIntegrity(Protocol):
    mode: str

    def status(self) -> dict[str, Any]: ...
    def check_vm_start(self, config: VmConfig, kernel: bytes, initrd: bytes | None) -> str: ...
    # a restore (docs/SNAPSHOT.md "The daemon"): the snapshot's launch digest, as the policy allows it today
    def check_vm_restore(self, digest: str | None) -> str: ...
    def should_stop_running(self) -> bool: ...
    def stop(self) -> None: ...


def _net(n: Any) -> NetConfig:
    if isinstance(n, NetConfig):
        return n
    tap, mac = n
    return NetConfig(tap, mac)


def vm_config_of(spec: Any, expected_digest: str | None = None) -> VmConfig:
    """The runtime VmConfig a backend builds from a daemon VmSpec (what is measured is what runs:
    bulkhead.sandbox.backend.JailedBackend builds the same fields). Raises ConfigError."""
    return VmConfig(
        kernel=spec.kernel, initrd=spec.initrd, cmdline=spec.cmdline, mem_mib=spec.mem_mib, cpus=spec.cpus,
        drives=tuple(DriveConfig(p, ro) for p, ro in spec.drives), nets=tuple(_net(n) for n in spec.nics),
        rng=bool(spec.rng), serial="stdio", expected_digest=expected_digest, vsock=vsock_of(spec),
    )



def _read(path: str, what: str) -> bytes:
    """Read an image once (the bytes measured are the bytes a TOCTOU-free loader would get).
    Raises IntegrityError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except OSError as exc:
        raise IntegrityError(f"cannot read the {what} {path} to measure it: {exc.strerror}", path=path) from None
    if len(data) > MAX_IMAGE:
        raise IntegrityError(f"the {what} {path} is larger than {MAX_IMAGE >> 20} MiB", path=path)
    return data


def measure_spec(spec: Any, expected_digest: str | None = None) -> tuple[VmConfig, bytes, bytes | None, str]:
    """(config, kernel bytes, initrd bytes, launch digest) of a VmSpec, reading each image once.
    Raises IntegrityError (unreadable image) or ConfigError (invalid config)."""
    config = vm_config_of(spec, expected_digest)
    kernel = _read(config.kernel, "kernel")
    initrd = _read(config.initrd, "initrd") if config.initrd else None
    return config, kernel, initrd, launch_digest_for_config(config, kernel, initrd)


class _Region:
    __slots__ = ("base", "end", "size")

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size, self.end = base, size, base + size


class _PlanOnlyMemory:
    """Guest RAM as the loader sees it (the VMM's region layout and its bounds checks, borrowed from
    GuestMemory) without allocating any: load_kernel checks every destination before its first write, so
    a load into this validates exactly what the VMM's load would, and writes nothing."""

    closed = False

    def __init__(self, mem_bytes: int) -> None:
        from bulkhead.memory.layout import ram_regions

        self.regions = tuple(_Region(b, n) for b, n in ram_regions(mem_bytes))
        self.size = sum(r.size for r in self.regions)

    from bulkhead.memory.guest import GuestMemory as _GM

    find = _GM.find
    contains = _GM.contains
    del _GM

    def write(self, addr: int, data: Any) -> None:
        return None

    def fill(self, addr: int, length: int) -> None:
        return None


def check_boot(config: VmConfig, kernel: bytes, initrd: bytes | None) -> None:
    """The VMM loader's own validation of this image, placement and configuration, run in the daemon
    (bulkhead.boot.load_kernel on plan-only memory), so a VM the loader would refuse is refused at
    `vm create` and `vm start` instead of being reported as started. The command line includes the
    virtio-mmio announcements the VMM appends (one per device). Raises ImageError or ConfigError."""
    from bulkhead.boot import load_kernel
    from bulkhead.boot.acpi import VirtioSlot
    from bulkhead.devices.virtio.mmio import kernel_cmdline_entry
    from bulkhead.memory.layout import (
        VIRTIO_FIRST_IRQ,
        VIRTIO_MMIO_BASE,
        VIRTIO_MMIO_SIZE,
        VIRTIO_MMIO_STRIDE,
    )

    devices = len(config.drives) + len(config.nets) + (1 if config.rng else 0)
    slots = [VirtioSlot(VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_SIZE, VIRTIO_FIRST_IRQ + i)
             for i in range(devices)]
    extra = [kernel_cmdline_entry(s.base, s.irq, s.size) for s in slots]
    cmdline = " ".join(p for p in (config.cmdline, *extra) if p)
    plan_only: Any = _PlanOnlyMemory(config.mem_bytes)  # duck-typed: what load_kernel uses of GuestMemory
    load_kernel(plan_only, kernel, initrd=initrd, cmdline=cmdline, cpus=config.cpus,
                protocol=config.boot_protocol, virtio=slots)


def launch_components(config: VmConfig, kernel: bytes, initrd: bytes | None) -> dict[str, Any]:
    """The measured fields, for GET /vms/{id}/measurement (so a verifier can see what changed)."""
    return {
        "kernel_sha256": hashlib.sha256(kernel).hexdigest(),
        "initrd_sha256": hashlib.sha256(initrd).hexdigest() if initrd is not None else None,
        "cmdline": config.cmdline, "mem_mib": config.mem_mib, "cpus": config.cpus,
        "boot": config.boot_protocol, "devices": sorted(config_devices(config)),
    }


def _base_status(mode: str, state: str, reasons: list[str]) -> dict[str, Any]:
    return {"state": state, "mode": mode, "reasons": reasons, "last_success_age_s": None, "max_age_s": None,
            "attempts": 0, "failures": 0, "running_vms_when_untrusted": "keep"}


class NoTpm:
    """No usable gate (no TPM configured, or its policy/enrollment unusable): untrusted, no VM starts."""

    mode = "none"
    REASON = ("no TPM configured: start the daemon with --tpm TCTI (production: device:/dev/tpmrm0) or "
              "--dev-tpm (development), see docs/INTEGRITY.md")

    def __init__(self, reason: str = REASON) -> None:
        self.reason = reason

    def status(self) -> dict[str, Any]:
        return _base_status(self.mode, "untrusted", [self.reason])

    def check_vm_start(self, config: VmConfig, kernel: bytes, initrd: bytes | None) -> str:
        raise HostUntrusted(f"VM start refused: the host is untrusted ({self.reason})")

    def check_vm_restore(self, digest: str | None) -> str:
        raise HostUntrusted(f"VM restore refused: the host is untrusted ({self.reason})")

    def should_stop_running(self) -> bool:
        return False

    def stop(self) -> None:
        pass


class IntegrityOff:
    """No gate (tests and the VM-less fake backend only). Still enforces a VM's expected_digest."""

    mode = "off"

    def __init__(self, why: str) -> None:
        self.why = why
        print(f"bulkhead: INTEGRITY GATE OFF ({why}): VM launches are not measured and the host is not "
              "attested. Never in production.", file=sys.stderr, flush=True)

    def status(self) -> dict[str, Any]:
        return _base_status(self.mode, "off", [f"integrity gate disabled: {self.why}"])

    def check_vm_start(self, config: VmConfig, kernel: bytes, initrd: bytes | None) -> str:
        digest = launch_digest_for_config(config, kernel, initrd)
        check_expected_digest(config, digest)
        return digest

    def check_vm_restore(self, digest: str | None) -> str:
        if digest is None:
            raise IntegrityError("VM restore refused: the snapshot has no launch digest")
        return digest

    def should_stop_running(self) -> bool:
        return False

    def stop(self) -> None:
        pass


class TpmIntegrity:
    """The real gate. The policy file is read again when it changes (so an operator adds a guest's
    launch digest without a restart); a changed file that does not parse keeps the old policy and is
    reported as a reason, which makes the host untrusted until it is fixed."""

    mode = "tpm"

    def __init__(self, gate: Any, policy_path: str | os.PathLike[str], on_stop: Any = None) -> None:
        self.gate = gate
        self._on_stop = on_stop
        self.policy_path = Path(policy_path)
        self._policy_stat = self._stat()
        self._lock = threading.Lock()
        self.policy_error: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.policy_path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_policy(self) -> None:
        """Re-read the policy when the file changed. The PCR choice and timing fields of the running
        gate stay as they were at start; golden values and ek_sha256 are taken from the new file."""
        with self._lock:
            st = self._stat()
            if st == self._policy_stat:
                return
            self._policy_stat = st
            from bulkhead.integrity.policy import parse_policy

            try:
                new = parse_policy(self.policy_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, IntegrityError) as exc:
                self.policy_error = f"the changed policy {self.policy_path} is unusable: {exc}"
                return
            if new.pcrs != self.gate.policy.pcrs:
                self.policy_error = "the changed policy uses other PCRs: restart the daemon to apply it"
                return
            self.policy_error = None
            self.gate.policy = new

    def status(self) -> dict[str, Any]:
        self.reload_policy()
        st = dict(self.gate.status())
        st["mode"] = self.mode
        if self.policy_error:
            st["state"] = "untrusted"
            st["reasons"] = [*st["reasons"], self.policy_error]
        return st

    def check_vm_start(self, config: VmConfig, kernel: bytes, initrd: bytes | None) -> str:
        self.reload_policy()
        if self.policy_error:
            raise IntegrityError(f"VM start refused: {self.policy_error}")
        digest: str = self.gate.check_vm_start(config, kernel=kernel, initrd=initrd)
        return digest

    def check_vm_restore(self, digest: str | None) -> str:
        self.reload_policy()
        if self.policy_error:
            raise IntegrityError(f"VM restore refused: {self.policy_error}")
        return str(self.gate.check_vm_restore(digest))

    def should_stop_running(self) -> bool:
        return bool(self.gate.should_stop_running())

    def stop(self) -> None:
        self.gate.stop()
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None


def check_off_allowed(integrity: Any, backend: Any) -> None:
    """IntegrityOff is accepted only with a backend that runs no guest, or in a pytest process.
    Raises HostError otherwise (a production daemon can never run real guests ungated)."""
    if getattr(integrity, "mode", None) != "off":
        return
    from bulkhead.daemon.backend import FakeBackend

    if isinstance(backend, FakeBackend) or "pytest" in sys.modules:
        return
    raise HostError("the integrity gate can be off only with the fake backend (no guest runs) or in tests")


# ---- the serving daemon ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegrityOptions:
    """`bulkhead serve` integrity options. Paths default to <state-dir>/integrity/{policy.json,
    enrollment.json,events.jsonl}; the TCTI to --tpm, then $BULKHEAD_TCTI, then device:/dev/tpmrm0 when
    that device exists. `mode` "off" is accepted only with the fake backend (see check_off_allowed)."""

    mode: str = "gate"  # gate | off
    tcti: str | None = None
    dev_tpm: bool = False
    policy: Path | None = None
    enrollment: Path | None = None
    event_log: Path | None = None

    def paths(self, state_dir: Path) -> tuple[Path, Path, Path]:
        base = state_dir / "integrity"
        return (self.policy or base / "policy.json", self.enrollment or base / "enrollment.json",
                self.event_log or base / "events.jsonl")

    def resolve_tcti(self) -> str | None:
        """The TCTI to open, or None for "no TPM configured" (`--tpm none`, serve --help; docs/INTEGRITY.md
        "Gate modes": mode `none`): an explicit none is never looked up in $BULKHEAD_TCTI or /dev."""
        if self.tcti == "none":
            return None
        if self.tcti:
            return self.tcti
        env = os.environ.get("BULKHEAD_TCTI")
        if env:
            return env
        return "device:/dev/tpmrm0" if os.path.exists("/dev/tpmrm0") else None


def check_code(role: str = "daemon") -> tuple[dict[str, str | bool | None], IntegrityError | None]:
    """require_integrity(role) as data: (summary, None) when verified or explicitly skipped
    (BULKHEAD_DEV_SKIP_INTEGRITY=1, loud), (summary, error) when the code differs or the manifest is
    not trusted. The caller audits the error and refuses to start."""
    from bulkhead.integrity.manifest import package_root, require_integrity

    try:
        res = require_integrity(role)
        if res.verified:
            _bound_to_running_code(res.manifest_path, package_root())
    except IntegrityError as exc:
        return {"verified": False, "manifest_digest": None, "manifest": None, "skipped": False,
                "error": str(exc), "path": exc.path or None}, exc
    return {"verified": res.verified, "manifest_digest": res.digest, "manifest": res.manifest_path,
            "skipped": not res.verified}, None


def _bound_to_running_code(manifest_path: str, running: Path) -> None:
    """The manifest must describe the package this process imported: a valid manifest of another
    directory (e.g. a pristine copy elsewhere, with the daemon started from a modified one through
    PYTHONPATH) vouches for nothing. Raises IntegrityError naming the running package directory."""
    try:
        doc = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
        recorded = Path(str(doc["manifest"]["package_root"])).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        raise IntegrityError(f"cannot read package_root from the manifest {manifest_path}",
                             path=manifest_path) from None
    if recorded != running.resolve():
        raise IntegrityError(f"bulkhead refuses to start: the running package {running} is not the package "
                             f"the manifest describes ({recorded})", path=str(running))


def daemon_config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the daemon configuration as measured at start (no secrets in it)."""
    from bulkhead.integrity.host import config_digest

    return config_digest({"format": "bulkhead-daemon-config/1", **config})


def _dev_tpm(state_dir: Path, enrollment: Path, policy: Path, manifest_digest: str | None,
             config_digest: str) -> Any:
    """Start a persistent swtpm under <state-dir>/integrity/devtpm; enroll and write a starting policy
    (this manifest and configuration) when they do not exist yet. Returns the SwTpm. Raises TpmError."""
    from bulkhead.integrity.policy import POLICY_FORMAT
    from bulkhead.integrity.tpm import SwTpm, Tpm, enroll

    sw = SwTpm(str(state_dir / "integrity" / "devtpm")).start()
    try:
        if not enrollment.exists():
            with Tpm(sw.tcti) as tpm:
                enr = enroll(tpm)
            enrollment.write_text(json.dumps(enr.to_dict(), indent=1, sort_keys=True))
            print(f"bulkhead serve --dev-tpm: enrolled the development TPM -> {enrollment}", file=sys.stderr)
        if not policy.exists():
            from bulkhead.integrity.policy import parse_enrollment

            enr = parse_enrollment(enrollment.read_text(encoding="utf-8"))
            doc = {"format": POLICY_FORMAT, "ek_sha256": enr.ek_sha256, "pcrs": {"host": 14, "vm": 15},
                   "allowed": {"manifest": [manifest_digest] if manifest_digest else [], "config": [config_digest],
                               "vm-launch": []},
                   "max_age_s": 300, "interval_s": 30, "running_vms_when_untrusted": "keep"}
            policy.write_text(json.dumps(doc, indent=1, sort_keys=True))
            print(f"bulkhead serve --dev-tpm: wrote a development policy -> {policy} (add each guest's "
                  "launch digest from `bulkhead vm measurement` to allowed.vm-launch)", file=sys.stderr)
    except BaseException:
        sw.cleanup()
        raise
    return sw


def start_host_integrity(daemon: Any, state_dir: Path, opts: IntegrityOptions, config: dict[str, Any],
                         *, timeout_s: float = 10.0) -> HostIntegrity:
    """Build the daemon's gate and install it as daemon.integrity (audited transitions go to
    daemon.integrity_transition). Never raises for TPM, policy or enrollment problems: those leave the
    host untrusted with the reason (fail closed). Raises HostError only for a refused `off` mode."""
    if opts.mode == "off":
        integ: HostIntegrity = IntegrityOff("--integrity off (fake backend: no guest can run)")
        check_off_allowed(integ, daemon.backend)
        daemon.integrity = integ
        return integ
    policy, enrollment, log = opts.paths(state_dir)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    manifest_digest = daemon.code_integrity.get("manifest_digest")
    cdigest = daemon_config_digest(config)
    sw = None
    tcti = opts.resolve_tcti()
    try:
        if opts.dev_tpm:
            sw = _dev_tpm(state_dir, enrollment, policy, manifest_digest if isinstance(manifest_digest, str) else None,
                          cdigest)
            tcti = sw.tcti
        if tcti is None:
            integ = NoTpm()
        else:
            from bulkhead.integrity.host import IntegrityGate

            gate = IntegrityGate.start(tcti, policy, enrollment, log,
                                       manifest_digest=manifest_digest if isinstance(manifest_digest, str) else None,
                                       config_digest=cdigest, on_transition=daemon.integrity_transition,
                                       timeout_s=timeout_s)
            integ = TpmIntegrity(gate, policy, on_stop=sw.cleanup if sw is not None else None)
            sw = None
    except IntegrityError as exc:  # TpmError from the dev TPM, unusable policy/enrollment
        integ = NoTpm(f"the integrity gate could not start: {exc}")
    finally:
        if sw is not None:
            sw.cleanup()
    daemon.integrity = integ
    return integ
