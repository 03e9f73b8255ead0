"""The daemon object: state directory layout, opening the stores, authentication of peers.

State directory (default /var/lib/bulkhead, or --state-dir / BULKHEAD_STATE_DIR), created by `init`:
  ca.pem ca.key              the bulkhead CA (key 0600)
  server.pem server.key      the daemon's TLS certificate
  admin.pem admin.key        the first admin client certificate (Owner at /)
  audit.key audit.pub        ed25519 key that signs audit checkpoints; audit.vkey: its note verifier key
  state.db                   resources, principals, certificates (revocation list), roles, assignments
  audit.db                   the audit log (its own file); audit.checkpoint: latest signed checkpoint
  witnesses/                 registered witnesses (docs/AUDIT.md)
  bulkhead.sock              the local bootstrap socket (0600, root only), while serving
  images/ disks/ vms/        kernel/initrd images, tenant disk images, per-VM console output
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from bulkhead.control.audit import Record
from bulkhead.control.models import IntegrityOut, VmOut
from bulkhead.daemon.access import AccessService
from bulkhead.daemon.auditapi import AuditService
from bulkhead.daemon.auditlog import AuditLog, AuditUnavailable, load_audit_key, now_iso
from bulkhead.daemon.backend import VmBackend, describe, make_backend
from bulkhead.daemon.consoleapi import ConsoleService
from bulkhead.daemon.disks import DiskService
from bulkhead.daemon.integrity import HostIntegrity, NoTpm, check_off_allowed
from bulkhead.daemon.networks import TenantNetworkService
from bulkhead.daemon.power import PowerService
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import ApiError, Caller, Core, ReqCtx
from bulkhead.daemon.snapshots import SnapshotService
from bulkhead.daemon.store import Store
from bulkhead.daemon.tenants import TenantService
from bulkhead.daemon.vms import VmService
from bulkhead.errors import HostError
from bulkhead.network.service import NetworkService

if TYPE_CHECKING:
    from bulkhead.daemon.witness import WitnessOptions, WitnessPusher

__all__ = ["Daemon", "StateDir", "daemon_routes", "default_state_dir"]

DHCP_WATCH_ROUNDS = 3  # monitor rounds (1 s each) between checks that every network's dnsmasq runs


def default_state_dir() -> Path:
    return Path(os.environ.get("BULKHEAD_STATE_DIR") or "/var/lib/bulkhead")


@dataclass(frozen=True)
class StateDir:
    root: Path

    def __getattr__(self, name: str) -> Path:
        files = {
            "ca_cert": "ca.pem", "ca_key": "ca.key", "server_cert": "server.pem", "server_key": "server.key",
            "admin_cert": "admin.pem", "admin_key": "admin.key", "audit_key": "audit.key",
            "audit_pub": "audit.pub", "state_db": "state.db", "audit_db": "audit.db",
            "checkpoint": "audit.checkpoint", "audit_vkey": "audit.vkey", "witnesses": "witnesses", "socket": "bulkhead.sock", "serve_info": "serve.json",
        }
        if name in files:
            return self.root / files[name]
        raise AttributeError(name)


class Daemon:
    """The management plane: its services as fields, each constructed fully here from what it is given
    (docs/ARCHITECTURE.md "The daemon"): `core` (store, audit log, RBAC), `tenants`, `access`,
    `networks`, `disks`, `vms` (with the host's integrity gate), `audit_api` and `metrics`. The daemon itself
    keeps the process's life (open, start, monitor, close) and the authentication of peers."""

    vm_model: Any = VmOut  # the VM routes' answer (the fleet's names the host too, bulkhead.fleet.api)

    def __init__(self, store: Store, audit: AuditLog, backend: VmBackend, state_dir: Path, engine: str = "casbin",
                 *, net: NetworkService | None = None, integrity: HostIntegrity | None = None,
                 witnesses: WitnessPusher | None = None, ca: Any = None) -> None:
        from bulkhead.network.state import HostConfig

        self.store = store
        self.audit = audit
        self.backend = backend
        self._witnesses = witnesses  # read-only: the audit gate (core) holds the same object
        self.core = Core(store, audit, state_dir, engine, witnesses)
        self.tenants = TenantService(self.core)
        self.access = AccessService(self.core, ca)
        self.networks = TenantNetworkService(self.core, net if net is not None else NetworkService(HostConfig()))
        self.disks = DiskService(self.core)
        # fail closed until a gate is installed (bulkhead.daemon.integrity)
        self.vms = VmService(self.core, backend, self.networks, self.disks, integrity or NoTpm())
        self.snapshots = SnapshotService(self.core, self.vms)  # daemon/snapshots.py (docs/SNAPSHOT.md)
        self.audit_api = AuditService(self.core)
        from bulkhead.daemon.metrics import Metrics  # prometheus_client: only for a daemon

        self.metrics = Metrics(self)  # GET /metrics, and one observation per request (daemon/metrics.py)
        self.power = PowerService(self.core, self.vms)
        self.console = ConsoleService(self.core, self.vms, self.authenticate, self.append_request)
        from bulkhead.daemon.uiauth import UiAuth

        self.ui_auth = UiAuth()  # the web console's login links and sessions (daemon/uiauth.py)
        self.code_integrity: dict[str, str | bool | None] = {"verified": False, "manifest_digest": None,
                                                             "manifest": None}
        self._cert_cache: dict[str, tuple[str, str]] = {}
        self._cache_lock = threading.Lock()
        self._closing = False
        hooks = getattr(backend, "set_hooks", None)  # the jailed backend reports its workers
        if hooks is not None:
            hooks(on_security_event=self._worker_security_event, on_exit=self._worker_exited)

    @property
    def integrity(self) -> HostIntegrity:
        return self.vms.integrity

    @integrity.setter
    def integrity(self, gate: HostIntegrity) -> None:
        """The server installs the TPM-backed gate after open (bulkhead.daemon.integrity)."""
        self.vms.integrity = gate

    @property
    def vm_api(self) -> Any:
        """The service behind the VM routes: `vms` here; the fleet's daemon keeps its VMs in etcd."""
        return self.vms

    def extra_routers(self) -> list[APIRouter]:
        """Routers besides the host API's (the fleet adds its host routes)."""
        return []

    @property
    def witnesses(self) -> WitnessPusher | None:
        """The witness pusher (docs/AUDIT.md), the one the audit gate consults."""
        return self._witnesses

    @property
    def net(self) -> NetworkService:
        return self.networks.net

    def event(self, kind: str, action: str, **kw: Any) -> int:
        """An audited lifecycle / security / system record (Core.event; raises ApiError 503)."""
        return self.core.event(kind, action, **kw)

    def security_event(self, vm_id: str, kind: str, detail: dict[str, Any]) -> int:
        return self.core.security_event(vm_id, kind, detail)

    def rbac_changed(self) -> None:
        self.core.rbac_changed()

    def monitor_once(self) -> None:
        self.vms.monitor_once()

    @classmethod
    def open(cls, state_dir: Path, backend: VmBackend | None = None, engine: str = "casbin",
             checkpoint_every: int = 1000, integrity: HostIntegrity | None = None,
             net: NetworkService | None = None, witnesses: WitnessOptions | None = None) -> Daemon:
        """Open an initialized state directory. Raises HostError when it is not initialized or damaged,
        or when `integrity` is IntegrityOff with a backend that runs guests outside tests.

        `integrity` (bulkhead.daemon.integrity): None means NoTpm (untrusted: no VM starts).
        `backend` None: make_backend("auto") (the jail as root). `net`: a bulkhead.network NetworkService
        (None: the host's, HostConfig()). `witnesses`: bulkhead.daemon.witness.WitnessOptions (None: the
        registered witnesses under <state-dir>/witnesses, if any, with the default policy)."""
        sd = StateDir(state_dir)
        if not sd.state_db.exists() or not sd.audit_key.exists():
            raise HostError(f"{state_dir} is not an initialized bulkhead state directory; run `bulkhead init`")
        store = Store(sd.state_db)
        store.initialize()
        from bulkhead.daemon.witness import WitnessOptions, WitnessPusher

        wopts = witnesses if witnesses is not None else WitnessOptions.registered(sd.witnesses)
        audit = AuditLog(sd.audit_db, load_audit_key(sd.audit_key), sd.checkpoint, checkpoint_every,
                         checkpoint_interval=wopts.checkpoint_interval)
        pusher = WitnessPusher(audit, wopts) if wopts.witnesses else None
        if backend is None:
            backend = make_backend("auto", console_root=state_dir / "vms")
        elif getattr(backend, "console_root", False) is None:  # process or jailed backend without one
            backend.console_root = state_dir / "vms"  # type: ignore[attr-defined]
        if integrity is not None:
            try:
                check_off_allowed(integrity, backend)
            except HostError:
                audit.close()
                store.close()
                raise
        ca = None
        if sd.ca_key.exists():
            from bulkhead.daemon import pki

            ca = pki.CertBundle(pki.load_key(sd.ca_key), pki.load_cert(sd.ca_cert))
        d = cls(store, audit, backend, state_dir, engine, net=net, integrity=integrity, witnesses=pusher, ca=ca)
        for sub in ("images", "disks", "vms"):
            (state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        return d

    def start(self) -> None:
        """Daemon start: audit it and apply the restart policy to VMs left running."""
        st = self.integrity.status()
        self.event("system", "daemon.start", detail={
            "pid": os.getpid(), "backend": describe(self.backend), "integrity": {"mode": self.integrity.mode, "state": st["state"],
                                              "reasons": st["reasons"][:8], "code": self.code_integrity}})
        if self.integrity.mode == "off":
            self.event("security", "security/integrity/gate-off", result="off", detail={"reasons": st["reasons"]})
        if not self.code_integrity.get("verified"):
            self.event("security", "security/integrity/code-unverified", result="unverified", detail=dict(self.code_integrity))
        if self.witnesses is not None:
            self.witnesses.start()  # pushes the current checkpoint now, then every new one
        self._clean_stale_jails(self.vms.mark_lost_on_startup())
        self.networks.reconcile_networks()  # rebuild what should exist on the host, remove what should not (audited)

    def _worker_security_event(self, vm_id: str, kind: str, detail: str) -> None:
        with contextlib.suppress(ApiError):  # the log is down: the VM's exit record still holds the reason
            self.security_event(vm_id, kind, {"detail": detail[:1024], "source": "jailed worker"})

    def _worker_exited(self, vm_id: str, result: Any) -> None:
        """A worker ended (any way): record it now rather than at the next read. Exits during daemon
        shutdown are left to the restart policy (the VMs are marked lost at the next start)."""
        if self._closing:
            return
        with self.vms.vm_lock(vm_id):
            row = self.store.q1("SELECT * FROM vms WHERE id = ?", (vm_id,))
            if row is not None:
                self.vms.refresh(row)

    def _clean_stale_jails(self, lost: list[str] | None = None) -> None:
        """Jail directories and cgroups a crashed daemon left behind (jailed backend only), audited; and
        everything left of this daemon's own `lost` VMs (sandbox.stale.cleanup_lost)."""
        opts = getattr(self.backend, "options", None)
        if opts is None or not hasattr(opts, "base_dir"):
            return
        from bulkhead.sandbox.stale import cleanup_lost
        from bulkhead.sandbox.supervisor import cleanup_stale

        try:
            cleaned = cleanup_stale(opts.base_dir, opts.cgroup_parent)
            for vm_id in lost or []:
                if cleanup_lost(vm_id, opts.base_dir, opts.cgroup_parent) and vm_id not in cleaned:
                    cleaned.append(vm_id)
        except (HostError, OSError) as exc:
            self.event("system", "sandbox.cleanup", result="error", detail={"error": str(exc)})
            return
        if cleaned:
            self.event("system", "sandbox.cleanup", result="ok", detail={"vms": cleaned[:100]})

    def integrity_transition(self, tr: Any) -> None:
        """Gate callback (bulkhead.integrity.gate.Transition): audit every change of the host's trust
        state; with policy `running_vms_when_untrusted: stop`, stop the running VMs (each audited)."""
        self.event("security", f"security/integrity/{tr.new}", result=tr.new,
                   detail={"from": tr.old, "to": tr.new, "reasons": list(tr.reasons)[:16]})
        if tr.new == "untrusted" and self.integrity.should_stop_running():
            threading.Thread(target=self.vms.stop_all_untrusted, args=(list(tr.reasons),), name="integrity-stop",
                             daemon=True).start()

    def integrity_status(self, ctx: ReqCtx) -> dict[str, Any]:
        """GET /integrity: the host's trust state with every reason (any authenticated principal)."""
        ctx.action, ctx.scope, ctx.decision = "integrity/read", "/", "allow"
        st = dict(self.integrity.status())
        st["code"] = dict(self.code_integrity)
        return st

    def start_monitor(self, interval: float = 1.0) -> None:
        self._monitor_stop = threading.Event()

        def loop() -> None:
            rounds = 0
            while not self._monitor_stop.wait(interval):
                rounds += 1
                try:
                    self.monitor_once()
                    if rounds % DHCP_WATCH_ROUNDS == 0:  # every few seconds: restore a dead dnsmasq
                        self.networks.dhcp_watch()
                except Exception as exc:  # the monitor must not die; the next round retries
                    print(f"bulkheadd: VM monitor: {exc}", file=sys.stderr)
                try:  # applies staleness even when nobody asks: a silent attestation loop is audited
                    self.integrity.status()
                except Exception as exc:
                    print(f"bulkheadd: integrity status: {exc}", file=sys.stderr)

        self._monitor = threading.Thread(target=loop, name="vm-monitor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        self.integrity.stop()
        stop = getattr(self, "_monitor_stop", None)
        if stop is not None:
            stop.set()
            self._monitor.join(10)
        self._closing = True
        try:
            self.backend.shutdown()
            self.event("system", "daemon.stop", detail={"pid": os.getpid()})
        except ApiError:
            pass
        self.audit.close()  # writes the shutdown checkpoint
        if self.witnesses is not None:
            self.witnesses.stop(final=True)
        self.store.close()

    # ------------------------------------------------------------------ authentication
    def authenticate(self, peer: dict[str, Any] | None) -> tuple[Caller | None, str]:
        """The caller for a connection's peer, or (None, reason). The TLS layer has already checked the
        chain to our CA and the validity period; this checks the state database's view: known
        certificate, not revoked, not expired, CN equal to the principal's name."""
        if not peer:
            return None, "no client identity"
        if peer.get("kind") == "local":
            row = self.store.local_principal()
            return Caller(row["id"], row["name"], "local"), ""
        der = peer.get("der")
        if peer.get("kind") != "tls" or not isinstance(der, bytes | bytearray):
            return None, "no client certificate"
        from bulkhead.daemon import pki

        fp = pki.fingerprint(bytes(der))
        prow, crow = self.store.principal_by_cert(fp)
        if prow is None or crow is None:
            return None, "unknown client certificate"
        if crow["revoked"]:
            return None, "client certificate revoked"
        if crow["not_after"] < dt.datetime.now(dt.UTC).isoformat():
            return None, "client certificate expired"
        cn = self._cn(fp, bytes(der))
        if cn != prow["name"]:
            return None, "certificate name does not match the principal"
        return Caller(prow["id"], prow["name"], prow["kind"]), ""

    def _cn(self, fp: str, der: bytes) -> str:
        with self._cache_lock:
            hit = self._cert_cache.get(fp)
        if hit is not None:
            return hit[0]
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_der_x509_certificate(der)
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(attrs[0].value) if attrs else ""
        with self._cache_lock:
            if len(self._cert_cache) > 10000:
                self._cert_cache.clear()
            self._cert_cache[fp] = (cn, "")
        return cn

    def auth_refused(self, peer: dict[str, Any] | None, why: str, rid: str, path: str) -> None:
        detail: dict[str, Any] = {"reason": why, "path": path[:512]}
        der = (peer or {}).get("der")
        if isinstance(der, bytes | bytearray):
            from bulkhead.daemon import pki

            detail["fingerprint"] = pki.fingerprint(bytes(der))
        self.core.append(Record.make(now_iso(), "security", detail, action="auth", decision="deny",
                                result="401", request_id=rid))

    def append_request(self, ctx: ReqCtx, result: str) -> None:
        """The request's audit record (raises ApiError 503 when the log cannot take it)."""
        if ctx.audited:
            return
        try:
            self.audit.append(ctx.record(result))
        except AuditUnavailable as exc:
            raise ApiError.of(exc, f"audit log unavailable, the response is withheld ({exc})") from None
        ctx.audited = True


def daemon_routes(daemon: Callable[[], Daemon]) -> APIRouter:
    """The daemon's own route: the host's trust state (the gate and the code check)."""
    r = router()

    @r.get("/integrity", response_model=IntegrityOut)
    def integrity(ctx: ReqCtx = Ctx) -> Any:
        return daemon().integrity_status(ctx)

    return r
