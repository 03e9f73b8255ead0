"""Issue 19: the image store (`bulkhead image import|list|delete`, validated with the boot loaders, sha256
re-checked by the daemon) and the attestation policy edited through the daemon (`bulkhead attest policy`),
both audited and RBAC-checked; the attacks (a lying digest, a symlink staged at a host file, a non-kernel,
a principal without the permission) fail."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bulkhead.boot.craft import make_bzimage, make_elf
from bulkhead.daemon.testkit import Harness, ServerThread
from bulkhead.integrity.policy import POLICY_FORMAT, parse_policy

ELF = make_elf([(0x100000, b"\xf4", 0x1000)], 0x100000)
PVH = make_elf([(0x100000, b"\xf4", 0x1000)], 0x100000, pvh_entry=0x100000)
BZ = make_bzimage(b"\xf4" * 64)
D1, D2 = "a" * 64, "b" * 64


@pytest.fixture
def h(tmp_path: Path) -> Any:
    harness = Harness(tmp_path / "s")
    yield harness
    harness.close()


def _stage(h: Harness, data: bytes, name: str = ".import-t1") -> tuple[str, str]:
    (h.root / "images" / name).write_bytes(data)
    return name, hashlib.sha256(data).hexdigest()


def _audit(h: Harness, action: str) -> list[dict[str, Any]]:
    with h.client() as c:
        return [r for r in c.get("/v1/audit", params={"limit": 5000}).json() if r["action"] == action]


@pytest.mark.parametrize(("data", "kind"), [(ELF, "ELF"), (PVH, "PVH"), (BZ, "bzImage")])
def test_import_records_kind_and_sha256(h: Harness, data: bytes, kind: str) -> None:
    staged, digest = _stage(h, data)
    with h.client() as c:
        r = c.post("/v1/images", json={"name": "k1", "staged": staged, "sha256": digest})
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == kind and r.json()["sha256"] == digest and r.json()["by"] == "root@local"
        listed = {i["name"]: i for i in c.get("/v1/images").json()}
        assert listed["k1"]["kind"] == kind and listed["vmlinux"]["kind"] == "unknown"  # copied in by hand
    assert (h.root / "images" / "k1").read_bytes() == data and not (h.root / "images" / staged).exists()
    rec = _audit(h, "image/write")[-1]
    assert rec["result"] == "201" and json.loads(rec["detail"])["sha256"] == digest


def test_import_refuses_lies_links_and_non_kernels(h: Harness) -> None:
    with h.client() as c:
        staged, _ = _stage(h, ELF)  # the importer's digest is checked, not trusted
        r = c.post("/v1/images", json={"name": "k", "staged": staged, "sha256": "0" * 64})
        assert r.status_code == 422 and "sha256" in r.text
        os.symlink("/etc/shadow", h.root / "images" / ".import-link")  # staged at a host file
        r = c.post("/v1/images", json={"name": "k", "staged": ".import-link",
                                       "sha256": hashlib.sha256(b"").hexdigest()})
        assert r.status_code == 422 and "cannot be opened" in r.text
        staged, digest = _stage(h, b"#!/bin/sh\necho not a kernel\n")
        r = c.post("/v1/images", json={"name": "k", "staged": staged, "sha256": digest})
        assert r.status_code == 422 and "not a bootable kernel" in r.text
        r = c.post("/v1/images", json={"name": "k", "staged": "../state.db", "sha256": "0" * 64})
        assert r.status_code == 422  # staging names are .import-* in the store, nothing else
        r = c.post("/v1/images", json={"name": "../k", "staged": ".import-x", "sha256": "0" * 64})
        assert r.status_code == 422
        staged, digest = _stage(h, b"any initrd bytes")
        r = c.post("/v1/images", json={"name": "rd", "staged": staged, "sha256": digest, "initrd": True})
        assert r.status_code == 201 and r.json()["kind"] == "initrd"
        staged, digest = _stage(h, ELF)
        assert c.post("/v1/images", json={"name": "vmlinux", "staged": staged, "sha256": digest}).status_code == 409
    assert not (h.root / "k").exists() and not (h.root / "images" / "k").exists()


def test_delete_refuses_an_image_in_use_and_rbac_applies(h: Harness) -> None:
    t = h.tenant("acme")
    h.vm(t, "web")  # kernel vmlinux
    contrib = h.principal("carol", ("Contributor", f"/tenants/{t}"))
    reader = h.principal("rita", ("Reader", "/"))
    with h.client(contrib) as c:  # a tenant-scoped principal cannot touch the shared store
        assert c.get("/v1/images").status_code == 403
        assert c.delete("/v1/images/vmlinux").status_code == 403
    with h.client(reader) as c:
        assert c.get("/v1/images").status_code == 200
        assert c.delete("/v1/images/vmlinux").status_code == 403
    with h.client() as c:
        r = c.delete("/v1/images/vmlinux")
        assert r.status_code == 409 and "web" in r.text
        staged, digest = _stage(h, ELF)
        c.post("/v1/images", json={"name": "spare", "staged": staged, "sha256": digest})
        assert c.delete("/v1/images/spare").status_code == 204
        assert c.delete("/v1/images/spare").status_code == 404
        r = c.post("/v1/vms", json={"tenant": t, "name": "x", "kernel": "missing"})
        assert r.status_code == 422 and str(h.root / "images") in r.text  # the error names the store
    assert not (h.root / "images" / ".meta" / "spare.json").exists()


def test_image_cli_import_list_delete(h: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead.cli import main

    src = tmp_path / "payload.elf"
    src.write_bytes(PVH)
    with ServerThread(h):
        common = ["--socket", str(h.sd.socket), "--state-dir", str(h.root)]
        assert main(["image", "import", str(src), "--name", "guest", *common]) == 0
        out = capsys.readouterr().out
        assert out.startswith("imported guest: PVH") and hashlib.sha256(PVH).hexdigest() in out
        assert main(["image", "list", *common]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == ["NAME", "KIND", "SIZE", "SHA256", "IMPORTED", "BY"]
        assert any(line.startswith("guest") and "PVH" in line for line in out.splitlines())
        src.write_bytes(b"garbage")
        assert main(["image", "import", str(src), "--name", "bad", *common]) == 1
        assert "not a bootable kernel" in capsys.readouterr().err
        assert [p.name for p in (h.root / "images").iterdir() if p.name.startswith(".import-")] == []
        assert main(["image", "delete", "guest", *common]) == 0
    assert not (h.root / "images" / "guest").exists()


def test_copy_shows_progress_for_large_files(tmp_path: Path) -> None:
    import io

    from bulkhead.daemon.ops_cli import PROGRESS_MIN, copy_with_progress

    src = tmp_path / "big"
    src.write_bytes(os.urandom(1024) * (PROGRESS_MIN // 1024 + 1))
    out = io.StringIO()
    digest = copy_with_progress(src, tmp_path / "copy", out)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "(100%)" in out.getvalue() and out.getvalue().count("\r") >= 8
    assert oct(os.stat(tmp_path / "copy").st_mode & 0o777) == "0o600"


def _write_policy(h: Harness) -> Path:
    path = h.root / "integrity" / "policy.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"format": POLICY_FORMAT, "ek_sha256": "c" * 64, "pcrs": {"host": 14, "vm": 15},
                                "allowed": {"manifest": [], "config": [], "vm-launch": [D1]}}))
    return path


def test_policy_through_the_daemon_is_audited_and_rbac_checked(h: Harness) -> None:
    path = _write_policy(h)
    contrib = h.principal("carol", ("Contributor", "/"))
    with h.client(contrib) as c:  # may read it (*/read), may not change it (Contributor's not-action)
        assert c.get("/v1/integrity/policy").json()["allowed"]["vm-launch"] == [D1]
        r = c.post("/v1/integrity/policy/allow", json={"digest": D2})
        assert r.status_code == 403
    assert parse_policy(path.read_text()).allowed["vm-launch"] == frozenset({D1})
    with h.client() as c:
        r = c.post("/v1/integrity/policy/allow", json={"digest": D2})
        assert r.status_code == 200 and r.json()["allowed"]["vm-launch"] == sorted([D1, D2])
        assert parse_policy(path.read_text()).allowed["vm-launch"] == frozenset({D1, D2})
        assert c.post("/v1/integrity/policy/revoke", json={"digest": D1}).json()["allowed"]["vm-launch"] == [D2]
        assert c.post("/v1/integrity/policy/allow", json={"digest": "XYZ"}).status_code == 422
        assert c.post("/v1/integrity/policy/allow", json={"digest": D1, "kind": "other"}).status_code == 422
    assert parse_policy(path.read_text()).allowed["vm-launch"] == frozenset({D2})
    recs = _audit(h, "integrity/policy/write")
    ops = [(json.loads(r["detail"]).get("op"), r["decision"], r["result"]) for r in recs]
    assert ("allow", "deny", "403") in [(o or "allow", d, res) for o, d, res in ops]
    assert ("allow", "allow", "200") in ops and ("revoke", "allow", "200") in ops


def test_attest_policy_cli(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead.cli import main

    _write_policy(h)
    with ServerThread(h):
        common = ["--socket", str(h.sd.socket)]
        assert main(["attest", "policy", "allow-digest", D2.upper(), *common]) == 0
        assert main(["attest", "policy", "show", *common]) == 0
        out = capsys.readouterr().out
        assert "vm-launch: 2 allowed" in out and D2 in out
        assert main(["attest", "policy", "revoke-digest", D2, "--json", *common]) == 0
        assert json.loads(capsys.readouterr().out)["allowed"]["vm-launch"] == [D1]
        assert main(["attest", "policy", "allow-digest", "nothex", *common]) == 1
        assert "digest" in capsys.readouterr().err
