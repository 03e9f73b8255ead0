"""Snapshots through the daemon's API (docs/SNAPSHOT.md "The daemon"), with real jailed workers and a real
guest: a running VM is snapshotted at a moment the test does not choose (POST /vms/{id}/snapshot, protocol
save-state), restored in a fresh jailed worker (POST /snapshots/{id}/restore), and the two runs together
print exactly what an uninterrupted run prints. The attacks: another tenant lists, reads, restores and
deletes the snapshot; a second restore without clone; a launch digest the policy no longer allows; an
altered file; a deleted snapshot. Each is refused with its typed error, and nothing runs."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.test_daemon_jailed import _wait
from tests.vmrun import payload

from bulkhead.daemon.backend import make_backend
from bulkhead.daemon.testkit import Harness
from bulkhead.integrity.errors import LaunchNotAllowed
from bulkhead.sandbox.supervisor import leftovers

pytestmark = [pytest.mark.root, pytest.mark.kvm, pytest.mark.timeout(300)]

CMDLINE = "count=24 delay=200000000"  # ~0.1 s a line (tests/test_snapshot.py)


def _console(c: Any, vm: str) -> str:
    return str(c.get(f"/v1/vms/{vm}/console").json()["data"])


def _finished(c: Any, vm: str) -> str:
    _wait(lambda: c.get(f"/v1/vms/{vm}").json()["state"] == "exited")
    return _console(c, vm)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    if os.geteuid() != 0:
        pytest.skip("the jailed backend needs root")
    harness = Harness(tmp_path / "s", backend=make_backend("jail"))
    (harness.root / "images" / "counter").write_bytes(payload("counter").read_bytes())
    try:
        yield harness
    finally:
        harness.close()


def _vm(c: Any, tenant: str, name: str = "g") -> str:
    r = c.post("/v1/vms", json={"tenant": tenant, "name": name, "kernel": "counter", "cmdline": CMDLINE,
                                "mem_mib": 16})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _snapshot_midway(c: Any, vm: str, then: str = "pause") -> tuple[dict[str, Any], str]:
    """Start the VM, snapshot it after a few lines plus a random delay; (snapshot, console at that moment)."""
    assert c.post(f"/v1/vms/{vm}/start").status_code == 200
    _wait(lambda: _console(c, vm).count("\n") >= 4)
    time.sleep(random.uniform(0, 0.1))
    r = c.post(f"/v1/vms/{vm}/snapshot", json={"name": f"s-{vm[:8]}", "then": then})
    assert r.status_code == 201, r.text
    return r.json(), _console(c, vm)


def _kind(r: Any) -> tuple[int, str | None]:
    """(status, kind): a 422 carries its kind as the error's type (docs/API.md "Errors"), others as `kind`."""
    body = r.json()
    if r.status_code == 422 and isinstance(body.get("detail"), list):
        return r.status_code, body["detail"][0]["type"]
    return r.status_code, body.get("kind")


def _audit(c: Any) -> list[dict[str, Any]]:
    return list(c.get("/v1/audit", params={"limit": 10000}).json())


def test_snapshot_mid_run_and_restore_print_what_an_uninterrupted_run_prints(h: Harness) -> None:
    t = h.tenant("a")
    with h.client() as c:
        ref_vm = _vm(c, t, "ref")
        assert c.post(f"/v1/vms/{ref_vm}/start").status_code == 200
        reference = _finished(c, ref_vm)
        assert reference.rstrip().splitlines()[-1].startswith("DONE sum="), reference

        vm = _vm(c, t)
        snap, before = _snapshot_midway(c, vm, then="pause")
        assert c.get(f"/v1/vms/{vm}").json()["state"] == "paused"
        assert snap["vm"] == vm and snap["launch_digest"] and snap["restores"] == 0
        assert 0 < len(before) < len(reference) and reference.startswith(before)
        # the original goes on after the pause as if never saved
        assert c.post(f"/v1/vms/{vm}/resume").status_code == 200
        assert _finished(c, vm) == reference

        r = c.post(f"/v1/snapshots/{snap['id']}/restore", json={"name": "restored"})
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["id"] != vm and new["state"] == "running" and new["tenant"] == t
        assert before + _finished(c, new["id"]) == reference  # the restored guest goes on where it was

        # a second restore duplicates the guest's secrets: only on purpose, and audited as a clone
        r = c.post(f"/v1/snapshots/{snap['id']}/restore", json={"name": "again"})
        assert _kind(r) == (409, "snapshot-clone-required"), r.text
        assert c.get("/v1/vms", params={"tenant": t}).json().__len__() == 3
        r = c.post(f"/v1/snapshots/{snap['id']}/restore", json={"name": "clone", "clone": True})
        assert r.status_code == 201, r.text
        assert before + _finished(c, r.json()["id"]) == reference
        assert c.get(f"/v1/snapshots/{snap['id']}").json()["restores"] == 2
        actions = [rec["action"] for rec in _audit(c)]
        for action in ("vm.snapshot", "snapshot.restore", "snapshot.clone", "vm/snapshot", "snapshot/restore"):
            assert action in actions, action
        for v in (vm, new["id"]):
            assert leftovers(v) == []


def test_snapshot_then_stop_and_a_restore_in_a_fresh_jailed_worker(h: Harness) -> None:
    t = h.tenant("b")
    with h.client() as c:
        vm = _vm(c, t)
        snap, before = _snapshot_midway(c, vm, then="stop")
        assert c.get(f"/v1/vms/{vm}").json()["state"] == "stopped"
        assert "DONE" not in before
        r = c.post(f"/v1/snapshots/{snap['id']}/restore", json={})
        assert r.status_code == 201, r.text
        new = r.json()["id"]
        worker = h.backend.worker(new)  # type: ignore[attr-defined]
        assert worker is not None and worker.hello is not None
        assert worker.hello.uid != 0 and worker.hello.seccomp  # the jail of a start
        out = _finished(c, new)
        assert out.rstrip().splitlines()[-1].startswith("DONE sum=")


def test_another_tenant_can_neither_list_read_restore_nor_delete_a_snapshot(h: Harness) -> None:
    ta, tb = h.tenant("alice-t"), h.tenant("bob-t")
    bob = h.principal("bob", ("Contributor", f"/tenants/{tb}"))
    with h.client() as c:
        snap, _ = _snapshot_midway(c, _vm(c, ta), then="stop")
        path = Path(h.daemon.store.q1("SELECT path FROM snapshots WHERE id = ?", (snap["id"],))["path"])
    with h.client(bob) as c:
        assert c.get("/v1/snapshots").json() == []
        for method, url, body in (("get", f"/v1/snapshots/{snap['id']}", None),
                                  ("post", f"/v1/snapshots/{snap['id']}/restore", {"name": "stolen", "clone": True}),
                                  ("delete", f"/v1/snapshots/{snap['id']}", None)):
            r = c.request(method.upper(), url, json=body)
            assert r.status_code == 404, (method, r.text)  # exactly like a missing one
        assert c.get("/v1/vms").json() == []
    assert path.is_file()
    with h.client() as c:
        assert c.get(f"/v1/snapshots/{snap['id']}").json()["restores"] == 0
        denied = [r for r in _audit(c) if r["action"] in ("snapshot/restore", "snapshot/delete")
                  and r["decision"] == "deny"]
        assert len(denied) == 2


class _Policy:
    """The host's gate with a policy that no longer lists any launch digest for restores (the start path
    is the harness's IntegrityOff; the restore check is what is under test)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.mode = inner, inner.mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def check_vm_restore(self, digest: str | None) -> str:
        raise LaunchNotAllowed(f"VM restore refused: launch digest {digest} is not allowed by the policy")


def test_a_restore_the_policy_no_longer_allows_is_refused_and_audited(h: Harness) -> None:
    t = h.tenant("p")
    with h.client() as c:
        snap, _ = _snapshot_midway(c, _vm(c, t), then="stop")
        h.daemon.integrity = _Policy(h.daemon.integrity)
        r = c.post(f"/v1/snapshots/{snap['id']}/restore", json={"name": "x"})
        assert _kind(r) == (409, "launch-refused"), r.text
        assert snap["launch_digest"] in r.text
        assert [v["name"] for v in c.get("/v1/vms").json()] == ["g"]
        sec = [rec for rec in _audit(c) if rec["action"] == "security/integrity/restore-refused"]
        assert len(sec) == 1 and json.loads(sec[0]["detail"])["digest"] == snap["launch_digest"]
        assert c.get(f"/v1/snapshots/{snap['id']}").json()["restores"] == 0


def test_an_altered_snapshot_file_is_refused_before_a_worker_exists(h: Harness) -> None:
    t = h.tenant("x")
    with h.client() as c:
        snap, _ = _snapshot_midway(c, _vm(c, t), then="stop")
        path = Path(h.daemon.store.q1("SELECT path FROM snapshots WHERE id = ?", (snap["id"],))["path"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        r = c.post(f"/v1/snapshots/{snap['id']}/restore", json={"name": "x"})
        assert _kind(r) == (422, "snapshot-invalid"), r.text
        assert [v["name"] for v in c.get("/v1/vms").json()] == ["g"]


def test_a_deleted_snapshot_is_scrubbed_and_cannot_be_restored(h: Harness) -> None:
    t = h.tenant("d")
    with h.client() as c:
        snap, _ = _snapshot_midway(c, _vm(c, t), then="stop")
        path = Path(h.daemon.store.q1("SELECT path FROM snapshots WHERE id = ?", (snap["id"],))["path"])
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)  # what a reader of the old blocks (through this inode) would see
        try:
            assert c.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
            assert not path.exists()
            assert os.pread(fd, size, 0) == bytes(size)  # overwritten before the unlink, not only unlinked
        finally:
            os.close(fd)
        assert c.get(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert c.post(f"/v1/snapshots/{snap['id']}/restore", json={"clone": True}).status_code == 404
        assert c.get("/v1/snapshots").json() == []
        rec = [r for r in _audit(c) if r["action"] == "snapshot/delete"][-1]
        assert json.loads(rec["detail"])["scrub"] == "overwrite+fsync+unlink"


def test_the_cli_snapshots_lists_restores_and_deletes_by_name(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead.daemon.cli import vm_main
    from bulkhead.daemon.snapshot_cli import snapshot_main
    from bulkhead.daemon.testkit import ServerThread

    t = h.tenant("cli")
    sock = ["--socket", str(h.sd.socket)]
    with ServerThread(h), h.client() as c:
        vm = _vm(c, t, "web")
        assert c.post(f"/v1/vms/{vm}/start").status_code == 200
        _wait(lambda: _console(c, vm).count("\n") >= 2)
        assert vm_main(["snapshot", "web", "--to", "before", "--then", "stop", *sock, "--json"]) == 0
        snap = json.loads(capsys.readouterr().out)
        assert snap["name"] == "before" and snap["vm_name"] == "web"
        assert snapshot_main(["list", *sock]) == 0
        assert "before" in capsys.readouterr().out
        assert vm_main(["restore", "before", "--name", "web2", *sock, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["name"] == "web2"
        assert vm_main(["restore", "before", "--name", "web3", *sock]) == 1
        assert "clone" in capsys.readouterr().err  # one sentence, no traceback
        assert vm_main(["restore", "before", "--name", "web3", "--clone", *sock, "--json"]) == 0
        capsys.readouterr()
        assert snapshot_main(["delete", "before", *sock]) == 0
        capsys.readouterr()
        assert snapshot_main(["list", *sock, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert snapshot_main(["delete", "before", *sock]) == 2  # usage: no such snapshot
        assert "no snapshot 'before'" in capsys.readouterr().err
