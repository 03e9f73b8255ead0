"""Principals (certificates), role definitions and role assignments.

Rules: issuing and revoking certificates needs `principal/write` at `/`. Creating a role needs
`role/write` at each of its assignable scopes. Assigning role R at scope S needs `role/assign` at S AND
every concrete action R grants at S (nobody can grant a permission they do not hold); S must lie within one
of R's assignable scopes. Removing an assignment needs `role/assign` at its scope. Built-in roles are
visible to every principal; custom roles to those with `role/read` or `role/assign` at one of their
assignable scopes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Response

from bulkhead.control import rbac
from bulkhead.control.models import (
    AssignmentCreate,
    AssignmentOut,
    PrincipalIssue,
    PrincipalIssued,
    PrincipalOut,
    RoleCreate,
    RoleOut,
    WhoAmI,
)
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx
from bulkhead.daemon.store import new_id
from bulkhead.errors import ConfigError

__all__ = ["AccessService", "access_routes"]


class AccessService:
    """Principals, roles and assignments; `ca` (pki.CertBundle) is None when this daemon does not hold
    the CA key (it then cannot issue certificates: 409)."""

    def __init__(self, core: Core, ca: Any = None) -> None:
        self.core = core
        self.store = core.store
        self.ca = ca

    # ------------------------------------------------------------------ identity
    def whoami(self, ctx: ReqCtx) -> dict[str, str]:
        ctx.action, ctx.scope, ctx.decision = "whoami", "/", "allow"
        return {"id": ctx.caller.id, "name": ctx.caller.name, "kind": ctx.caller.kind}


    # ------------------------------------------------------------------ principals
    def principal_list(self, ctx: ReqCtx) -> list[dict[str, Any]]:
        self.core.authorize(ctx, "principal/read", "/", visible=lambda: True)
        return [self.store.principal_out(r) for r in self.store.q("SELECT * FROM principals ORDER BY name")]

    def principal_get(self, ctx: ReqCtx, pid: str) -> dict[str, Any]:
        self.core.authorize(ctx, "principal/read", "/", visible=lambda: False)
        row = self.store.q1("SELECT * FROM principals WHERE id = ?", (pid,))
        if row is None:
            raise ApiError(404, NOT_FOUND)
        return self.store.principal_out(row)

    def principal_issue(self, ctx: ReqCtx, name: str, csr_pem: str, days: int) -> dict[str, Any]:
        from bulkhead.daemon import pki

        self.core.authorize(ctx, "principal/write", "/", visible=lambda: True)
        if self.ca is None:
            raise ApiError(409, "this daemon does not hold the CA key, so it cannot issue certificates")
        try:
            pub = pki.csr_public_key(csr_pem)
        except ConfigError as exc:
            raise ApiError.of(exc) from None
        row = self.store.q1("SELECT * FROM principals WHERE name = ?", (name,))
        if row is not None and row["kind"] != "cert":
            raise ApiError(409, f"{name!r} is a reserved principal name")
        issued = pki.issue_client(self.ca, name, pub, days=days)
        ctx.detail.update(fingerprint=issued.fingerprint, serial=issued.serial, name=name)
        with self.core.mutation(ctx, "201") as c:
            pid = row["id"] if row is not None else new_id()
            if row is None:
                c.execute("INSERT INTO principals VALUES (?,?,?,?)", (pid, name, "cert", now_iso()))
            c.execute("INSERT INTO certs VALUES (?,?,?,?,0,NULL)",
                      (issued.fingerprint, pid, issued.serial, issued.not_after))
        prow = self.store.q1("SELECT * FROM principals WHERE id = ?", (pid,))
        assert prow is not None
        return {
            "principal": self.store.principal_out(prow),
            "certificate_pem": pki.cert_pem(issued.cert).decode(),
            "ca_pem": pki.cert_pem(self.ca.cert).decode(),
        }

    def principal_revoke(self, ctx: ReqCtx, pid: str) -> dict[str, Any]:
        self.core.authorize(ctx, "principal/write", "/", visible=lambda: True)
        row = self.store.q1("SELECT * FROM principals WHERE id = ?", (pid,))
        if row is None:
            raise ApiError(404, NOT_FOUND)
        if row["kind"] != "cert":
            raise ApiError(409, "the local bootstrap principal has no certificate to revoke")
        ctx.detail.update(revoked_principal=pid, name=row["name"])
        with self.core.mutation(ctx) as c:
            c.execute("UPDATE certs SET revoked = 1, revoked_at = ? WHERE principal_id = ? AND revoked = 0",
                      (now_iso(), pid))
        return self.store.principal_out(row)

    # ------------------------------------------------------------------ roles
    def _role_visible(self, ctx: ReqCtx, role: rbac.RoleDef) -> bool:
        return role.builtin or any(
            self.core.allowed(ctx.caller, act, s) for s in role.assignable_scopes for act in ("role/read", "role/assign")
        )

    def role_list(self, ctx: ReqCtx) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "role/read", "/", "allow"
        return [_role_out(r) for r in self.store.roles() if self._role_visible(ctx, r)]

    def _role(self, ctx: ReqCtx, ref: str, action: str) -> rbac.RoleDef:
        row = self.store.q1("SELECT * FROM roles WHERE id = ? OR name = ?", (ref, ref))
        ctx.action = action
        if row is None:
            raise self.core.deny_unknown(ctx, action)
        role = self.store.role_from_row(row)
        if not self._role_visible(ctx, role):
            raise self.core.deny_unknown(ctx, action)
        return role

    def role_get(self, ctx: ReqCtx, ref: str) -> dict[str, Any]:
        role = self._role(ctx, ref, "role/read")
        ctx.scope, ctx.decision = role.assignable_scopes[0], "allow"
        return _role_out(role)

    def role_create(self, ctx: ReqCtx, body: Any) -> dict[str, Any]:
        try:
            scopes = [rbac.validate_scope(s) for s in body.assignable_scopes]
            for p in [*body.actions, *body.not_actions]:
                rbac.validate_pattern(p)
        except ConfigError as exc:
            ctx.action, ctx.decision = "role/write", "deny"
            raise ApiError.of(exc) from None
        for s in scopes:
            self.core.authorize(ctx, "role/write", s, visible=partial(self._scope_visible, ctx, s))
        if self.store.q1("SELECT 1 FROM roles WHERE name = ?", (body.name,)):
            raise ApiError(409, f"a role named {body.name!r} already exists")
        rid = new_id()
        ctx.detail.update(role=rid, name=body.name, actions=body.actions, not_actions=body.not_actions)
        with self.core.mutation(ctx, "201") as c:
            c.execute("INSERT INTO roles VALUES (?,?,?,?,?,?,0)", (
                rid, body.name, body.description, json.dumps(body.actions), json.dumps(body.not_actions),
                json.dumps(scopes)))
            self.core.rbac_changed()
        return _role_out(rbac.RoleDef(rid, body.name, tuple(body.actions), tuple(body.not_actions),
                                      tuple(scopes), body.description, False))

    def role_delete(self, ctx: ReqCtx, ref: str) -> None:
        role = self._role(ctx, ref, "role/delete")
        for s in role.assignable_scopes:
            self.core.authorize(ctx, "role/delete", s, visible=lambda: True)
        if role.builtin:
            raise ApiError(409, "built-in roles cannot be deleted")
        with self.core.mutation(ctx, "204") as c:
            if self.store.q1("SELECT 1 FROM assignments WHERE role_id = ?", (role.id,)):
                raise ApiError(409, "the role is still assigned; remove its assignments first")
            c.execute("DELETE FROM roles WHERE id = ?", (role.id,))
            self.core.rbac_changed()

    def _scope_visible(self, ctx: ReqCtx, scope: str) -> bool:
        tenant, _ = rbac.parse_scope(scope)
        return tenant is None or self.core.can_see_tenant(ctx.caller, tenant)

    def _scope_exists(self, scope: str) -> bool:
        tenant, vm = rbac.parse_scope(scope)
        if tenant is None:
            return True
        if vm is not None:
            return self.store.q1("SELECT 1 FROM vms WHERE id = ? AND tenant = ?", (vm, tenant)) is not None
        return self.store.q1("SELECT 1 FROM tenants WHERE id = ?", (tenant,)) is not None

    # ------------------------------------------------------------------ assignments
    def assignment_list(self, ctx: ReqCtx, principal: str | None = None) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "role/read", "/", "allow"
        readable = self.core.readable_scopes(ctx.caller, "role/read")
        names = {r.id: r.name for r in self.store.roles()}
        out = []
        for a in self.store.assignments():
            if principal and a.principal_id != principal:
                continue
            if a.principal_id == ctx.caller.id or any(rbac.scope_within(a.scope, s) for s in readable):
                out.append(_assignment_out(a, names))
        return out

    def assignment_create(self, ctx: ReqCtx, principal: str, role_ref: str, scope: str) -> dict[str, Any]:
        ctx.action = "role/assign"
        try:
            rbac.validate_scope(scope)
        except ConfigError as exc:
            ctx.decision = "deny"
            raise ApiError.of(exc) from None
        if "/disks/" in scope:
            ctx.decision = "deny"
            raise ApiError(422, "roles are assignable at /, /tenants/<t> or /tenants/<t>/vms/<v>")
        if not self._scope_exists(scope):
            ctx.scope = scope
            raise self.core.deny_unknown(ctx, "role/assign")
        self.core.authorize(ctx, "role/assign", scope, visible=lambda: self._scope_visible(ctx, scope))
        role = self._role(ctx, role_ref, "role/assign")
        ctx.action, ctx.scope = "role/assign", scope
        if not any(rbac.scope_within(scope, s) for s in role.assignable_scopes):
            raise ApiError(422, f"role {role.name!r} is not assignable at {scope}")
        missing = sorted(a for a in rbac.granted_actions(role) if not self.core.allowed(ctx.caller, a, scope))
        if missing:
            ctx.decision = "deny"
            ctx.detail["missing"] = missing
            raise ApiError(403, f"you cannot grant permissions you do not hold at {scope}: {', '.join(missing)}")
        prow = self.store.q1("SELECT * FROM principals WHERE id = ? OR name = ?", (principal, principal))
        if prow is None:
            raise ApiError(404, "principal not found")
        if self.store.q1("SELECT 1 FROM assignments WHERE principal_id = ? AND role_id = ? AND scope = ?",
                         (prow["id"], role.id, scope)):
            raise ApiError(409, "this assignment already exists")
        aid = new_id()
        ctx.detail.update(assignment=aid, principal=prow["id"], role=role.name)
        with self.core.mutation(ctx, "201") as c:
            c.execute("INSERT INTO assignments VALUES (?,?,?,?)", (aid, prow["id"], role.id, scope))
            self.core.rbac_changed()
        return _assignment_out(rbac.Assignment(aid, prow["id"], role.id, scope), {role.id: role.name})

    def assignment_delete(self, ctx: ReqCtx, aid: str) -> None:
        row = self.store.q1("SELECT * FROM assignments WHERE id = ?", (aid,))
        if row is None:
            raise self.core.deny_unknown(ctx, "role/assign")
        scope = row["scope"]
        self.core.authorize(ctx, "role/assign", scope, visible=lambda: self.core.allowed(ctx.caller, "role/read", scope))
        ctx.detail.update(assignment=aid, principal=row["principal_id"])
        with self.core.mutation(ctx, "204") as c:
            c.execute("DELETE FROM assignments WHERE id = ?", (aid,))
            self.core.rbac_changed()


def _role_out(r: rbac.RoleDef) -> dict[str, Any]:
    return {
        "id": r.id, "name": r.name, "description": r.description, "actions": list(r.actions),
        "not_actions": list(r.not_actions), "assignable_scopes": list(r.assignable_scopes), "builtin": r.builtin,
    }


def _assignment_out(a: rbac.Assignment, names: dict[str, str]) -> dict[str, Any]:
    return {"id": a.id, "principal_id": a.principal_id, "role_id": a.role_id,
            "role_name": names.get(a.role_id, "?"), "scope": a.scope}


def access_routes(svc: Callable[[], AccessService]) -> APIRouter:
    r = router()

    @r.get("/whoami", response_model=WhoAmI)
    def whoami(ctx: ReqCtx = Ctx) -> Any:
        return svc().whoami(ctx)

    @r.get("/principals", response_model=list[PrincipalOut])
    def principal_list(ctx: ReqCtx = Ctx) -> Any:
        return svc().principal_list(ctx)

    @r.post("/principals", response_model=PrincipalIssued, status_code=201)
    def principal_issue(body: PrincipalIssue, ctx: ReqCtx = Ctx) -> Any:
        return svc().principal_issue(ctx, body.name, body.csr_pem, body.days)

    @r.get("/principals/{principal_id}", response_model=PrincipalOut)
    def principal_get(principal_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().principal_get(ctx, str(principal_id))

    @r.post("/principals/{principal_id}/revoke", response_model=PrincipalOut)
    def principal_revoke(principal_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().principal_revoke(ctx, str(principal_id))

    @r.get("/roles", response_model=list[RoleOut])
    def role_list(ctx: ReqCtx = Ctx) -> Any:
        return svc().role_list(ctx)

    @r.post("/roles", response_model=RoleOut, status_code=201)
    def role_create(body: RoleCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().role_create(ctx, body)

    @r.get("/roles/{role_id}", response_model=RoleOut)
    def role_get(role_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().role_get(ctx, str(role_id))

    @r.delete("/roles/{role_id}", status_code=204)
    def role_delete(role_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().role_delete(ctx, str(role_id))
        return Response(status_code=204)

    @r.get("/assignments", response_model=list[AssignmentOut])
    def assignment_list(principal: UUID | None = None, ctx: ReqCtx = Ctx) -> Any:
        return svc().assignment_list(ctx, str(principal) if principal else None)

    @r.post("/assignments", response_model=AssignmentOut, status_code=201)
    def assignment_create(body: AssignmentCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().assignment_create(ctx, body.principal, body.role, body.scope)

    @r.delete("/assignments/{assignment_id}", status_code=204)
    def assignment_delete(assignment_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().assignment_delete(ctx, str(assignment_id))
        return Response(status_code=204)

    return r
