"""The daemon as a process: SIGKILL during a burst of requests (every acknowledged request is in the log,
which still verifies), restart persistence (resources, principals, roles, assignments survive; running
VMs are marked lost), and the CLI end to end over mTLS."""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
from pathlib import Path

import httpx
import pytest

from bulkhead.daemon.auditlog import load_verifier, verify_files
from bulkhead.daemon.cli import audit_main, cert_main, init_main, role_main, tenant_main, vm_main
from bulkhead.daemon.testkit import fake_kernel, spawn_daemon


def _ctx(root: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root / "ca.pem"))
    ctx.load_cert_chain(str(cert or root / "admin.pem"), str(key or root / "admin.key"))
    return ctx


def _stop(proc, sig=signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(20)
    finally:
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    assert init_main(["--state-dir", str(tmp_path / "state")]) == 0
    return tmp_path / "state"


@pytest.mark.slow
def test_sigkill_during_a_burst_loses_no_acknowledged_request(root):
    proc, info = spawn_daemon(root)
    url = f"https://127.0.0.1:{info['port']}"
    acked: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    going = threading.Event()  # set once the burst is well under way (40 acknowledged requests)

    def worker(w: int) -> None:
        with httpx.Client(base_url=url, verify=_ctx(root), timeout=10) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = c.post("/v1/tenants", json={"name": f"w{w}-{i}"}) if i % 2 else c.get("/v1/whoami")
                except (httpx.HTTPError, OSError):
                    return
                with lock:
                    acked.append((r.headers["x-request-id"], r.status_code, f"w{w}-{i}"))
                    if len(acked) >= 40:
                        going.set()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    assert going.wait(60), "the burst did not get going"
    proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight on all six connections
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    proc.stdout.close()
    assert len(acked) > 20, "the burst did not get going"
    from bulkhead.daemon.auditlog import query_records

    logged = {r["request_id"]: r["result"] for r in query_records(root / "audit.db", limit=None) if r["kind"] == "api"}
    missing = [a for a in acked if a[0] not in logged]
    assert not missing, f"{len(missing)} acknowledged requests are not in the audit log"
    assert all(logged[rid] == str(status) for rid, status, _ in acked)
    rep = verify_files(root / "audit.db", load_verifier(root / "audit.vkey", root / "audit.db"), root / "audit.checkpoint")
    assert rep.ok, rep.problem
    # the state agrees: every acknowledged create exists after a restart, and the log reopens
    proc, info = spawn_daemon(root)
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{info['port']}", verify=_ctx(root)) as c:
            names = {t["name"] for t in c.get("/v1/tenants").json()}
        assert {name for _, status, name in acked if status == 201} <= names
    finally:
        assert _stop(proc) == 0


@pytest.mark.slow
def test_restart_keeps_everything_and_marks_running_vms_lost(root):
    (root / "images" / "vmlinux").write_bytes(fake_kernel(b"kernel"))
    proc, info = spawn_daemon(root)
    url = f"https://127.0.0.1:{info['port']}"
    with httpx.Client(base_url=url, verify=_ctx(root)) as c:
        t = c.post("/v1/tenants", json={"name": "acme"}).json()["id"]
        disk = c.post(f"/v1/tenants/{t}/disks", json={"name": "root", "size_mib": 4}).json()["id"]
        net = c.post(f"/v1/tenants/{t}/networks", json={"name": "lan", "ipv4_subnet": "10.9.0.0/24"}).json()["id"]
        vm = c.post("/v1/vms", json={"tenant": t, "name": "web", "kernel": "vmlinux", "cpus": 2, "mem_mib": 64,
                                     "drives": [{"disk": disk, "read_only": True}],
                                     "nics": [{"network": net, "mac": "52:54:00:12:34:56"}]}).json()["id"]
        idle = c.post("/v1/vms", json={"tenant": t, "name": "idle", "kernel": "vmlinux"}).json()["id"]
        assert c.post(f"/v1/vms/{vm}/start").json()["state"] == "running"
        role = c.post("/v1/roles", json={"name": "Starter", "actions": ["vm/read", "vm/start"],
                                         "assignable_scopes": [f"/tenants/{t}"]}).json()["id"]
    assert cert_main(["issue", "dave", "--out", str(root / "dave"), "--state-dir", str(root),
                      "--cert", str(root / "admin.pem"), "--key", str(root / "admin.key")]) == 0
    assert role_main(["assign", "dave", "Starter", f"/tenants/{t}", "--state-dir", str(root),
                      "--cert", str(root / "admin.pem"), "--key", str(root / "admin.key")]) == 0
    assert _stop(proc) == 0

    proc, info = spawn_daemon(root)
    try:
        url = f"https://127.0.0.1:{info['port']}"
        with httpx.Client(base_url=url, verify=_ctx(root)) as c:
            got = c.get(f"/v1/vms/{vm}").json()
            assert got["state"] == "lost"
            assert (got["cpus"], got["mem_mib"], got["drives"], got["nics"][0]["network"], got["nics"][0]["mac"],
                    got["nics"][0]["ipv4"]) == (2, 64, [{"disk": disk, "read_only": True}], net, "52:54:00:12:34:56",
                                                "10.9.0.2")
            assert c.get(f"/v1/networks/{net}").json()["ipv4_gateway"] == "10.9.0.1"
            assert c.get(f"/v1/vms/{idle}").json()["state"] == "stopped"
            assert c.get(f"/v1/disks/{disk}").json()["size_mib"] == 4
            assert c.get(f"/v1/roles/{role}").json()["actions"] == ["vm/read", "vm/start"]
            assert any(a["role_name"] == "Starter" for a in c.get("/v1/assignments").json())
            lost = c.get("/v1/audit", params={"vm": vm}).json()
            assert any(r["action"] == "vm.lost" for r in lost)
            assert [e["event"] for e in c.get(f"/v1/vms/{vm}/events").json()][-1] == "lost"
        dave = _ctx(root, root / "dave" / "dave.pem", root / "dave" / "dave.key")
        with httpx.Client(base_url=url, verify=dave) as c:  # the issued certificate and its grant survive
            assert c.post(f"/v1/vms/{vm}/start").json()["state"] == "running"
            assert c.delete(f"/v1/vms/{idle}").status_code == 403
    finally:
        assert _stop(proc) == 0
    assert audit_main(["verify", "--state-dir", str(root)]) == 0


@pytest.mark.slow
def test_cli_end_to_end_over_mtls(root, capsys, tmp_path):
    (root / "images" / "vmlinux").write_bytes(fake_kernel(b"kernel"))
    proc, _ = spawn_daemon(root)
    auth = ["--state-dir", str(root), "--cert", str(root / "admin.pem"), "--key", str(root / "admin.key")]
    try:
        assert tenant_main(["create", "acme", *auth]) == 0
        capsys.readouterr()
        assert tenant_main(["list", *auth]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == ["ID", "NAME", "CREATED"] and "acme" in out
        assert vm_main(["create", "--tenant", "acme", "--name", "web", "--kernel", "vmlinux", "--mem", "64",
                        "--json", *auth]) == 0
        vm = json.loads(capsys.readouterr().out)
        assert vm["state"] == "stopped" and vm["mem_mib"] == 64
        assert vm_main(["start", "web", *auth]) == 0
        assert vm_main(["list", "--json", *auth]) == 0
        capsys.readouterr()
        assert vm_main(["console", "web", "--once", *auth]) == 0
        assert "booting vmlinux" in capsys.readouterr().out
        assert vm_main(["reboot", "web", *auth]) == 0  # the same VM, a new boot after the old output
        assert vm_main(["console", "web", "--once", *auth]) == 0
        assert capsys.readouterr().out.count("booting vmlinux") == 2
        assert vm_main(["shutdown", "web", "--timeout", "5", *auth]) == 0
        assert "the guest powered off" in capsys.readouterr().err
        assert vm_main(["start", "web", *auth]) == 0
        assert vm_main(["stop", "web", "--force", *auth]) == 0
        assert vm_main(["start", "web", *auth]) == 0
        capsys.readouterr()
        assert vm_main(["delete", "web", *auth]) == 1  # running: refused with a reason
        assert "stop it first" in capsys.readouterr().err
        assert vm_main(["create", "--tenant", "acme", "--name", "bad", "--kernel", "vmlinux", "--cpus", "0", *auth]) == 1
        assert "cpus" in capsys.readouterr().err
        assert cert_main(["issue", "erin", "--out", str(tmp_path), *auth]) == 0
        erin = ["--state-dir", str(root), "--cert", str(tmp_path / "erin.pem"), "--key", str(tmp_path / "erin.key")]
        capsys.readouterr()
        assert vm_main(["list", *erin]) == 0
        assert capsys.readouterr().out.strip() == "(none)"
        assert cert_main(["revoke", "erin", *auth]) == 0
        assert vm_main(["list", *erin]) == 1
        assert "revoked" in capsys.readouterr().err
        assert audit_main(["show", "--principal", "admin", "--limit", "5", *auth]) == 0
        assert "SEQ" in capsys.readouterr().out
        assert audit_main(["export", "--out", str(tmp_path / "a.jsonl"), *auth]) == 0
        lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
        assert lines and lines[0]["seq"] == 1 and all({"principal", "action", "decision"} <= set(x) for x in lines)
        assert vm_main(["list", "--state-dir", str(root), "--socket", str(root / "bulkhead.sock")]) == 0
        assert tenant_main(["list", "--state-dir", str(tmp_path / "nowhere")]) == 3  # no daemon to reach
        assert tenant_main(["list", "--state-dir", str(root), "--url", "https://127.0.0.1:1",
                            "--cert", str(root / "admin.pem"), "--key", str(root / "admin.key")]) == 3
    finally:
        assert _stop(proc) == 0
    assert audit_main(["verify", "--state-dir", str(root)]) == 0
    assert os.stat(root / "admin.key").st_mode & 0o077 == 0
