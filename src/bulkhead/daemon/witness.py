"""Witnesses for the audit log (docs/AUDIT.md): the witness server, its durable state, and the daemon's
pusher with the quorum policy.

Witness (`bulkhead audit witness serve`, its own process, state directory, cosigning key, CA and mTLS
identity): C2SP tlog-witness `POST /add-checkpoint`. For a known log origin it checks the log's note
signature, then that `old` equals the size it last cosigned (else 409, `text/x.tlog.size`), then the
consistency proof from that checkpoint to the new one (RFC 9162 2.1.4.2, else 422), persists the new
checkpoint (SQLite, synchronous=FULL, committed before the answer) and answers with its cosignature
(C2SP tlog-cosignature, cosignature/v1). Unknown origin 404, no trusted signature 403, malformed 400,
old size larger than the checkpoint's 400, same size with another root 422 (the editor's draft; v1.0.0
said 409). Every decision is a record in the witness's own audit log. `GET /monitor/<hex sha256(origin)>/
checkpoint` serves the latest cosigned checkpoint (log signature + cosignature), which `bulkhead audit
verify --witness` compares with the local log.

Pusher (in the daemon): after every checkpoint (and at start, and every retry interval while failing)
each witness gets the head checkpoint with a consistency proof from the size it last cosigned (learned
from a 409 the first time). Policy: mutations are refused (503) once fewer than `quorum` witnesses have
cosigned the latest pushed checkpoint for longer than `grace` seconds; the default grace is 0: fail
closed from the start until the first quorum.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import sqlite3
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bulkhead.control.audit import Record, SignedCheckpoint, parse_signed
from bulkhead.control.merkle import EMPTY_ROOT, verify_consistency
from bulkhead.control.note import (
    ALG_COSIGNATURE,
    Checkpoint,
    NoteError,
    Verifier,
    cosign,
    format_add_checkpoint,
    open_note,
    parse_add_checkpoint,
    verify_cosignature,
)
from bulkhead.daemon.auditlog import AuditLog, now_iso
from bulkhead.errors import ConfigError, HostError

__all__ = ["WitnessClient", "WitnessOptions", "WitnessPusher", "WitnessService", "WitnessSpec",
           "witness_checkpoints"]

MAX_BODY = 1 << 16
STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS logs(origin TEXT PRIMARY KEY, vkey TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
  root BLOB, note TEXT NOT NULL DEFAULT '', updated TEXT NOT NULL DEFAULT '');
"""


def _origin_id(origin: str) -> str:
    return hashlib.sha256(origin.encode()).hexdigest()


# ---------------------------------------------------------------------- the witness
class WitnessService:
    """The witness's decisions over its durable state (no HTTP): `add_checkpoint(body)` returns
    (status, content type, body). `audit` is the witness's own audit log (None in unit tests)."""

    def __init__(self, state_db: Path, key: Ed25519PrivateKey, name: str, audit: AuditLog | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.key, self.name, self.audit, self.clock = key, name, audit, clock
        self.verifier = Verifier.for_key(name, key, ALG_COSIGNATURE)
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(str(state_db), isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(STATE_SCHEMA)
        except sqlite3.Error as exc:
            raise HostError(f"cannot open the witness state {state_db}: {exc}") from None

    def add_log(self, vkey: str) -> str:
        v = Verifier.parse(vkey)
        with self._lock:
            self.db.execute("INSERT INTO logs(origin, vkey) VALUES (?, ?) ON CONFLICT(origin) DO UPDATE SET "
                            "vkey = excluded.vkey", (v.name, str(v)))
        self._audit("witness.add-log", v.name, "ok", {"verifier_key": str(v)})
        return v.name

    def _audit(self, action: str, origin: str, result: str, detail: dict[str, Any]) -> None:
        if self.audit is not None:  # a refused audit append refuses the request (fail closed)
            self.audit.append(Record.make(now_iso(), "system", detail, action=action, scope=origin, result=result))

    def latest(self, origin_id: str) -> str | None:
        for origin, note in self.db.execute("SELECT origin, note FROM logs WHERE note != ''").fetchall():
            if _origin_id(origin) == origin_id:
                return str(note)
        return None

    def add_checkpoint(self, body: bytes) -> tuple[int, str, bytes]:
        with self._lock:
            status, ctype, out, why, origin, size = self._decide(body)
            try:
                self._audit("witness.add-checkpoint", origin, str(status), {"why": why, "size": size})
            except Exception as exc:
                return 503, "text/plain", f"the witness's audit log is unavailable: {exc}\n".encode()
            return status, ctype, out

    def _decide(self, body: bytes) -> tuple[int, str, bytes, str, str, int]:
        def no(status: int, why: str, origin: str = "", size: int = -1) -> tuple[int, str, bytes, str, str, int]:
            return status, "text/plain", (why + "\n").encode(), why, origin, size

        try:
            req = parse_add_checkpoint(body)
            text = req.note[: req.note.rfind("\n\n") + 1]
            cp = Checkpoint.parse(text)
        except NoteError as exc:
            return no(400, f"malformed request: {exc}")
        row = self.db.execute("SELECT vkey, size, root, note FROM logs WHERE origin = ?", (cp.origin,)).fetchone()
        if row is None:
            return no(404, "unknown log origin", cp.origin, cp.size)
        try:
            open_note(req.note, Verifier.parse(row[0]))
        except NoteError as exc:
            return no(403, f"no trusted signature: {exc}", cp.origin, cp.size)
        known, known_root = int(row[1]), bytes(row[2]) if row[2] is not None else EMPTY_ROOT
        if req.old > cp.size:
            return no(400, "old size is larger than the checkpoint's", cp.origin, cp.size)
        if req.old != known:
            return 409, "text/x.tlog.size", f"{known}\n".encode(), f"old {req.old} != known {known}", cp.origin, cp.size
        if cp.size == 0 and cp.root != EMPTY_ROOT:
            return no(422, "a size-0 checkpoint must carry the empty-tree root", cp.origin, cp.size)
        if req.old == cp.size and cp.root != known_root:
            return no(422, f"a different root for size {known}: the log forked", cp.origin, cp.size)
        if not verify_consistency(known, cp.size, known_root, cp.root, list(req.proof)):
            return no(422, f"the consistency proof from {known} to {cp.size} does not verify", cp.origin, cp.size)
        t = int(self.clock())
        sig = cosign(text, self.name, self.key, t)
        stored = req.note + sig  # the log's signatures and ours: what the monitoring endpoint serves
        self.db.execute("UPDATE logs SET size = ?, root = ?, note = ?, updated = ? WHERE origin = ?",
                        (cp.size, cp.root, stored, now_iso(), cp.origin))
        return 200, "text/plain", sig.encode(), "cosigned", cp.origin, cp.size

    def close(self) -> None:
        self.db.close()


class _Handler(BaseHTTPRequestHandler):
    server: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path != "/add-checkpoint":
            self._send(404, "text/plain", b"not found\n")
            return
        try:
            n = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            self._send(400, "text/plain", b"a body of at most 64 KiB with Content-Length\n")
            return
        self._send(*self.server.service.add_checkpoint(self.rfile.read(n)))

    def do_GET(self) -> None:
        parts = self.path.split("/")
        if len(parts) == 4 and parts[1] == "monitor" and parts[3] == "checkpoint":
            note = self.server.service.latest(parts[2])
            if note is not None:
                self._send(200, "text/plain", note.encode())
                return
        self._send(404, "text/plain", b"not found\n")


def make_witness_server(service: WitnessService, host: str, port: int, ssl_ctx: ssl.SSLContext) -> ThreadingHTTPServer:
    """The witness's HTTPS server (mTLS: `ssl_ctx` requires a client certificate from its CA)."""
    try:
        srv = ThreadingHTTPServer((host, port), _Handler)
    except OSError as exc:
        raise HostError(f"cannot listen on {host}:{port}: {exc}") from None
    srv.socket = ssl_ctx.wrap_socket(srv.socket, server_side=True)
    srv.service = service  # type: ignore[attr-defined]
    srv.daemon_threads = True
    return srv


# ---------------------------------------------------------------------- the daemon's side
@dataclass(frozen=True)
class WitnessSpec:
    """One registered witness: <state-dir>/witnesses/<dir>/witness.json + ca.pem client.pem client.key."""

    name: str
    url: str
    verifier: Verifier
    ca: Path
    cert: Path
    key: Path

    @staticmethod
    def load(d: Path) -> WitnessSpec:
        try:
            info = json.loads((d / "witness.json").read_text())
            v = Verifier.parse(info["verifier_key"])
            url = str(info["url"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HostError(f"bad witness registration {d}: {exc}") from None
        if v.alg != ALG_COSIGNATURE:
            raise HostError(f"{d}: the witness key is not a cosignature/v1 key")
        return WitnessSpec(v.name, url, v, d / "ca.pem", d / "client.pem", d / "client.key")


def register_witness(witnesses_dir: Path, bundle: Path) -> WitnessSpec:
    """Copy a client bundle made by `bulkhead audit witness init --client` under witnesses/."""
    spec = WitnessSpec.load(bundle)
    dest = witnesses_dir / _origin_id(spec.name)[:16]
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in ("witness.json", "ca.pem", "client.pem", "client.key"):
        shutil.copyfile(bundle / f, dest / f)
    (dest / "client.key").chmod(0o600)
    return WitnessSpec.load(dest)


@dataclass
class WitnessOptions:
    witnesses: list[WitnessSpec] = field(default_factory=list)
    quorum: int = 0  # 0: all of them
    grace: float = 0.0  # seconds without quorum before mutations are refused
    checkpoint_interval: float = 60.0
    retry: float = 2.0

    @staticmethod
    def registered(d: Path, select: list[str] | None = None, **kw: Any) -> WitnessOptions:
        """The witnesses registered under `d` (`select`: only these names or URLs; all must exist)."""
        specs = [WitnessSpec.load(x) for x in sorted(d.iterdir()) if (x / "witness.json").exists()] \
            if d.is_dir() else []
        if select:
            chosen = [s for s in specs if s.name in select or s.url in select]
            missing = set(select) - {s.name for s in chosen} - {s.url for s in chosen}
            if missing:
                raise ConfigError(f"not registered witnesses: {', '.join(sorted(missing))} (bulkhead audit "
                                  "witness add)")
            specs = chosen
        opts = WitnessOptions(specs, **kw)
        if opts.quorum > len(specs):
            raise ConfigError(f"a quorum of {opts.quorum} needs at least that many witnesses ({len(specs)} given)")
        return opts


class WitnessClient:
    def __init__(self, spec: WitnessSpec, timeout: float = 5.0) -> None:
        self.spec = spec
        u = urllib.parse.urlsplit(spec.url)
        if u.scheme != "https" or not u.hostname:
            raise ConfigError(f"witness URL {spec.url!r} is not https://host:port")
        self.host, self.port, self.prefix = u.hostname, u.port or 443, u.path.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=str(spec.ca))
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(str(spec.cert), str(spec.key))
        self.timeout = timeout

    def _call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=self.timeout)
        try:
            conn.request(method, self.prefix + path, body=body, headers={"Content-Type": "text/plain"})
            r = conn.getresponse()
            return r.status, r.getheader("Content-Type", ""), r.read(MAX_BODY + 1)
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            raise HostError(f"witness {self.spec.url}: {exc}") from None
        finally:
            conn.close()

    def add_checkpoint(self, old: int, proof: list[bytes], note: str) -> tuple[int, str, bytes]:
        return self._call("POST", "/add-checkpoint", format_add_checkpoint(old, proof, note))

    def latest(self, origin: str) -> str | None:
        status, _, body = self._call("GET", f"/monitor/{_origin_id(origin)}/checkpoint")
        return body.decode("utf-8", "replace") if status == 200 else None


class WitnessPusher:
    """Pushes the log's checkpoints to its witnesses and keeps the quorum state (thread-safe)."""

    def __init__(self, audit: AuditLog, opts: WitnessOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.audit, self.opts, self.clock = audit, opts, clock
        self.clients = [WitnessClient(s) for s in opts.witnesses]
        self.quorum = opts.quorum or len(self.clients)
        self.known: dict[str, int] = {}  # witness name -> size it last cosigned (learned from 409s)
        self.cosigned: dict[str, int] = {}  # witness name -> size of our checkpoint it cosigned
        self.errors: dict[str, str] = {}
        self.lost_since: float | None = clock()  # no quorum yet
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        audit.on_checkpoint = lambda note: self._wake.set()

    def refusal(self) -> str:
        """Empty when mutations may go on; else why not."""
        with self._lock:
            if self.lost_since is None or self.clock() - self.lost_since <= self.opts.grace:
                return ""
            errs = "; ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "no cosignature yet"
            return f"fewer than {self.quorum} witnesses cosigned the latest checkpoint ({errs})"

    def push_once(self) -> bool:
        """Push the head checkpoint to every witness; True when a quorum cosigned it."""
        note = self.audit.head_note()
        size = Checkpoint.parse(note[: note.rfind("\n\n") + 1]).size
        ok = 0
        reader = self.audit.reader()
        try:
            for c in self.clients:
                name = c.spec.name
                try:
                    if self.cosigned.get(name) == size or self._push(c, reader, note, size):
                        ok += 1
                        self.errors.pop(name, None)
                except HostError as exc:
                    self.errors[name] = str(exc)
        finally:
            reader.conn.close()
        with self._lock:
            if ok >= self.quorum:
                self.lost_since = None
            elif self.lost_since is None:
                self.lost_since = self.clock()
        return ok >= self.quorum

    def _push(self, c: WitnessClient, reader: Any, note: str, size: int) -> bool:
        name = c.spec.name
        for _ in range(3):
            old = self.known.get(name, 0)
            if old > size:
                self.errors[name] = f"the witness has cosigned {old} records, the log has {size}: rollback?"
                return False
            proof = reader.consistency(old, size)["path"] if 0 < old < size else []
            status, ctype, body = c.add_checkpoint(old, [bytes.fromhex(p) for p in proof], note)
            if status == 409 and ctype.startswith("text/x.tlog.size"):
                text = body.decode("ascii", "replace").strip()
                if not text.isdigit():
                    break
                self.known[name] = int(text)
                continue
            if status != 200:
                self.errors[name] = f"refused ({status}): {body[:200].decode('utf-8', 'replace').strip()}"
                return False
            try:
                verify_cosignature(note + body.decode(), c.spec.verifier)
            except (NoteError, UnicodeDecodeError) as exc:
                self.errors[name] = f"bad cosignature: {exc}"
                return False
            self.known[name] = self.cosigned[name] = size
            return True
        self.errors[name] = "the witness keeps answering 409"
        return False

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    good = self.push_once()
                except Exception as exc:  # the pusher must not die
                    print(f"bulkheadd: witness push: {exc!r}", flush=True)
                    good = False
                self._wake.wait(None if good else self.opts.retry)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="witness-push", daemon=True)
        self._thread.start()

    def stop(self, final: bool = False) -> None:
        """Stop pushing; `final`: push the shutdown checkpoint once more, unless the witnesses were
        failing (a shutdown is not held up by an unreachable witness)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if final and not self.errors:
            try:
                self.push_once()
            except Exception as exc:  # shutdown goes on; the next start pushes again
                print(f"bulkheadd: final witness push: {exc!r}", flush=True)


def witness_checkpoints(state_dir: Path, select: list[str], verifier: Verifier) -> list[SignedCheckpoint]:
    """Each selected witness's latest cosigned checkpoint of this log (cosignature and log signature
    checked). Raises HostError when a witness is unreachable, does not know the log, or answers with a
    checkpoint it did not cosign: verification against a witness fails closed."""
    opts = WitnessOptions.registered(state_dir / "witnesses", None if select == ["all"] else select)
    if not opts.witnesses:
        raise HostError("no witnesses registered (bulkhead audit witness add)")
    out = []
    for spec in opts.witnesses:
        note = WitnessClient(spec).latest(verifier.name)
        if note is None:
            raise HostError(f"witness {spec.name} has no checkpoint of {verifier.name} (a new log, or another one)")
        try:
            verify_cosignature(note, spec.verifier)
            out.append(parse_signed(note, verifier, f"witness {spec.name}"))
        except NoteError as exc:
            raise HostError(f"witness {spec.name}: {exc}") from None
    return out
