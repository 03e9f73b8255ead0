"""The attestation policy through the daemon (`bulkhead attest policy show|allow-digest|revoke-digest`).

docs/INTEGRITY.md: the policy file (<state-dir>/integrity/policy.json, or `serve --policy`) lists the
digests allowed per event kind (`allowed.vm-launch` for guests). These routes edit it so nobody edits it by
hand: `GET /v1/integrity/policy` (RBAC `integrity/policy/read` at `/`), `POST
/v1/integrity/policy/allow` and `/revoke` (`integrity/policy/write` at `/`, body {digest, kind}). A change
is written to a temporary file, checked with the policy parser (bulkhead.integrity.policy.parse_policy),
audited (the request record, with the digest, kind and before/after counts, is durable first: fail
closed) and then renamed over the policy; the gate (daemon/integrity.TpmIntegrity) reloads a changed file
on its next decision, so no restart is needed. A policy file that cannot be read or parsed is a HostError
(503 by the status table, daemon/api_status.py); a change that would make it unusable a ConfigError (422).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from bulkhead.control.opsmodels import DigestChange, PolicyOut
from bulkhead.daemon.integrity import HostIntegrity
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import ApiError, Core, ReqCtx
from bulkhead.errors import ConfigError, HostError

if TYPE_CHECKING:
    from bulkhead.daemon.daemon import Daemon

__all__ = ["policy_change", "policy_path", "policy_routes", "policy_show"]

_LOCK = threading.Lock()


def policy_path(core: Core, integrity: HostIntegrity) -> Path:
    p = getattr(integrity, "policy_path", None)
    return Path(p) if p is not None else core.paths.state_dir / "integrity" / "policy.json"


def _load(path: Path) -> dict[str, Any]:
    from bulkhead.integrity.errors import IntegrityError
    from bulkhead.integrity.policy import parse_policy

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ApiError(404, f"no attestation policy at {path} (create one with `bulkhead attest policy-init` "
                       "or start the daemon with --dev-tpm)") from None
    except OSError as exc:
        raise HostError(f"cannot read the policy {path}: {exc.strerror}") from None
    try:
        parse_policy(text)
        doc = json.loads(text)
    except (IntegrityError, ValueError) as exc:
        raise HostError(f"the policy {path} is unusable: {exc}") from None
    return dict(doc)


def _out(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    allowed = doc.get("allowed") or {}
    return {"path": str(path), "format": doc.get("format", ""),
            "allowed": {k: sorted(v) for k, v in sorted(allowed.items())},
            "max_age_s": doc.get("max_age_s"), "interval_s": doc.get("interval_s"), "pcrs": doc.get("pcrs") or {}}


def policy_show(core: Core, integrity: HostIntegrity, ctx: ReqCtx) -> dict[str, Any]:
    core.authorize(ctx, "integrity/policy/read", "/", visible=lambda: True)
    path = policy_path(core, integrity)
    return _out(path, _load(path))


def policy_change(core: Core, integrity: HostIntegrity, ctx: ReqCtx, digest: str, kind: str,
                  allow: bool) -> dict[str, Any]:
    from bulkhead.integrity.errors import IntegrityError
    from bulkhead.integrity.policy import parse_policy

    core.authorize(ctx, "integrity/policy/write", "/", visible=lambda: True)
    path = policy_path(core, integrity)
    with _LOCK:
        doc = _load(path)
        allowed = dict(doc.get("allowed") or {})
        values = list(allowed.get(kind, []))
        before = len(values)
        if allow and digest not in values:
            values.append(digest)
        elif not allow and digest in values:
            values.remove(digest)
        changed = len(values) != before
        ctx.detail.update(policy=str(path), kind=kind, digest=digest, op="allow" if allow else "revoke",
                          changed=changed, before=before, after=len(values))
        if not changed:
            return _out(path, doc)
        allowed[kind] = sorted(values)
        doc["allowed"] = allowed
        text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
        try:
            parse_policy(text)
        except IntegrityError as exc:  # cannot happen for a valid digest; refuse rather than write it
            raise ConfigError(f"the changed policy would be unusable: {exc}") from None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            core.append(ctx.record("200"))  # fail closed: audited before the policy changes
            ctx.audited = True
            os.replace(tmp, path)
        except OSError as exc:
            raise HostError(f"cannot write the policy {path}: {exc.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        reload = getattr(integrity, "reload_policy", None)
        if reload is not None:
            reload()
        return _out(path, doc)


def policy_routes(daemon: Callable[[], Daemon]) -> APIRouter:
    """/v1/integrity/policy (show), /allow and /revoke; the gate is the daemon's current one."""
    r = router()

    @r.get("/integrity/policy", response_model=PolicyOut, name="policy_show")
    def show(ctx: ReqCtx = Ctx) -> Any:
        d = daemon()
        return policy_show(d.core, d.integrity, ctx)

    @r.post("/integrity/policy/allow", response_model=PolicyOut, name="policy_allow")
    def allow(body: DigestChange, ctx: ReqCtx = Ctx) -> Any:
        d = daemon()
        return policy_change(d.core, d.integrity, ctx, body.digest, body.kind, True)

    @r.post("/integrity/policy/revoke", response_model=PolicyOut, name="policy_revoke")
    def revoke(body: DigestChange, ctx: ReqCtx = Ctx) -> Any:
        d = daemon()
        return policy_change(d.core, d.integrity, ctx, body.digest, body.kind, False)

    return r
