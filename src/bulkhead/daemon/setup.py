"""`bulkhead init`: create a state directory with the CA, the server certificate, the first admin
client certificate (Owner at /), the audit signing key and empty databases. Raises ConfigError when the
directory is already initialized (unless force), HostError when files cannot be written."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bulkhead.daemon import pki
from bulkhead.daemon.auditlog import AuditLog, load_audit_key, make_audit_key
from bulkhead.daemon.daemon import StateDir
from bulkhead.daemon.store import Store
from bulkhead.errors import ConfigError, HostError

__all__ = ["init_state_dir", "issue_local"]


def init_state_dir(root: Path, admin_name: str = "admin", hosts: list[str] | None = None, force: bool = False) -> StateDir:
    sd = StateDir(root)
    if sd.state_db.exists() and not force:
        raise ConfigError(f"{root} is already initialized (state.db exists); use --force to start over")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
    except OSError as exc:
        raise HostError(f"cannot create {root}: {exc}") from None
    if force:
        for p in (sd.state_db, sd.audit_db, sd.checkpoint, sd.audit_vkey):
            for suffix in ("", "-wal", "-shm"):
                Path(str(p) + suffix).unlink(missing_ok=True)
    ca = pki.make_ca()
    pki.write_private(sd.ca_key, pki.key_pem(ca.key))
    pki.write_private(sd.ca_cert, pki.cert_pem(ca.cert), 0o644)
    names = hosts or ["127.0.0.1", "::1", "localhost", socket.gethostname()]
    skey, scert = pki.issue_server(ca, names)
    pki.write_private(sd.server_key, pki.key_pem(skey))
    pki.write_private(sd.server_cert, pki.cert_pem(scert.cert), 0o644)
    make_audit_key(sd.audit_key, sd.audit_pub)
    store = Store(sd.state_db)
    store.initialize()
    akey = pki.new_key()
    issued = pki.issue_client(ca, admin_name, akey.public_key(), days=365)
    pid = store.add_principal(admin_name)
    store.add_cert(pid, issued.fingerprint, issued.serial, issued.not_after)
    owner = store.q1("SELECT id FROM roles WHERE name = 'Owner'")
    assert owner is not None
    with store.txn() as c:
        from bulkhead.daemon.store import new_id

        c.execute("INSERT INTO assignments VALUES (?,?,?,?)", (new_id(), pid, owner["id"], "/"))
    store.close()
    pki.write_private(sd.admin_key, pki.key_pem(akey))
    pki.write_private(sd.admin_cert, pki.cert_pem(issued.cert), 0o644)
    log = AuditLog(sd.audit_db, load_audit_key(sd.audit_key), sd.checkpoint, create=True)  # docs/AUDIT.md
    pki.write_private(sd.audit_vkey, f"{log.verifier}\n".encode(), 0o644)
    from bulkhead.control.audit import Record
    from bulkhead.daemon.auditlog import now_iso

    log.append(Record.make(now_iso(), "system", {"admin": pid, "admin_fingerprint": issued.fingerprint},
                           action="init", result="ok"))
    log.close()
    for sub in ("images", "disks", "vms"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    return sd


def issue_local(sd: StateDir, name: str, days: int = 365) -> tuple[bytes, bytes, pki.Issued]:
    """Mint a key + certificate with the CA in the state directory, WITHOUT registering it (used by
    tests and by `cert issue --offline` output that an admin then registers)."""
    ca = pki.CertBundle(pki.load_key(sd.ca_key), pki.load_cert(sd.ca_cert))
    key = pki.new_key()
    issued = pki.issue_client(ca, name, key.public_key(), days=days)
    return pki.key_pem(key), pki.cert_pem(issued.cert), issued
