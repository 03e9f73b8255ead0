"""The interactive serial console over the API: a WebSocket at `/v1/vms/{vm_id}/console/ws`.

It rides the same listeners as every other request (mTLS with a client certificate, or the local root
socket): server.py's WebSocket protocols carry the connection's peer like its HTTP protocols, and the
Gate in app.py hands `websocket` scopes here. RFC 6455 framing is uvicorn's (websockets' sans-I/O
implementation); this module is the ASGI application of one session (the ASGI WebSocket spec: connect,
accept, receive/send, close).

Query: `mode=ro` (default; needs `vm/console/read`) or `mode=rw` (needs `vm/console/read` and
`vm/console/write`); `offset=N` (replay the console output from byte N) or `tail=N` (the last N bytes,
default 4096).

Session (docs/API.md "Console"):
- The server accepts, then sends one text frame `{"type": "attached", "mode", "offset", "writer"}`.
  Refusals are sent after the accept as a close frame whose code is 4000 + the HTTP status it stands
  for (4401 unauthenticated, 4403 not allowed, 4404 no such VM or not visible, 4409 the VM is not
  running or another session holds the console for writing, 4503 the audit log is unavailable) and whose
  reason is the one-sentence detail, so a client can print why.
- Guest output goes to every attached session as binary frames, in order, read from the VM's console
  file: runtime/console.py's ConsoleSink stays the one output sink, and several readers see the same
  bytes.
- Binary frames from the one writer are guest input: at most MAX_INPUT_FRAME bytes each (uvicorn caps
  the frame size too), handed to the backend (jailed: the worker protocol's ConsoleIn, validated by the
  worker and queued in the 16550's bounded receive queue, devices/serial.py). Input from a read-only
  session is dropped and answered once with `{"type": "notice"}`. Text frames are ignored.
- When the VM stops the server sends `{"type": "exit", "state"}` and closes with 1000.
- A live session is checked again every STATE_POLL_S: a certificate revoked (or expired) meanwhile ends
  it with 4401, a principal that lost the permission with 4403 (a `security/console-access-ended`
  record each), as revocation ends live HTTP connections.

Audit: the attach is the request's audit record (action vm/console/read or vm/console/write, the
principal, decision, result "attached" or the refusal's status) written before the session starts (fail
closed: no record, no session); the detach is a `vm.console.detach` record with the principal, the mode,
the byte counts and the duration.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import anyio

from bulkhead.control import rbac
from bulkhead.daemon.service import ApiError, Caller, Core, ReqCtx
from bulkhead.daemon.vms import VmService
from bulkhead.errors import HostError

__all__ = ["CONSOLE_WS_PATH", "MAX_INPUT_FRAME", "ConsoleService", "ConsoleSession", "serve_console_ws"]

CONSOLE_WS_PATH = re.compile(r"^/v1/vms/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/console/ws$")
MAX_INPUT_FRAME = 16 * 1024  # bytes of guest input per frame (the worker protocol's MAX_CONSOLE_CHUNK)
MAX_WS_MESSAGE = 64 * 1024  # what uvicorn accepts per message (server.py ws_max_size)
DEFAULT_TAIL = 4096
POLL_S = 0.05  # console file polling
STATE_POLL_S = 0.5  # VM state polling
READ_CHUNK = 65536
PEER_KEY = "bulkhead.peer"  # app.PEER_KEY (app.py imports this module; the key is repeated, not imported)


class ConsoleSession:
    """One attached client (bookkeeping for the detach record). `peer`: the connection's identity, checked
    again while the session lasts."""

    def __init__(self, ctx: ReqCtx, vm_id: str, tenant: str, mode: str, offset: int) -> None:
        self.ctx, self.vm_id, self.tenant, self.mode, self.offset = ctx, vm_id, tenant, mode, offset
        self.peer: dict[str, Any] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped_input = 0
        self.t0 = time.monotonic()


class ConsoleService:
    """Attach/detach (RBAC, the single-writer rule, audit) and the sessions' I/O. Given the core, the VM
    service (its rows, refresh and backend) and the daemon's peer authentication and request audit."""

    def __init__(self, core: Core, vms: VmService,
                 authenticate: Callable[[dict[str, Any] | None], tuple[Caller | None, str]],
                 append_request: Callable[[ReqCtx, str], None]) -> None:
        self.core = core
        self.store = core.store
        self.vms = vms
        self.backend = vms.backend
        self.authenticate = authenticate
        self.append_request = append_request
        self._writers: dict[str, ConsoleSession] = {}
        self._writers_lock = threading.Lock()

    def _console_writers(self) -> dict[str, ConsoleSession]:
        return self._writers

    def console_attach(self, ctx: ReqCtx, vm_id: str, mode: str, offset: int | None,
                       tail: int | None) -> ConsoleSession:
        """Authorize and register a console session. Raises ApiError: 404/403 (RBAC, docs/RBAC.md), 409
        (the VM is not running, or a writer is attached already), 422 (bad mode), 503 (audit)."""
        if mode not in ("ro", "rw"):
            raise ApiError(422, "mode must be ro or rw")
        row: Any = self.vms._vm(ctx, vm_id, "vm/console/read")
        ctx.detail.update(console="attach", mode=mode)
        if mode == "rw":
            self.core.authorize(ctx, "vm/console/write", ctx.scope, visible=lambda: True)
        row = self.vms.refresh(row)
        if row["state"] not in ("running", "paused"):
            raise ApiError(409, f"the VM is {row['state']}; `bulkhead vm console --once` shows its output")
        start = offset if offset is not None else max(0, self._console_end(vm_id) - (tail or 0))
        session = ConsoleSession(ctx, vm_id, row["tenant"], mode, start)
        writers = self._console_writers()
        if mode == "rw":
            with self._writers_lock:
                holder = writers.get(vm_id)
                if holder is not None:
                    raise ApiError(409, f"{holder.ctx.caller.name} holds this VM's console for writing; "
                                        "attach read-only (--follow) or wait until it detaches")
                writers[vm_id] = session
        try:
            self.append_request(ctx, "attached")
        except ApiError:
            self._release(session)
            raise
        return session

    def _console_end(self, vm_id: str) -> int:
        end = 0
        while True:
            data = self.backend.console(vm_id, end, 1 << 20)
            end += len(data)
            if len(data) < 1 << 20:
                return end

    def _release(self, session: ConsoleSession) -> None:
        writers = self._console_writers()
        with self._writers_lock:
            if writers.get(session.vm_id) is session:
                del writers[session.vm_id]

    def console_detach(self, session: ConsoleSession, why: str) -> None:
        """Free the writer slot and append the detach record (best effort: the session is over)."""
        self._release(session)
        try:
            self.core.event("vm", "vm.console.detach", vm=session.vm_id,
                       scope=rbac.vm_scope(session.tenant, session.vm_id), principal=session.ctx.caller.id,
                       result=why, request_id=session.ctx.request_id,
                       detail={"mode": session.mode, "bytes_in": session.bytes_in, "bytes_out": session.bytes_out,
                               "dropped_input": session.dropped_input,
                               "seconds": round(time.monotonic() - session.t0, 3)})
        except ApiError:
            pass

    def console_input(self, session: ConsoleSession, data: bytes) -> bool:
        """Writer input -> the guest. Returns False when the session may not write (input dropped).
        Raises HostError when the VM cannot take it (it stopped)."""
        if session.mode != "rw" or self._console_writers().get(session.vm_id) is not session:
            session.dropped_input += len(data)
            return False
        for i in range(0, len(data), MAX_INPUT_FRAME):
            self.backend.console_input(session.vm_id, bytes(data[i : i + MAX_INPUT_FRAME]))
        session.bytes_in += len(data)
        return True

    def console_read(self, session: ConsoleSession) -> bytes:
        data: bytes = self.backend.console(session.vm_id, session.offset, READ_CHUNK)
        session.offset += len(data)
        session.bytes_out += len(data)
        return data

    def console_vm_state(self, session: ConsoleSession) -> str:
        row = self.store.q1("SELECT state FROM vms WHERE id = ?", (session.vm_id,))
        return "deleted" if row is None else str(row["state"])

    def console_still_allowed(self, session: ConsoleSession) -> tuple[int, str] | None:
        """A live session is checked again (every STATE_POLL_S): a revoked or expired certificate ends it
        (4401), and so does losing the console permission (4403), audited as a security event. Returns
        None while it may go on, else (status, reason)."""
        caller, why = self.authenticate(session.peer)
        status, reason = 0, ""
        if caller is None or caller.id != session.ctx.caller.id:
            status, reason = 401, why or "the connection's identity changed"
        else:
            scope = rbac.vm_scope(session.tenant, session.vm_id)
            needed = ["vm/console/read"] + (["vm/console/write"] if session.mode == "rw" else [])
            lost = [a for a in needed if not self.core.allowed(caller, a, scope)]
            if lost:
                status, reason = 403, f"{caller.name} may no longer {lost[0]} at this scope"
        if not status:
            return None
        try:
            self.core.event("security", "security/console-access-ended", vm=session.vm_id,
                       scope=rbac.vm_scope(session.tenant, session.vm_id), principal=session.ctx.caller.id,
                       result=str(status), request_id=session.ctx.request_id,
                       detail={"reason": reason, "mode": session.mode})
        except ApiError:
            pass  # the session ends anyway; its detach record says why
        self._release(session)
        return status, reason


def _query(scope: dict[str, Any]) -> tuple[str, int | None, int | None]:
    """mode, offset, tail from the query string. Raises ApiError 422."""
    raw = scope.get("query_string", b"")
    try:
        q = parse_qs(raw.decode("ascii"), strict_parsing=False, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(422, "the query string is not valid") from None
    unknown = set(q) - {"mode", "offset", "tail"}
    if unknown:
        raise ApiError(422, f"unknown query parameter {sorted(unknown)[0][:32]!r}")

    def num(name: str) -> int | None:
        if name not in q:
            return None
        v = q[name][-1]
        if not v.isdigit() or len(v) > 15:
            raise ApiError(422, f"{name} must be a non-negative integer")
        return int(v)

    mode = q.get("mode", ["ro"])[-1]
    offset, tail = num("offset"), num("tail")
    return mode, offset, DEFAULT_TAIL if tail is None and offset is None else tail


async def _refuse(send: Any, status: int, detail: str) -> None:
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 4000 + status, "reason": detail.encode()[:120].decode("utf-8", "ignore")})


async def serve_console_ws(daemon: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI application of one WebSocket connection (any path: only CONSOLE_WS_PATH exists)."""
    msg = await receive()
    if msg.get("type") != "websocket.connect":
        return
    rid = str(uuid.uuid4())
    path = str(scope.get("path", ""))
    caller, why = await anyio.to_thread.run_sync(daemon.authenticate, scope.get("extensions", {}).get(PEER_KEY))
    if caller is None:
        try:
            await anyio.to_thread.run_sync(daemon.auth_refused, scope.get("extensions", {}).get(PEER_KEY), why, rid,
                                           path)
        except ApiError:
            pass
        await _refuse(send, 401, why)
        return
    ctx = ReqCtx(caller, rid, "GET", path)
    m = CONSOLE_WS_PATH.match(path)
    try:
        if m is None:
            ctx.action, ctx.decision = "websocket", "invalid"
            raise ApiError(404, "not found")
        mode, offset, tail = _query(scope)
        session = await anyio.to_thread.run_sync(daemon.console.console_attach, ctx, m.group(1), mode, offset, tail)
        session.peer = scope.get("extensions", {}).get(PEER_KEY)
    except ApiError as exc:
        try:
            await anyio.to_thread.run_sync(daemon.append_request, ctx, str(exc.status))
        except ApiError as audit:
            exc = audit
        await _refuse(send, exc.status, exc.detail)
        return
    await send({"type": "websocket.accept"})
    why_end = "detached"
    try:
        writer = session.mode == "rw"
        await send({"type": "websocket.send", "text": json.dumps(
            {"type": "attached", "mode": session.mode, "offset": session.offset, "writer": writer})})
        why_end = await _pump(daemon, session, receive, send)
    finally:
        await anyio.to_thread.run_sync(daemon.console.console_detach, session, why_end)


async def _pump(daemon: Any, session: ConsoleSession, receive: Any, send: Any) -> str:
    """Run output and input until the client leaves or the VM stops; returns why it ended."""
    ended: list[str] = []

    async def output() -> None:
        last_state = 0.0
        while True:
            data = await anyio.to_thread.run_sync(daemon.console.console_read, session)
            if data:
                await send({"type": "websocket.send", "bytes": data})
                continue
            now = time.monotonic()
            if now - last_state >= STATE_POLL_S:
                last_state = now
                refused = await anyio.to_thread.run_sync(daemon.console.console_still_allowed, session)
                if refused is not None:
                    await send({"type": "websocket.close", "code": 4000 + refused[0], "reason": refused[1][:120]})
                    ended.append(f"refused-{refused[0]}")
                    return
                state = await anyio.to_thread.run_sync(daemon.console.console_vm_state, session)
                if state not in ("running", "paused"):
                    while data := await anyio.to_thread.run_sync(daemon.console.console_read, session):
                        await send({"type": "websocket.send", "bytes": data})
                    await send({"type": "websocket.send", "text": json.dumps({"type": "exit", "state": state})})
                    await send({"type": "websocket.close", "code": 1000})
                    ended.append("vm-" + state)
                    return
            await anyio.sleep(POLL_S)

    async def inbound() -> None:
        noticed = False
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                ended.append("detached")
                return
            data = msg.get("bytes")
            if not data:
                continue  # text frames carry nothing for the guest
            try:
                ok = await anyio.to_thread.run_sync(daemon.console.console_input, session, data)
            except HostError:
                continue  # the VM is stopping: output() notices and ends the session
            if not ok and not noticed:
                noticed = True
                await send({"type": "websocket.send", "text": json.dumps(
                    {"type": "notice", "detail": "read-only session: input is not sent to the guest"})})

    async with anyio.create_task_group() as tg:
        async def run(fn: Any) -> None:
            try:
                await fn()
            except Exception:  # the client went away mid-frame (uvicorn's ClientDisconnected, ...)
                ended.append("connection-lost")
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(run, output)
        tg.start_soon(run, inbound)
    return ended[0] if ended else "detached"


def declare_surfaces() -> None:
    """The console WebSocket: an API route outside the OpenAPI document (daemon/surfaces.py lists those)."""
    from bulkhead.surface import declare

    declare(
        "api-route",
        "WEBSOCKET /v1/vms/{vm_id}/console/ws",
        owner=__name__,
        boundary="client-daemon",
        accepts="an mTLS-authenticated WebSocket (or root on the local socket), frames <= 64 KiB, no "
        "compression; query mode/offset/tail checked; RBAC vm/console/read (+ vm/console/write to send), "
        "one writer per VM, attach and detach audited; guest input goes to the worker as ConsoleIn",
        handler="serve_console_ws",
        operation="vm_console_ws",
        fuzz="fuzz/fuzz_console_query.py",
    )
