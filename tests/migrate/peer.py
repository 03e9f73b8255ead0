"""One side of a live migration, as its own process (the guest's vCPU loop needs a main thread).

  python -m tests.migrate.peer dest DIR ATTEST [jail]     listen on 127.0.0.1, port in DIR/port
  python -m tests.migrate.peer src DIR ATTEST KERNEL CMDLINE AFTER_LINES [CPUS]

ATTEST: "good" or "bad" (evidence keyed with another host's secret). Guest output goes to stdout; the
migration's result (JSON) to DIR/<side>.json."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any


class KeyedAttestation:
    """A test double of the attestation hook: evidence is an HMAC over the nonce under the host's secret;
    verify checks it with the secret enrolled for the peer. A host with another secret fails, as a host
    whose quote does not verify does (the TPM path is runtime/migrate.TpmAttestation)."""

    def __init__(self, mine: bytes, enrolled_peer: bytes) -> None:
        self.mine, self.peer = mine, enrolled_peer

    def evidence(self, nonce: str) -> dict[str, Any]:
        return {"mac": hmac.new(self.mine, nonce.encode(), hashlib.sha256).hexdigest()}

    def verify(self, evidence: dict[str, Any], nonce: str) -> list[str]:
        want = hmac.new(self.peer, nonce.encode(), hashlib.sha256).hexdigest()
        mac = evidence.get("mac")
        return [] if isinstance(mac, str) and hmac.compare_digest(mac, want) else ["quote does not verify"]


GOOD = b"fleet-enrolled-secret"


def attestation(kind: str) -> KeyedAttestation:
    return KeyedAttestation(b"an unenrolled host" if kind == "bad" else GOOD, GOOD)


def out(data: bytes) -> None:
    os.write(1, data)


def dest(d: Path, kind: str, jail: bool) -> int:
    from bulkhead.runtime.migrate import MigrationError, receive_vm, tls_context

    if kind == "die":  # the destination host dies (SIGKILL) when the first guest pages arrive
        from bulkhead.snapshot import wire

        def die(*a: object, **k: object) -> None:
            os.kill(os.getpid(), 9)

        wire.decode_pages = die  # type: ignore[assignment]

    ctx = tls_context(server=True, cert=str(d / "server.crt"), key=str(d / "server.key"), ca=str(d / "ca.crt"))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    (d / "port.tmp").write_text(str(lsock.getsockname()[1]))
    os.replace(d / "port.tmp", d / "port")
    while True:
        raw, _ = lsock.accept()
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as exc:  # a client without a valid certificate: refused, keep listening
            (d / "tls-refused.txt").write_text(str(exc))
            raw.close()
            continue
        break
    try:
        inc = receive_vm(conn, attestation(kind), serial="stdio")
    except MigrationError as exc:
        (d / "dest.json").write_text(json.dumps({"error": str(exc)}))
        return 3
    if jail:
        from bulkhead.sandbox.supervisor import run_jailed

        reason = run_jailed(inc.config, restore=inc.restore, console=out)
    else:
        from bulkhead.runtime.vm import run_vm

        reason = run_vm(inc.config, restore=inc.restore, console=out, console_input=False)
    (d / "dest.json").write_text(json.dumps({"reason": reason.kind, "status": reason.status}))
    return 0


def src(d: Path, kind: str, kernel: str, cmdline: str, after: int, cpus: int) -> int:
    from bulkhead.config import VmConfig
    from bulkhead.runtime.migrate import MigrationError, send_vm, tls_context
    from bulkhead.runtime.snapshot import guest_memfds
    from bulkhead.runtime.vm import Machine

    cfg = VmConfig(kernel=kernel, cmdline=cmdline, mem_mib=128, cpus=cpus, serial="stdio")
    memory_fd, _state_fd = guest_memfds(cfg.mem_bytes)
    lines = threading.Event()
    seen = [0]

    def console(data: bytes) -> None:
        out(data)
        seen[0] += data.count(b"\n")
        if seen[0] >= after:
            lines.set()

    m = Machine(cfg, console=console, console_input=False, measure=True, memory_fd=memory_fd)
    m.build()
    result: dict[str, Any] = {}

    def migrate() -> None:
        lines.wait()
        ctx = tls_context(server=False, cert=str(d / "client.crt"), key=str(d / "client.key"), ca=str(d / "ca.crt"))
        try:
            port = int((d / "port").read_text())
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                result.update(send_vm(m, conn, attestation(kind), vm_id="vm-1", launch_digest=m.launch_digest))
        except (MigrationError, OSError) as exc:
            result.update(error=str(exc), resumed=getattr(exc, "resumed", True))

    threading.Thread(target=migrate, daemon=True).start()
    try:
        reason = m.run()
    finally:
        m.close()
    result.update(reason=reason.kind, status=reason.status)
    (d / "src.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "dest":
        sys.exit(dest(Path(a[1]), a[2], len(a) > 3 and a[3] == "jail"))
    sys.exit(src(Path(a[1]), a[2], a[3], a[4], int(a[5]), int(a[6]) if len(a) > 6 else 1))
