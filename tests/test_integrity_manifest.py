"""Signed manifest: build, sign, verify; every tampering must end in refusal."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import bulkhead
from bulkhead.integrity import IntegrityError, require_integrity, verify_installation
from bulkhead.integrity import manifest as m
from bulkhead.integrity.cli import manifest_main


@pytest.fixture
def install(tmp_path: Path) -> dict[str, Path]:
    """A copy of the bulkhead package + a stand-in interpreter, a release key and a signed manifest."""
    pkg = tmp_path / "site" / "bulkhead"
    shutil.copytree(Path(bulkhead.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "junk.pyc").write_bytes(b"ignored")
    interp = tmp_path / "python3"
    interp.write_bytes(b"\x7fELF pretend interpreter")
    priv, pub = m.generate_key()
    (tmp_path / "release.key").write_bytes(priv)
    (tmp_path / "release.pub").write_bytes(pub)
    manifest = m.build_manifest(pkg, {str(interp): "interpreter"})
    signed = m.sign_manifest(manifest, priv)
    (tmp_path / "manifest.json").write_text(json.dumps(signed))
    return {"pkg": pkg, "interp": interp, "manifest": tmp_path / "manifest.json",
            "pub": tmp_path / "release.pub", "key": tmp_path / "release.key", "dir": tmp_path}


def _require(install: dict[str, Path], **env: str) -> m.IntegrityResult:
    return require_integrity("daemon", manifest_path=str(install["manifest"]),
                             pubkey_path=str(install["pub"]), environ=env, running_root=install["pkg"])


def test_manifest_records_every_package_file_and_skips_pycache(install: dict[str, Path]) -> None:
    doc = json.loads(install["manifest"].read_text())["manifest"]
    on_disk = {p.relative_to(install["pkg"]).as_posix() for p in install["pkg"].rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert set(doc["files"]) == on_disk
    assert "integrity/manifest.py" in doc["files"]
    assert doc["files"]["integrity/manifest.py"] == m.sha256_file(install["pkg"] / "integrity/manifest.py")
    assert doc["roles"] == {str(install["interp"]): "interpreter"}


def test_clean_install_verifies_and_digest_is_stable(install: dict[str, Path]) -> None:
    assert verify_installation(install["manifest"], install["pub"]) == []
    res = _require(install)
    assert res.verified and res.digest is not None
    doc = json.loads(install["manifest"].read_text())["manifest"]
    assert res.digest == m.manifest_digest(doc)


def test_default_manifest_covers_interpreter_and_real_package() -> None:
    doc = m.build_manifest()
    import os
    import sys

    assert os.path.realpath(sys.executable) in doc["external"]
    import sysconfig

    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert "libpython" in doc["roles"].values()
    assert doc["package_root"] == str(Path(bulkhead.__file__).resolve().parent)
    assert "integrity/manifest.py" in doc["files"]


def test_modified_vmm_file_is_refused_naming_the_file(install: dict[str, Path]) -> None:
    target = install["pkg"] / "bus.py"
    target.write_text(target.read_text() + "\n# backdoor\n")
    diffs = verify_installation(install["manifest"], install["pub"])
    assert len(diffs) == 1 and diffs[0].startswith(f"{target}: modified")
    with pytest.raises(IntegrityError) as err:
        _require(install)
    assert err.value.path == str(target)
    assert "bus.py" in str(err.value) and "refuses to start" in str(err.value)


def test_added_removed_and_interpreter_changes_are_refused(install: dict[str, Path]) -> None:
    (install["pkg"] / "evil.py").write_text("import os\n")
    (install["pkg"] / "errors.py").unlink()
    install["interp"].write_bytes(b"other interpreter")
    diffs = verify_installation(install["manifest"], install["pub"])
    text = "\n".join(diffs)
    assert "evil.py: unexpected file" in text
    assert "errors.py: missing" in text
    assert f"{install['interp']}: modified" in text
    with pytest.raises(IntegrityError, match="bulkhead daemon refuses to start: installed code differs"):
        _require(install)


@pytest.mark.parametrize("tamper", ["file-hash", "add-file", "signature", "format"])
def test_modified_manifest_is_refused(install: dict[str, Path], tamper: str) -> None:
    doc = json.loads(install["manifest"].read_text())
    if tamper == "file-hash":  # attacker re-hashes a modified file into the manifest
        (install["pkg"] / "bus.py").write_text("pwned\n")
        doc["manifest"]["files"]["bus.py"] = m.sha256_file(install["pkg"] / "bus.py")
    elif tamper == "add-file":
        doc["manifest"]["files"]["evil.py"] = "0" * 64
    elif tamper == "signature":
        sig = bytearray(bytes.fromhex(doc["signature"]["sig"]))
        sig[5] ^= 1
        doc["signature"]["sig"] = sig.hex()
    else:
        doc["manifest"]["format"] = "bulkhead-manifest/0"
    install["manifest"].write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=r"signature|format"):
        verify_installation(install["manifest"], install["pub"])
    with pytest.raises(IntegrityError, match="the manifest"):
        _require(install)


def test_manifest_signed_with_another_key_is_refused(install: dict[str, Path]) -> None:
    other_priv, _ = m.generate_key()
    doc = json.loads(install["manifest"].read_text())
    install["manifest"].write_text(json.dumps(m.sign_manifest(doc["manifest"], other_priv)))
    with pytest.raises(IntegrityError, match="different key"):
        verify_installation(install["manifest"], install["pub"])


def test_missing_manifest_or_key_refuses(install: dict[str, Path]) -> None:
    with pytest.raises(IntegrityError, match="cannot read the manifest"):
        require_integrity(manifest_path=str(install["dir"] / "nope.json"), pubkey_path=str(install["pub"]),
                          environ={})
    with pytest.raises(IntegrityError, match="release public key"):
        require_integrity(manifest_path=str(install["manifest"]), pubkey_path=str(install["dir"] / "no.pub"),
                          environ={})


def test_dev_skip_only_with_exact_env_and_loud(install: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    (install["pkg"] / "bus.py").write_text("modified\n")
    for value in ("0", "true", "yes", ""):
        with pytest.raises(IntegrityError, match="bulkhead daemon refuses to start: installed code differs"):
            _require(install, BULKHEAD_DEV_SKIP_INTEGRITY=value)
    res = _require(install, BULKHEAD_DEV_SKIP_INTEGRITY="1")
    assert not res.verified and res.digest is None
    err = capsys.readouterr().err
    assert "INTEGRITY CHECK SKIPPED" in err and "never in production" in err


def test_cli_build_sign_verify(install: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d = install["dir"]
    assert manifest_main(["keygen", str(d / "k")]) == 0
    assert (d / "k.key").stat().st_mode & 0o077 == 0
    assert manifest_main(["build", "--root", str(install["pkg"]), "-o", str(d / "u.json")]) == 0
    assert manifest_main(["sign", str(d / "u.json"), "--key", str(d / "k.key"), "-o", str(d / "s.json")]) == 0
    assert manifest_main(["verify", "--manifest", str(d / "s.json"), "--pubkey", str(d / "k.pub")]) == 0
    (install["pkg"] / "bus.py").write_text("changed\n")
    capsys.readouterr()
    assert manifest_main(["verify", "--manifest", str(d / "s.json"), "--pubkey", str(d / "k.pub")]) == 1
    assert "bus.py: modified" in capsys.readouterr().out
    # wrong key for verification: refused, one line on stderr, exit 1
    assert manifest_main(["verify", "--manifest", str(d / "s.json"), "--pubkey", str(install["pub"])]) == 1
    assert manifest_main(["sign", str(d / "u.json"), "--key", str(d / "k.pub")]) == 1
    assert manifest_main(["bogus"]) == 2


def test_the_refusal_counts_the_other_differences(install: dict[str, Path]) -> None:
    target = install["pkg"] / "bus.py"
    target.write_text(target.read_text() + "\n# one\n")
    diffs = verify_installation(install["manifest"], install["pub"])
    with pytest.raises(IntegrityError) as one:
        _require(install)
    assert str(one.value).endswith(f"signed manifest: {diffs[0]}")  # exactly one difference: nothing after it
    (install["pkg"] / "evil.py").write_text("import os\n")
    with pytest.raises(IntegrityError, match=r"\(and 1 more\)$"):
        _require(install)
    (install["pkg"] / "errors.py").unlink()
    with pytest.raises(IntegrityError, match=r"\(and 2 more\)$"):
        _require(install)


def test_a_process_started_through_the_pre_import_gate_reuses_its_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    gate = types.ModuleType("bulkhead_boot")
    gate.RESULT = {"verified": True, "root": str(m.package_root()), "digest": "ab" * 32,  # type: ignore[attr-defined]
                   "manifest_path": "/etc/bulkhead/manifest.json"}
    monkeypatch.setitem(sys.modules, "bulkhead_boot", gate)
    monkeypatch.delenv("BULKHEAD_DEV_SKIP_INTEGRITY", raising=False)
    assert m._booted_result() is gate.RESULT  # type: ignore[attr-defined]
    assert require_integrity("worker") == m.IntegrityResult(True, "ab" * 32, "/etc/bulkhead/manifest.json")
    gate.RESULT = "not a dict"  # type: ignore[attr-defined]
    assert m._booted_result() is None


def test_default_externals_name_the_entry_point_script() -> None:
    script = Path(sys.executable).parent / "bulkhead"
    roles = m._default_externals()
    assert roles[os.path.realpath(sys.executable)] == "interpreter"
    if script.is_file():
        assert roles[str(script.resolve())] == "entry-point"
