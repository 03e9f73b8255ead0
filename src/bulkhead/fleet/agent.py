"""The host agent: `bulkhead serve --fleet URL[,URL...] --host-id NAME` (docs/FLEET.md "Host agent").

Three threads:
- the lease thread registers the host under an etcd lease (TTL a few seconds) and renews it every
  `keepalive` seconds; a renewal that etcd answers with "lease not found" fences at once and registers anew;
- the fence thread enforces rule F2: when no renewal sent after time t has succeeded by t + TTL - margin,
  every VM of this host is stopped (SIGKILL, no grace) before the lease can expire, whatever the lease
  thread is blocked on;
- the work thread reconciles: it starts what etcd assigns to this host and stops what it does not,
  answers the controller's attestation nonces with TPM quotes, and reports VMs that exited.
Every start is guarded (rule F1): one transaction compares the assignment's revision (the fencing
token), this host's lease on its registration, that no other host claims the VM and that no other VM
claims its writable disks, and writes those claims under this host's lease. The VM's processes die with
the agent (PR_SET_PDEATHSIG, or in-process for the fake backend), so a killed agent cannot leave one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkhead.daemon.backend import VmSpec
from bulkhead.errors import ConfigError, HostError
from bulkhead.fleet.model import FleetTiming, decode, encode, fence_deadline, key
from bulkhead.fleet.storage import DiskFence
from bulkhead.fleet.store import Cmp, EtcdStore, Op

__all__ = ["Agent", "TpmAttestor", "agent_config_digest"]


def agent_config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the agent's configuration, measured into the TPM at start (docs/FLEET.md "Attestation")."""
    from bulkhead.integrity.host import config_digest

    return config_digest({"format": "bulkhead-fleet-agent-config/1", **config})


class TpmAttestor:
    """Quotes for the controller's nonces. At start it measures the manifest digest and the agent
    configuration into the policy's host PCR (logged first, then extended, as the daemon's gate does)."""

    PCRS = (14, 15)

    def __init__(self, tcti: str, log_path: Path, manifest_digest: str, config_digest: str) -> None:
        from bulkhead.integrity.eventlog import ZERO_PCR, Event
        from bulkhead.integrity.host import append_event, read_event_log
        from bulkhead.integrity.tpm import Tpm

        self.tcti, self.log = tcti, log_path
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with Tpm(tcti) as tpm:
            current = tpm.read_pcrs(list(self.PCRS))
            if all(v == ZERO_PCR for v in current.values()) and log_path.exists():
                os.replace(log_path, str(log_path) + f".{int(time.time())}.old")  # a TPM reset: a new boot
            for ev in (Event(14, "manifest", manifest_digest, "bulkhead manifest"),
                       Event(14, "config", config_digest, "bulkhead fleet agent config")):
                append_event(str(log_path), ev)
                tpm.extend(ev.pcr, ev.extend_value)
        self._read = read_event_log

    def evidence(self, nonce: str) -> dict[str, Any]:
        from bulkhead.integrity.host import make_evidence
        from bulkhead.integrity.tpm import Tpm

        with self._lock, Tpm(self.tcti) as tpm:
            return make_evidence(tpm, list(self.PCRS), nonce, self._read(str(self.log)))


class Agent:
    def __init__(self, store: EtcdStore, host_id: str, backend: Any, *, shared_dir: Path, state_dir: Path,
                 capacity: tuple[int, int, int], timing: FleetTiming | None = None,
                 attestor: Any = None, clock: Callable[[], float] = time.monotonic, poll: float = 0.2,
                 hostlog: Any = None) -> None:
        self.store, self.host, self.backend = store, host_id, backend
        self.shared = shared_dir.resolve()
        self.state_dir = state_dir
        self.mem_mib, self.vcpus, self.slots = capacity
        self.t = timing or FleetTiming()
        self.attestor = attestor
        self.clock = clock
        self.poll = poll
        self.lease = 0
        self.deadline = 0.0  # rule F2: monotonic time by which every VM is stopped
        self.local: dict[str, int] = {}  # vm id -> fencing token it runs under
        self.disks: dict[str, list[str]] = {}  # vm id -> writable disk ids it claims
        self.fences = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._answered = ""
        self.fence_store = DiskFence(self.shared / "disks")
        self.hostlog = hostlog  # fleet/hostlog.HostLog: this agent's own audit log, witnessed by the fleet

    # ---- lease and self-fencing --------------------------------------------------------------------
    def _record(self) -> str:
        return encode({"host": self.host, "mem_mib": self.mem_mib, "vcpus": self.vcpus, "slots": self.slots,
                       "pid": os.getpid(), "vms": sorted(self.local)})

    def _register(self) -> None:
        sent = self.clock()
        lease = self.store.grant(int(self.t.ttl))
        self.store.put(key("hosts", self.host), self._record(), lease)
        # deadline and lease are plain assignments, never behind self._lock: a start holding that lock
        # (a jailed start takes seconds) must not hold back a renewal and so cause a false fence
        self.deadline = fence_deadline(sent, self.t.ttl, self.t.fence_margin)
        self.lease = lease
        self._log(f"registered with lease {lease:x}")

    def fence(self, why: str) -> None:
        """Stop every VM of this host now (rule F2), before its lease can expire."""
        with self._lock:
            if self.local:
                self._log(f"self-fencing ({why}): stopping {len(self.local)} VM(s)")
            for vm in list(self.local):
                with contextlib.suppress(HostError):
                    self.backend.stop(vm, grace=0.0)
                self.backend.forget(vm)
                self.local.pop(vm, None)
                self.disks.pop(vm, None)
            self.fences += 1
            self._status()
            self._audit("host.fence", why=why)

    def _lease_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.lease:
                    self._register()
                else:
                    sent = self.clock()
                    ttl = self.store.keepalive(self.lease)
                    if ttl <= 0:
                        self.fence("lease expired")
                        self.lease = 0
                        continue
                    self.deadline = max(self.deadline, fence_deadline(sent, min(float(ttl), self.t.ttl),
                                                                      self.t.fence_margin))
            except HostError as exc:
                self._log(f"etcd: {exc}")
            self._stop.wait(self.t.keepalive)

    def _fence_loop(self) -> None:
        """Rule F2's watchdog, on its own thread: a keepalive that hangs (a partition makes each endpoint
        time out in turn) must not delay the fence past the deadline."""
        while not self._stop.is_set():
            if self.local and self.clock() >= self.deadline:
                with self._lock:
                    if self.local and self.clock() >= self.deadline:  # not renewed meanwhile
                        self.fence("lease could not be renewed in time")
            self._stop.wait(0.05)

    # ---- reconciliation ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        kvs, _ = self.store.get_prefix(key("assign", ""))
        want: dict[str, tuple[int, dict[str, Any]]] = {}
        for kv in kvs:
            rec = decode(kv.value)
            if rec is not None and rec.get("host") == self.host:
                want[kv.key.rsplit("/", 1)[-1]] = (kv.mod_revision, rec)
        for vm, token in list(self.local.items()):
            if vm not in want or want[vm][0] != token:
                self._stop_vm(vm, token, "unassigned")
            else:
                st = self.backend.status(vm)
                if st.state not in ("running", "paused"):
                    self._exited(vm, token, st.exit_status)
        for vm, (token, rec) in sorted(want.items()):
            if vm not in self.local:
                self._start_vm(vm, token, rec)
        self._status()

    def _start_vm(self, vm: str, token: int, rec: dict[str, Any]) -> None:
        try:
            spec, rw = self._spec(vm, rec)
        except ConfigError as exc:
            self.store.put(key("exit", vm), encode({"token": token, "host": self.host, "status": None,
                                                    "error": str(exc)}))
            return
        with self._lock:
            if not self.lease or self.clock() >= self.deadline:
                return  # rule F1 needs a live lease; F2 would stop it at once anyway
            claim = encode({"host": self.host, "token": token, "lease": self.lease})
            cmp = [Cmp(key("assign", vm), "MOD", token), Cmp(key("hosts", self.host), "LEASE", self.lease),
                   Cmp(key("running", vm), "CREATE", 0)]
            ops = [Op(key("running", vm), claim, self.lease)]
            for d in rw:
                cmp.append(Cmp(key("disks", d), "CREATE", 0))
                ops.append(Op(key("disks", d), encode({"vm": vm, "host": self.host, "token": token}), self.lease))
            ok, _ = self.store.txn(cmp, ops)
            if not ok:
                return  # the previous holder has not released it yet, or the assignment moved: next round
            try:
                for d in rw:  # the storage-side fence: a lower token than one already seen is refused
                    self.fence_store.acquire(d, token)
                self.backend.start(vm, spec)
            except (HostError, ConfigError) as exc:
                self._log(f"start of {vm} failed: {exc}")
                self._release(vm, token, rw)
                self.store.put(key("exit", vm), encode({"token": token, "host": self.host, "status": None,
                                                        "error": str(exc)[:300]}))
                return
            self.local[vm] = token
            self.disks[vm] = rw
            self._log(f"started {vm} (token {token})")
            self._audit("vm.start", vm, token=token, disks=rw)

    def _spec(self, vm: str, rec: dict[str, Any]) -> tuple[VmSpec, list[str]]:
        s = rec.get("spec") or {}

        def shared(rel: str) -> str:
            p = (self.shared / rel).resolve()
            if self.shared not in p.parents:
                raise ConfigError(f"path {rel!r} is outside the shared directory")
            return str(p)

        drives = tuple((shared(f"disks/{d['disk']}.img"), bool(d.get("read_only"))) for d in s.get("drives", []))
        rw = [str(d["disk"]) for d in s.get("drives", []) if not d.get("read_only")]
        console = self.state_dir / "vms" / vm / "console.log"
        console.parent.mkdir(parents=True, exist_ok=True)
        spec = VmSpec(kernel=shared(f"images/{s['kernel']}"),
                      initrd=shared(f"images/{s['initrd']}") if s.get("initrd") else None,
                      cmdline=str(s.get("cmdline", "")), mem_mib=int(s["mem_mib"]), cpus=int(s["cpus"]),
                      drives=drives, nics=(), rng=bool(s.get("rng")), console_path=str(console),
                      expected_digest=s.get("expected_digest"))
        return spec, rw

    def _release(self, vm: str, token: int, rw: list[str]) -> None:
        mine = [Cmp(key("hosts", self.host), "LEASE", self.lease)]
        with contextlib.suppress(HostError):
            self.store.txn([*mine, Cmp(key("running", vm), "LEASE", self.lease)],
                           [Op(key("running", vm)), *(Op(key("disks", d)) for d in rw)])

    def _stop_vm(self, vm: str, token: int, why: str) -> None:
        with self._lock:
            with contextlib.suppress(HostError):
                self.backend.stop(vm, grace=2.0)
            self.backend.forget(vm)
            rw = self.disks.pop(vm, [])
            self.local.pop(vm, None)
            self._release(vm, token, rw)  # only after the VM is gone: the claim outlives the process
            self._log(f"stopped {vm} ({why})")
            self._audit("vm.stop", vm, token=token, why=why)

    def _exited(self, vm: str, token: int, status: int | None) -> None:
        with self._lock:
            rw = self.disks.pop(vm, [])
            self.local.pop(vm, None)
            self.backend.forget(vm)
            self.store.put(key("exit", vm), encode({"token": token, "host": self.host, "status": status}))
            self._release(vm, token, rw)
            self._log(f"{vm} exited with status {status}")
            self._audit("vm.exit", vm, token=token, status=status)

    def attest(self) -> None:
        if self.attestor is None:
            return
        kv = self.store.get(key("nonce", self.host))
        rec = decode(kv.value) if kv else None
        nonce = str(rec.get("nonce", "")) if rec else ""
        if nonce and nonce != self._answered:
            ev = self.attestor.evidence(nonce)
            self.store.put(key("evidence", self.host), json.dumps(ev, sort_keys=True))
            self._answered = nonce

    def _audit(self, action: str, vm: str = "", **detail: Any) -> None:
        if self.hostlog is not None:
            try:
                self.hostlog.record(action, vm, **detail)
            except Exception as exc:  # the log's own error is reported; the fleet sees no new checkpoint
                self._log(f"audit: {type(exc).__name__}: {exc}")

    def publish(self) -> None:
        """Put this host's latest signed checkpoint, with its proof from what the fleet witnessed, under
        the lease (docs/FLEET.md "Witnessing")."""
        if self.hostlog is None:
            return
        kv = self.store.get(key("witnessed", self.host))
        rec = decode(kv.value) if kv else None
        size = rec.get("size") if rec else 0
        pub = self.hostlog.publication(size if type(size) is int and size >= 0 else 0)
        if pub is not None:
            self.store.put(key("checkpoint", self.host), encode(pub), self.lease)

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.lease:
                    self.attest()
                    self.reconcile()
                    self.publish()
            except HostError as exc:
                self._log(f"etcd: {exc}")
            except Exception as exc:  # the agent must not die: the next round retries
                self._log(f"reconcile: {type(exc).__name__}: {exc}")
            self._stop.wait(self.poll)

    def _status(self) -> None:
        """<state-dir>/agent.json: what this agent runs (for operators and the failure tests)."""
        info = {"host": self.host, "pid": os.getpid(), "lease": self.lease, "fences": self.fences,
                "vms": dict(sorted(self.local.items())), "disks": dict(sorted(self.disks.items()))}
        tmp = self.state_dir / "agent.json.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(info, sort_keys=True))
            os.replace(tmp, self.state_dir / "agent.json")

    def _log(self, msg: str) -> None:
        print(f"bulkhead agent {self.host}: {msg}", file=sys.stderr, flush=True)

    def run(self) -> None:
        """Block until stop(); on the way out every VM is stopped and the lease revoked."""
        threads = [threading.Thread(target=self._lease_loop, name="fleet-lease", daemon=True),
                   threading.Thread(target=self._fence_loop, name="fleet-fence", daemon=True),
                   threading.Thread(target=self._work_loop, name="fleet-work", daemon=True)]
        for th in threads:
            th.start()
        self._stop.wait()
        for th in threads:
            th.join(5)
        self.fence("agent stopping")
        if self.hostlog is not None:
            self.hostlog.close()
        if self.lease:
            with contextlib.suppress(HostError):
                self.store.revoke(self.lease)

    def stop(self) -> None:
        self._stop.set()
