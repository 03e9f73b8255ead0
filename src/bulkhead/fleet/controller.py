"""The fleet controller's loop: leader election, attestation, scheduling, lost hosts (docs/FLEET.md).

Leadership (rule F4): a controller leads while its lease-bound `/bulkhead/leader` key exists; every write
it makes is a transaction that also compares that key's create revision with its own, so a deposed
controller's writes are refused by etcd, however late they arrive. It keeps renewing its lease; when a
renewal fails past TTL - margin it stops leading and stands by. If its lease turns out to be alive and
the leader key still its own, it resumes at once (`reclaim`); otherwise standbys poll the key and
campaign when it is gone: takeover within one TTL.

Each tick reads the whole `/bulkhead/` prefix in one consistent range and decides from that snapshot:
nonces and quote verification per host, host states, the VMs to place, drain or reschedule, and applies
each decision as a guarded transaction (assignment compared by revision: idempotent across restarts).
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulkhead.errors import HostError
from bulkhead.fleet.etcdauth import Grants
from bulkhead.fleet.leadership import Emit, Leadership
from bulkhead.fleet.model import (
    FleetTiming,
    HostView,
    VmDemand,
    decode,
    encode,
    host_state,
    key,
    lost_reschedulable,
    place,
)
from bulkhead.fleet.store import Cmp, EtcdStore, Kv, Op
from bulkhead.fleet.witness import FleetWitness

__all__ = ["Controller", "Deposed", "Snapshot"]

@dataclass
class Snapshot:
    """One consistent read of the fleet's keys, parsed."""

    revision: int = 0
    raw: dict[str, dict[str, Kv]] = field(default_factory=dict)

    @classmethod
    def read(cls, store: EtcdStore) -> Snapshot:
        kvs, rev = store.get_prefix(key(""))
        snap = cls(rev)
        for kv in kvs:
            parts = kv.key[len(key("")):].split("/", 1)
            if len(parts) == 2:
                snap.raw.setdefault(parts[0], {})[parts[1]] = kv
        return snap

    def rec(self, kind: str, name: str) -> dict[str, Any] | None:
        kv = self.raw.get(kind, {}).get(name)
        return decode(kv.value) if kv else None

    def names(self, kind: str) -> list[str]:
        return sorted(self.raw.get(kind, {}))

    def kv(self, kind: str, name: str) -> Kv | None:
        return self.raw.get(kind, {}).get(name)


MAX_COUNT = 1 << 40


def _count(v: object) -> int:
    """A capacity number from a host's own record: a non-negative int, anything else counts as 0 (a host
    cannot stall the controller, or claim more than MAX_COUNT, with a malformed registration)."""
    return min(v, MAX_COUNT) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


class Deposed(Exception):
    """This controller lost the leadership: it must not act on its view any more (rule F4)."""


class Controller(Leadership):
    def __init__(self, store: EtcdStore, ident: str, state_dir: Path, *, timing: FleetTiming | None = None,
                 emit: Emit | None = None, dedicated: frozenset[str] = frozenset(), untrusted: str = "drain", rbac: bool = False,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.store, self.ident, self.state_dir = store, ident, state_dir
        self.t = timing or FleetTiming()
        self.emit = emit or (lambda kind, action, detail: None)
        self.dedicated = dedicated
        self.untrusted = untrusted  # drain | stop: what happens to the VMs of a host that fails attestation
        self.clock, self.wall = clock, wall
        self.rbac = rbac  # etcd auth is on: hosts may write a VM's keys only while it is assigned to them
        self.grants = Grants()
        self.lease = 0
        self.leader_rev = 0
        self.deadline = 0.0
        self.lost_seen: dict[str, float] = {}
        self.last_states: dict[str, str] = {}
        self.witness = FleetWitness(state_dir)  # the hosts' audit logs (docs/FLEET.md "Witnessing")
        self._stop = threading.Event()

    # ---- one tick ------------------------------------------------------------------------------------
    def hosts(self, snap: Snapshot) -> list[HostView]:
        out = []
        for name in sorted(set(snap.names("known")) | set(snap.names("hosts"))):
            reg = snap.rec("hosts", name)
            att = snap.rec("attest", name) or {}
            at = att.get("at")
            raw = att.get("reasons")
            rs: list[Any] = raw if isinstance(raw, list) else []
            flag = snap.rec("flagged", name)  # its audit log failed the fleet's witnessing: never trusted again
            if flag is not None:
                rs = [f"audit log: {flag.get('reason', 'inconsistent')}", *rs]
            out.append(HostView(
                name=name, alive=reg is not None, mem_mib=_count((reg or {}).get("mem_mib")),
                vcpus=_count((reg or {}).get("vcpus")), slots=_count((reg or {}).get("slots")),
                trusted=att.get("trusted") is True and flag is None,
                attested_at=float(at) if att.get("trusted") is True and isinstance(at, int | float) else None,
                drained=snap.kv("drain", name) is not None,
                reasons=tuple(str(r)[:300] for r in rs)[:8]))
        return out

    def tick(self) -> None:
        snap = Snapshot.read(self.store)
        now_wall = self.wall()
        self._attestation(snap, now_wall)
        self.witness.tick(self, snap, now_wall)
        views = self.hosts(snap)
        now = self.clock()
        states = {}
        for h in views:
            st = host_state(h, now_wall, self.t.attest_max_age)
            states[h.name] = st
            if st == "lost":
                self.lost_seen.setdefault(h.name, now)
            else:
                self.lost_seen.pop(h.name, None)
            if self.last_states.get(h.name) != st:
                self.emit("security" if st == "unattested" else "system", f"fleet.host.{st}",
                          {"host": h.name, "from": self.last_states.get(h.name), "reasons": list(h.reasons)})
                self.last_states[h.name] = st
            if snap.kv("known", h.name) is None and h.alive:
                self._guarded([Cmp(key("known", h.name), "CREATE", 0)], [Op(key("known", h.name), encode({"host": h.name}))])
        self._vms(snap, views, states, now, now_wall)
        if self.grants.pending:
            self.grants.released(self.store, lambda vid: (snap.rec("running", vid) or {}).get("host"))

    def _guarded(self, cmp: list[Cmp], ops: list[Op]) -> bool:
        """A write under rule F4: refused by etcd unless this controller still leads. A refusal is
        checked at once: when the leader key is no longer ours, the controller stops acting (Deposed)."""
        ok, _ = self.store.txn([self._lead(), *cmp], ops)
        if not ok:
            kv = self.store.get(key("leader"))
            if kv is None or kv.create_revision != self.leader_rev:
                raise Deposed(f"{self.ident}: the leader key is no longer ours")
        return ok

    def _attestation(self, snap: Snapshot, now_wall: float) -> None:
        """Rule: a host's word about itself is never trusted. The controller picks the nonce, and only
        its own verification (the host's enrolled AK, the host's policy) makes it `trusted`."""
        from bulkhead.integrity.attest import Verdict, verify_evidence

        for name in snap.names("hosts"):
            nonce_rec = snap.rec("nonce", name)
            att = snap.rec("attest", name) or {}
            ev_kv = snap.kv("evidence", name)
            if nonce_rec and ev_kv is not None and att.get("nonce") != nonce_rec.get("nonce"):
                ev = decode(ev_kv.value)
                if ev is not None and ev.get("nonce") == nonce_rec.get("nonce"):
                    enr = self.state_dir / "hosts" / name / "enrollment.json"
                    pol = self.state_dir / "hosts" / name / "policy.json"
                    if not enr.exists() or not pol.exists():
                        verdict = Verdict(False, [f"host {name} is not enrolled ({enr} / {pol} missing)"])
                    else:
                        verdict = verify_evidence(ev, pol.read_text(), enr.read_text(), str(nonce_rec["nonce"]))
                    rec = {"trusted": verdict.trusted, "reasons": verdict.reasons[:16], "at": now_wall,
                           "nonce": nonce_rec["nonce"], "by": self.ident}
                    if self._guarded([], [Op(key("attest", name), encode(rec))]):
                        self.emit("security", "fleet.attestation", {"host": name, "verdict": verdict.to_dict()})
                    continue
            asked = float(nonce_rec.get("at", 0)) if nonce_rec else 0.0
            if now_wall - asked >= self.t.attest_interval or asked > now_wall + 1:
                rec = {"nonce": secrets.token_hex(16), "at": now_wall}
                self._guarded([], [Op(key("nonce", name), encode(rec))])
                if nonce_rec and att.get("nonce") != nonce_rec.get("nonce") and att.get("trusted"):
                    # the host did not answer the previous nonce in a whole interval: no longer trusted
                    fail = {"trusted": False, "reasons": ["no answer to the controller's nonce"], "at": now_wall,
                            "nonce": nonce_rec.get("nonce"), "by": self.ident}
                    self._guarded([], [Op(key("attest", name), encode(fail))])

    def _vms(self, snap: Snapshot, views: list[HostView], states: dict[str, str], now: float,
             now_wall: float) -> None:
        running: dict[str, tuple[str, VmDemand]] = {}
        pending: list[VmDemand] = []
        moves: dict[str, str] = {}  # vm -> why it must leave its host
        for vid in snap.names("vms"):
            vm = snap.rec("vms", vid)
            if vm is None:
                continue
            akv = snap.kv("assign", vid)
            a = decode(akv.value) if akv else None
            ex = snap.rec("exit", vid)
            if ex is not None and akv is not None and a is not None and ex.get("token") == akv.mod_revision \
                    and ex.get("host") == a.get("host"):  # only the assigned host can report V's exit
                self._exited(vid, vm, akv, ex)
                continue
            if ex is not None:  # an exit of an older assignment, or from another host: stale, drop it
                self._guarded([Cmp(key("exit", vid), "MOD", snap.kv("exit", vid).mod_revision)],  # type: ignore[union-attr]
                              [Op(key("exit", vid))])
            if vm.get("desired") != "running":
                if akv is not None and self._guarded([Cmp(key("assign", vid), "MOD", akv.mod_revision)],
                                                     [Op(key("assign", vid))]) and a is not None:
                    self._permit(None, str(a.get("host")), vid, a.get("spec"))
                continue
            d = VmDemand(vid, str(vm["tenant"]), int(vm["spec"]["mem_mib"]), int(vm["spec"]["cpus"]))
            if akv is None or a is None:
                pending.append(d)
                continue
            host = str(a.get("host"))
            st = states.get(host, "lost")
            if st == "ready":
                running[vid] = (host, d)
            elif st == "lost":
                seen = self.lost_seen.get(host, now)
                if now >= lost_reschedulable(seen, self.t.grace) and snap.kv("running", vid) is None:
                    moves[vid] = "host lost"
                    pending.append(d)
                else:
                    running[vid] = (host, d)
            else:  # unattested or draining: move it if a ready host can take it
                moves[vid] = "host " + st
                pending.append(d)
        plan = place(pending, views, running, now=now_wall, max_age=self.t.attest_max_age, dedicated=self.dedicated)
        batch: list[tuple[Cmp, Op, dict[str, Any]]] = []
        for vid, host in plan.assigned.items():
            akv = snap.kv("assign", vid)
            old = decode(akv.value) if akv else None
            rec = {"host": host, "vm": vid, "spec": snap.rec("vms", vid)["spec"],  # type: ignore[index]
                   "tenant": snap.rec("vms", vid)["tenant"]}  # type: ignore[index]
            cmp = Cmp(key("assign", vid), "MOD", akv.mod_revision) if akv else Cmp(key("assign", vid), "CREATE", 0)
            self._permit(host, old.get("host") if old else None, vid, rec["spec"])
            batch.append((cmp, Op(key("assign", vid), encode(rec)),
                          {"vm": vid, "host": host, "from": old.get("host") if old else None,
                           "why": moves.get(vid, "placement")}))
        self._commit_assignments(batch)
        for vid, why in plan.unplaced.items():
            if vid in moves and moves[vid] == "host unattested" and self.untrusted == "stop":
                akv = snap.kv("assign", vid)
                if akv is not None and self._guarded([Cmp(key("assign", vid), "MOD", akv.mod_revision)],
                                                     [Op(key("assign", vid))]):
                    self.emit("security", "fleet.vm.stopped-untrusted", {"vm": vid, "why": why})

    def _permit(self, host: str | None, old: object, vid: str, spec: object) -> None:
        """With etcd auth on: VM `vid`'s keys move from `old` to `host` (etcdauth.Grants.move)."""
        if self.rbac:
            self.grants.move(self.store, host, old, vid, spec)

    TXN_BATCH = 60  # below etcd's default --max-txn-ops (128): one compare + one put per VM, plus the leader

    def _commit_assignments(self, batch: list[tuple[Cmp, Op, dict[str, Any]]]) -> None:
        """Assignments in batches, one transaction each (all or nothing, each compared by revision); a
        batch refused because one of its VMs changed meanwhile is retried one by one."""
        for i in range(0, len(batch), self.TXN_BATCH):
            part = batch[i:i + self.TXN_BATCH]
            if self._guarded([c for c, _, _ in part], [o for _, o, _ in part]):
                done = part
            else:
                done = [x for x in part if self._guarded([x[0]], [x[1]])]
            for _, _, detail in done:
                self.emit("vm", "fleet.vm.assign", detail)

    def _exited(self, vid: str, vm: dict[str, Any], akv: Kv | None, ex: dict[str, Any]) -> None:
        status = ex.get("status")
        vm = {**vm, "desired": "exited", "exit_status": status if isinstance(status, int) and -1 < status < 1 << 16
              and not isinstance(status, bool) else None, "error": str(ex.get("error") or "")[:300] or None,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        cmp = [Cmp(key("assign", vid), "MOD", akv.mod_revision)] if akv else []
        ops = [Op(key("vms", vid), encode(vm)), Op(key("exit", vid))] + ([Op(key("assign", vid))] if akv else [])
        if self._guarded(cmp, ops):
            a = decode(akv.value) if akv else None
            if a is not None:
                self._permit(None, str(a.get("host")), vid, a.get("spec"))
            self.emit("vm", "vm.exit", {"vm": vid, "status": ex.get("status"), "host": ex.get("host"),
                                        "error": ex.get("error")})

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self, on_lead: Callable[[], None] | None = None, poll: float = 0.2) -> str:
        """Stand by until leading, then lead until stop() or the leadership is lost. Returns why it ended."""
        while not self._stop.is_set():
            try:
                if self.campaign():
                    break
                if not self.leader_rev and not self.renew():
                    self.lease = 0
            except HostError as exc:
                print(f"bulkhead fleet: standby: {exc}", file=sys.stderr)
            self._stop.wait(min(self.t.ttl / 6, 0.5))
        else:
            return "stopped"
        lost = threading.Event()
        keeper = threading.Thread(target=self._keep, args=(lost,), name="fleet-leader-lease", daemon=True)
        keeper.start()  # its own thread: a slow tick or takeover (opening the daemon) delays no renewal
        try:
            if on_lead is not None:
                on_lead()
            while not self._stop.is_set() and not lost.is_set():
                try:
                    self.tick()
                except Deposed:
                    lost.set()
                except HostError as exc:
                    print(f"bulkhead fleet: tick: {exc}", file=sys.stderr)
                except Exception as exc:  # the loop must not die on one bad record
                    print(f"bulkhead fleet: tick: {type(exc).__name__}: {exc}", file=sys.stderr)
                lost.wait(poll)
        finally:
            done = lost.is_set()
            lost.set()
            keeper.join(5)
        if done and not self._stop.is_set():
            self.emit("system", "fleet.leader.lost", {"id": self.ident})
            return "deposed"  # it keeps its lease and leader revision: campaign() first tries reclaim()
        self.resign()
        return "stopped"

    def stop(self) -> None:
        self._stop.set()


def host_table(snap: Snapshot, views: list[HostView], now_wall: float, max_age: float) -> list[dict[str, Any]]:
    """GET /hosts rows: host, state, VMs, free memory, attestation age (seconds) and reasons."""
    rows = []
    for h in views:
        vms = [v for v in snap.names("assign") if (snap.rec("assign", v) or {}).get("host") == h.name]
        used = sum(int(((snap.rec("assign", v) or {}).get("spec") or {}).get("mem_mib", 0)) for v in vms)
        att = snap.rec("attest", h.name) or {}
        at = att.get("at")
        rows.append({"host": h.name, "state": host_state(h, now_wall, max_age), "vms": len(vms),
                     "mem_free_mib": max(0, h.mem_mib - used) if h.alive else 0, "mem_mib": h.mem_mib,
                     "attestation_age_s": round(now_wall - float(at), 1) if at is not None else None,
                     "trusted": h.trusted, "reasons": list(h.reasons)[:4],
                     "drained": h.drained})
    return rows

