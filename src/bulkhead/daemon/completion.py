"""Recording a VM lifecycle change that has already happened on the host, fail closed (issue 12, soak
finding A; docs/API.md "VM lifecycle and execution").

The new state, its VM event and the request's audit record are one transaction (Core.mutation). When
that transaction fails (the audit log or the state database is full or locked: a 503), start, pause and
resume are undone on the host before the 503, so a refused request changed nothing (no worker runs
outside the daemon's accounting). A stop cannot be undone: its intent record (written before the stop,
with the request's id) is its audit record, the state is stored without a second record and the stop
is acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from typing import Any

from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.backend import VmBackend
from bulkhead.daemon.service import ApiError, Core, ReqCtx
from bulkhead.errors import HostError

__all__ = ["UNDO", "LifecycleCompletion"]

UNDO = {"start": "stop", "pause": "resume", "resume": "pause"}  # what takes a refused change back on the host
STOP_RETRIES, STOP_RETRY_S = 50, 0.1  # a stop's state write retries briefly on a full or locked database


class LifecycleCompletion:
    """Given the shared core and the VMM backend that made the change."""

    def __init__(self, core: Core, backend: VmBackend) -> None:
        self.core = core
        self.store = core.store
        self.backend = backend

    def complete(self, ctx: ReqCtx, vm_id: str, op: str, new: str, pid: int | None,
                 extra: dict[str, Any] | None = None) -> None:
        """Store `new` (with `pid`) for `op` and the request's audit record together; `extra` goes into
        the VM event (a stop's exit reason). Raises the failure (ApiError 503, its kind) after undoing a
        start, pause or resume whose record failed."""
        detail = json.dumps({"op": op, "by": ctx.caller.id, **(extra or {})}, sort_keys=True)

        def write(c: Any) -> None:
            now = now_iso()
            c.execute("UPDATE vms SET state = ?, pid = ?, exit_status = NULL, updated = ? WHERE id = ?",
                      (new, pid, now, vm_id))
            c.execute("INSERT INTO vm_events(vm, time, event, detail) VALUES (?,?,?,?)", (vm_id, now, new, detail))

        try:
            with self.core.mutation(ctx, "200") as c:
                write(c)
            return
        except ApiError as exc:
            failure = exc
        if op == "stop":  # done on the host and audited before it was done: the store follows the host
            self._stopped_anyway(ctx, write, failure)
            return
        self._undo(ctx, vm_id, op, failure)

    def _stopped_anyway(self, ctx: ReqCtx, write: Any, failure: ApiError) -> None:
        for _ in range(STOP_RETRIES):
            try:
                with self.store.txn() as c:
                    write(c)
                break
            except sqlite3.Error:  # a full or locked database: retry briefly
                time.sleep(STOP_RETRY_S)
        ctx.audited = True  # the vm.stop intent record carries this request's id
        ctx.detail["completion"] = f"not recorded: {failure.detail}"

    def _undo(self, ctx: ReqCtx, vm_id: str, op: str, failure: ApiError) -> None:
        undo = UNDO[op]
        try:
            getattr(self.backend, undo)(vm_id)
            undone = "ok"
        except HostError as exc:  # e.g. the worker already died: nothing of it remains either
            undone = str(exc)
        ctx.detail.update(rolled_back=undone, error=failure.detail)
        with contextlib.suppress(ApiError):
            self.core.event("vm", f"vm.{op}", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id,
                            result="rolled-back", request_id=ctx.request_id, detail={"undo": undo, "result": undone})
        raise ApiError(failure.status, f"cannot {op} the VM: {failure.detail}; the {op} was undone",
                       kind=failure.kind) from None
