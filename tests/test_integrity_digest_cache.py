"""The pre-import gate's digest cache (bulkhead/_boot.py DigestCache, docs/INTEGRITY.md §5 "The digest cache").

A digest is reused only while a file's (dev, ino, size, mtime_ns, ctime_ns) are unchanged, from a root-owned
0600 file. Attacks: modify an installed module and an external file keeping their size and restoring their
mtime (what a file's owner can do); forge cache entries in a file someone other than root could write.
Each must still be refused by the real launcher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from tests.test_integrity_boot import Tree

from bulkhead import _boot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the digest cache is used as root only")

# A data file (read by sandbox/policy.py at run time): the import-time loader never re-hashes it, so the
# package walk, and therefore the cache, is its only check.
DATA = "sandbox/seccomp/worker.json"


def _tamper_keeping_size_and_mtime(path: Path) -> None:
    """Change one byte of `path` (same size) and put its atime/mtime back: only ctime moves."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.rindex(b"#") if b"#" in data else len(data) - 2
    data[i + 1] = ord("X") if data[i + 1] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture
def cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Tree, dict[str, str], Path]:
    tree = Tree(tmp_path)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    env = {**tree.env, _boot.CACHE_ENV: str(cache_dir / "digests.json")}
    monkeypatch.setattr(_boot, "CACHE_MIN_AGE_NS", 0)  # the tree is seconds old; record it anyway
    _boot.verify(env)
    return tree, env, cache_dir / "digests.json"


def test_a_cached_digest_spares_the_hash(cached: tuple[Tree, dict[str, str], Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tree, env, cache = cached
    st = cache.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    entries = json.loads(cache.read_text())
    assert str(tree.pkg / "cli.py") in entries and str(tree.launchers["bulkheadd"]) in entries

    def no_hashing(*a: object, **k: object) -> object:
        raise AssertionError("a file was hashed although its cached key matched")

    monkeypatch.setattr(hashlib, "file_digest", no_hashing)
    assert _boot.verify(env)["root"] == str(tree.pkg)


@pytest.mark.parametrize("rel", ["cli.py", DATA])
def test_a_package_file_modified_with_its_size_and_mtime_kept_is_still_refused(
        cached: tuple[Tree, dict[str, str], Path], rel: str) -> None:
    tree, env, _ = cached
    victim = tree.pkg / rel
    _tamper_keeping_size_and_mtime(victim)
    out = tree.run("bulkhead", "--version", **{_boot.CACHE_ENV: env[_boot.CACHE_ENV]})
    assert out.returncode == _boot.EXIT_INTEGRITY, out.stderr
    assert f"integrity check failed: {victim}: installed code differs" in out.stderr


def test_an_external_file_modified_with_its_size_and_mtime_kept_is_still_refused(
        cached: tuple[Tree, dict[str, str], Path]) -> None:
    tree, env, _ = cached
    victim = tree.launchers["bulkheadd"]
    _tamper_keeping_size_and_mtime(victim)
    out = tree.run("bulkhead", "--version", **{_boot.CACHE_ENV: env[_boot.CACHE_ENV]})
    assert out.returncode == _boot.EXIT_INTEGRITY, out.stderr
    assert str(victim) in out.stderr and "modified" in out.stderr


def _forge(cache: Path, tree: Tree, victim: Path) -> None:
    """The attacker's cache entry: the tampered file's current key with the manifest's (good) digest."""
    good = json.loads((tree.tmp / "manifest.json").read_text())["manifest"]["files"][DATA]
    entries = json.loads(cache.read_text())
    entries[str(victim)] = [*_boot._stat_key(victim.stat()), good]
    cache.write_text(json.dumps(entries))


@pytest.mark.parametrize("weakness", ["file-mode-0644", "directory-writable-by-others", "symlink"])
def test_a_cache_file_others_could_write_is_ignored(cached: tuple[Tree, dict[str, str], Path],
                                                    weakness: str) -> None:
    tree, env, cache = cached
    victim = tree.pkg / DATA
    _tamper_keeping_size_and_mtime(victim)
    _forge(cache, tree, victim)
    if weakness == "file-mode-0644":
        cache.chmod(0o644)
    elif weakness == "directory-writable-by-others":
        cache.parent.chmod(0o777)
    else:
        real = cache.with_name("real.json")
        cache.rename(real)
        cache.symlink_to(real)
    out = tree.run("bulkhead", "--version", **{_boot.CACHE_ENV: env[_boot.CACHE_ENV]})
    assert out.returncode == _boot.EXIT_INTEGRITY, out.stderr
    assert str(victim) in out.stderr


def test_control_a_forged_entry_in_a_root_only_file_is_believed(cached: tuple[Tree, dict[str, str], Path]) -> None:
    """The control of the test above: the same forgery in a root-owned 0600 file passes. Writing that file
    takes root, who could equally rewrite the gate; that is the boundary docs/INTEGRITY.md states."""
    tree, env, cache = cached
    victim = tree.pkg / DATA
    _tamper_keeping_size_and_mtime(victim)
    _forge(cache, tree, victim)
    out = tree.run("bulkhead", "--version", **{_boot.CACHE_ENV: env[_boot.CACHE_ENV]})
    assert out.returncode == 0, out.stderr


def test_files_changed_within_the_minimum_age_are_never_recorded(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    (tmp_path / "cache").mkdir(mode=0o700)
    path = tmp_path / "cache" / "digests.json"
    _boot.verify({**tree.env, _boot.CACHE_ENV: str(path)})
    entries = json.loads(path.read_text()) if path.exists() else {}
    assert not [p for p in entries if p.startswith(str(tmp_path))]  # the whole tree is seconds old


def test_off_disables_the_cache(tmp_path: Path) -> None:
    assert _boot.open_cache({_boot.CACHE_ENV: "off"}) is None
