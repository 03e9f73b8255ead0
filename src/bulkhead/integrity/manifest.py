"""Signed manifest of bulkhead's own installed code, and the start-up check that enforces it.

Manifest (canonical JSON, see bulkhead.integrity.canonical)::

    {"format": "bulkhead-manifest/1", "package": "bulkhead", "version": "0.1.0",
     "package_root": "/abs/path/to/site-packages/bulkhead",
     "files": {"relative/path.py": "<sha256 hex>", ...},      # every file under package_root, no __pycache__
     "external": {"/abs/path/python3.11": "<sha256 hex>", ...}, # interpreter + worker entry point
     "roles": {"/abs/path/python3.11": "interpreter", ...}}

Signed manifest file::

    {"manifest": {...}, "signature": {"alg": "ed25519", "key_id": "<sha256 of raw public key, hex>",
                                      "sig": "<hex of ed25519 signature over canonical_json(manifest)>"}}

The manifest digest (what goes into the TPM) is SHA-256 over canonical_json(manifest).
Checking compares every recorded file, reports files that are missing, modified or unexpected (added to
the package directory), and refuses on any difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from bulkhead import _boot
from bulkhead.integrity.canonical import canonical_json
from bulkhead.integrity.errors import IntegrityError

__all__ = [
    "DEFAULT_MANIFEST",
    "DEFAULT_PUBKEY",
    "FORMAT",
    "SKIP_ENV",
    "IntegrityResult",
    "build_manifest",
    "diff_manifest",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "load_signed_manifest",
    "manifest_digest",
    "package_root",
    "require_integrity",
    "sha256_file",
    "sign_manifest",
    "verify_installation",
    "verify_signature",
]

FORMAT = "bulkhead-manifest/1"
SKIP_ENV = "BULKHEAD_DEV_SKIP_INTEGRITY"
DEFAULT_MANIFEST = "/etc/bulkhead/manifest.json"
DEFAULT_PUBKEY = "/etc/bulkhead/release-key.pub"
_SKIP_DIRS = frozenset({"__pycache__"})


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex of a file's contents. Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def package_root() -> Path:
    """The directory of the imported bulkhead package."""
    import bulkhead

    return Path(bulkhead.__file__).resolve().parent


def _walk_package(root: Path) -> dict[str, str]:
    return _boot.walk_package(str(root))  # one walk for the pre-import gate and this module


def _walk_bytecode(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every cached-bytecode file (``__pycache__/*.pyc``) under `root`."""
    out: dict[str, str] = {}
    for dirpath, _dirs, filenames in os.walk(root):
        if os.path.basename(dirpath) != "__pycache__":
            continue
        for name in sorted(filenames):
            if name.endswith(".pyc"):
                full = Path(dirpath) / name
                out[full.relative_to(root).as_posix()] = sha256_file(full)
    return out


def _default_externals() -> dict[str, str]:
    """Interpreter (resolved), libpython when the interpreter is linked against it (the interpreter
    binary is then a small stub), and the `bulkhead` entry-point script next to it, when it exists."""
    import sysconfig

    roles: dict[str, str] = {os.path.realpath(sys.executable): "interpreter"}
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname:
        lib = Path(libdir) / soname
        if lib.is_file():
            roles[str(lib.resolve())] = "libpython"
    script = Path(sys.executable).parent / "bulkhead"
    if script.is_file():
        roles[str(script.resolve())] = "entry-point"
    return roles


def build_manifest(
    root: str | os.PathLike[str] | None = None,
    externals: Mapping[str, str] | None = None,
    version: str | None = None,
    bytecode: bool = False,
) -> dict[str, Any]:
    """Hash every file of the package (default: the imported one) plus the external files.

    `externals` maps absolute path -> role (default: interpreter and worker entry point). With
    `bytecode`, the cached bytecode present now (``__pycache__/*.pyc``, e.g. after ``compileall``) is
    recorded under "bytecode": the pre-import gate (bulkhead._boot) executes a .pyc only when its digest
    is listed there, and compiles the verified source otherwise.
    Raises IntegrityError if a file cannot be read.
    """
    if version is None:
        import bulkhead

        version = str(getattr(bulkhead, "__version__", "0"))
    pkg = Path(root).resolve() if root is not None else package_root()
    roles = dict(externals) if externals is not None else _default_externals()
    try:
        files = _walk_package(pkg)
        external = {p: sha256_file(p) for p in sorted(roles)}
        compiled = _walk_bytecode(pkg) if bytecode else {}
    except OSError as exc:
        raise IntegrityError(f"cannot hash {exc.filename}: {exc.strerror}", path=str(exc.filename)) from None
    extra: dict[str, Any] = {"bytecode": compiled} if compiled else {}
    return {
        **extra,
        "format": FORMAT,
        "package": "bulkhead",
        "version": version,
        "package_root": str(pkg),
        "files": files,
        "external": external,
        "roles": {p: roles[p] for p in sorted(roles)},
    }


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 hex over the canonical JSON of the (unsigned) manifest."""
    return hashlib.sha256(canonical_json(dict(manifest))).hexdigest()


# ---- keys and signatures (ed25519 via cryptography) ----------------------------------------------


def generate_key() -> tuple[bytes, bytes]:
    """Return (private key PEM, public key PEM) of a fresh ed25519 release key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return priv, pub


def load_private_key(pem: bytes) -> Any:
    """Parse an ed25519 private key PEM. Raises IntegrityError if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError("the signing key is not an ed25519 key")
    return key


def load_public_key(pem: bytes) -> Any:
    """Parse an ed25519 public key PEM. Raises IntegrityError if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError("the release public key is not an ed25519 key")
    return key


def _key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_manifest(manifest: Mapping[str, Any], private_pem: bytes) -> dict[str, Any]:
    """Return the signed-manifest document. Raises IntegrityError on a bad key or manifest."""
    key = load_private_key(private_pem)
    sig = key.sign(canonical_json(dict(manifest)))
    return {
        "manifest": dict(manifest),
        "signature": {"alg": "ed25519", "key_id": _key_id(key.public_key()), "sig": sig.hex()},
    }


def verify_signature(document: Any, public_pem: bytes) -> dict[str, Any]:
    """Check a signed-manifest document; return the manifest. Raises IntegrityError when it does not verify.

    The checks are the pre-import gate's own (bulkhead._boot.check_document: one definition of a valid
    signed manifest for the gate and for this module, so the two cannot drift)."""
    from cryptography.hazmat.primitives import serialization

    raw = load_public_key(public_pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        return _boot.check_document(document, raw)
    except _boot.Refusal as exc:
        raise IntegrityError(str(exc)) from None


def load_signed_manifest(path: str | os.PathLike[str], public_pem: bytes) -> dict[str, Any]:
    """Read and verify a signed manifest file. Raises IntegrityError when unreadable or not verified."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
    except OSError as exc:
        raise IntegrityError(f"cannot read the manifest {path}: {exc.strerror}", path=str(path)) from None
    except ValueError:
        raise IntegrityError(f"the manifest {path} is not valid JSON", path=str(path)) from None
    return verify_signature(document, public_pem)


# ---- comparing the installation against a manifest ------------------------------------------------


def diff_manifest(manifest: Mapping[str, Any], root: str | os.PathLike[str] | None = None) -> list[str]:
    """Compare files on disk with `manifest`; return one line per difference (empty = identical).

    Package files are looked up under `root` (default: the manifest's package_root). Lines start with
    the absolute path so the first line names the first differing file.
    """
    return _boot.diff_manifest(dict(manifest), None if root is None else str(root))


def verify_installation(
    manifest_path: str | os.PathLike[str], pubkey: bytes | str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Verify the manifest signature, then the files; return the differences (empty = intact).

    `pubkey` is PEM bytes or a path to the PEM file. Raises IntegrityError when the manifest itself
    cannot be trusted (unreadable, bad signature, wrong key).
    """
    pem = pubkey if isinstance(pubkey, bytes) else _read_pubkey(pubkey)
    manifest = load_signed_manifest(manifest_path, pem)
    return diff_manifest(manifest, root)


def _read_pubkey(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise IntegrityError(f"cannot read the release public key {path}: {exc.strerror}") from None


def _booted_result() -> dict[str, Any] | None:
    """The pre-import gate's result when this process was started through bulkhead/_boot.py."""
    boot = sys.modules.get("bulkhead_boot")
    result = getattr(boot, "RESULT", None)
    return result if isinstance(result, dict) else None


class IntegrityResult(NamedTuple):
    """Outcome of require_integrity: `digest` is the verified manifest digest, None when skipped."""

    verified: bool
    digest: str | None
    manifest_path: str


def require_integrity(
    role: str = "daemon",
    *,
    manifest_path: str | None = None,
    pubkey_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    running_root: str | os.PathLike[str] | None = None,
) -> IntegrityResult:
    """The one-call start-up check for the daemon and every worker.

    The manifest must describe the package actually running (`running_root`, default the imported
    package's directory): a genuine manifest of some other intact copy vouches for nothing.

    Paths default to $BULKHEAD_MANIFEST / $BULKHEAD_RELEASE_KEY, then /etc/bulkhead/manifest.json and
    /etc/bulkhead/release-key.pub. The check is skipped ONLY when the environment has exactly
    BULKHEAD_DEV_SKIP_INTEGRITY=1; then a loud warning goes to stderr and the result says verified=False
    (the TPM measurement then records an unverified installation, which no policy should allow).

    Raises IntegrityError naming the first differing file (`.path`), or why the manifest is not trusted.
    """
    env = os.environ if environ is None else environ
    mpath = manifest_path or env.get("BULKHEAD_MANIFEST") or DEFAULT_MANIFEST
    if env.get(SKIP_ENV) == "1":
        bar = "!" * 78
        print(
            f"{bar}\n!! bulkhead {role}: INTEGRITY CHECK SKIPPED ({SKIP_ENV}=1).\n"
            f"!! Installed code is NOT verified against {mpath}. Development only; never in production.\n{bar}",
            file=sys.stderr,
            flush=True,
        )
        return IntegrityResult(False, None, mpath)
    kpath = pubkey_path or env.get("BULKHEAD_RELEASE_KEY") or DEFAULT_PUBKEY
    running = Path(running_root).resolve() if running_root is not None else package_root()
    booted = _booted_result()
    if (booted is not None and booted.get("verified") and manifest_path is None and pubkey_path is None
            and environ is None and Path(str(booted["root"])) == running):
        # This process started through the pre-import gate, which verified this very package before
        # any of it ran and imports only verified bytes: hashing it all again would prove nothing new.
        return IntegrityResult(True, str(booted["digest"]), str(booted["manifest_path"]))
    manifest = load_signed_manifest(mpath, _read_pubkey(kpath))
    recorded = Path(str(manifest["package_root"])).resolve()
    if recorded != running:
        raise IntegrityError(
            f"bulkhead {role} refuses to start: the running package {running} is not the package "
            f"the manifest describes ({recorded})",
            path=str(running),
        )
    diffs = diff_manifest(manifest)
    if diffs:
        first = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise IntegrityError(
            f"bulkhead {role} refuses to start: installed code differs from the signed manifest: {first}{more}",
            path=first.split(": ", 1)[0],
        )
    return IntegrityResult(True, manifest_digest(manifest), mpath)
