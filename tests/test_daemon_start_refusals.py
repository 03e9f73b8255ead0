"""No false success (issue 13.5) and integrity refusals as security events (issue 12.3), through a real
daemon (testkit.Harness: the daemon, its API and a real backend in this process).

- A guest the loader refuses (an ELF whose segment runs beyond guest RAM) is refused at `vm create` and, if
  the image changes after create, at `vm start`: 422 with the loader's reason and a typed kind, the VM stays
  `stopped`, its events say why, the backend is never asked. Both backends (jail as root, process).
- A worker that fails before its guest runs (the image swapped after the daemon's check) turns the start
  into the same typed 422, never "200 running".
- A worker whose code fails the pre-import integrity check is a security event
  (`security/integrity/code-mismatch` with the path) and a 503 with kind `code-mismatch` (docs/API.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.boot.craft import make_elf
from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.backend import BackendStatus, ProcessBackend
from bulkhead.daemon.testkit import Harness, fake_kernel

SRC = Path(__file__).resolve().parents[1] / "src"
# 128 MiB of memsz at 1 MiB in a 64 MiB guest: "ELF segment [0x100000, 0x8100000) is not inside guest RAM"
BEYOND_RAM = make_elf([(0x100000, b"\xf4" * 16, 128 << 20)], 0x100000)


def _events(c: Any, vm: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e["event"], json.loads(e["detail"])) for e in c.get(f"/v1/vms/{vm}/events").json()]


def _audit(h: Harness, action: str) -> list[dict[str, Any]]:
    return [r for r in query_records(h.root / "audit.db", limit=None) if r["action"] == action]


class Recording:
    """Wraps a real backend; records start calls (and can swap the kernel just before the real start)."""

    def __init__(self, inner: Any, swap: bytes | None = None, drop_expected: bool = False) -> None:
        self.inner, self.swap, self.drop_expected = inner, swap, drop_expected
        self.started: list[str] = []

    def start(self, vm_id: str, spec: Any) -> int:
        self.started.append(vm_id)
        if self.swap is not None:  # after every check of the daemon: the race the VMM must still catch
            Path(spec.kernel).write_bytes(self.swap)
        if self.drop_expected:
            spec = dataclasses.replace(spec, expected_digest=None)
        return int(self.inner.start(vm_id, spec))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _backend(kind: str) -> Any:
    if kind == "jail":
        if os.geteuid() != 0:
            pytest.skip("the jail needs root")
        from bulkhead.sandbox.backend import JailedBackend

        return JailedBackend(status_type=BackendStatus)
    return ProcessBackend()


@pytest.fixture(params=["jail", "process"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Harness, Recording]]:
    rec = Recording(_backend(request.param))
    h = Harness(tmp_path / "s", backend=rec)
    try:
        yield h, rec
    finally:
        h.close()


def test_a_guest_the_loader_refuses_is_refused_at_create_and_at_start(daemon: tuple[Harness, Recording]) -> None:
    h, rec = daemon
    (h.root / "images" / "beyond-ram").write_bytes(BEYOND_RAM)
    t = h.tenant(f"t-{uuid.uuid4().hex[:6]}")
    with h.client() as c:
        r = c.post("/v1/vms", json={"tenant": t, "name": "bad", "kernel": "beyond-ram", "mem_mib": 64})
        assert r.status_code == 422, r.text
        (err,) = r.json()["detail"]
        assert err["type"] == "image-invalid"
        assert "ELF segment [0x100000, 0x8100000) is not inside guest RAM" in err["msg"]
        assert c.get("/v1/vms").json() == []  # nothing stored
        # an image that loads at create, replaced before start: refused at start with the loader's reason
        (h.root / "images" / "k").write_bytes(fake_kernel(b"good"))
        vm = c.post("/v1/vms", json={"tenant": t, "name": "ok", "kernel": "k", "mem_mib": 64}).json()["id"]
        (h.root / "images" / "k").write_bytes(BEYOND_RAM)
        r = c.post(f"/v1/vms/{vm}/start")
        assert r.status_code == 422, r.text
        (err,) = r.json()["detail"]
        assert err["type"] == "image-invalid" and "is not inside guest RAM" in err["msg"]
        got = c.get(f"/v1/vms/{vm}").json()
        assert got["state"] == "stopped"
        refused = [d for e, d in _events(c, vm) if e == "start-refused"]
        assert refused and refused[-1]["kind"] == "image-invalid" and "is not inside guest RAM" in refused[-1]["error"]
    assert rec.started == []  # the backend was never asked
    (start,) = _audit(h, "vm/start")  # the request's own record says why
    assert start["result"] == "422" and json.loads(start["detail"])["kind"] == "image-invalid"


@pytest.mark.root
@pytest.mark.kvm
@pytest.mark.parametrize(("drop_expected", "kind", "reason"), [
    (True, "image-invalid", "is not inside guest RAM"),  # the worker's own loader refuses the new bytes
    (False, "config-invalid", "differs from the expected digest"),  # the VMM's launch-digest re-check
])
def test_a_worker_that_fails_before_the_guest_runs_is_not_a_started_vm(tmp_path: Path, drop_expected: bool,
                                                                       kind: str, reason: str) -> None:
    rec = Recording(_backend("jail"), swap=BEYOND_RAM, drop_expected=drop_expected)
    h = Harness(tmp_path / "s", backend=rec)
    try:
        vm = h.vm(h.tenant("acme"), "web", mem_mib=64)
        with h.client() as c:
            r = c.post(f"/v1/vms/{vm}/start")
            assert r.status_code == 422, r.text
            (err,) = r.json()["detail"]
            assert err["type"] == kind and reason in err["msg"], err
            assert c.get(f"/v1/vms/{vm}").json()["state"] == "stopped"
            refused = [d for e, d in _events(c, vm) if e == "start-refused"]
            assert refused and refused[-1]["kind"] == kind and reason in refused[-1]["error"]
            assert "running" not in [e for e, _ in _events(c, vm)]
        assert rec.started == [vm]  # it did reach the worker, which refused before the guest ran
        assert not rec.inner.worker(vm).running
    finally:
        h.close()


@pytest.mark.root
@pytest.mark.kvm
def test_a_worker_integrity_refusal_is_a_security_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed code differs from the signed manifest (here: the manifest's digest of one module is not
    the file's): the worker's pre-import gate refuses, the refusal travels as the typed protocol message,
    the daemon audits security/integrity/code-mismatch with the path and answers 503 kind code-mismatch."""
    from bulkhead.integrity import manifest as mf

    priv, pub = mf.generate_key()
    m = mf.build_manifest(SRC / "bulkhead")
    m["files"]["sandbox/jail.py"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(mf.sign_manifest(m, priv)))
    (tmp_path / "release.pub").write_bytes(pub)
    monkeypatch.delenv("BULKHEAD_DEV_SKIP_INTEGRITY", raising=False)
    monkeypatch.setenv("BULKHEAD_MANIFEST", str(tmp_path / "manifest.json"))
    monkeypatch.setenv("BULKHEAD_RELEASE_KEY", str(tmp_path / "release.pub"))
    rec = Recording(_backend("jail"))
    h = Harness(tmp_path / "s", backend=rec)
    victim = str(SRC / "bulkhead" / "sandbox" / "jail.py")
    try:
        vm = h.vm(h.tenant("acme"), "web", mem_mib=64)
        with h.client() as c:
            r = c.post(f"/v1/vms/{vm}/start")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["kind"] == "code-mismatch" and victim in body["detail"]
            assert c.get(f"/v1/vms/{vm}").json()["state"] == "stopped"
            refused = [d for e, d in _events(c, vm) if e == "start-refused"]
            assert refused == [{"integrity": "code-mismatch", "path": victim}]
        (sec,) = _audit(h, "security/integrity/code-mismatch")
        assert sec["vm"] == vm
        detail = json.loads(sec["detail"])
        assert detail["path"] == victim and "differs from the signed manifest" in detail["reason"]
        assert not _audit(h, "vm.start-failed")
    finally:
        h.close()
