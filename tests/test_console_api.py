"""The console WebSocket and the graceful lifecycle through the real servers (mTLS and the local socket),
with the FakeBackend (its guest echoes console input to its output; it powers off on a shutdown request
unless told not to). docs/API.md "Console" and "Lifecycle".

What is attacked: a principal without the permission, a principal unknown to the daemon, a read-only
session sending input, a second writer; each is refused and the guest receives nothing.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect, unix_connect

from bulkhead.daemon.testkit import Harness, Identity, ServerThread


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[Harness, ServerThread]]:
    h = Harness(tmp_path / "s")
    with ServerThread(h) as s:
        yield h, s
    h.close()


def _running_vm(h: Harness) -> tuple[str, str]:
    t = h.tenant("t1")
    vm = h.vm(t, "g1", mem_mib=16)
    with h.client() as c:
        assert c.post(f"/v1/vms/{vm}/start").status_code == 200
    return t, vm


def _ws(h: Harness, s: ServerThread, vm: str, who: Identity | None = None, **q: Any) -> Any:
    query = "&".join(f"{k}={v}" for k, v in q.items())
    path = f"/v1/vms/{vm}/console/ws?{query}"
    if who is None:
        return unix_connect(str(h.sd.socket), "ws://bulkheadd" + path, compression=None, open_timeout=10)
    ctx = ssl.create_default_context(cafile=str(h.sd.ca_cert))
    ctx.load_cert_chain(str(who.cert_path), str(who.key_path))
    return connect(f"wss://127.0.0.1:{s.port}{path}", ssl=ctx, proxy=None, compression=None, open_timeout=10)


def _attached(ws: Any) -> dict[str, Any]:
    hello = json.loads(ws.recv(timeout=10))
    assert hello["type"] == "attached", hello
    return hello


def _read_until(ws: Any, needle: bytes, timeout: float = 10.0) -> bytes:
    got = b""
    end = time.monotonic() + timeout
    while needle not in got:
        msg = ws.recv(timeout=max(0.1, end - time.monotonic()))
        if isinstance(msg, bytes):
            got += msg
    return got


def _refusal(ws: Any) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as exc:
        ws.recv(timeout=10)
    assert exc.value.rcvd is not None
    return exc.value.rcvd.code, exc.value.rcvd.reason


def _audit(h: Harness, vm: str) -> list[dict[str, Any]]:
    with h.client() as c:
        return list(c.get("/v1/audit", params={"vm": vm, "limit": 10000}).json())


def test_two_readers_and_one_writer_see_the_same_output_over_mtls(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    t, vm = _running_vm(h)
    op = h.principal("operator", ("VM Operator", f"/tenants/{t}"))
    with _ws(h, s, vm, op, mode="rw", offset=0) as w, _ws(h, s, vm, op, offset=0) as r1, _ws(h, s, vm) as r2:
        assert _attached(w)["writer"] is True
        assert _attached(r1)["writer"] is False
        _attached(r2)
        assert b"booting vmlinux" in _read_until(w, b"booting")
        w.send(b"hello guest\r")
        for ws in (w, r1, r2):  # the fake guest echoes: every session sees the writer's input come back
            assert b"hello guest" in _read_until(ws, b"hello guest")
    assert bytes(h.backend.inputs[vm]) == b"hello guest\r"
    end = time.monotonic() + 10  # the server writes each detach record once it sees the close
    recs = _audit(h, vm)
    while len([r for r in recs if r["action"] == "vm.console.detach"]) < 3:
        assert time.monotonic() < end
        time.sleep(0.05)
        recs = _audit(h, vm)
    attach = [r for r in recs if r["kind"] == "api" and r["action"].startswith("vm/console/")]
    assert [(r["action"], r["result"]) for r in attach] == [("vm/console/write", "attached"),
                                                             ("vm/console/read", "attached"),
                                                             ("vm/console/read", "attached")]
    assert attach[0]["principal"] == op.principal_id
    detach = [r for r in recs if r["action"] == "vm.console.detach"]
    assert len(detach) == 3 and {r["principal"] for r in detach} == {op.principal_id, h.daemon.store.local_principal()["id"]}
    details = [json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"] for r in detach]
    assert any(d["mode"] == "rw" and d["bytes_in"] == 12 for d in details)


def test_a_second_writer_is_refused_until_the_first_detaches(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _running_vm(h)
    with _ws(h, s, vm, mode="rw") as first:
        _attached(first)
        with _ws(h, s, vm, mode="rw") as second:
            code, reason = _refusal(second)
        assert code == 4409 and "holds this VM's console for writing" in reason, reason
        first.send(b"still mine")
        assert b"still mine" in _read_until(first, b"still mine")
    # the server frees the writer slot, then appends the first session's detach record: wait for that record
    end = time.monotonic() + 10
    while not [r for r in _audit(h, vm) if r["action"] == "vm.console.detach"]:
        assert time.monotonic() < end, "the first writer's detach was never recorded"
        time.sleep(0.05)
    with _ws(h, s, vm, mode="rw") as again:
        assert _attached(again)["writer"] is True


def test_a_read_only_session_cannot_type_into_the_guest(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _running_vm(h)
    with _ws(h, s, vm, mode="ro") as r:
        _attached(r)
        r.send(b"rm -rf /\r")
        notice = None
        end = time.monotonic() + 5
        while notice is None and time.monotonic() < end:
            msg = r.recv(timeout=5)
            if isinstance(msg, str):
                notice = json.loads(msg)
        assert notice is not None and notice["type"] == "notice"
    assert vm not in h.backend.inputs


@pytest.mark.parametrize(("grant", "mode", "code"), [
    (None, "ro", 4404),  # no grant: the VM is invisible, exactly like a missing one
    ("Reader", "ro", 4403),  # sees the VM, may not read its console (it may hold secrets)
    ("Reader", "rw", 4403),
])
def test_unauthorised_principals_are_refused(srv: tuple[Harness, ServerThread], grant: str | None, mode: str,
                                             code: int) -> None:
    h, s = srv
    t, vm = _running_vm(h)
    who = h.principal(f"p-{grant}-{mode}", *([(grant, f"/tenants/{t}")] if grant else []))
    with _ws(h, s, vm, who, mode=mode) as ws:
        got, reason = _refusal(ws)
    assert got == code, reason
    denied = [r for r in _audit(h, vm) if r["principal"] == who.principal_id]
    assert denied and denied[-1]["decision"] == "deny"


def test_an_unknown_certificate_is_refused_and_audited(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _running_vm(h)
    ghost = h.principal("ghost", register=False)  # signed by the CA, unknown to the state database
    before = h.daemon.audit.size
    with _ws(h, s, vm, ghost) as ws:
        code, _ = _refusal(ws)
    assert code == 4401
    assert h.daemon.audit.size > before


def test_attaching_to_a_stopped_vm_says_so(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    t = h.tenant("t2")
    vm = h.vm(t, "cold", mem_mib=16)
    with _ws(h, s, vm) as ws:
        code, reason = _refusal(ws)
    assert code == 4409 and "stopped" in reason and "--once" in reason


def test_the_session_ends_when_the_vm_stops(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _running_vm(h)
    with _ws(h, s, vm) as ws:
        _attached(ws)
        with h.client() as c:
            assert c.post(f"/v1/vms/{vm}/stop").json()["state"] == "stopped"
        end = time.monotonic() + 10
        info = None
        with pytest.raises(ConnectionClosed):
            while time.monotonic() < end:
                msg = ws.recv(timeout=10)
                if isinstance(msg, str):
                    info = json.loads(msg)
        assert info == {"type": "exit", "state": "stopped"}


# ---------------------------------------------------------------------- lifecycle
def test_shutdown_is_graceful_when_the_guest_powers_off(srv: tuple[Harness, ServerThread]) -> None:
    h, _ = srv
    t, vm = _running_vm(h)
    op = h.principal("op2", ("VM Operator", f"/tenants/{t}"))
    with h.client(op) as c:
        got = c.post(f"/v1/vms/{vm}/shutdown", params={"timeout": 5}).json()
    assert got["state"] == "stopped"
    assert got["shutdown"] == {"graceful": True, "method": "ctrl-alt-del", "exit_status": 0}
    recs = [r for r in _audit(h, vm) if r["action"] == "vm.shutdown"]
    assert [r["result"] for r in recs] == ["intent", "graceful"]
    assert all(r["principal"] == op.principal_id for r in recs)
    assert ("stop", vm) not in h.backend.calls  # never forced


def test_shutdown_force_stops_a_guest_that_ignores_it(srv: tuple[Harness, ServerThread]) -> None:
    h, _ = srv
    _, vm = _running_vm(h)
    h.backend.honours_shutdown = False
    t0 = time.monotonic()
    with h.client() as c:
        got = c.post(f"/v1/vms/{vm}/shutdown", params={"timeout": 0.5}).json()
    assert time.monotonic() - t0 >= 0.5
    assert got["state"] == "stopped" and got["shutdown"]["graceful"] is False
    assert ("stop", vm) in h.backend.calls
    assert [r["result"] for r in _audit(h, vm) if r["action"] == "vm.shutdown"] == ["intent", "forced"]


def test_shutdown_needs_its_permission_and_a_running_vm(srv: tuple[Harness, ServerThread]) -> None:
    h, _ = srv
    t, vm = _running_vm(h)
    reader = h.principal("reader", ("Reader", f"/tenants/{t}"))
    with h.client(reader) as c:
        assert c.post(f"/v1/vms/{vm}/shutdown").status_code == 403
        assert c.post(f"/v1/vms/{vm}/reboot").status_code == 403
    with h.client() as c:
        assert c.post(f"/v1/vms/{vm}/shutdown", params={"timeout": 9999}).status_code == 422
        assert c.post(f"/v1/vms/{vm}/pause").status_code == 200
        r = c.post(f"/v1/vms/{vm}/shutdown")
        assert r.status_code == 409 and "paused" in r.json()["detail"]
    assert ("shutdown", vm) not in h.backend.calls


def test_reboot_keeps_the_vm_and_its_console(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _running_vm(h)
    with _ws(h, s, vm, offset=0) as ws, h.client() as c:
        _attached(ws)
        _read_until(ws, b"booting")
        got = c.post(f"/v1/vms/{vm}/reboot").json()
        assert got["state"] == "running" and got["id"] == vm
        _read_until(ws, b"booting")  # the new boot's output reaches the attached session
        assert c.get(f"/v1/vms/{vm}/console").json()["data"].count("booting vmlinux") == 2
        assert [r["result"] for r in _audit(h, vm) if r["action"] == "vm.reboot"] == ["intent"]
        assert [e["event"] for e in c.get(f"/v1/vms/{vm}/events").json()][-1] == "rebooted"


def test_an_oversized_input_frame_ends_the_session_and_reaches_no_guest(srv: tuple[Harness, ServerThread]) -> None:
    h, s = srv
    _, vm = _running_vm(h)
    with _ws(h, s, vm, mode="rw") as w:
        _attached(w)
        w.send(b"A" * (64 * 1024 + 1))  # over the server's frame limit (server.py ws_max_size)
        with pytest.raises(ConnectionClosed) as exc:
            while True:
                w.recv(timeout=10)
    assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009  # message too big (RFC 6455 §7.4.1)
    assert vm not in h.backend.inputs
    with _ws(h, s, vm, mode="rw") as again:  # the writer slot was released
        assert _attached(again)["writer"] is True


@pytest.mark.parametrize("how", ["revoke", "unassign"])
def test_a_live_session_ends_when_its_access_is_taken_away(srv: tuple[Harness, ServerThread], how: str) -> None:
    h, s = srv
    t, vm = _running_vm(h)
    op = h.principal(f"op-{how}", ("VM Operator", f"/tenants/{t}"))
    with _ws(h, s, vm, op, mode="rw") as w:
        _attached(w)
        with h.client() as c:
            if how == "revoke":
                assert c.post(f"/v1/principals/{op.principal_id}/revoke").status_code == 200
            else:
                (a,) = [a for a in c.get("/v1/assignments", params={"principal": op.principal_id}).json()]
                assert c.delete(f"/v1/assignments/{a['id']}").status_code == 204
        code, reason = _refusal_after_output(w)
    assert code == (4401 if how == "revoke" else 4403), reason
    sec = [r for r in _audit(h, vm) if r["action"] == "security/console-access-ended"]
    assert len(sec) == 1 and sec[0]["principal"] == op.principal_id
    with _ws(h, s, vm, mode="rw") as again:  # the writer slot was freed
        assert _attached(again)["writer"] is True


def _refusal_after_output(ws: Any) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as exc:
        while True:
            ws.recv(timeout=10)
    assert exc.value.rcvd is not None
    return exc.value.rcvd.code, exc.value.rcvd.reason
