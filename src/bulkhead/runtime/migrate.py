"""Live migration of a running VM to another host: pre-copy with KVM dirty logging, then stop-and-copy
(docs/MIGRATION.md; issue 20). Edge module: sockets, TLS, KVM.

Source (send_vm, on a thread while Machine.run() runs the guest):
1. attestation both ways (the destination's first: not a byte of guest memory goes to an unverified host);
2. dirty logging on (hypervisor/kvm/dirty.py), then every non-zero page (runtime/snapshot.memfd_runs);
3. rounds of the pages dirtied meanwhile, until few are left or MAX_ROUNDS;
4. pause the vCPUs, send the last dirty pages and the machine state (runtime/snapshot.save_state: the same
   document a snapshot holds, so device state is just another section of it), wait for `ready`;
5. send `commit`, wait for `running`, then stop the source VM with reason "migrated".
Any failure before `commit` is sent: dirty logging off, vCPUs resumed: the guest goes on here, nothing lost.
After `commit` the VM belongs to the destination; if `running` never comes, the source keeps it paused
and reports that (the VM never runs on both hosts).

Destination (receive_vm): verifies the offer and the source's attestation, receives pages into a fresh
sealed memfd, and hands back a RestoreSource that runtime/vm.run_vm or sandbox/supervisor.run_jailed
restores exactly like a snapshot: the same state checks, jail, seccomp, and launch-digest policy.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from bulkhead import __version__
from bulkhead.errors import ConfigError, HostError, SnapshotError
from bulkhead.snapshot import wire
from bulkhead.snapshot.format import FORMAT, MAX_CPUS, MAX_MEM, PAGE

Machine = Any  # bulkhead.runtime.vm.Machine
__all__ = ["Attestation", "Incoming", "MigrationError", "receive_vm", "send_vm", "tls_context"]

MAX_ROUNDS = 8
SMALL_DIRTY = 64  # pages: stop iterating when a round leaves at most this many
TIMEOUT = 30.0


class MigrationError(HostError):
    """A migration that did not happen; `resumed` says whether the source VM runs on."""

    def __init__(self, message: str, *, resumed: bool = True) -> None:
        super().__init__(message)
        self.resumed = resumed


class Attestation(Protocol):
    """This host's evidence over a peer's nonce, and the verification of a peer's evidence.
    verify returns the reasons it is not trusted (empty: trusted). Never trust a peer's own verdict."""

    def evidence(self, nonce: str) -> dict[str, Any]: ...

    def verify(self, evidence: dict[str, Any], nonce: str) -> list[str]: ...


class TpmAttestation:
    """The fleet's attestation (integrity/attest.verify_evidence, the verifier the fleet controller uses):
    quotes from this host's TPM (fleet/agent.TpmAttestor), checked against the peer's enrolled AK and the
    host policy."""

    def __init__(self, attestor: Any, policy: str, peer_enrollment: str) -> None:
        self.attestor, self.policy, self.peer = attestor, policy, peer_enrollment

    def evidence(self, nonce: str) -> dict[str, Any]:
        return dict(self.attestor.evidence(nonce))

    def verify(self, evidence: dict[str, Any], nonce: str) -> list[str]:
        from bulkhead.integrity.attest import verify_evidence

        verdict = verify_evidence(evidence, self.policy, self.peer, nonce)
        return [] if verdict.trusted else list(verdict.reasons) or ["untrusted"]


def tls_context(*, server: bool, cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3, both sides present a certificate of the hosts' CA (the daemons' mTLS identities)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the migration TLS identity ({cert}, {key}, {ca}): {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("the peer closed the migration stream")
            buf += chunk
        return bytes(buf)

    def expect(self, kind: bytes, what: str) -> bytes:
        got, payload = wire.read_frame(self.recv_exact)
        if got == b"X":
            reason = wire.parse_json(payload, "abort").get("reason", "no reason given")
            raise MigrationError(f"the peer refused the migration: {reason}")
        if got != kind:
            raise SnapshotError(f"migration stream: expected {what}, got frame {got!r}")
        return payload

    def abort(self, reason: str) -> None:
        try:
            self.send(wire.json_frame(b"X", {"reason": reason[:500]}))
        except OSError:
            pass


def _page_frames(mem_bytes: int) -> int:
    from bulkhead.memory.layout import ram_regions

    return max(b + s for b, s in ram_regions(mem_bytes)) // PAGE


# -- source --------------------------------------------------------------------------------------


def _send_pfns(conn: _Conn, machine: Machine, pfns: list[int]) -> int:
    """Send the listed pages (ascending) as runs of consecutive frames."""
    mem = machine.mem
    i = 0
    while i < len(pfns):
        j = i + 1
        while j < len(pfns) and pfns[j] == pfns[j - 1] + 1 and j - i < wire.MAX_PAGES:
            j += 1
        conn.send(wire.encode_pages(pfns[i], mem.view(pfns[i] * PAGE, (j - i) * PAGE)))
        i = j
    return len(pfns)


def _handshake_source(conn: _Conn, att: Attestation, offer: dict[str, Any]) -> None:
    conn.send(wire.json_frame(b"O", offer))
    ev = wire.parse_json(conn.expect(b"E", "the destination's evidence"), "evidence")
    theirs, their_nonce = ev.get("evidence"), ev.get("nonce")
    if not isinstance(theirs, dict) or not isinstance(their_nonce, str) or not 16 <= len(their_nonce) <= 128:
        raise SnapshotError("migration stream: the destination's evidence frame is malformed")
    reasons = att.verify(theirs, offer["nonce"])
    if reasons:
        conn.abort("the destination host failed attestation")
        raise MigrationError(f"the destination host failed attestation: {'; '.join(reasons)}")
    conn.send(wire.json_frame(b"E", {"evidence": att.evidence(their_nonce), "nonce": offer["nonce"]}))
    conn.expect(b"A", "accept")


def send_vm(machine: Machine, sock: socket.socket, att: Attestation, *, vm_id: str,
            launch_digest: str | None, max_rounds: int = MAX_ROUNDS, small: int = SMALL_DIRTY) -> dict[str, Any]:
    """Migrate the running `machine` over `sock` (a TLS socket, connected). Returns the measurements
    (total_ms, downtime_ms, rounds, pages, bytes). Raises MigrationError (resumed=True: the guest runs on
    here) or, after commit without confirmation, MigrationError(resumed=False)."""
    from bulkhead.hypervisor.kvm.dirty import DirtyLog
    from bulkhead.runtime.exits import ExitReason
    from bulkhead.runtime.snapshot import _mapped, _state, memfd_runs

    if machine.transports:
        raise MigrationError("live migration of VMs with virtio devices is not supported yet (docs/MIGRATION.md)")
    if machine.memory_fd < 0:
        raise MigrationError("live migration needs the VM's memory in the host's memfd")
    cfg = machine.config
    sock.settimeout(TIMEOUT)
    conn = _Conn(sock)
    t0 = time.monotonic()
    stats: dict[str, Any] = {"rounds": 0, "pages": 0}
    offer = {"version": __version__, "vm_id": vm_id, "launch_digest": launch_digest, "mem_bytes": cfg.mem_bytes,
             "cpus": cfg.cpus, "nonce": secrets.token_hex(16)}
    log = DirtyLog(machine.vm, [(r.base, r.size, r.host_addr) for r in machine.mem.regions])
    paused = committed = False
    try:
        _handshake_source(conn, att, offer)
        log.enable()
        with _mapped(machine.memory_fd, cfg.mem_bytes) as view:
            for pfn, n, data in memfd_runs(view, cfg.mem_bytes, machine.memory_fd):
                conn.send(wire.encode_pages(pfn, data))
                stats["pages"] += n
            del data
        dirty = log.collect()
        while stats["rounds"] < max_rounds and len(dirty) > small:
            stats["rounds"] += 1
            stats["pages"] += _send_pfns(conn, machine, dirty)
            dirty = log.collect()
        t_pause = time.monotonic()
        _pause(machine)
        paused = True
        if machine.serial is not None:
            machine.serial.flush()  # what the guest printed here is printed here
        stats["pages"] += _send_pfns(conn, machine, sorted({*log.collect(), *dirty}))
        doc = _state(machine)  # what save_state writes, without its quiescing KVM_RUN: see _pause
        conn.send(wire.json_frame(b"S", doc))
        conn.expect(b"R", "ready")
        conn.send(wire.json_frame(b"C", {}))
        committed = True
        conn.expect(b"U", "running")
        t_end = time.monotonic()
    except Exception as exc:  # any failure (a bug included) must leave the guest running here, never paused
        if committed:
            raise MigrationError(f"the destination did not confirm that it runs the VM ({exc}); the VM is "
                                 "held paused here", resumed=False) from None
        conn.abort(str(exc))
        try:
            log.disable()
        finally:
            if paused:
                machine.resume()
        if isinstance(exc, MigrationError):
            raise
        raise MigrationError(f"migration failed, the VM runs on here: {type(exc).__name__}: {exc}") from None
    stats.update(total_ms=round((t_end - t0) * 1000, 1), downtime_ms=round((t_end - t_pause) * 1000, 1),
                 bytes=conn.sent)
    machine.request_stop(ExitReason.of("migrated", f"migrated ({stats['pages']} pages, downtime "
                                                   f"{stats['downtime_ms']} ms)"))
    return stats


def _pause(machine: Machine, timeout: float = 5.0) -> None:
    """Hold every vCPU outside KVM_RUN. A vCPU parks only after KVM_RUN returned EINTR, and KVM completes a
    pending I/O instruction before it looks at immediate_exit (api.rst §4.3: arch/x86 runs
    complete_userspace_io first), so the state read next is at an instruction boundary; the extra KVM_RUN
    of runtime/snapshot.save_state (from this thread: a vCPU pid change, tens of ms) is not needed."""
    machine.pause()
    deadline = time.monotonic() + timeout
    while not all(r.paused or not (r.thread and r.thread.is_alive()) for r in machine.runners):
        if time.monotonic() > deadline:
            raise MigrationError("the vCPUs did not pause")
        for r in machine.runners:
            r.kick()
        time.sleep(0.0005)


# -- destination ---------------------------------------------------------------------------------


class Incoming(NamedTuple):
    """A received VM: its config, the RestoreSource to run it from, the offer, and the measurements."""

    config: Any
    restore: Any
    offer: dict[str, Any]
    peer: str


def _handshake_dest(conn: _Conn, att: Attestation,
                    allow_digest: Callable[[str | None], str | None] | None) -> dict[str, Any]:
    """Check the offer, quote over the source's nonce, verify the source's quote over ours, check the
    launch digest against this host's policy. Sends `accept`, or `abort` and raises."""
    try:
        offer = wire.check_offer(wire.parse_json(conn.expect(b"O", "an offer"), "offer"),
                                 max_mem=MAX_MEM, max_cpus=MAX_CPUS)
        nonce = secrets.token_hex(16)
        conn.send(wire.json_frame(b"E", {"evidence": att.evidence(offer["nonce"]), "nonce": nonce}))
        ev = wire.parse_json(conn.expect(b"E", "the source's evidence"), "evidence")
        if not isinstance(ev.get("evidence"), dict):
            raise SnapshotError("migration stream: the source's evidence frame is malformed")
        reasons = att.verify(ev["evidence"], nonce)
        if reasons:
            raise MigrationError(f"the source host failed attestation: {'; '.join(reasons)}")
        if offer["version"] != __version__:
            raise MigrationError(f"the source runs bulkhead {offer['version']}, this host {__version__}")
        if allow_digest is not None:
            why = allow_digest(offer["launch_digest"])
            if why:
                raise MigrationError(f"the VM's launch digest is not allowed here: {why}")
    except (MigrationError, SnapshotError) as exc:
        conn.abort(str(exc))
        raise
    conn.send(wire.json_frame(b"A", {}))
    return offer


def _receive_memory(conn: _Conn, memory_fd: int, mem_bytes: int) -> bytes:
    """P frames into the memfd until the S frame, whose payload is returned."""
    from bulkhead.runtime.snapshot import _flat_regions, _mapped

    frames = _page_frames(mem_bytes)
    flat = _flat_regions(mem_bytes)
    with _mapped(memory_fd, mem_bytes) as view:
        while True:
            kind, payload = wire.read_frame(conn.recv_exact)
            if kind == b"X":
                raise MigrationError(f"the source aborted: {wire.parse_json(payload, 'abort').get('reason')}")
            if kind == b"S":
                return payload
            if kind != b"P":
                raise SnapshotError(f"migration stream: unexpected frame {kind!r} among the pages")
            pfn, n, data = wire.decode_pages(payload, page_frames=frames)
            addr = pfn * PAGE
            for base, size, off in flat:
                if base <= addr and addr + n * PAGE <= base + size:
                    view[off + addr - base : off + addr - base + n * PAGE] = data
                    break
            else:
                raise SnapshotError(f"migration stream: pages {pfn:#x}+{n} are outside guest RAM")
            del data


def receive_vm(sock: socket.socket, att: Attestation, *, serial: str = "stdio",
               allow_digest: Callable[[str | None], str | None] | None = None,
               on_running: Callable[[], None] | None = None) -> Incoming:
    """Receive one VM over `sock` (a TLS server socket, handshaken). `allow_digest(digest)` returns None
    when this host's policy allows the launch digest, else the reason it does not (checked before any
    page is accepted). The returned RestoreSource's on_built sends `ready`, waits for `commit` and sends
    `running`; if commit does not come, it raises and the VM never runs here.
    Raises MigrationError/SnapshotError; the memfds of a failed receive are closed here."""
    import bulkhead.hypervisor.kvm.state
    import bulkhead.runtime.vm  # noqa: F401 - imported now, not during the downtime
    from bulkhead.runtime.snapshot import (
        RestoreSource,
        _check_config,
        guest_memfds,
        load_restore_state,
        write_state_fd,
    )

    sock.settimeout(TIMEOUT)
    conn = _Conn(sock)
    offer = _handshake_dest(conn, att, allow_digest)
    mem_bytes = offer["mem_bytes"]
    memory_fd, state_fd = guest_memfds(mem_bytes)
    try:
        state = wire.parse_json(_receive_memory(conn, memory_fd, mem_bytes), "state")
        header = {"format": FORMAT, "bulkhead": __version__, "snapshot_id": uuid.uuid4().hex,
                  "vm_id": offer["vm_id"], "launch_digest": offer["launch_digest"], "host_key_id": "migration",
                  "created": int(time.time()), "mem_bytes": mem_bytes, "cpus": offer["cpus"]}
        write_state_fd(state_fd, {"header": header, "state": state})
        header, checked = load_restore_state(state_fd)  # the snapshot's schema checks, all of them
        config = _check_config(state["config"], header, serial)
    except (OSError, EOFError, SnapshotError, MigrationError, ConfigError) as exc:
        conn.abort(str(exc))
        os.close(memory_fd)
        os.close(state_fd)
        if isinstance(exc, MigrationError | SnapshotError):
            raise
        raise MigrationError(f"the migration stream broke: {exc}") from None

    def on_built() -> None:
        try:
            conn.send(wire.json_frame(b"R", {}))
            conn.expect(b"C", "commit")
            conn.send(wire.json_frame(b"U", {}))
        except (OSError, EOFError, SnapshotError) as exc:
            raise MigrationError(f"the source did not commit the migration ({exc}); the VM does not run here") from None
        if on_running is not None:
            on_running()

    return Incoming(config, RestoreSource(header, checked, memory_fd, state_fd, on_built), offer, _peer_name(sock))


def _peer_name(sock: socket.socket) -> str:
    try:
        cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    except ValueError:
        cert = None
    for rdn in (cert or {}).get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return "unknown"

