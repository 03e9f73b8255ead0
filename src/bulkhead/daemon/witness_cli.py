"""`bulkhead audit witness init|client|add-log|serve` (the witness's side, on another host) and
`bulkhead audit witness add|list` (the log host's side). docs/AUDIT.md.

Witness state directory (0700): ca.pem/ca.key (the witness's own CA: it alone decides who may submit),
server.pem/server.key, witness.key (ed25519 cosigning key), witness.vkey (its cosignature/v1 verifier
key), state.db (latest cosigned checkpoint per log), audit.* (its own audit log), clients/<name>/ (client
bundles: ca.pem, client.pem, client.key, witness.json, to copy to a log host), serve.json (while serving).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from pathlib import Path

from bulkhead.errors import ConfigError, HostError

__all__ = ["witness_main"]


def _paths(root: Path) -> dict[str, Path]:
    names = ("ca.pem", "ca.key", "server.pem", "server.key", "witness.key", "witness.vkey", "state.db",
             "audit.key", "audit.pub", "audit.db", "audit.checkpoint", "audit.vkey", "serve.json")
    return {n: root / n for n in names}


def _witness_key(root: Path) -> tuple[object, str]:
    from bulkhead.daemon.auditlog import load_audit_key

    p = _paths(root)
    if not p["witness.key"].exists():
        raise HostError(f"{root} is not a witness state directory (bulkhead audit witness init)")
    name = p["witness.vkey"].read_text().split("+", 1)[0]
    return load_audit_key(p["witness.key"]), name


def init_witness(root: Path, hosts: list[str] | None = None) -> str:
    """Create a witness state directory. Returns the witness's verifier key."""
    from bulkhead.control.audit import Record
    from bulkhead.control.note import ALG_COSIGNATURE, Verifier
    from bulkhead.daemon import pki
    from bulkhead.daemon.auditlog import AuditLog, load_audit_key, make_audit_key, make_origin, now_iso
    from bulkhead.daemon.witness import WitnessService

    p = _paths(root)
    if p["witness.key"].exists():
        raise ConfigError(f"{root} is already a witness state directory")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = pki.make_ca(cn="bulkhead witness CA")
    pki.write_private(p["ca.key"], pki.key_pem(ca.key))
    pki.write_private(p["ca.pem"], pki.cert_pem(ca.cert), 0o644)
    skey, scert = pki.issue_server(ca, hosts or ["127.0.0.1", "::1", "localhost", socket.gethostname()])
    pki.write_private(p["server.key"], pki.key_pem(skey))
    pki.write_private(p["server.pem"], pki.cert_pem(scert.cert), 0o644)
    make_audit_key(p["witness.key"], root / "witness.pub")
    name = make_origin("witness").replace("/witness/", "/witness-")
    vkey = Verifier.for_key(name, load_audit_key(p["witness.key"]), ALG_COSIGNATURE)
    pki.write_private(p["witness.vkey"], f"{vkey}\n".encode(), 0o644)
    make_audit_key(p["audit.key"], p["audit.pub"])
    log = AuditLog(p["audit.db"], load_audit_key(p["audit.key"]), p["audit.checkpoint"], create=True,
                   origin=make_origin("witness-audit"))
    pki.write_private(p["audit.vkey"], f"{log.verifier}\n".encode(), 0o644)
    log.append(Record.make(now_iso(), "system", {"witness": str(vkey)}, action="witness.init", result="ok"))
    log.close()
    WitnessService(p["state.db"], load_audit_key(p["witness.key"]), name, None).close()
    return str(vkey)


def make_client(root: Path, name: str, url: str) -> Path:
    """A client bundle for one log host: its mTLS identity at this witness, the witness's URL and key."""
    from bulkhead.daemon import pki

    p = _paths(root)
    _witness_key(root)
    ca = pki.CertBundle(pki.load_key(p["ca.key"]), pki.load_cert(p["ca.pem"]))
    key = pki.new_key()
    issued = pki.issue_client(ca, name, key.public_key(), days=825)
    d = root / "clients" / name
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki.write_private(d / "client.key", pki.key_pem(key))
    pki.write_private(d / "client.pem", pki.cert_pem(issued.cert), 0o644)
    pki.write_private(d / "ca.pem", p["ca.pem"].read_bytes(), 0o644)
    info = {"url": url, "verifier_key": p["witness.vkey"].read_text().strip(), "client": name}
    pki.write_private(d / "witness.json", json.dumps(info, indent=2).encode(), 0o644)
    return d


def _server_ssl(root: Path) -> ssl.SSLContext:
    p = _paths(root)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(p["server.pem"]), str(p["server.key"]))
        ctx.load_verify_locations(cafile=str(p["ca.pem"]))
    except (OSError, ssl.SSLError) as exc:
        raise HostError(f"cannot load the witness TLS material in {root}: {exc}") from None
    return ctx


def open_service(root: Path) -> object:
    from bulkhead.daemon.auditlog import AuditLog, load_audit_key
    from bulkhead.daemon.witness import WitnessService

    p = _paths(root)
    key, name = _witness_key(root)
    log = AuditLog(p["audit.db"], load_audit_key(p["audit.key"]), p["audit.checkpoint"])
    return WitnessService(p["state.db"], key, name, log)  # type: ignore[arg-type]


def serve_witness(root: Path, host: str, port: int) -> int:
    from bulkhead.control.audit import Record
    from bulkhead.daemon.auditlog import now_iso
    from bulkhead.daemon.witness import make_witness_server

    svc = open_service(root)
    srv = make_witness_server(svc, host, port, _server_ssl(root))  # type: ignore[arg-type]
    real = srv.server_address[1]
    log = svc.audit  # type: ignore[attr-defined]
    log.append(Record.make(now_iso(), "system", {"pid": os.getpid(), "port": real}, action="witness.start"))
    tmp = _paths(root)["serve.json"].with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": host, "port": real}))
    os.replace(tmp, _paths(root)["serve.json"])
    print(f"bulkhead witness listening on https://{host}:{real}", flush=True)

    def stop(*_: object) -> None:
        import threading

        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()
        _paths(root)["serve.json"].unlink(missing_ok=True)
        try:
            log.append(Record.make(now_iso(), "system", {"pid": os.getpid()}, action="witness.stop"))
        finally:
            log.close()
            svc.close()  # type: ignore[attr-defined]
    return 0


def _refuse_if_serving(root: Path) -> None:
    """One writer per witness audit log: `add-log` while `serve` runs is refused (stop it first)."""
    try:
        pid = int(json.loads(_paths(root)["serve.json"].read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return
    raise ConfigError(f"the witness is serving (pid {pid}); stop it, add the log, start it again")


def witness_main(argv: list[str]) -> int:
    from bulkhead.daemon.cli import _Parser, _run, _state_dir

    p = _Parser(prog="bulkhead audit witness", description="audit-log witnesses (docs/AUDIT.md)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    it = sub.add_parser("init", help="create a witness state directory (on the witness's host)")
    it.add_argument("--host", action="append", dest="hosts", help="server certificate name/IP (repeatable)")
    cl = sub.add_parser("client", help="make a client bundle for a log host")
    cl.add_argument("name")
    cl.add_argument("--url", required=True, help="https://host:port where log hosts reach this witness")
    al = sub.add_parser("add-log", help="witness this log (its verifier key, `bulkhead audit checkpoint --verifier-key`)")
    al.add_argument("verifier_key")
    sv = sub.add_parser("serve", help="run the witness")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8444, help="0 picks a free port (written to serve.json)")
    ad = sub.add_parser("add", help="register a witness with this log host (a client bundle directory)")
    ad.add_argument("bundle", type=Path)
    ls = sub.add_parser("list", help="the witnesses registered with this log host")
    for sp in (it, cl, al, sv, ad, ls):
        sp.add_argument("--state-dir", type=Path, default=None,
                        help="the witness's (init/client/add-log/serve) or the log host's (add/list) state directory")

    def go() -> int:
        args = p.parse_args(argv)
        root = _state_dir(args)
        if args.cmd == "init":
            print(f"witness initialized in {root}\n  verifier key  {init_witness(root, args.hosts)}")
            return 0
        if args.cmd == "client":
            print(f"client bundle {make_client(root, args.name, args.url)} (copy it to the log host, then "
                  "`bulkhead audit witness add DIR` there)")
            return 0
        if args.cmd == "add-log":
            from bulkhead.control.note import NoteError

            _refuse_if_serving(root)

            svc = open_service(root)
            try:
                print(f"witnessing {svc.add_log(args.verifier_key)}")  # type: ignore[attr-defined]
            except NoteError as exc:
                raise ConfigError(f"bad verifier key: {exc}") from None
            finally:
                svc.audit.close()  # type: ignore[attr-defined]
                svc.close()  # type: ignore[attr-defined]
            return 0
        if args.cmd == "serve":
            return serve_witness(root, args.host, args.port)
        from bulkhead.daemon.witness import WitnessOptions, register_witness

        if args.cmd == "add":
            spec = register_witness(root / "witnesses", args.bundle)
            print(f"registered witness {spec.name} at {spec.url}")
            return 0
        for s in WitnessOptions.registered(root / "witnesses").witnesses:
            print(f"{s.name}  {s.url}  {s.verifier}")
        return 0

    return _run(go)

