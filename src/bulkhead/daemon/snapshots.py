"""Snapshots of the daemon's VMs: take, list, delete (scrubbed), restore in a fresh jailed worker
(docs/SNAPSHOT.md "The daemon", docs/API.md "Snapshots").

A snapshot is a tenant-owned resource (scope /tenants/{t}/snapshots/{id}): another tenant can neither see,
restore nor delete it (404, like a missing one). The file is the authenticated, encrypted format of
bulkhead/snapshot/format.py, sealed with the daemon's host key (<state>/snapshot.key, which never enters a
jail). Every operation appends an intent record before it acts and its API record with the result.

A restore: the file is authenticated and every memory chunk decrypted into fresh memfds before a worker
exists (runtime/snapshot.py open_restore/decrypt_into); the snapshot's launch digest must still be allowed by
the host's integrity gate (HostIntegrity.check_vm_restore, the same gate as a start: 409 launch-refused when
the policy no longer lists it); the record must match the file (the file's own id and the VM it was taken
of); a second restore of one snapshot needs clone=true (409 snapshot-clone-required otherwise) and is
audited as `snapshot.clone`. The restored VM is a new VM of the snapshot's tenant.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Response

from bulkhead.control import rbac
from bulkhead.control.lifecycle import LifecycleError
from bulkhead.control.models import VmOut
from bulkhead.control.snapmodels import SnapshotCreate, SnapshotOut, SnapshotRestore
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx
from bulkhead.daemon.store import new_id
from bulkhead.errors import BulkheadError, HostError, SnapshotError
from bulkhead.integrity.errors import IntegrityError

__all__ = ["SCHEMA", "SnapshotService", "scrub_file", "snapshot_routes"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots(id TEXT PRIMARY KEY, tenant TEXT NOT NULL, vm TEXT NOT NULL,
  vm_name TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, file_id TEXT NOT NULL, launch_digest TEXT,
  spec TEXT NOT NULL, bytes INTEGER NOT NULL, created TEXT NOT NULL, restores INTEGER NOT NULL DEFAULT 0,
  UNIQUE(tenant, name));
"""
_AFTER = {"pause": "paused", "stop": "stopped"}


def scrub_file(path: str) -> None:
    """Overwrite a snapshot file with zeros, fsync, then unlink it (docs/SNAPSHOT.md "Deleting").

    What this does: the file's blocks as the filesystem maps them now hold zeros before the name goes, so
    a later reader of the raw device through this file's extents finds no ciphertext, and the data key
    (wrapped in the file) is gone with it. What it does not guarantee: a copy-on-write or log-structured
    filesystem (btrfs, ZFS, f2fs), a filesystem snapshot or backup, an SSD's remapped blocks or journal
    data may keep the old blocks. The file is encrypted at rest, so those copies are ciphertext under the
    host key; destroying that key is what makes them unreadable. Raises HostError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise HostError(f"cannot scrub the snapshot file: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        zero = bytes(1 << 20)
        for off in range(0, size, len(zero)):
            os.pwrite(fd, zero[: min(len(zero), size - off)], off)
        os.fsync(fd)
        os.unlink(path)
    except OSError as exc:
        raise HostError(f"cannot scrub the snapshot file: {exc.strerror}") from None
    finally:
        os.close(fd)


def _out(r: Any) -> dict[str, Any]:
    return {"id": r["id"], "tenant": r["tenant"], "vm": r["vm"], "vm_name": r["vm_name"], "name": r["name"],
            "launch_digest": r["launch_digest"], "bytes": r["bytes"], "created": r["created"],
            "restores": r["restores"]}


class SnapshotService:
    """Given the shared core and the VM service (its rows, locks, backend and integrity gate)."""

    def __init__(self, core: Core, vms: Any) -> None:
        self.core = core
        self.store = core.store
        self.vms = vms
        self.dir = core.paths.state_dir / "snapshots"
        self.key_path = str(core.paths.state_dir / "snapshot.key")
        self._lock = threading.Lock()  # one restore at a time per daemon: the ledger check and the spawn
        with self.store.txn() as c:
            c.execute(SCHEMA)

    def _key(self, create: bool) -> bytes:
        from bulkhead.snapshot.keys import load_host_key

        return load_host_key(self.key_path, create=create)

    # ------------------------------------------------------------------ take
    def snapshot_create(self, ctx: ReqCtx, vm_id: str, body: SnapshotCreate) -> dict[str, Any]:
        """Pause the VM, save its state and memory, then resume, keep it paused or stop it (body.then)."""
        row = self.vms._vm(ctx, vm_id, "vm/snapshot")
        take = getattr(self.vms.backend, "snapshot", None)
        if take is None:
            raise ApiError.of(HostError("this daemon's backend cannot snapshot VMs (the jail backend can)"))
        from bulkhead.runtime.snapshot import SnapshotTarget, seal_snapshot

        with self.vms.vm_lock(vm_id):
            row = self.vms.refresh(self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,)))
            if row is None:
                raise ApiError(404, NOT_FOUND)
            if row["state"] not in ("running", "paused"):
                raise ApiError.of(LifecycleError(f"cannot snapshot a VM that is {row['state']}"))
            name = body.name or f"{row['name']}-{now_iso().replace(':', '').replace('-', '')[:15]}"
            if self.store.q1("SELECT 1 FROM snapshots WHERE tenant = ? AND name = ?", (row["tenant"], name)):
                raise ApiError(409, f"a snapshot named {name!r} already exists in this tenant")
            digest = self.vms.launch._digests.get(vm_id)  # measured by this daemon at the VM's start
            snap_id = new_id()
            path = self.dir / f"{snap_id}.bhs"
            ctx.detail.update(snapshot=snap_id, snapshot_name=name, then=body.then, launch_digest=digest)
            self.core.event("vm", "vm.snapshot", vm=vm_id, scope=ctx.scope, principal=ctx.caller.id,
                            result="intent", request_id=ctx.request_id, detail={"snapshot": snap_id, "then": body.then})
            spec = self.vms._spec(row)
            from bulkhead.daemon.integrity import vm_config_of

            config = vm_config_of(spec)
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                key = self._key(create=True)
                info = take(vm_id, lambda mem, st: seal_snapshot(SnapshotTarget(str(path), key, vm_id.replace("-", ""),
                                                                                 mem, st),
                                                                  config=config, launch_digest=digest),
                            then=body.then)
            except (BulkheadError, OSError) as exc:
                ctx.detail["error"] = str(exc)
                self.core.note_vm_event(vm_id, "snapshot-failed", {"error": str(exc)})
                raise ApiError.of(exc if isinstance(exc, BulkheadError) else HostError(str(exc)),
                                  f"cannot snapshot the VM: {exc}") from None
            now = now_iso()
            # a paused VM stays paused after `then=resume` (JailedBackend.snapshot leaves it as it was)
            new_state = row["state"] if body.then == "resume" else _AFTER[body.then]
            try:
                with self.core.mutation(ctx, "201") as c:
                    c.execute("INSERT INTO snapshots VALUES (?,?,?,?,?,?,?,?,?,?,?,0)",
                              (snap_id, row["tenant"], vm_id, row["name"], name, str(path), info["snapshot_id"],
                               digest, row["spec"], info["bytes"], now))
                    c.execute("UPDATE vms SET state = ?, updated = ? WHERE id = ?", (new_state, now, vm_id))
                    c.execute("INSERT INTO vm_events(vm, time, event, detail) VALUES (?,?,?,?)",
                              (vm_id, now, "snapshotted", json.dumps({"snapshot": snap_id, "then": body.then})))
            except BaseException:
                scrub_file(str(path))
                raise
        got = self.store.q1("SELECT * FROM snapshots WHERE id = ?", (snap_id,))
        return _out(got)

    # ------------------------------------------------------------------ read / delete
    def snapshot_list(self, ctx: ReqCtx) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "snapshot/read", "/", "allow"
        rows = self.store.q("SELECT * FROM snapshots ORDER BY created")
        return [_out(r) for r in self.core.visible_rows(ctx, "snapshot", rows)]

    def snapshot_get(self, ctx: ReqCtx, snap_id: str) -> dict[str, Any]:
        return _out(self.core.owned_row(ctx, "snapshot", snap_id, "snapshot/read"))

    def snapshot_delete(self, ctx: ReqCtx, snap_id: str) -> None:
        row = self.core.owned_row(ctx, "snapshot", snap_id, "snapshot/delete")
        with self._lock:
            ctx.detail.update(snapshot=snap_id, scrub="overwrite+fsync+unlink")
            with self.core.mutation(ctx, "204") as c:
                c.execute("DELETE FROM snapshots WHERE id = ?", (snap_id,))
                try:
                    scrub_file(row["path"])  # in the transaction: a file that cannot be scrubbed keeps its row
                except HostError as exc:
                    raise ApiError.of(exc) from None

    # ------------------------------------------------------------------ restore
    def snapshot_restore(self, ctx: ReqCtx, snap_id: str, body: SnapshotRestore) -> dict[str, Any]:
        row = self.core.owned_row(ctx, "snapshot", snap_id, "snapshot/restore")
        tenant = row["tenant"]
        self.core.authorize_in_tenant(ctx, "vm/write", tenant)  # a restore creates a VM
        ctx.action, ctx.scope = "snapshot/restore", rbac.owned_scope("snapshot", tenant, snap_id)
        start = getattr(self.vms.backend, "start", None)
        if not hasattr(self.vms.backend, "snapshot") or start is None:
            raise ApiError.of(HostError("this daemon's backend cannot restore VMs (the jail backend can)"))
        name = body.name or f"{row['vm_name']}-restored-{new_id()[:8]}"
        with self._lock:
            row = self.store.q1("SELECT * FROM snapshots WHERE id = ?", (snap_id,))
            if row is None:
                raise ApiError(404, NOT_FOUND)
            if row["restores"] and not body.clone:
                from bulkhead.errors import SnapshotRestoredBefore

                raise ApiError.of(SnapshotRestoredBefore(
                    f"snapshot {snap_id} was restored before: restoring it again duplicates the guest's secrets "
                    "and RNG state; pass clone=true (`bulkhead vm restore --clone`) to do it on purpose"))
            if self.store.q1("SELECT 1 FROM vms WHERE tenant = ? AND name = ?", (tenant, name)):
                raise ApiError(409, f"a VM named {name!r} already exists in this tenant")
            try:
                self.vms.integrity.check_vm_restore(row["launch_digest"])  # the policy as it is now
            except IntegrityError as exc:
                ctx.detail.update(error=str(exc), digest=row["launch_digest"])
                try:
                    self.core.event("security", "security/integrity/restore-refused", scope=ctx.scope,
                                    detail={"snapshot": snap_id, "digest": row["launch_digest"], "reason": str(exc)})
                except ApiError:
                    pass
                raise ApiError.of(exc) from None
            vm_id = new_id()
            action = "snapshot.clone" if row["restores"] else "snapshot.restore"
            ctx.vm = vm_id
            ctx.detail.update(snapshot=snap_id, vm_name=name, clone=bool(row["restores"]),
                              launch_digest=row["launch_digest"])
            self.core.event("vm", action, vm=vm_id, scope=ctx.scope, principal=ctx.caller.id, result="intent",
                            request_id=ctx.request_id, detail={"snapshot": snap_id, "restores_before": row["restores"]})
            source = self._open(row)
            spec = json.loads(row["spec"])
            console = self.core.paths.vms / vm_id / "console.log"
            try:  # a fresh jailed worker, as a start: jail, seccomp, the worker's own integrity gate
                pid = start(vm_id, _RestoreSpec(str(console)), restore=source)
            except BaseException as exc:
                ctx.detail["error"] = str(exc)
                raise ApiError.of(exc if isinstance(exc, BulkheadError) else HostError(str(exc)),
                                  f"cannot restore the VM: {exc}") from None
            now = now_iso()
            try:
                with self.core.mutation(ctx, "201") as c:  # the VM, the count and this request's record together
                    c.execute("INSERT INTO vms VALUES (?,?,?,?,?,NULL,?,?,?)",
                              (vm_id, tenant, name, "running",
                               json.dumps({**spec, "restored_from": snap_id}, sort_keys=True), pid, now, now))
                    c.execute("UPDATE snapshots SET restores = restores + 1 WHERE id = ?", (snap_id,))
                    c.execute("INSERT INTO vm_events(vm, time, event, detail) VALUES (?,?,?,?)",
                              (vm_id, now, "restored", json.dumps({"snapshot": snap_id, "by": ctx.caller.id,
                                                                   "clone": bool(row["restores"])})))
            except BaseException:
                self.vms.backend.stop(vm_id)  # not recorded: it does not run either
                self.vms.backend.forget(vm_id)
                raise
            with self.store.lock:
                self.vms.launch._digests[vm_id] = row["launch_digest"]  # a snapshot of it carries the digest
        final = self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,))
        assert final is not None
        return self.store.vm_out(final)

    def _open(self, row: Any) -> Any:
        """Authenticate the file and decrypt it into fresh memfds (runtime/snapshot.py); the file must be
        the one the record names. Raises ApiError (snapshot-invalid 422, host-error 503)."""
        from bulkhead.runtime.snapshot import (
            decrypt_into,
            guest_memfds,
            load_restore_state,
            open_restore,
        )

        try:
            restore = open_restore(row["path"], host_key=lambda: self._key(create=False), serial="stdio")
            try:
                header = restore.header
                if header["snapshot_id"] != row["file_id"] or header["vm_id"] != row["vm"].replace("-", ""):
                    raise SnapshotError("the snapshot file is not the one this snapshot's record names")
                if header["launch_digest"] != row["launch_digest"]:
                    raise SnapshotError("the snapshot file's launch digest differs from its record")
                memory_fd, state_fd = guest_memfds(restore.config.mem_bytes)
                try:
                    decrypt_into(restore, memory_fd, state_fd)
                except BaseException:
                    os.close(memory_fd)
                    os.close(state_fd)
                    raise
            finally:
                restore.close()
            header, state = load_restore_state(state_fd)
        except (BulkheadError, OSError) as exc:
            raise ApiError.of(exc if isinstance(exc, BulkheadError) else HostError(str(exc))) from None
        return _Source(header, state, memory_fd, state_fd, lambda: None, restore.config)


class _Source:
    """runtime/snapshot.py RestoreSource plus the snapshot's configuration (JailedBackend.start)."""

    def __init__(self, header: dict[str, Any], state: dict[str, Any], memory_fd: int, state_fd: int,
                 on_built: Callable[[], object], config: Any) -> None:
        self.header, self.state, self.memory_fd, self.state_fd = header, state, memory_fd, state_fd
        self.on_built, self.config = on_built, config


class _RestoreSpec:
    """What JailedBackend.start reads of a spec for a restore: the console file (the rest is the snapshot's)."""

    def __init__(self, console_path: str) -> None:
        self.console_path = console_path
        self.keep_console = False


def snapshot_routes(svc: Callable[[], SnapshotService]) -> APIRouter:
    r = router()

    @r.post("/vms/{vm_id}/snapshot", response_model=SnapshotOut, status_code=201)
    def snapshot_create(vm_id: UUID, body: SnapshotCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().snapshot_create(ctx, str(vm_id), body)

    @r.get("/snapshots", response_model=list[SnapshotOut])
    def snapshot_list(ctx: ReqCtx = Ctx) -> Any:
        return svc().snapshot_list(ctx)

    @r.get("/snapshots/{snap_id}", response_model=SnapshotOut)
    def snapshot_get(snap_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().snapshot_get(ctx, str(snap_id))

    @r.delete("/snapshots/{snap_id}", status_code=204)
    def snapshot_delete(snap_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().snapshot_delete(ctx, str(snap_id))
        return Response(status_code=204)

    @r.post("/snapshots/{snap_id}/restore", response_model=VmOut, status_code=201)
    def snapshot_restore(snap_id: UUID, body: SnapshotRestore, ctx: ReqCtx = Ctx) -> Any:
        return svc().snapshot_restore(ctx, str(snap_id), body)

    return r
