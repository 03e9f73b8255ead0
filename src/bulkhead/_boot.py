"""bulkhead's pre-import integrity gate: verify the installed code, THEN import it (docs/INTEGRITY.md §5).

Standard library only, and never imported as ``bulkhead._boot`` on a start path: the launchers
(``/usr/local/bin/bulkhead``, ``bulkheadd``, written by ``launcher_text``) and the supervisor's worker exec
run this file *by path*, so no module of the ``bulkhead`` package (not even ``bulkhead/__init__.py``)
executes before the check:

    python -I -S -B /…/bulkhead/_boot.py [--site DIR]... [--root PKGDIR] -- <bulkhead argv>

Steps (``launch``):

1. Unless ``BULKHEAD_DEV_SKIP_INTEGRITY=1`` (exactly; loud banner on stderr): read the signed manifest
   (``$BULKHEAD_MANIFEST`` or /etc/bulkhead/manifest.json) and the release key (``$BULKHEAD_RELEASE_KEY``
   or /etc/bulkhead/release-key.pub), verify the ed25519 signature (RFC 8032 §5.1.7, pure Python below:
   importing ``cryptography`` first would cost ~40 ms of every start), then the SHA-256 of every file of
   the package directory (missing, modified or added files are refusals) and of the external files.
2. Install a meta-path finder that resolves ``bulkhead`` and every ``bulkhead.*`` module from exactly the
   verified directory (the manifest's signed ``package_root``) and nowhere else. Its loader hashes the
   bytes it reads and executes only bytes whose digest the manifest lists: a module's source, or cached
   bytecode listed under ``bytecode`` (anything else in ``__pycache__`` is ignored, never executed).
   Verify-then-import therefore uses the very bytes that were checked (no TOCTOU for code).
3. ``sys.path`` is the interpreter's standard library (``-I -S``) followed by the ``--site`` directories
   (third-party dependencies, not covered by the manifest), so nothing can shadow the standard library.
4. Run ``bulkhead.cli.main(argv)``.

A refusal prints one line, ``bulkhead: integrity check failed: <path>: <reason>``, and exits with
``EXIT_INTEGRITY`` (77). A worker (``worker --channel-fd N``) also sends the typed protocol message
``integrity-refused`` (bulkhead.sandbox.protocol.IntegrityRefused) on its channel first, so the
supervisor reports a security event instead of a generic start failure.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import sys

TYPE_CHECKING = False  # no `typing` import on the start path (mypy treats this name as True)
if TYPE_CHECKING:
    from typing import Any, NoReturn

EXIT_INTEGRITY = 77  # sysexits EX_NOPERM: the installed code is not the signed code
FORMAT = "bulkhead-manifest/1"
SKIP_ENV = "BULKHEAD_DEV_SKIP_INTEGRITY"
DEFAULT_MANIFEST = "/etc/bulkhead/manifest.json"
DEFAULT_PUBKEY = "/etc/bulkhead/release-key.pub"
SKIP_DIRS = frozenset({"__pycache__"})
# The result of the check that ran in this process (None: not booted through this file).
RESULT: dict[str, Any] | None = None


class Refusal(Exception):
    """The code or the manifest cannot be trusted. `path` names the first differing file (or the manifest)."""

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


# ---- ed25519 verification, RFC 8032 §5.1 (verify only: no secrets here, so no constant-time need) ----

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_GY = 4 * pow(5, _P - 2, _P) % _P
if TYPE_CHECKING:
    _Point = tuple[int, int, int, int]  # extended homogeneous coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, xy = T/Z


def _add(p: _Point, q: _Point) -> _Point:
    """RFC 8032 §5.1.4 point addition (also correct for doubling)."""
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _recover_x(y: int, sign: int) -> int | None:
    """RFC 8032 §5.1.3 steps 2-4."""
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _decompress(s: bytes) -> _Point | None:
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_B = _decompress(_GY.to_bytes(32, "little"))


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 §5.1.7: True when `signature` is a valid Ed25519 signature of `message` under `public`.

    Checks the cofactorless equation [S]B = R + [k]A (as OpenSSL does; §5.1.7 allows either form),
    refuses S >= L and non-canonical point encodings. One joint double-and-add (Straus) for [S]B - [k]A."""
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decompress(public)
    r = _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L or _B is None:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    neg_a = (_P - a[0], a[1], a[2], _P - a[3])
    table = {(1, 0): _B, (0, 1): neg_a, (1, 1): _add(_B, neg_a)}
    acc: _Point = (0, 1, 1, 0)
    for i in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        acc = _add(acc, acc)
        bits = ((s >> i) & 1, (k >> i) & 1)
        if bits != (0, 0):
            acc = _add(acc, table[bits])
    # acc == R, compared projectively
    return (acc[0] * r[2] - r[0] * acc[2]) % _P == 0 and (acc[1] * r[2] - r[1] * acc[2]) % _P == 0


_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")  # RFC 8410 SubjectPublicKeyInfo prefix


def public_key_from_pem(pem: bytes) -> bytes:
    """The raw 32-byte key of an ed25519 SubjectPublicKeyInfo PEM (RFC 8410). Raises Refusal otherwise."""
    text = pem.decode("ascii", "replace").strip().splitlines()
    if len(text) < 3 or text[0] != "-----BEGIN PUBLIC KEY-----" or text[-1] != "-----END PUBLIC KEY-----":
        raise Refusal("the release public key is not a PEM public key")
    try:
        der = binascii.a2b_base64("".join(text[1:-1]).encode("ascii"), strict_mode=True)
    except (ValueError, UnicodeEncodeError):
        raise Refusal("the release public key is not valid base64 PEM") from None
    if len(der) != 44 or not der.startswith(_SPKI_ED25519):
        raise Refusal("the release public key is not an ed25519 key")
    return der[12:]


# ---- canonical JSON, files ---------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII; the bytes that are signed and hashed (as integrity.canonical)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sha256_file(path: str, cache: DigestCache | None = None) -> str:
    """SHA-256 hex of a file's contents (through `cache` when given). Raises OSError when it cannot be read."""
    if cache is not None:
        return cache.sha256(path)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- the digest cache (docs/INTEGRITY.md §5 "The digest cache") --------------------------------------

CACHE_ENV = "BULKHEAD_DIGEST_CACHE"  # "off" disables it
DEFAULT_CACHE = "/run/bulkhead/digests.json"  # tmpfs: emptied at every boot
CACHE_MIN_AGE_NS = 2_000_000_000  # a file changed less than this ago is hashed every time ("racy" entries)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestCache:
    """SHA-256 digests of files, each remembered with its (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns).

    A remembered digest is used only while all five are unchanged: any write moves st_ctime to the kernel's
    current time (userspace cannot set it back; utimensat sets mtime and moves ctime forward too), a
    replaced file is a new inode. Entries are recorded only for files whose ctime is CACHE_MIN_AGE_NS old
    (a write within the same clock tick as the hash would leave the key unchanged) and whose fstat did not
    change while they were hashed. The file is trusted only when this process is root and the file is a
    regular file owned by root with mode 0600 (no group/other bits) in a root-owned directory that nobody
    else may write; otherwise it is ignored (and never written), so every file is hashed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        self.trusted = os.geteuid() == 0 and self._dir_trusted()
        if self.trusted:
            self.entries = self._load()

    def _dir_trusted(self) -> bool:
        try:
            st = os.stat(os.path.dirname(self.path) or ".")
        except OSError:
            return False
        return st.st_uid == 0 and not st.st_mode & 0o022

    def _load(self) -> dict[str, list[Any]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if st.st_uid != 0 or st.st_mode & 0o077 or (st.st_mode & 0o170000) != 0o100000:
                return {}
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        finally:
            os.close(fd)
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items()
                if isinstance(k, str) and isinstance(v, list) and len(v) == 6 and isinstance(v[5], str)}

    def sha256(self, path: str) -> str:
        if self.trusted:
            try:
                key = _stat_key(os.stat(path))
            except OSError:
                key = None
            entry = self.entries.get(path)
            if key is not None and entry is not None and entry[:5] == key:
                return str(entry[5])
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            after = os.fstat(f.fileno())
        if self.trusted and _stat_key(before) == _stat_key(after) \
                and _now_ns() - after.st_ctime_ns >= CACHE_MIN_AGE_NS:
            self.entries[path] = [*_stat_key(after), digest]
            self.dirty = True
        return digest

    def save(self) -> None:
        """Write the entries back (atomically, mode 0600) when something was added; errors are ignored:
        the cache only saves time."""
        if not (self.trusted and self.dirty):
            return
        keep = {k: v for k, v in self.entries.items() if os.path.lexists(k)}  # deleted trees drop out
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(json.dumps(keep, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _now_ns() -> int:
    import time

    return time.time_ns()


def open_cache(environ: Any) -> DigestCache | None:
    """The digest cache named by $BULKHEAD_DIGEST_CACHE (default DEFAULT_CACHE; "off": none), as root only.
    Creates the default directory (root, 0700) when missing."""
    path = environ.get(CACHE_ENV) or DEFAULT_CACHE
    if path == "off" or os.geteuid() != 0:
        return None
    if path == DEFAULT_CACHE:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        except OSError:
            return None
    return DigestCache(path)


def walk_package(root: str, cache: DigestCache | None = None) -> dict[str, str]:
    """relative path -> sha256 (or "symlink:<target>") of every file under `root`, __pycache__ skipped."""
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):  # a symlink could point anywhere: its target text is what is recorded
                files[rel] = "symlink:" + os.readlink(full)
            else:
                files[rel] = sha256_file(full, cache)
    return files


def diff_manifest(manifest: dict[str, Any], root: str | None = None, cache: DigestCache | None = None) -> list[str]:
    """One line per difference between the files on disk and `manifest` (empty = identical); each line
    starts with the absolute path, so the first line names the first differing file.

    The external files (the interpreter and libpython: ~23 MB here) are hashed in a second thread while
    the package is walked; hashlib and file reads release the GIL, so the two overlap."""
    import threading

    pkg = root if root is not None else str(manifest["package_root"])
    recorded: dict[str, Any] = manifest["files"]
    external: list[str] = []

    def hash_externals() -> None:
        for path, digest in sorted(dict(manifest["external"]).items()):
            try:
                now = sha256_file(path, cache)
            except OSError as exc:
                external.append(f"{path}: unreadable ({exc.strerror})")
                continue
            if now != digest:
                external.append(f"{path}: modified (sha256 {now} != manifest {digest})")

    worker = threading.Thread(target=hash_externals, name="bulkhead-boot-hash")
    worker.start()
    diffs: list[str] = []
    try:
        actual = walk_package(pkg, cache)
    except OSError as exc:
        actual = {}
        diffs.append(f"{exc.filename}: unreadable ({exc.strerror})")
    for rel in sorted(set(recorded) | set(actual)) if not diffs else ():
        full = os.path.join(pkg, rel)
        if rel not in actual:
            diffs.append(f"{full}: missing")
        elif rel not in recorded:
            diffs.append(f"{full}: unexpected file (not in the manifest)")
        elif actual[rel] != recorded[rel]:
            diffs.append(f"{full}: modified (sha256 {actual[rel]} != manifest {recorded[rel]})")
    worker.join()
    return diffs + external


def check_document(document: Any, public: bytes) -> dict[str, Any]:
    """Verify a signed-manifest document with the raw ed25519 key; return the manifest. Raises Refusal."""
    if not isinstance(document, dict) or set(document) != {"manifest", "signature"}:
        raise Refusal("the manifest file is not a signed manifest (needs exactly manifest + signature)")
    manifest, sig = document["manifest"], document["signature"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Refusal(f"the manifest format is not {FORMAT}")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519" or not isinstance(sig.get("sig"), str):
        raise Refusal("the manifest signature is not an ed25519 signature")
    if sig.get("key_id") != hashlib.sha256(public).hexdigest():
        raise Refusal("the manifest was signed by a different key than the release key")
    try:
        raw = bytes.fromhex(sig["sig"])
        body = canonical_json(manifest)
    except (ValueError, TypeError):
        raw, body = b"", b""
    if not ed25519_verify(public, body, raw):
        raise Refusal("the manifest signature does not verify (manifest modified or forged)")
    for field, kind in (("files", dict), ("external", dict), ("package_root", str)):
        if not isinstance(manifest.get(field), kind):
            raise Refusal(f"the manifest field {field!r} is missing or malformed")
    if not isinstance(manifest.get("bytecode", {}), dict):
        raise Refusal("the manifest field 'bytecode' is malformed")
    return manifest


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise Refusal(f"cannot read the {what} {path}: {exc.strerror}", path) from None


def verify(environ: Any = None, expected_root: str | None = None) -> dict[str, Any]:
    """Steps 1 of the module docstring (as root, through the digest cache: DigestCache). Returns {"manifest", "digest", "manifest_path", "root"}; raises
    Refusal naming the first differing file or why the manifest is not trusted."""
    env = os.environ if environ is None else environ
    mpath = env.get("BULKHEAD_MANIFEST") or DEFAULT_MANIFEST
    kpath = env.get("BULKHEAD_RELEASE_KEY") or DEFAULT_PUBKEY
    public = public_key_from_pem(_read(kpath, "release public key"))
    raw = _read(mpath, "manifest")
    try:
        document = json.loads(raw)
    except ValueError:
        raise Refusal(f"the manifest {mpath} is not valid JSON", mpath) from None
    try:
        manifest = check_document(document, public)
    except Refusal as exc:
        raise Refusal(exc.reason, mpath) from None
    root = os.path.realpath(str(manifest["package_root"]))
    if expected_root is not None and os.path.realpath(expected_root) != root:
        raise Refusal(f"the launched package {os.path.realpath(expected_root)} is not the package the "
                      f"manifest describes ({root})", os.path.realpath(expected_root))
    cache = open_cache(env)
    diffs = diff_manifest(manifest, root, cache)
    if cache is not None:
        cache.save()  # true digests only: a tampered file's entry holds the tampered digest, refused again
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        path, _, why = diffs[0].partition(": ")
        raise Refusal(f"installed code differs from the signed manifest: {why}{more}", path)
    digest = hashlib.sha256(canonical_json(manifest)).hexdigest()
    return {"manifest": manifest, "digest": digest, "manifest_path": mpath, "root": root}


# ---- imports only from the verified tree ---------------------------------------------------------------


def _refuse(exc: Refusal, argv: list[str]) -> NoReturn:
    """Print the one-line refusal, tell a worker's supervisor (typed message), exit EXIT_INTEGRITY."""
    print(f"bulkhead: integrity check failed: {exc.path or '?'}: {exc.reason}", file=sys.stderr, flush=True)
    if argv[:1] == ["worker"] and "--channel-fd" in argv:
        try:
            import socket

            fd = int(argv[argv.index("--channel-fd") + 1])
            msg = {"v": 1, "type": "integrity-refused", "path": exc.path[:1024], "detail": exc.reason[:1024]}
            sock = socket.socket(fileno=fd)
            sock.send(json.dumps(msg).encode())
            sock.detach()
        except (ValueError, IndexError, OSError):
            pass
    os._exit(EXIT_INTEGRITY)


def install_finder(root: str, manifest: dict[str, Any] | None, argv: list[str]) -> None:
    """Resolve `bulkhead` and `bulkhead.*` only from `root`. With a manifest, a module's bytes run only
    when their SHA-256 is listed (source in "files", cached bytecode in "bytecode")."""
    from importlib.machinery import ModuleSpec, SourceFileLoader

    files: dict[str, str] = dict(manifest["files"]) if manifest else {}
    bytecode: dict[str, str] = dict(manifest.get("bytecode", {})) if manifest else {}
    prefix = root.rstrip(os.sep) + os.sep

    class VerifiedLoader(SourceFileLoader):
        def get_data(self, path: str) -> bytes:
            with open(path, "rb") as f:
                data = f.read()
            if manifest is None:
                return data
            rel = path[len(prefix):].replace(os.sep, "/") if path.startswith(prefix) else None
            digest = hashlib.sha256(data).hexdigest()
            if rel is not None and rel.endswith(".pyc"):
                if bytecode.get(rel) != digest:
                    raise OSError(f"{path}: bytecode not in the manifest")  # -> the loader uses the source
                return data
            if rel is None or files.get(rel) != digest:
                _refuse(Refusal("modified after the check (sha256 differs from the manifest)", path), argv)
            return data

        def set_data(self, path: str, data: Any, *, _mode: int = 0o666) -> None:
            return None  # never write bytecode into the verified tree

    class VerifiedFinder:
        @classmethod
        def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
            if fullname != "bulkhead" and not fullname.startswith("bulkhead."):
                return None
            parts = fullname.split(".")[1:]
            base = os.path.join(root, *parts)
            init = os.path.join(base, "__init__.py")
            if os.path.isfile(init):
                spec = ModuleSpec(fullname, VerifiedLoader(fullname, init), origin=init, is_package=True)
                spec.submodule_search_locations = [base]
            elif os.path.isfile(base + ".py"):
                spec = ModuleSpec(fullname, VerifiedLoader(fullname, base + ".py"), origin=base + ".py")
            else:
                raise ModuleNotFoundError(f"No module named {fullname!r} in {root}", name=fullname)
            spec.has_location = True
            return spec

        @classmethod
        def invalidate_caches(cls) -> None:
            return None

    sys.meta_path.insert(0, VerifiedFinder)


def default_sites(path: list[str] | None = None) -> list[str]:
    """The third-party directories of this interpreter's sys.path (site-/dist-packages)."""
    return [p for p in (sys.path if path is None else path)
            if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]


def worker_argv(python: str, args: list[str]) -> list[str]:
    """How a supervisor execs `bulkhead <args>` through this gate with the same package and sites."""
    boot = RESULT["boot"] if RESULT else os.path.abspath(__file__)
    root = RESULT["root"] if RESULT else os.path.dirname(os.path.abspath(__file__))
    sites = RESULT["sites"] if RESULT else default_sites()
    out = [python, "-I", "-S", "-B", boot, "--root", root]
    for s in sites:
        out += ["--site", s]
    return [*out, "--", *args]


def launch(argv: list[str]) -> int:
    """Parse `[--site DIR]... [--root PKGDIR] [--] <bulkhead argv>`, verify, import, run bulkhead.cli.main."""
    global RESULT
    sites: list[str] = []
    root: str | None = None
    i = 0
    while i < len(argv) and argv[i] in ("--site", "--root"):
        if i + 1 >= len(argv):
            break
        if argv[i] == "--site":
            sites.append(argv[i + 1])
        else:
            root = argv[i + 1]
        i += 2
    if i < len(argv) and argv[i] == "--":
        i += 1
    rest = argv[i:]
    sys.dont_write_bytecode = True
    me = os.path.abspath(__file__)
    if os.environ.get(SKIP_ENV) == "1":
        bar = "!" * 78
        print(f"{bar}\n!! bulkhead: INTEGRITY CHECK SKIPPED ({SKIP_ENV}=1): the code about to run is NOT "
              f"verified.\n!! Development only; never in production.\n{bar}", file=sys.stderr, flush=True)
        pkg = os.path.realpath(root or os.path.dirname(me))
        manifest = None
        RESULT = {"verified": False, "digest": None, "root": pkg, "sites": sites, "boot": me,
                  "manifest_path": os.environ.get("BULKHEAD_MANIFEST") or DEFAULT_MANIFEST}
    else:
        try:
            checked = verify(expected_root=root)
        except Refusal as exc:
            _refuse(exc, rest)
        pkg, manifest = checked["root"], checked["manifest"]
        RESULT = {"verified": True, "digest": checked["digest"], "root": pkg, "sites": sites, "boot": me,
                  "manifest_path": checked["manifest_path"]}
    # -I -S leaves only the standard library; never the package's own or parent directory (a module there
    # would shadow the standard library), even when run without -I
    here = os.path.dirname(os.path.realpath(me))
    near = {here, os.path.dirname(here), pkg, os.path.dirname(pkg)}
    sys.path[:] = [p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) not in near] + sites
    install_finder(pkg, manifest, rest)
    # The hand-over to the entry point, by name: this bootstrap sits in the foundation layer (stdlib only,
    # imported by integrity.manifest for its package walk), so it holds no import arrow up to the CLI.
    import importlib

    status = int(importlib.import_module("bulkhead.cli").main(rest))
    if rest and rest[0] in FAST_EXIT_COMMANDS:
        fast_exit(status)
    return status


FAST_EXIT_COMMANDS = ("run", "demo")


def fast_exit(status: int) -> None:
    """End a finished `bulkhead run`/`demo` without the interpreter's teardown (docs/PERFORMANCE.md,
    "Jailed start"): the atexit handlers run (the supervisor's kill-every-live-worker among them) and the
    standard streams are flushed, exactly as at a normal exit; what is skipped is freeing every module and
    object one by one (~40 ms with the VM path imported), which nothing observes. Returns (and the caller
    exits normally) when a non-daemon thread is still alive: a normal exit would wait for it."""
    import threading

    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


def launcher_text(python: str, boot: str, sites: list[str], root: str, command: str = "bulkhead",
                  boot_pyc: str = "", boot_pyc_sha256: str = "") -> str:
    """The /usr/local/bin launcher install.sh writes (`bulkhead`, or `bulkheadd` = `bulkhead serve`).

    With `boot_pyc` (this file's cached bytecode) and its digest, the launcher executes that bytecode
    when it hashes to the digest written here (saves compiling this file, ~6 ms per start), and
    compiles the source otherwise. The launcher itself is a manifest entry (install.sh: --extra)."""
    prefix = ["serve"] if command == "bulkheadd" else []
    args: list[str] = ["--root", root]
    for s in sites:
        args += ["--site", s]
    return (
        f"#!{python} -ISB\n"
        f"# Written by bulkhead's install.sh (bulkhead._boot.launcher_text): verifies the installed code against\n"
        f"# the signed manifest, then imports bulkhead only from the verified tree (docs/INTEGRITY.md).\n"
        f"import sys\n"
        f"BOOT, PYC, PYC_SHA256 = {boot!r}, {boot_pyc!r}, {boot_pyc_sha256!r}\n"
        f"code = None\n"
        f"if PYC:\n"
        f"    import hashlib, marshal\n"
        f"    try:\n"
        f"        with open(PYC, 'rb') as f:\n"
        f"            data = f.read()\n"
        f"        if hashlib.sha256(data).hexdigest() == PYC_SHA256:\n"
        f"            code = marshal.loads(data[16:])\n"
        f"    except (OSError, ValueError, EOFError):\n"
        f"        code = None\n"
        f"if code is None:\n"
        f"    with open(BOOT, 'rb') as f:\n"
        f"        code = compile(f.read(), BOOT, 'exec')\n"
        f"boot = type(sys)('bulkhead_boot')\n"
        f"boot.__file__ = BOOT\n"
        f"sys.modules['bulkhead_boot'] = boot\n"
        f"exec(code, boot.__dict__)\n"
        f"sys.exit(boot.launch({[*args, '--', *prefix]!r} + sys.argv[1:]))\n"
    )


def write_launcher(path: str, command: str, python: str | None = None, sites: list[str] | None = None,
                   boot: str | None = None) -> str:
    """Write the `command` launcher (bulkhead | bulkheadd) to `path` (mode 0755) for the package of `boot`
    (default: this file), this interpreter (default sys.executable) and its site directories; returns the
    text. install.sh calls it (and the tests, for a copied tree)."""
    import importlib.util

    me = os.path.abspath(boot or __file__)
    pyc = importlib.util.cache_from_source(me)
    try:
        pyc_sha = sha256_file(pyc)
    except OSError:
        pyc, pyc_sha = "", ""
    text = launcher_text(python or sys.executable, me, default_sites() if sites is None else sites,
                         os.path.dirname(me), command, pyc, pyc_sha)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o755)  # noqa: S103 - a launcher in /usr/local/bin is executable by everyone
    os.replace(tmp, path)
    return text


def _main() -> None:
    sys.modules.setdefault("bulkhead_boot", sys.modules[__name__])
    sys.exit(launch(sys.argv[1:]))


if __name__ == "__main__":
    _main()
