"""The checks a VM passes before its guest may run (docs/INTEGRITY.md "The daemon", docs/API.md
"VM lifecycle and execution"): the loader's validation of the images and their placement (at `vm create`
and again at `vm start`, on the bytes then measured), the launch measurement against the VM's
expected_digest, and the host's integrity gate. Every refusal is audited (a security event for an
integrity refusal) and answered through the status table (api_status.py)."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from bulkhead.daemon.backend import VmSpec
from bulkhead.daemon.integrity import HostIntegrity
from bulkhead.daemon.service import ApiError, Core, ReqCtx
from bulkhead.errors import ConfigError, HostError, StartRefused
from bulkhead.integrity.errors import CodeMismatch

__all__ = ["LaunchCheck"]


class LaunchCheck:
    """`integrity` is the host's gate (replaced when the server installs the TPM-backed one); the last
    launch digest of each VM is kept in memory (and in the start request's audit record)."""

    def __init__(self, core: Core, integrity: HostIntegrity) -> None:
        self.core = core
        self.store = core.store
        self.integrity = integrity
        self._digests: dict[str, str] = {}

    def check_images(self, ctx: ReqCtx, config: Any, drives: int, nics: int) -> None:
        """`vm create`: the loader's validation of the image, its placement and the configuration (the
        same check runs again at `vm start`, on the bytes that are then measured). Raises ApiError 422
        (kind image-invalid | config-invalid) or 503 when an image cannot be read."""
        from bulkhead.daemon.integrity import MAX_IMAGE, check_boot
        from bulkhead.runtime.config import DriveConfig, NetConfig

        images: list[bytes | None] = []
        for path in (config.kernel, config.initrd):
            if path is None:
                images.append(None)
                continue
            try:
                with open(path, "rb") as f:
                    images.append(f.read(MAX_IMAGE + 1))
            except OSError as exc:
                raise ApiError.of(HostError(f"cannot read the image {path.rsplit('/', 1)[-1]}: {exc.strerror}")) from None
        # the device count decides the command-line announcements the VMM appends
        shaped = config._replace(drives=tuple(DriveConfig("/dev/null", True) for _ in range(drives)),
                                 nets=tuple(NetConfig(f"tap{i}", "") for i in range(nics)))
        try:
            check_boot(shaped, images[0] or b"", images[1])
        except ConfigError as exc:
            self.refuse_boot(ctx, None, exc, "create")

    def check_start(self, ctx: ReqCtx, row: Any, spec: VmSpec) -> str:
        """Measure the launch (kernel/initrd read once) and pass it through the host's integrity gate.

        Refusals are audited as security events and raise ApiError: 409 when the launch digest differs
        from the VM's expected_digest (e.g. its kernel was swapped) or is not allowed by the policy,
        503 while the host is untrusted (or the image cannot be read)."""
        from bulkhead.daemon.integrity import check_boot, measure_spec
        from bulkhead.integrity.errors import (
            IntegrityError,
        )
        from bulkhead.integrity.launch import check_expected_digest

        vm_id = row["id"]
        expected = json.loads(row["spec"]).get("expected_digest")
        digest = None
        try:
            config, kernel, initrd, digest = measure_spec(spec, expected)
            check_expected_digest(config, digest)  # a swapped kernel is a security event before it is a bad image
            try:  # the loader's own checks on the bytes just read: a guest it refuses is never "started"
                check_boot(config, kernel, initrd)
            except ConfigError as exc:
                self.refuse_boot(ctx, vm_id, exc, "start")  # raises ApiError 422 with the kind
            self.integrity.check_vm_start(config, kernel, initrd)
        except ConfigError as exc:
            raise ApiError.of(exc) from None
        except IntegrityError as exc:
            # status and kind by type (api_status.TABLE): a changed launch or one the policy does not list
            # 409, an untrusted host (or a gate/TPM/image failure) 503
            refusal = ApiError.of(exc)
            kind = str(refusal.kind)
            detail: dict[str, Any] = {"reason": str(exc), "digest": digest, "expected_digest": expected}
            if exc.path:
                detail["path"] = exc.path
            ctx.detail.update(error=str(exc), integrity=kind)
            self.core.note_vm_event(vm_id, "start-refused", {"integrity": kind, "digest": digest})
            try:
                self.core.security_event(vm_id, f"integrity/{kind}", detail)
            except ApiError:
                pass  # the request's own record (ctx.detail) still says why; it is written before the reply
            raise refusal from None
        with self.store.lock:  # kept in memory (and in the request's audit record), not as a VM event
            self._digests[vm_id] = str(digest)
        ctx.detail["launch_digest"] = digest
        return str(digest)

    def code_mismatch(self, ctx: ReqCtx, vm_id: str, exc: CodeMismatch) -> NoReturn:
        """A worker refused to run because bulkhead's installed code differs from the signed manifest:
        a security event (security/integrity/code-mismatch with the path), answered 503 (the host cannot
        start a VMM; docs/API.md), the VM's events say why. Raises ApiError."""
        detail = {"reason": str(exc), "path": exc.path, "source": "worker pre-import check"}
        ctx.detail.update(error=str(exc), integrity="code-mismatch", path=exc.path)
        self.core.note_vm_event(vm_id, "start-refused", {"integrity": "code-mismatch", "path": exc.path})
        try:
            self.core.security_event(vm_id, "integrity/code-mismatch", detail)
        except ApiError:
            pass  # the request's own record (ctx.detail) still says why
        raise ApiError.of(exc, f"cannot start the VM: bulkhead's installed code differs from the signed manifest "
                               f"({exc.path}): {exc}") from None

    def refuse_boot(self, ctx: ReqCtx, vm_id: str | None, exc: ConfigError, op: str) -> NoReturn:
        refused = StartRefused.of(exc)
        ctx.detail.update(error=str(exc), kind=refused.kind)
        if vm_id is not None:
            self.core.note_vm_event(vm_id, f"{op}-refused", {"kind": refused.kind, "error": str(exc)})
        raise ApiError.of(refused, f"cannot {op} the VM: {exc}") from None

    def measurement(self, vm_id: str, row: Any, spec: VmSpec) -> dict[str, Any]:
        """The VM's launch digest computed now from its current files and configuration (GET
        /vms/{id}/measurement). Raises ApiError 503 (an image cannot be read), 422."""
        from bulkhead.daemon.integrity import launch_components, measure_spec
        from bulkhead.integrity.errors import IntegrityError

        expected = json.loads(row["spec"]).get("expected_digest")
        try:
            config, kernel, initrd, digest = measure_spec(spec)
        except (ConfigError, IntegrityError) as exc:
            raise ApiError.of(exc) from None
        with self.store.lock:
            last = self._digests.get(vm_id)
        return {"vm": vm_id, "digest": digest, "expected_digest": expected,
                "matches_expected": None if expected is None else digest == expected,
                "last_launch_digest": last,
                "components": launch_components(config, kernel, initrd)}
