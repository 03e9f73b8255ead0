"""The web console's authentication front (daemon/uiauth.py, docs/UI.md "Authentication") in-process,
through the real app (UiFront, the Gate, the services): each claim is tested by attempting the attack.
The browser end to end is tests/test_ui_browser.py."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.control import rbac
from bulkhead.daemon import uiauth
from bulkhead.daemon.app import inject_peer
from bulkhead.daemon.testkit import Harness, Identity


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "s")
    yield h
    h.close()


def _browser(h: Harness) -> Any:
    """A client on the console listener without a certificate (the peer server.UiProtocol gives it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        return TestClient(inject_peer(h.app, {"kind": "anonymous"}), base_url="https://bulkheadd",
                          follow_redirects=False)


def _link(h: Harness, who: Identity) -> str:
    with h.client(who) as c:
        r = c.post("/v1/ui/login-links", json={})
        assert r.status_code == 201, r.text
        return str(r.json()["path"])


def _operator(h: Harness) -> tuple[Identity, str]:
    t = h.tenant("acme")
    vm = h.vm(t, "web")
    return h.principal("alice", ("VM Operator", rbac.tenant_scope(t))), vm


def test_a_link_logs_in_once_and_the_cookie_is_strict(h: Harness) -> None:
    alice, _vm = _operator(h)
    path = _link(h, alice)
    with _browser(h) as b:
        assert b.get("/ui/vms").headers["location"] == "/ui/login"  # no identity: to the login page
        r = b.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/ui/vms"
        cookie = r.headers["set-cookie"]
        for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/ui"):
            assert flag in cookie
        page = b.get("/ui/vms")
        assert page.status_code == 200 and '<strong id="me">alice</strong>' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert b.get("/v1/vms").status_code == 401  # the cookie never counts for the API
    with _browser(h) as other:
        assert other.get(path).status_code == 403  # replayed
        assert other.get("/ui/login/" + "A" * 43).status_code == 403  # guessed
    recs = [r for r in h.daemon.audit_api.audit_query(_admin_ctx(h)) if r["action"] == "ui/login"]
    assert [r["result"] for r in recs] == ["200", "403", "403"]  # replayed and guessed links are audited too
    assert path.split("/")[-1].encode() not in Path(h.daemon.audit.path).read_bytes()  # never logged


def test_a_login_link_from_another_site_is_refused_and_not_used_up(h: Harness) -> None:
    """Login CSRF: a link navigated to from another site (Sec-Fetch-Site: cross-site or same-site, as
    Chromium sends it) logs nobody in; the same link opened from the address bar (`none`) still works."""
    alice, _vm = _operator(h)
    path = _link(h, alice)
    with _browser(h) as b:
        for site in ("cross-site", "same-site"):
            r = b.get(path, headers={"sec-fetch-site": site})
            assert r.status_code == 403 and "set-cookie" not in r.headers and "login CSRF" in r.text
        r = b.get(path, headers={"sec-fetch-site": "none"})
        assert r.status_code == 303 and "set-cookie" in r.headers
    recs = [r for r in h.daemon.audit_api.audit_query(_admin_ctx(h)) if r["action"] == "ui/login"]
    assert [r["result"] for r in recs] == ["403", "403", "200"]


def _admin_ctx(h: Harness) -> Any:
    from bulkhead.daemon.service import Caller, ReqCtx

    row = h.daemon.store.local_principal()
    return ReqCtx(Caller(row["id"], row["name"], "local"), "t")


def test_an_expired_link_is_refused(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _vm = _operator(h)
    monkeypatch.setattr(uiauth, "LINK_TTL_S", -1.0)
    path = _link(h, alice)
    with _browser(h) as b:
        assert b.get(path).status_code == 403


@pytest.mark.parametrize("how", ["revoke", "cert-forgotten"])
def test_the_session_ends_with_its_principal(h: Harness, how: str) -> None:
    alice, _vm = _operator(h)
    with _browser(h) as b:
        b.get(_link(h, alice))
        assert b.get("/ui/vms").status_code == 200
        with h.client() as c:
            if how == "revoke":
                assert c.post(f"/v1/principals/{alice.principal_id}/revoke").status_code == 200
            else:
                with h.daemon.store.txn() as db:  # the API cannot delete a principal: remove its certificates
                    db.execute("DELETE FROM certs WHERE principal_id = ?", (alice.principal_id,))
        assert b.get("/ui/vms").status_code == 401


def test_a_post_without_the_sessions_csrf_token_is_refused(h: Harness) -> None:
    alice, vm = _operator(h)
    with _browser(h) as b:
        b.get(_link(h, alice))
        token = re.search(r'name="csrf" value="([0-9a-f]{64})"', b.get("/ui/vms").text).group(1)  # type: ignore[union-attr]
        assert b.post(f"/ui/vms/{vm}/start", data={}).status_code == 403
        assert b.post(f"/ui/vms/{vm}/start", data={"csrf": "0" * 64}).status_code == 403
        with h.client(h.admin) as c:
            assert c.get(f"/v1/vms/{vm}").json()["state"] != "running"
        r = b.post(f"/ui/vms/{vm}/start", data={"csrf": token})
        assert r.status_code == 303
    with h.client(h.admin) as c:
        assert c.get(f"/v1/vms/{vm}").json()["state"] == "running"
    denied = [r for r in h.daemon.audit_api.audit_query(_admin_ctx(h)) if r["action"] == "vm/start"]
    assert [r["decision"] for r in denied] == ["deny", "deny", "allow"]


def test_a_cross_site_console_websocket_is_refused(h: Harness) -> None:
    alice, vm = _operator(h)
    with _browser(h) as b:
        b.get(_link(h, alice))
        from starlette.websockets import WebSocketDisconnect

        with pytest.raises(WebSocketDisconnect) as exc, b.websocket_connect(
                f"/ui/vms/{vm}/console/ws?mode=ro", headers={"origin": "https://evil.example"}) as ws:
            ws.receive_text()
        assert exc.value.code == 4403


def test_the_vm_list_names_no_other_tenant(h: Harness) -> None:
    """A principal of one tenant learns nothing of another from /ui/vms: not its VMs, nor its name in the
    tenant filter (a review finding: the filter once listed every tenant's name)."""
    alice, _vm = _operator(h)
    other = h.tenant("globex-secret-merger")
    h.vm(other, "payroll")
    with _browser(h) as b:
        b.get(_link(h, alice))
        page = b.get("/ui/vms")
        assert page.status_code == 200
        assert "acme" in page.text
        assert "globex-secret-merger" not in page.text and "payroll" not in page.text
