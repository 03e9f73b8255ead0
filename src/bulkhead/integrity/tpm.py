"""TPM access (edge): the only module that talks to a TPM, through tpm2-pytss; plus a swtpm launcher.

Keys (both primaries under the endorsement hierarchy, so they are re-derived from the TPM's endorsement
seed on every start and never leave the TPM):
  - EK: TCG EK Credential Profile template "EK-ECC256" (NIST P-256, restricted decrypt, PolicySecret(EH)).
  - AK: NIST P-256 ECDSA/SHA-256, restricted | sign | fixedTPM | fixedParent | sensitiveDataOrigin |
    noDA. noDA (TPM 2.0 Part 2 §8.3.3.1 TPMA_OBJECT, Part 1 §19.8 dictionary attack protection): the AK's
    authValue is empty and it is never a password, so failures elsewhere (or the failedTries an unorderly
    shutdown adds, Part 1 §19.8.6) must not lock the attestation key out: a TPM in DA lockout still quotes.
The AK is bound to the EK by TPM2_MakeCredential (verifier side, software) / TPM2_ActivateCredential
(TPM side): only the TPM that holds both the EK private key and the AK named in the credential can
recover the secret. See enroll().

TCTI strings: "swtpm:host=127.0.0.1,port=2321", "device:/dev/tpmrm0", "mssim:...".
Every TPM failure raises TpmError (an IntegrityError): callers fail closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bulkhead.integrity.errors import IntegrityError, TpmError
from bulkhead.integrity.policy import Enrollment
from bulkhead.integrity.tpmwire import public_name

__all__ = ["SwTpm", "Tpm", "activate_challenge", "enroll", "make_challenge"]


def _pytss() -> Any:
    try:
        import tpm2_pytss
    except ImportError as exc:
        raise TpmError(f"tpm2-pytss is not installed or libtss2 is missing ({exc}); run ./install.sh") from None
    return tpm2_pytss


class Tpm:
    """An open TPM connection. Use as a context manager or call close(). Raises TpmError on failure."""

    def __init__(self, tcti: str) -> None:
        t = _pytss()
        name, _, conf = tcti.partition(":")
        if not name:
            raise TpmError(f"bad TCTI string {tcti!r} (expected e.g. swtpm:host=127.0.0.1,port=2321)")
        self.tcti = tcti
        self._t = t
        try:
            self._ctx = t.ESAPI(t.TCTILdr(name, conf or None))
        except Exception as exc:
            raise TpmError(f"cannot open the TPM at {tcti}: {exc}") from None
        self._ek: Any = None
        self._ek_pub: bytes = b""
        self._ak: Any = None
        self._ak_pub: bytes = b""

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx is None:
            return
        for h in (self._ek, self._ak):
            if h is not None:
                with contextlib.suppress(Exception):  # the TPM may be gone; nothing to release then
                    ctx.flush_context(h)
        with contextlib.suppress(Exception):
            ctx.close()

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        if self._ctx is None:
            raise TpmError("the TPM connection is closed")
        try:
            return fn(*args, **kw)
        except IntegrityError:
            raise
        except Exception as exc:
            raise TpmError(f"TPM {what} failed: {exc}") from None

    # ---- keys --------------------------------------------------------------------------------

    def _ensure_ek(self) -> None:
        if self._ek is not None:
            return
        t = self._t
        from tpm2_pytss.internal.templates import ek_template

        template = t.TPM2B_PUBLIC(publicArea=ek_template.lookup("EK-ECC256").template.publicArea)
        handle, pub, _, _, _ = self._call(
            "EK creation", self._ctx.create_primary, None, template, t.ESYS_TR.ENDORSEMENT
        )
        self._ek, self._ek_pub = handle, pub.publicArea.marshal()

    def _ensure_ak(self) -> None:
        if self._ak is not None:
            return
        t = self._t
        attrs = (
            t.TPMA_OBJECT.FIXEDTPM | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
            | t.TPMA_OBJECT.USERWITHAUTH | t.TPMA_OBJECT.RESTRICTED | t.TPMA_OBJECT.SIGN_ENCRYPT
            | t.TPMA_OBJECT.NODA  # Part 2 §8.3.3.1: not subject to dictionary-attack lockout
        )
        template = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs)
        handle, pub, _, _, _ = self._call(
            "AK creation", self._ctx.create_primary, None, template, t.ESYS_TR.ENDORSEMENT
        )
        self._ak, self._ak_pub = handle, pub.publicArea.marshal()

    def ek_public(self) -> bytes:
        """Marshalled TPMT_PUBLIC of the endorsement key."""
        self._ensure_ek()
        return bytes(self._ek_pub)

    def ak_public(self) -> bytes:
        """Marshalled TPMT_PUBLIC of the attestation key."""
        self._ensure_ak()
        return bytes(self._ak_pub)

    # ---- PCRs ----------------------------------------------------------------------------------

    def extend(self, pcr: int, value: bytes) -> None:
        """Extend the SHA-256 bank of PCR `pcr` with the 32-byte `value`."""
        t = self._t
        if len(value) != 32 or not 0 <= pcr <= 23:
            raise TpmError("extend needs a PCR 0..23 and a 32-byte SHA-256 value")
        digests = t.TPML_DIGEST_VALUES([t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256, digest=t.TPMU_HA(sha256=value))])
        self._call("PCR extend", self._ctx.pcr_extend, getattr(t.ESYS_TR, f"PCR{pcr}"), digests)

    def read_pcrs(self, pcrs: list[int]) -> dict[int, bytes]:
        """Current SHA-256 values of `pcrs`."""
        out: dict[int, bytes] = {}
        for i in sorted(set(pcrs)):
            _, _, digests = self._call("PCR read", self._ctx.pcr_read, f"sha256:{i}")
            values = list(digests)
            if len(values) != 1:
                raise TpmError(f"the TPM has no SHA-256 value for PCR {i}")
            out[i] = bytes(values[0])
        return out

    # ---- quote and credential activation ---------------------------------------------------------

    def quote(self, pcrs: list[int], qualifying_data: bytes) -> tuple[bytes, bytes]:
        """TPM2_Quote over the SHA-256 `pcrs` with the AK. Returns (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes)."""
        self._ensure_ak()
        t = self._t
        sel = "sha256:" + ",".join(str(i) for i in sorted(set(pcrs)))
        attest, sig = self._call(
            "quote", self._ctx.quote, self._ak, sel, t.TPM2B_DATA(qualifying_data)
        )
        return bytes(attest), sig.marshal()

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK (activate handle) and the EK (key handle)."""
        self._ensure_ek()
        self._ensure_ak()
        t = self._t
        blob, _ = t.TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = t.TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        ctx = self._ctx
        session = self._call(
            "policy session", ctx.start_auth_session, t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.POLICY,
            t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL), t.TPM2_ALG.SHA256,
        )
        try:
            self._call("PolicySecret(endorsement)", ctx.policy_secret, t.ESYS_TR.ENDORSEMENT, session)
            cred = self._call(
                "credential activation", ctx.activate_credential, self._ak, self._ek, blob, secret,
                session1=t.ESYS_TR.PASSWORD, session2=session,
            )
        finally:
            with contextlib.suppress(Exception):
                ctx.flush_context(session)
        return bytes(cred)


def make_challenge(ek_public: bytes, ak_name: bytes) -> tuple[bytes, bytes, bytes]:
    """Verifier side of the binding: TPM2_MakeCredential in software for (EK public, AK name).

    Returns (credential_blob, encrypted_secret, secret). Only a TPM holding that EK's private key AND a
    loaded object with exactly that AK name can recover `secret`.
    """
    t = _pytss()
    from tpm2_pytss.utils import make_credential

    try:
        public, _ = t.TPMT_PUBLIC.unmarshal(ek_public)
        secret = secrets.token_bytes(32)
        blob, enc = make_credential(t.TPM2B_PUBLIC(publicArea=public), secret, t.TPM2B_NAME(ak_name))
    except Exception as exc:
        raise IntegrityError(f"cannot make a credential challenge for this EK: {exc}") from None
    return blob.marshal(), enc.marshal(), secret


def activate_challenge(tpm: Tpm, blob: bytes, enc: bytes, secret: bytes) -> str:
    """Have `tpm` activate a challenge; return SHA-256 of the challenge on success.

    Raises IntegrityError when the TPM cannot recover the secret (its EK or AK is not the one challenged).
    """
    try:
        got = tpm.activate(blob, enc)
    except TpmError as exc:
        raise IntegrityError(f"AK/EK binding refused: the TPM could not activate the credential ({exc})") from None
    if not hmac.compare_digest(got, secret):
        raise IntegrityError("AK/EK binding refused: the activated credential does not match")
    return hashlib.sha256(blob + enc).hexdigest()


def enroll(tpm: Tpm, ek_public: bytes | None = None) -> Enrollment:
    """Enroll `tpm`'s AK: prove by credential activation that it lives in the TPM of `ek_public`.

    `ek_public` is the EK the verifier expects (e.g. from an EK certificate or a prior registration);
    by default the TPM's own EK is read. Raises IntegrityError when the binding cannot be proven.
    """
    ek = tpm.ek_public() if ek_public is None else ek_public
    ak_pub = tpm.ak_public()
    name = public_name(ak_pub)
    blob, enc, secret = make_challenge(ek, name)
    challenge = activate_challenge(tpm, blob, enc, secret)
    return Enrollment(ek, ak_pub, name, True, challenge)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise TpmError("no free pair of TCP ports for swtpm")


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the socket listening on 127.0.0.1:`port` (/proc/net/tcp state
    0A = LISTEN, matched by inode against /proc/<pid>/fd). A port chosen free can be taken by another
    process (a second dev TPM starting at the same moment) before swtpm binds it: then a connection to
    the port reaches *that* process's TPM, and only this check tells them apart."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[1] == want and cols[3] == "0A":
                    inodes.add(f"socket:[{cols[9]}]")
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Any:
    """A preexec_fn doing prctl(PR_SET_PDEATHSIG, SIGKILL) (prctl(2)), so swtpm dies with the process that
    started it, even when that process is SIGKILLed. libc is loaded here, before the fork (no import in the
    child). Note: the signal follows the *thread* that forked; SwTpm.start runs on the daemon's main thread."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def child() -> None:  # pragma: no cover - runs in the forked child before exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return child


def _stale_swtpm(pidfile: Path, state_dir: str) -> int | None:
    """The pid recorded in `pidfile` when it is still a swtpm serving `state_dir`, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if not argv or Path(os.fsdecode(argv[0])).name != "swtpm":
        return None
    if f"dir={state_dir}".encode() not in argv:
        return None
    return pid


def kill_stale_swtpm(state_dir: str, timeout: float = 5.0) -> int | None:
    """Kill a swtpm left running on `state_dir` by an earlier process (its pid is in <state_dir>/swtpm.pid
    and its command line names the directory): it holds the state's lock, and a second swtpm on the same
    state would refuse to start. Returns the pid killed, or None."""
    pidfile = Path(state_dir) / "swtpm.pid"
    pid = _stale_swtpm(pidfile, str(state_dir))
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if _stale_swtpm(pidfile, str(state_dir)) is None:
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


class SwTpm:
    """A swtpm process (TPM 2.0, TCP) for development and tests. Raises TpmError if it cannot start.

    It dies with the process that started it (PR_SET_PDEATHSIG), its pid is kept in
    <state_dir>/swtpm.pid, and a stale one left on the same state directory is killed first
    (kill_stale_swtpm). It counts as started only once this very process listens on both ports
    (`_listens`): a port taken by a concurrent swtpm makes it retry on another pair."""

    def __init__(self, state_dir: str | None = None, port: int | None = None) -> None:
        if shutil.which("swtpm") is None:
            raise TpmError("swtpm is not installed (Debian package swtpm)")
        self._own_dir = state_dir is None
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="bulkhead-swtpm-")
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self._want_port = port
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._last_error = ""

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self, timeout: float = 10.0) -> SwTpm:
        stale = kill_stale_swtpm(self.state_dir)
        if stale is not None:
            print(f"bulkhead: stopped a stale swtpm (pid {stale}) left on {self.state_dir}", file=sys.stderr)
        deadline = time.monotonic() + timeout
        again = self.port  # a restart keeps its port: clients hold the TCTI string
        for _attempt in range(5):
            self.port = self._want_port or again or _free_port_pair()
            if self._try_start(deadline):
                return self
            if self._want_port is not None or again:
                break
        raise TpmError(f"swtpm could not listen on 127.0.0.1 port {self.port}: {self._last_error}")

    def _try_start(self, deadline: float) -> bool:
        """One attempt on self.port; True once *this* swtpm listens on it. False when its port was taken
        (it exited); raises TpmError when it fails otherwise or does not come up before `deadline`."""
        cmd = [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
            "--tpmstate", f"dir={self.state_dir}",
            "--pid", f"file={Path(self.state_dir) / 'swtpm.pid'}",
            "--flags", "startup-clear,not-need-init",
        ]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, preexec_fn=_die_with_parent())
        except OSError as exc:
            raise TpmError(f"cannot run swtpm: {exc.strerror}") from None
        self._last_error = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                proc, self.proc = self.proc, None
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                if proc.stderr:
                    proc.stderr.close()
                if "in use" in err.lower() or "bind" in err.lower():  # the port was taken meanwhile: retry
                    self._last_error = err
                    return False
                raise TpmError(f"swtpm exited with status {proc.returncode}: {err}")
            if _listens(self.proc.pid, self.port) and _listens(self.proc.pid, self.port + 1):
                return True
            time.sleep(0.02)
        self.stop()
        raise TpmError(f"swtpm did not listen on port {self.port} in time")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        pidfile = Path(self.state_dir) / "swtpm.pid"
        if proc is not None and _stale_swtpm(pidfile, self.state_dir) == proc.pid:
            with contextlib.suppress(OSError):
                pidfile.unlink()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def cleanup(self) -> None:
        """Stop, and remove the state directory when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> SwTpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
