"""The management plane's operations, independent of HTTP: authorization, auditing, state changes.

Every operation takes a `ReqCtx` (who is asking, the request id) and either returns a JSON-able value or
raises ApiError(status, detail). The rules applied everywhere:

- authorize(action, scope) consults the RBAC evaluator (pycasbin). A denied principal that cannot read
  the resource gets 404, exactly as for a resource that does not exist; one that can read it gets 403.
- State changes run inside a state-store transaction that commits only after the audit record of the
  request is durable (fail closed: AuditUnavailable -> rollback -> 503); concurrent requests share one
  group commit (store.py, issue 16 item 5).
- Records of requests that end otherwise (reads, denials, errors) are appended by the HTTP layer before
  the response starts; if that append fails the response becomes a 503 (nothing is disclosed).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bulkhead.control import rbac
from bulkhead.control.audit import Record
from bulkhead.daemon.api_status import status_of
from bulkhead.daemon.auditlog import AuditLog, AuditUnavailable, now_iso
from bulkhead.daemon.store import StateUnavailable, Store

__all__ = ["NOT_FOUND", "ApiError", "Caller", "Core", "Paths", "ReqCtx", "WitnessGate"]


class ApiError(Exception):
    """An error with an HTTP status and a one-sentence detail; `kind` (optional) types it for clients
    (e.g. "image-invalid", "code-mismatch"): the 422 body's `type`, else a `kind` key next to `detail`."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind

    @classmethod
    def of(cls, exc: BaseException, detail: str | None = None) -> ApiError:
        """The answer to a domain exception: its status and kind from the one table (api_status.py),
        `detail` (default: the exception's message) worded by the operation. Raises TypeError for an
        exception the table does not know (a bug, not a refusal)."""
        hit = status_of(exc)
        if hit is None:
            raise TypeError(f"{type(exc).__name__} is not in the API status table") from exc
        return cls(hit[0], str(exc) if detail is None else detail, kind=hit[1])


@dataclass(frozen=True)
class Caller:
    id: str
    name: str
    kind: str  # cert | local


@dataclass
class ReqCtx:
    caller: Caller
    request_id: str
    method: str = ""
    path: str = ""
    action: str = ""
    scope: str = ""
    decision: str = ""
    vm: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    audited: bool = False

    def record(self, result: str) -> Record:
        detail = {"method": self.method, "path": self.path[:512], **self.detail}
        return Record.make(
            now_iso(), "api", detail, principal=self.caller.id, action=self.action, scope=self.scope,
            decision=self.decision, result=result, request_id=self.request_id, vm=self.vm,
        )


NOT_FOUND = "not found"


class WitnessGate(Protocol):
    """bulkhead.daemon.witness.WitnessPusher as the audit gate sees it."""

    def refusal(self) -> str: ...


@dataclass
class Paths:
    state_dir: Path

    @property
    def images(self) -> Path:
        return self.state_dir / "images"

    @property
    def disks(self) -> Path:
        return self.state_dir / "disks"

    @property
    def vms(self) -> Path:
        return self.state_dir / "vms"


class Core:
    """What every service is given: the state store, the audit log (behind the witness-quorum gate) and
    the RBAC evaluator, with the authorization and fail-closed audit helpers built on them. It holds no
    resources of its own; the services (tenants, access, networks, disks, VMs, audit) each take it in
    __init__."""

    def __init__(self, store: Store, audit: AuditLog, state_dir: Path, engine: str = "casbin",
                 witnesses: WitnessGate | None = None):
        self.store = store
        self.audit = audit
        self.paths = Paths(state_dir)
        self.evaluator = rbac.make_evaluator(engine)
        self.witnesses = witnesses  # docs/AUDIT.md: mutations wait for a witness quorum
        self._generation = -1
        self._rbac_lock = threading.Lock()
        store.durable = audit.append_many  # a state batch's audit records: one append before its COMMIT

    # ------------------------------------------------------------------ RBAC
    def _fresh(self) -> rbac.Evaluator:
        """The evaluator, reloaded from committed state only (never from a batch that may still fail)
        when an RBAC change has committed since its last load."""
        with self._rbac_lock:
            gen = self.store.generation
            if self._generation != gen:
                with self.store.committed():
                    self.evaluator.load(self.store.roles(), self.store.assignments())
                self._generation = gen
        return self.evaluator

    def rbac_changed(self) -> None:
        """Call inside the transaction that changes roles or assignments: evaluators reload on their next
        decision after that transaction has committed (store.after_commit)."""
        def bump() -> None:
            with self._rbac_lock:
                self.store.generation += 1

        self.store.after_commit(bump)

    def allowed(self, who: Caller, action: str, scope: str) -> bool:
        return self._fresh().allowed(who.id, action, scope)

    def my_scopes(self, who: Caller) -> list[str]:
        return [a.scope for a in self.store.assignments(who.id)]

    def readable_scopes(self, who: Caller, action: str) -> list[str]:
        """Scopes within which `action` is allowed (everything inside one of them is allowed)."""
        return rbac.allowed_scopes(self._fresh(), who.id, action, self.my_scopes(who))

    def tenant_ref(self, ref: str) -> str:
        """A tenant id, or the id of the tenant named `ref` (the API takes names where the CLI does); an
        unknown name is returned as is, so it gets the answer of an unknown id (404)."""
        row = self.store.q1("SELECT id FROM tenants WHERE id = ? OR name = ?", (ref, ref))
        return str(row["id"]) if row is not None else ref

    def principal_ref(self, ref: str) -> str:
        """A principal id, or the id of the principal named `ref` (unknown: returned as is -> 404)."""
        row = self.store.q1("SELECT id FROM principals WHERE id = ? OR name = ?", (ref, ref))
        return str(row["id"]) if row is not None else ref

    def can_see_tenant(self, who: Caller, tenant_id: str) -> bool:
        ts = rbac.tenant_scope(tenant_id)
        if self.allowed(who, "tenant/read", ts):
            return True
        return any(rbac.scope_within(s, ts) for s in self.my_scopes(who))

    def authorize(self, ctx: ReqCtx, action: str, scope: str, *, visible: Callable[[], bool]) -> None:
        """Allow, or raise ApiError 403 (the caller may see the resource) / 404 (it may not)."""
        ctx.action, ctx.scope = action, scope
        if self.allowed(ctx.caller, action, scope):
            ctx.decision = "allow"
            return
        ctx.decision = "deny"
        if visible():
            raise ApiError(403, f"{ctx.caller.name} may not {action} at this scope")
        raise ApiError(404, NOT_FOUND)

    def authorize_in_tenant(self, ctx: ReqCtx, action: str, tenant: str) -> None:
        """Authorize creating a resource in `tenant`: a missing tenant and one the caller may not see get
        the same 404; a visible one without `action` 403 (docs/RBAC.md)."""
        ts = rbac.tenant_scope(tenant)
        if self.store.q1("SELECT 1 FROM tenants WHERE id = ?", (tenant,)) is None:
            ctx.scope = ts
            raise self.deny_unknown(ctx, action)
        self.authorize(ctx, action, ts, visible=lambda: self.can_see_tenant(ctx.caller, tenant))

    def deny_unknown(self, ctx: ReqCtx, action: str) -> ApiError:
        """The resource does not exist: same answer as an invisible one."""
        ctx.action, ctx.decision = action, "deny"
        return ApiError(404, NOT_FOUND)

    _OWNED_ROW = {
        "vm": "SELECT * FROM vms WHERE id = ?",
        "disk": "SELECT * FROM disks WHERE id = ?",
        "network": "SELECT * FROM networks WHERE id = ?",
        "snapshot": "SELECT * FROM snapshots WHERE id = ?",
    }

    def owned_row(self, ctx: ReqCtx, kind: str, row_id: str, action: str) -> Any:
        """Load a tenant-owned resource and authorize `action` on it. Raises ApiError 404 when it does not
        exist or the caller may not `{kind}/read` it (tenant isolation), 403 when it may see but not act."""
        row = self.store.q1(self._OWNED_ROW[kind], (row_id,))
        if row is None:
            raise self.deny_unknown(ctx, action)
        scope = rbac.owned_scope(kind, row["tenant"], row_id)
        self.authorize(ctx, action, scope, visible=lambda: self.allowed(ctx.caller, f"{kind}/read", scope))
        return row

    def visible_rows(self, ctx: ReqCtx, kind: str, rows: Iterable[Any]) -> list[Any]:
        """The rows of tenant-owned resources the caller may `{kind}/read` (lists never reveal the rest)."""
        readable = self.readable_scopes(ctx.caller, f"{kind}/read")
        return [
            r for r in rows
            if any(rbac.scope_within(rbac.owned_scope(kind, r["tenant"], r["id"]), s) for s in readable)
        ]  # fmt: skip

    # ------------------------------------------------------------------ audit
    @contextmanager
    def mutation(self, ctx: ReqCtx, result: str = "200") -> Iterator[Any]:
        """A state transaction whose commit waits for the request's audit record (fail closed). The record
        joins the store's group commit (store.py): the batch's records are appended in one audit
        transaction, then the batch's state commits, then every member's response may go out."""
        try:
            with self.store.txn() as conn:
                yield conn
                rec = ctx.record(result)
                self._quorum_gate(rec)
                self.store.add_durable(rec)
        except AuditUnavailable as exc:
            raise ApiError.of(exc, f"audit log unavailable, nothing was changed ({exc})") from None
        except sqlite3.IntegrityError:  # a concurrent request created the same name first
            raise ApiError(409, "conflicts with an existing resource (created concurrently)") from None
        except sqlite3.Error as exc:  # the state commit failed (maybe after the record was written): say so
            if getattr(exc, "records_durable", False):
                ctx.detail["rolled_back"] = str(exc)
            raise ApiError.of(StateUnavailable(str(exc)),
                              f"the state database refused the change, nothing was changed ({exc})") from None
        ctx.audited = True

    def _quorum_gate(self, rec: Record) -> None:
        """An API record is refused (503) while the witness policy says the log has had no witness quorum
        for longer than its grace (docs/AUDIT.md)."""
        if rec.kind == "api" and self.witnesses is not None:
            why = self.witnesses.refusal()
            if why:
                raise ApiError(503, f"no witness quorum, nothing was changed ({why})")

    def append(self, rec: Record) -> int:
        """Append `rec` (fail closed). An API record is refused (503) while the witness policy says the
        log has had no witness quorum for longer than its grace (docs/AUDIT.md)."""
        self._quorum_gate(rec)
        try:
            return self.audit.append(rec)
        except AuditUnavailable as exc:
            raise ApiError.of(exc, f"audit log unavailable, nothing was changed ({exc})") from None

    def note_vm_event(self, vm_id: str, event: str, detail: dict[str, Any] | None = None) -> None:
        """A VM event (GET /vms/{id}/events) that only explains an answer already decided (a refusal, a
        failure): best effort, a full or locked state database does not turn the answer into a 500."""
        try:
            self.store.vm_event(vm_id, event, detail)
        except sqlite3.Error:
            return  # the request's audit record holds the same error

    def event(self, kind: str, action: str, *, vm: str = "", scope: str = "", principal: str = "",
              result: str = "", request_id: str = "", detail: dict[str, Any] | None = None) -> int:
        """Append a lifecycle / security / system record. Raises ApiError(503) when it cannot."""
        return self.append(Record.make(
            now_iso(), kind, detail, principal=principal, action=action, scope=scope, result=result,
            request_id=request_id, vm=vm,
        ))

    def security_event(self, vm_id: str, kind: str, detail: dict[str, Any]) -> int:
        """For workers and the supervisor: seccomp kills, guest faults, device resets, integrity
        failures. Returns the record's seq; raises ApiError(503) when the log is unavailable."""
        row = self.store.q1("SELECT tenant FROM vms WHERE id = ?", (vm_id,))
        scope = rbac.vm_scope(row["tenant"], vm_id) if row else ""
        return self.event("security", f"security/{kind}", vm=vm_id, scope=scope, detail=detail)
