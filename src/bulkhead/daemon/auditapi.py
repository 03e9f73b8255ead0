"""The audit log's read and proof API (docs/AUDIT.md); the witness-quorum gate is Core.append.

- `GET /v1/audit/checkpoint`: the signed head checkpoint and the log's verifier key; any caller holding
  audit/read somewhere (a checkpoint reveals only a size and a hash).
- `GET /v1/audit/proof/inclusion?seq=&size=`: RFC 9162 inclusion proof of one record. Allowed when the
  caller holds audit/read at the record's scope: a tenant's auditor proves its tenant's records are in
  the log from hashes alone, without reading any other tenant's record. Another tenant's record, or one
  that does not exist, is 404 alike.
- `GET /v1/audit/proof/consistency?old=&new=`: any caller holding audit/read somewhere.
- Mutations (records of kind `api` appended inside a state transaction) are refused with 503 while the
  witness policy says the log has had no witness quorum for longer than its grace (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Query

from bulkhead.control import rbac
from bulkhead.control.models import AuditRecordOut, CheckpointOut, ConsistencyProofOut, InclusionProofOut
from bulkhead.control.note import Checkpoint
from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx

__all__ = ["AuditService", "audit_routes"]

_SINCE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.]{1,15}Z?)?$"


class AuditService:
    """GET /audit and the proofs over the log (docs/AUDIT.md), within the caller's audit/read scopes."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.audit = core.audit

    def audit_query(self, ctx: ReqCtx, leaf: bool = False, **filters: Any) -> list[dict[str, Any]]:
        """GET /audit: records within the caller's audit/read scopes (`leaf`: with leaf inputs)."""
        scopes = self._audit_reader_scopes(ctx)
        return list(query_records(self.audit.path, scopes=None if "/" in scopes else scopes, leaf=leaf, **filters))

    def _audit_reader_scopes(self, ctx: ReqCtx) -> list[str]:
        ctx.action, ctx.scope = "audit/read", "/"
        scopes = self.core.readable_scopes(ctx.caller, "audit/read")
        if not scopes:
            ctx.decision = "deny"
            raise ApiError(404, NOT_FOUND)
        ctx.decision = "allow"
        return scopes

    def _size(self, size: int | None, at_least: int) -> int:
        cur = self.audit.size
        n = cur if size is None else size
        if n > cur:
            raise ApiError(422, f"the log has {cur} records, not {n}")
        if n < at_least or n < 1:
            raise ApiError(422, f"tree size {n} is below {max(at_least, 1)}")
        return n

    def audit_checkpoint(self, ctx: ReqCtx) -> dict[str, Any]:
        self._audit_reader_scopes(ctx)
        note = self.audit.head_note()
        cp = Checkpoint.parse(note[: note.rfind("\n\n") + 1])
        return {"note": note, "origin": cp.origin, "tree_size": cp.size, "root_hash": cp.root.hex(),
                "verifier_key": str(self.audit.verifier)}

    def audit_inclusion(self, ctx: ReqCtx, seq: int, size: int | None) -> dict[str, Any]:
        scopes = self._audit_reader_scopes(ctx)
        ctx.detail["seq"] = seq
        rec = next(iter(query_records(self.audit.path, seq=seq, limit=1)), None)
        if rec is None or not any(rbac.scope_within(rec["scope"] or "/", s) for s in scopes):
            ctx.decision = "deny"
            raise ApiError(404, NOT_FOUND)
        ctx.scope = rec["scope"] or "/"
        n = self._size(size, seq)
        t = self.audit.reader()
        try:
            return t.inclusion(seq, n)
        finally:
            t.conn.close()

    def audit_consistency(self, ctx: ReqCtx, old: int, new: int) -> dict[str, Any]:
        self._audit_reader_scopes(ctx)
        ctx.detail.update({"old": old, "new": new})
        n = self._size(new, old)
        t = self.audit.reader()
        try:
            return t.consistency(old, n)  # a ConfigError is answered by the status table (422)
        finally:
            t.conn.close()


def audit_routes(svc: Callable[[], AuditService]) -> APIRouter:
    r = router()

    @r.get("/audit", response_model=list[AuditRecordOut], response_model_exclude_none=True)
    def audit_list(
        since: str | None = Query(None, max_length=40, pattern=_SINCE),
        principal: UUID | None = None,
        vm: UUID | None = None,
        after: int = Query(0, ge=0, le=1 << 62),
        limit: int = Query(1000, ge=1, le=10000),
        leaf: bool = False,
        ctx: ReqCtx = Ctx,
    ) -> Any:
        return svc().audit_query(ctx, since=since, principal=str(principal) if principal else None,
                             vm=str(vm) if vm else None, after_seq=after, limit=limit, leaf=leaf)

    @r.get("/audit/checkpoint", response_model=CheckpointOut)
    def audit_checkpoint(ctx: ReqCtx = Ctx) -> Any:
        return svc().audit_checkpoint(ctx)

    @r.get("/audit/proof/inclusion", response_model=InclusionProofOut)
    def audit_inclusion(seq: int = Query(..., ge=1, le=1 << 62), size: int | None = Query(None, ge=1, le=1 << 62),
                        ctx: ReqCtx = Ctx) -> Any:
        return svc().audit_inclusion(ctx, seq, size)

    @r.get("/audit/proof/consistency", response_model=ConsistencyProofOut)
    def audit_consistency(old: int = Query(..., ge=1, le=1 << 62), new: int = Query(..., ge=1, le=1 << 62),
                          ctx: ReqCtx = Ctx) -> Any:
        return svc().audit_consistency(ctx, old, new)

    return r
