"""The audit log's proof API (docs/AUDIT.md) and the witness-quorum gate on mutations.

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

from typing import Any

from bulkhead.control import rbac
from bulkhead.control.audit import Record
from bulkhead.control.note import Checkpoint
from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx

__all__ = ["AuditOps"]


class AuditOps(Core):
    witnesses: Any = None  # bulkhead.daemon.witness.WitnessPusher, or None (no witnesses configured)

    def append(self, rec: Record) -> int:
        if rec.kind == "api" and self.witnesses is not None:
            why = self.witnesses.refusal()
            if why:
                raise ApiError(503, f"no witness quorum, nothing was changed ({why})")
        return super().append(rec)

    def audit_query(self, ctx: ReqCtx, leaf: bool = False, **filters: Any) -> list[dict[str, Any]]:
        """GET /audit: records within the caller's audit/read scopes (`leaf`: with leaf inputs)."""
        scopes = self._audit_reader_scopes(ctx)
        return list(query_records(self.audit.path, scopes=None if "/" in scopes else scopes, leaf=leaf, **filters))

    def _audit_reader_scopes(self, ctx: ReqCtx) -> list[str]:
        ctx.action, ctx.scope = "audit/read", "/"
        scopes = self.readable_scopes(ctx.caller, "audit/read")
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
