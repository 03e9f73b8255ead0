"""The web console's pages (issue 21; docs/UI.md): server-rendered Jinja2 templates under /ui, behind the
same Gate as the API (authentication, request audit record, body cap) and uiauth.UiFront (sessions,
security headers). Every view calls the same service method as its API route with the request's ReqCtx,
so RBAC is decided by the same code (Core.authorize / visible_rows) and audited by the same Gate record;
buttons are shown by asking the same evaluator (Core.allowed) whether the action would be allowed.

State changes are POST forms carrying the CSRF token (uiauth.csrf_ok); a POST without a matching token
is refused with 403 before any service is called (and audited as a deny).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

import anyio
import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from bulkhead.control import merkle, rbac
from bulkhead.daemon.routing import Ctx
from bulkhead.daemon.service import ApiError, ReqCtx
from bulkhead.daemon.uiauth import UiAuth, _binding, csrf_ok

__all__ = ["VM_ACTIONS", "login_link_routes", "public_app", "ui_routes", "vendor_dir"]

HERE = Path(__file__).parent
VM_ACTIONS = ("start", "stop", "shutdown", "pause", "resume")
_VENDOR_FILES = {  # what the pages load from node_modules (ui/package.json), and nothing else
    "htmx.min.js": "htmx.org/dist/htmx.min.js",
    "xterm.js": "@xterm/xterm/lib/xterm.js",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "axe.min.js": "axe-core/axe.min.js",
}
_OWN_FILES = {"app.js": "application/javascript", "app.css": "text/css"}


def vendor_dir() -> Path:
    """Where install.sh ran `npm ci` (BULKHEAD_UI_VENDOR overrides; then the installed copy, then the
    checkout's ui/node_modules)."""
    env = os.environ.get("BULKHEAD_UI_VENDOR")
    if env:
        return Path(env)
    for cand in (Path("/usr/local/share/bulkhead/ui/node_modules"), HERE.parents[2] / "ui" / "node_modules"):
        if cand.is_dir():
            return cand
    return Path("/usr/local/share/bulkhead/ui/node_modules")


_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                          autoescape=True)


def _human(v: Any) -> str:
    """A value as a person reads it (no Python reprs), as daemon/cli.py's `human`."""
    if v is None or v == "" or v == [] or v == {}:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_human(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return ", ".join(_human(x) for x in v)
    return str(v)


_env.filters["human"] = _human


def _render(request: Request, ctx: ReqCtx, auth: UiAuth, name: str, **values: Any) -> HTMLResponse:
    t0 = time.perf_counter()
    html = _env.get_template(name).render(me=ctx.caller, csrf=auth.csrf_for(_binding(request.scope)),
                                          path=request.url.path, **values)
    resp = HTMLResponse(html)
    resp.headers["server-timing"] = f"render;dur={(time.perf_counter() - t0) * 1000:.1f}"
    return resp


def _may(daemon: Any, ctx: ReqCtx, vms: list[dict[str, Any]]) -> None:
    """Set each VM's `may`: the actions the caller may take on it, from the scopes within which the
    evaluator allows each action (Core.readable_scopes, as Core.visible_rows does for lists); the POST
    itself is authorized again by the service."""
    scopes = {op: daemon.core.readable_scopes(ctx.caller, f"vm/{op}") for op in VM_ACTIONS}
    for vm in vms:
        own = rbac.owned_scope("vm", vm["tenant"], vm["id"])
        vm["may"] = [op for op in VM_ACTIONS if any(rbac.scope_within(own, s) for s in scopes[op])]


def _tenant_names(daemon: Any) -> dict[str, str]:
    return {r["id"]: r["name"] for r in daemon.store.q("SELECT id, name FROM tenants")}


def _form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=20).items()}


def _audit_view(daemon: Any, ctx: ReqCtx, q: dict[str, str]) -> dict[str, Any]:
    """Records (filtered), the log's verification, the head checkpoint, and a chosen record's inclusion
    proof checked here (RFC 9162 2.1.3.2) against the signed head's root."""
    from bulkhead.daemon.auditlog import verify_files

    api = daemon.audit_api
    recs = api.audit_query(ctx, principal=q.get("principal") or None, since=q.get("since") or None, limit=5000)
    for key in ("action", "decision", "resource"):
        want = q.get(key, "")
        if want:
            field = {"resource": "scope"}.get(key, key)
            recs = [r for r in recs if want in str(r.get(field, "")) or (key == "resource" and want in str(r.get("vm")))]
    recs = recs[-500:][::-1]
    audit = daemon.core.audit
    report = verify_files(audit.path, audit.verifier, getattr(audit, "checkpoint_file", None))
    cp = api.audit_checkpoint(ctx)
    witnesses = getattr(daemon, "witnesses", None)
    proof: dict[str, Any] | None = None
    if q.get("seq", "").isdigit():
        seq = int(q["seq"])
        try:
            p = api.audit_inclusion(ctx, seq, None)
            root = bytes.fromhex(cp["root_hash"])
            ok = p["tree_size"] == cp["tree_size"] and merkle.verify_inclusion(
                bytes.fromhex(p["leaf_hash"]), p["leaf_index"], p["tree_size"], [bytes.fromhex(h) for h in p["path"]], root)
            rec = next(iter(api.audit_query(ctx, leaf=True, seq=seq)), None)
            leaf_ok = rec is not None and merkle.leaf_hash(base64.b64decode(rec["leaf"])).hex() == p["leaf_hash"]
            proof = {**p, "seq": seq, "verified": bool(ok and leaf_ok), "record": rec}
        except ApiError as exc:
            proof = {"seq": seq, "error": exc.detail, "verified": False}
    return {"records": recs, "report": report, "checkpoint": cp, "proof": proof, "q": q,
            "witnesses": [] if witnesses is None else [getattr(s, "name", str(s)) for s in getattr(witnesses, "specs", [])],
            "principals": {r["id"]: r["name"] for r in daemon.store.q("SELECT id, name FROM principals")}}


def ui_routes(the: Callable[[], Any]) -> APIRouter:
    """GET pages and POST actions under /ui (not in the OpenAPI document: they are HTML)."""
    r = APIRouter(prefix="/ui", include_in_schema=False)

    def run(fn: Callable[[], Any]) -> Any:
        return anyio.to_thread.run_sync(fn)

    @r.get("")
    @r.get("/")
    def home() -> Response:
        return RedirectResponse("/ui/vms", 303)

    @r.get("/vms")
    def vms(request: Request, tenant: str = "", state: str = "", q: str = "", ctx: ReqCtx = Ctx) -> Response:
        d = the()
        seen = d.vm_api.vm_list(ctx)  # only what this principal may see (RBAC in the VM service)
        names = _tenant_names(d)
        visible_tenants = sorted({names.get(v["tenant"], v["tenant"]) for v in seen})  # never other tenants' names
        rows = [v for v in seen if (not tenant or names.get(v["tenant"]) == tenant or v["tenant"] == tenant)
                and (not state or v["state"] == state) and (not q or q in v["name"])]
        for v in rows:
            v["tenant_name"] = names.get(v["tenant"], v["tenant"])
        _may(d, ctx, rows)
        rows.sort(key=lambda v: (v["tenant_name"], v["name"]))
        return _render(request, ctx, d.ui_auth, "vms.html", vms=rows, tenants=visible_tenants,
                       f={"tenant": tenant, "state": state, "q": q}, host=os.uname().nodename)

    @r.get("/vms/{vm_id}")
    def vm(request: Request, vm_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        v = d.vm_api.vm_get(ctx, str(vm_id))
        v["tenant_name"] = _tenant_names(d).get(v["tenant"], v["tenant"])
        _may(d, ctx, [v])
        try:
            m = d.vm_api.vm_measurement(ReqCtx(ctx.caller, ctx.request_id), str(vm_id))
        except ApiError as exc:
            m = {"error": exc.detail}
        console = d.core.allowed(ctx.caller, "vm/console/read", rbac.owned_scope("vm", v["tenant"], v["id"]))
        return _render(request, ctx, d.ui_auth, "vm.html", vm=v, m=m, console=console)

    @r.get("/vms/{vm_id}/stats")
    def vm_stats(vm_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        from bulkhead.daemon.vmstats import vm_stats as stats

        d = the()
        return JSONResponse({**stats(d.core, d.vm_api.backend, ctx, str(vm_id)), "t": time.monotonic()})

    @r.get("/vms/{vm_id}/console")
    def console(request: Request, vm_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        v = d.vm_api.vm_get(ctx, str(vm_id))
        ctx.action = "vm/console/read"
        write = d.core.allowed(ctx.caller, "vm/console/write", rbac.owned_scope("vm", v["tenant"], v["id"]))
        return _render(request, ctx, d.ui_auth, "console.html", vm=v, write=write)

    @r.post("/vms/{vm_id}/{op}")
    async def vm_action(request: Request, vm_id: UUID, op: str, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        form = _form(await request.body())
        if not csrf_ok(d.ui_auth, request.scope, form.get("csrf", "")):
            ctx.action, ctx.decision, ctx.vm = f"vm/{op}", "deny", str(vm_id)
            ctx.detail["csrf"] = "missing or wrong"
            return Response("CSRF token missing or wrong\n", 403, media_type="text/plain")
        if op not in VM_ACTIONS:
            raise ApiError(404, "not found")
        vid = str(vm_id)
        if op == "shutdown":
            await run(lambda: d.power.vm_shutdown(ctx, vid, float(form.get("timeout", "30") or 30)))
        else:
            await run(lambda: d.vm_api.vm_op(ctx, vid, op))
        back = form.get("back", "")
        return RedirectResponse(back if back.startswith("/ui/") else f"/ui/vms/{vid}", 303)

    _views(r, the)
    return r


def _views(r: APIRouter, the: Callable[[], Any]) -> None:
    """The host, audit and network views and logout (ui_routes' second half)."""

    @r.get("/hosts")
    def hosts(request: Request, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        st = d.integrity_status(ctx)
        events = []
        try:
            events = [rec for rec in d.audit_api.audit_query(ReqCtx(ctx.caller, ctx.request_id), limit=5000)
                      if "integrity" in rec.get("action", "")][-50:][::-1]
        except ApiError:
            pass  # no audit/read: the host state alone
        fleet = None
        if getattr(d, "fleet", None) is not None:  # the fleet controller: every host, as GET /v1/hosts shows them
            try:
                fleet = d.fleet.host_list(ReqCtx(ctx.caller, ctx.request_id))
            except ApiError:
                fleet = None  # no host/read
        return _render(request, ctx, d.ui_auth, "hosts.html", st=st, events=events, host=os.uname().nodename,
                       fleet=fleet)

    @r.get("/audit")
    def audit(request: Request, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        q = {k: v[:200] for k, v in request.query_params.items()}
        return _render(request, ctx, d.ui_auth, "audit.html", **_audit_view(d, ctx, q))

    @r.get("/networks")
    def networks(request: Request, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        tenants = d.tenants.tenant_list(ctx)
        vms = {v["id"]: v for v in d.vm_api.vm_list(ReqCtx(ctx.caller, ctx.request_id))}
        out = []
        for t in tenants:
            nets = []
            try:
                nets = d.networks.network_list(ReqCtx(ctx.caller, ctx.request_id), t["id"])
            except ApiError:
                pass
            for n in nets:
                n["vms"] = [(v, nic) for v in vms.values() for nic in v["nics"] if nic["network"] == n["id"]]
                try:
                    n["drops"] = d.networks.network_counters(ReqCtx(ctx.caller, ctx.request_id), n["id"])["counters"]
                except ApiError as exc:
                    n["drops"] = {"(unavailable)": {"packets": 0, "bytes": 0, "why": exc.detail}}
            out.append({"tenant": t, "networks": nets})
        return _render(request, ctx, d.ui_auth, "networks.html", tenants=out)

    @r.post("/logout")
    async def logout(request: Request, ctx: ReqCtx = Ctx) -> Response:
        d = the()
        form = _form(await request.body())
        ctx.action, ctx.scope = "ui/logout", "/"
        if not csrf_ok(d.ui_auth, request.scope, form.get("csrf", "")):
            ctx.decision = "deny"
            return Response("CSRF token missing or wrong\n", 403, media_type="text/plain")
        ctx.decision = "allow"
        sid = request.scope.get("bulkhead.ui_session")
        if sid:
            d.ui_auth.end(sid)
        resp = RedirectResponse("/ui/login", 303)
        resp.delete_cookie("bulkhead_session", path="/ui", secure=True, httponly=True, samesite="strict")
        return resp



def public_app() -> Any:
    """What /ui serves without an identity (uiauth.UiFront routes to it before the Gate): the login
    page and the static files (the console's own script and style, the pinned npm packages)."""
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    r = APIRouter(prefix="/ui", include_in_schema=False)

    @r.get("/login")
    def login(request: Request) -> Response:
        html = _env.get_template("login.html").render(me=None, csrf="", path="/ui/login")
        return HTMLResponse(html)

    @r.get("/static/{name}")
    def static(name: str) -> Response:
        if name in _OWN_FILES:
            return FileResponse(HERE / "ui_static" / name, media_type=_OWN_FILES[name])
        rel = _VENDOR_FILES.get(name)
        if rel is None or not (vendor_dir() / rel).is_file():
            return Response("not found (run install.sh: npm ci in ui/)\n", 404, media_type="text/plain")
        return FileResponse(vendor_dir() / rel)

    app.include_router(r)
    return app


def login_link_routes(the: Callable[[], Any]) -> APIRouter:
    """POST /v1/ui/login-links: a single-use login link for the caller itself (grants nothing the
    caller's certificate does not already grant; audited by the Gate as `ui/login-link`)."""
    r = APIRouter(prefix="/v1")

    @r.post("/ui/login-links", status_code=201, tags=["ui"])
    def login_link(request: Request, ctx: ReqCtx = Ctx) -> Any:
        from bulkhead.daemon.uiauth import LINK_TTL_S, PEER_KEY

        ctx.action, ctx.scope, ctx.decision = "ui/login-link", "/", "allow"
        peer = request.scope.get("extensions", {}).get(PEER_KEY) or {}
        token = the().ui_auth.issue_link(peer, ctx.caller.id)
        ctx.detail["link"] = hashlib.sha256(token.encode()).hexdigest()[:16]  # which link, never the token
        return {"path": f"/ui/login/{token}", "expires_in": LINK_TTL_S}

    return r
