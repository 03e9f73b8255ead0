"""A model-based soak of the real daemon (issue 12 point 7): a pure model predicts every answer, several
concurrent clients drive the API, invariants are checked between rounds, faults are injected between rounds.

Shape of a run (`Soak.run`):
- setup: `bulkhead serve` on the jail backend with host networks and --dev-tpm (tests/soak_world.py); one
  tenant and one mTLS identity (Contributor at /tenants/<t>) per actor, plus the root socket for the admin.
- rounds: every actor runs `ops_per_round` seeded random operations in its own thread at the same time
  (networks, disks, VMs with NICs and drives, start/stop/pause/resume/delete, reads, lists, and refused
  ones: another tenant's resources -> 404, invalid input -> 422, conflicts -> 409); the admin does tenants,
  roles and assignments meanwhile. Each actor owns its tenant, so its model's predictions do not depend on
  how the threads interleave: the same seed gives the same operations.
- after every round: the daemon is up; every list matches the model; every acknowledged request id is in
  the audit log; `bulkhead audit verify` passes; the host objects (namespaces, bridges, taps, nftables
  tables, dnsmasq processes, cgroups, jail directories, worker processes) are exactly what the model says.
- between rounds, one fault (faults.py order, seeded): SIGKILL of dnsmasq, a worker, swtpm, the daemon;
  ENOSPC on the state filesystem; an exclusively locked state.db / audit.db; a tap deleted behind the
  daemon's back.

A violation records the seed, the actor, the step and the request; the run stops at the end of the round.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

LIVE = ("running", "paused")
CAN = {"start": ("stopped", "exited", "lost"), "stop": LIVE, "pause": ("running",), "resume": ("paused",),
       "delete": ("stopped", "exited", "lost")}
AFTER = {"start": "running", "stop": "stopped", "pause": "paused", "resume": "running"}


@dataclass
class MVm:
    id: str
    name: str
    state: str
    nets: list[str]
    drives: list[tuple[str, bool]]  # (disk id, read_only)


@dataclass
class TenantModel:
    id: str
    name: str
    nets: dict[str, tuple[str, IPv4Network]] = field(default_factory=dict)  # id -> (name, subnet)
    disks: dict[str, str] = field(default_factory=dict)  # id -> name
    vms: dict[str, MVm] = field(default_factory=dict)

    def disk_users(self, disk: str, writable_only: bool) -> int:
        return sum(1 for v in self.vms.values() for d, ro in v.drives if d == disk and not (writable_only and ro))

    def net_used(self, net: str) -> bool:
        return any(net in v.nets for v in self.vms.values())


class DaemonGone(Exception):
    """A request found no daemon (connection refused or dropped)."""


class Stats:
    """Counters shared by the threads (one lock)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.invariants: Counter[str] = Counter()
        self.notes: list[str] = []
        self.violations: list[str] = []
        self.findings: list[str] = []  # bugs found and worked around so the soak can go on (reported)
        self.acked: set[str] = set()  # request ids of acknowledged (2xx) changes
        self.latency_max = 0.0
        self.tolerate_503 = False  # set while a fault runs concurrently with the actors

    def op(self, kind: str, status: int, elapsed: float) -> None:
        with self.lock:
            self.ops[kind] += 1
            self.statuses[str(status)] += 1
            self.latency_max = max(self.latency_max, elapsed)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(f"[seed {self.seed}] {text}")

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)

    def finding(self, text: str) -> None:
        with self.lock:
            self.findings.append(text)

    def inv(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.invariants[kind] += n


class Actor:
    """One client with its own mTLS identity and its own tenant."""

    MAX_NETS, MAX_DISKS, MAX_VMS, MAX_LIVE = 3, 3, 4, 2

    def __init__(self, idx: int, seed: int, world: Any, tenant: TenantModel, others: list[TenantModel],
                 stats: Stats) -> None:
        self.idx = idx
        self.rng = random.Random(f"{seed}/{idx}")
        self.world = world
        self.t = tenant
        self.others = others
        self.stats = stats
        self.api: Any = None
        self.step_no = 0
        self.name_no = 0
        self.lock = threading.Lock()  # guards the model against the main thread's fault handlers

    def connect(self) -> None:
        if self.api is not None:
            self.api.close()
        self.api = self.world.tls_api(f"soak-actor{self.idx}")

    # ------------------------------------------------------------------ plumbing
    def _fresh(self, stem: str) -> str:
        self.name_no += 1
        return f"{stem}{self.name_no}"

    def call(self, kind: str, expect: int | tuple[int, ...], method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None) -> Any:
        """One request; a status other than `expect` is a violation. Returns the reply."""
        r = self.world_api().call(method, path, body, params)
        self.stats.op(kind, r.status, r.elapsed)
        want = expect if isinstance(expect, tuple) else (expect,)
        if r.status == -1:  # the daemon is unreachable: this actor stops, the round's check says why
            self.stats.violation(f"actor{self.idx} step {self.step_no} {kind}: {method} {path} -> {r.body['detail']}")
            raise DaemonGone(r.body["detail"])
        if r.status == 503 and self.stats.tolerate_503:  # a fault window: refused, so nothing changed
            return r
        if r.status not in want:
            self.stats.violation(f"actor{self.idx} step {self.step_no} {kind}: {method} {path} {body!r} -> "
                                 f"{r.status} {r.body!r}, model expected {want}")
        elif 200 <= r.status < 300 and method != "GET":
            with self.stats.lock:
                self.stats.acked.add(r.request_id)
        return r

    def world_api(self) -> Any:
        return self.api

    # ------------------------------------------------------------------ one random step
    def step(self) -> None:
        self.step_no += 1
        self.world.flush_policy()
        with self.lock:
            kinds = [("net_create", 3), ("net_delete", 2), ("disk_create", 2), ("disk_delete", 1),
                     ("vm_create", 5), ("vm_life", 10), ("vm_delete", 3), ("read", 4), ("list", 2),
                     ("foreign", 3)]
            kind = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
            getattr(self, kind)()

    def _subnet(self, k: int) -> IPv4Network:
        return IPv4Network(f"10.{100 + self.idx}.{k}.0/24")

    def net_create(self) -> None:
        t, rng = self.t, self.rng
        used = {s for _, s in t.nets.values()}
        free = [self._subnet(k) for k in range(8) if self._subnet(k) not in used]
        case = rng.choice(["ok", "ok", "ok", "dup", "overlap", "badname", "public"])
        if case == "ok" and len(t.nets) >= self.MAX_NETS:
            case = "overlap" if t.nets else "badname"
        if case in ("dup", "overlap") and not t.nets:
            case = "public"
        name, subnet, want = self._fresh("lan"), str(rng.choice(free)), 201
        if case == "dup":
            name, want = rng.choice(list(t.nets.values()))[0], 409
        elif case == "overlap":
            subnet, want = str(rng.choice(list(t.nets.values()))[1].supernet(new_prefix=16)), 422
        elif case == "badname":
            name, want = "Not_Valid", 422
        elif case == "public":
            subnet, want = "8.8.8.0/24", 422
        r = self.call(f"net_create/{case}", want, "POST", f"/tenants/{t.id}/networks",
                      {"name": name, "ipv4_subnet": subnet})
        if r.status == 201 == want:
            t.nets[r.body["id"]] = (name, IPv4Network(subnet))

    def net_delete(self) -> None:
        t = self.t
        if not t.nets or self.rng.random() < 0.15:
            self.call("net_delete/missing", 404, "DELETE", f"/networks/{uuid.uuid4()}")
            return
        nid = self.rng.choice(sorted(t.nets))
        used = t.net_used(nid)
        r = self.call("net_delete/" + ("used" if used else "ok"), 409 if used else 204, "DELETE", f"/networks/{nid}")
        if r.status == 204 and not used:
            del t.nets[nid]

    def disk_create(self) -> None:
        t = self.t
        case = self.rng.choice(["ok", "ok", "dup", "zero"])
        if case == "ok" and len(t.disks) >= self.MAX_DISKS:
            case = "zero"
        if case == "dup" and not t.disks:
            case = "zero"
        name, size, want = self._fresh("d"), 1, 201
        if case == "dup":
            name, want = self.rng.choice(sorted(t.disks.values())), 409
        elif case == "zero":
            size, want = 0, 422
        r = self.call(f"disk_create/{case}", want, "POST", f"/tenants/{t.id}/disks", {"name": name, "size_mib": size})
        if r.status == 201 == want:
            t.disks[r.body["id"]] = name

    def disk_delete(self) -> None:
        t = self.t
        if not t.disks:
            self.call("disk_delete/missing", 404, "DELETE", f"/disks/{uuid.uuid4()}")
            return
        did = self.rng.choice(sorted(t.disks))
        used = t.disk_users(did, writable_only=False) > 0
        r = self.call("disk_delete/" + ("used" if used else "ok"), 409 if used else 204, "DELETE", f"/disks/{did}")
        if r.status == 204 and not used:
            del t.disks[did]

    def vm_create(self) -> None:
        t, rng = self.t, self.rng
        case = rng.choice(["ok", "ok", "ok", "ok", "dup", "foreign-net", "bad-mem", "no-kernel"])
        if case == "ok" and len(t.vms) >= self.MAX_VMS:
            case = "bad-mem"
        if case == "dup" and not t.vms:
            case = "bad-mem"
        foreign = [n for o in self.others for n in list(o.nets)]
        if case == "foreign-net" and not foreign:
            case = "no-kernel"
        nets = rng.sample(sorted(t.nets), rng.randint(0, min(2, len(t.nets))))
        drives: list[tuple[str, bool]] = []
        want = 201
        if t.disks and rng.random() < 0.4:
            d = rng.choice(sorted(t.disks))
            ro = rng.random() < 0.5
            drives = [(d, ro)]
            if (not ro and t.disk_users(d, False)) or t.disk_users(d, True):
                want = 409
        body: dict[str, Any] = {"tenant": t.id, "name": self._fresh("vm"), "kernel": "idle", "mem_mib": 8,
                                "nics": [{"network": n} for n in nets],
                                "drives": [{"disk": d, "read_only": ro} for d, ro in drives]}
        if case == "dup":
            body["name"], want = rng.choice([v.name for v in t.vms.values()]), 409
            body["drives"] = []
        elif case == "foreign-net":
            body["nics"], want, body["drives"] = [{"network": rng.choice(foreign)}], 422, []
        elif case == "bad-mem":
            body["mem_mib"], want = 1, 422
        elif case == "no-kernel":
            body["kernel"], want = "no-such-image", 422
        kind = f"vm_create/{case}" + ("/disk-conflict" if case == "ok" and want == 409 else "")
        r = self.call(kind, want, "POST", "/vms", body)
        if r.status == 201 == want:
            vm = MVm(r.body["id"], body["name"], "stopped", nets, drives)
            t.vms[vm.id] = vm
            m = self.call("vm_measure", 200, "GET", f"/vms/{vm.id}/measurement")
            if m.status == 200:
                self.world.allow_launch(m.body["digest"])

    def vm_life(self) -> None:
        t = self.t
        if not t.vms:
            self.call("vm_life/missing", 404, "POST", f"/vms/{uuid.uuid4()}/start")
            return
        vm = t.vms[self.rng.choice(sorted(t.vms))]
        op = self.rng.choice(["start", "start", "stop", "stop", "pause", "resume"])
        live = sum(1 for v in t.vms.values() if v.state in LIVE)
        if op == "start" and vm.state in CAN["start"] and live >= self.MAX_LIVE:
            op = "pause"
        ok = vm.state in CAN[op]
        r = self.call(f"vm_{op}/" + ("ok" if ok else "refused"), 200 if ok else 409, "POST", f"/vms/{vm.id}/{op}")
        if r.status == 200 and ok:
            vm.state = AFTER[op]
            if r.body.get("state") != vm.state:
                self.stats.violation(f"actor{self.idx} step {self.step_no} vm_{op}: answered state "
                                     f"{r.body.get('state')!r}, model {vm.state!r}")

    def vm_delete(self) -> None:
        t = self.t
        if not t.vms or self.rng.random() < 0.1:
            self.call("vm_delete/missing", 404, "DELETE", f"/vms/{uuid.uuid4()}")
            return
        vm = t.vms[self.rng.choice(sorted(t.vms))]
        ok = vm.state in CAN["delete"]
        r = self.call("vm_delete/" + ("ok" if ok else "refused"), 204 if ok else 409, "DELETE", f"/vms/{vm.id}")
        if r.status == 204 and ok:
            del t.vms[vm.id]

    def read(self) -> None:
        t = self.t
        if not t.vms:
            self.call("vm_get/missing", 404, "GET", f"/vms/{uuid.uuid4()}")
            return
        vm = t.vms[self.rng.choice(sorted(t.vms))]
        what = self.rng.choice(["get", "get", "console", "events"])
        if what == "get":
            r = self.call("vm_get", 200, "GET", f"/vms/{vm.id}")
            if r.status == 200:
                got = (r.body["state"], [n["network"] for n in r.body["nics"]],
                       [(d["disk"], d["read_only"]) for d in r.body["drives"]])
                if got != (vm.state, vm.nets, vm.drives):
                    self.stats.violation(f"actor{self.idx} step {self.step_no} vm_get {vm.id}: {got} != model "
                                         f"{(vm.state, vm.nets, vm.drives)}")
        else:
            self.call(f"vm_{what}", 200, "GET", f"/vms/{vm.id}/{what}")

    def list(self) -> None:
        t = self.t
        what = self.rng.choice(["vms", "networks", "disks"])
        got: Any
        if what == "vms":
            r = self.call("list/vms", 200, "GET", "/vms")
            got = {v["id"]: v["state"] for v in r.body} if r.status == 200 else None
            want: Any = {v.id: v.state for v in t.vms.values()}
        else:
            r = self.call(f"list/{what}", 200, "GET", f"/tenants/{t.id}/{what}")
            got = {x["id"] for x in r.body} if r.status == 200 else None
            want = set(t.nets if what == "networks" else t.disks)
        if got is not None and got != want:
            self.stats.violation(f"actor{self.idx} step {self.step_no} list/{what}: {got} != model {want}")

    def foreign(self) -> None:
        """Another tenant's resources: always exactly the answer for a missing one (404)."""
        o = self.rng.choice(self.others)
        vms, nets = list(o.vms), list(o.nets)
        probes = [("GET", f"/tenants/{o.id}/networks"), ("POST", f"/tenants/{o.id}/disks")]
        if vms:
            v = self.rng.choice(vms)
            probes += [("GET", f"/vms/{v}"), ("POST", f"/vms/{v}/stop"), ("DELETE", f"/vms/{v}"),
                       ("GET", f"/vms/{v}/console")]
        if nets:
            n = self.rng.choice(nets)
            probes += [("GET", f"/networks/{n}"), ("DELETE", f"/networks/{n}")]
        method, path = self.rng.choice(probes)
        body = {"name": "stolen", "size_mib": 1} if path.endswith("/disks") else None
        if method == "GET" and path.endswith("/networks"):  # a list: filtered to what the caller may read
            r = self.call("foreign/list", 200, method, path)
            if r.status == 200 and r.body != []:
                self.stats.violation(f"actor{self.idx} step {self.step_no}: another tenant's networks listed: {r.body}")
            return
        self.call("foreign/" + method.lower(), 404, method, path, body)


@dataclass
class AdminModel:
    scratch_tenants: dict[str, str] = field(default_factory=dict)  # id -> name
    roles: dict[str, str] = field(default_factory=dict)  # custom role id -> name
    assignments: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (role id, scope)


class Admin(Actor):
    """The root socket: tenants, roles and assignments (for a scratch principal `soak-extra`)."""

    def __init__(self, seed: int, world: Any, stats: Stats, extra_principal: str) -> None:
        super().__init__(99, seed, world, TenantModel("", ""), [], stats)
        self.m = AdminModel()
        self.extra = extra_principal

    def connect(self) -> None:
        if self.api is not None:
            self.api.close()
        self.api = self.world.root_api()

    def step(self) -> None:
        self.step_no += 1
        with self.lock:
            kind = self.rng.choice(["tenant", "tenant", "role", "role", "assign", "assign", "whoami"])
            getattr(self, "a_" + kind)()

    def a_whoami(self) -> None:
        self.call("whoami", 200, "GET", "/whoami")

    def a_tenant(self) -> None:
        m, rng = self.m, self.rng
        case = rng.choice(["create", "create", "delete", "dup", "bad", "missing"])
        if case in ("delete", "dup") and not m.scratch_tenants:
            case = "create"
        if case == "create" and len(m.scratch_tenants) >= 4:
            case = "delete"
        if case == "create":
            name = self._fresh("scratch-")
            r = self.call("tenant_create/ok", 201, "POST", "/tenants", {"name": name})
            if r.status == 201:
                m.scratch_tenants[r.body["id"]] = name
        elif case == "dup":
            self.call("tenant_create/dup", 409, "POST", "/tenants", {"name": rng.choice(sorted(m.scratch_tenants.values()))})
        elif case == "bad":
            self.call("tenant_create/bad", 422, "POST", "/tenants", {"name": "Bad Name!"})
        elif case == "missing":
            self.call("tenant_delete/missing", 404, "DELETE", f"/tenants/{uuid.uuid4()}")
        else:
            tid = rng.choice(sorted(m.scratch_tenants))
            busy = any(s.endswith(tid) for _, s in m.assignments.values())
            r = self.call("tenant_delete/" + ("assigned" if busy else "ok"), (204, 409) if busy else 204,
                          "DELETE", f"/tenants/{tid}")
            if r.status == 204:
                del m.scratch_tenants[tid]
                m.assignments = {a: v for a, v in m.assignments.items() if not v[1].endswith(tid)}

    def a_role(self) -> None:
        m, rng = self.m, self.rng
        case = rng.choice(["create", "create", "delete", "dup", "bad", "builtin"])
        if case in ("delete", "dup") and not m.roles:
            case = "create"
        if case == "create" and len(m.roles) >= 4:
            case = "delete"
        if case == "create":
            name = self._fresh("soak-role-")
            r = self.call("role_create/ok", 201, "POST", "/roles",
                          {"name": name, "actions": ["vm/read", "network/read"], "assignable_scopes": ["/"]})
            if r.status == 201:
                m.roles[r.body["id"]] = name
        elif case == "dup":
            self.call("role_create/dup", 409, "POST", "/roles", {"name": rng.choice(sorted(m.roles.values())),
                                                                 "actions": ["vm/read"], "assignable_scopes": ["/"]})
        elif case == "bad":
            self.call("role_create/bad", 422, "POST", "/roles", {"name": "bad", "actions": ["VM READ"],
                                                                  "assignable_scopes": ["/"]})
        elif case == "builtin":
            r = self.call("role_list", 200, "GET", "/roles")
            builtin = [x["id"] for x in r.body if x["name"] == "Reader"] if r.status == 200 else []
            if builtin:
                self.call("role_delete/builtin", 409, "DELETE", f"/roles/{builtin[0]}")
        else:
            rid = rng.choice(sorted(m.roles))
            used = any(v[0] == rid for v in m.assignments.values())
            r = self.call("role_delete/" + ("assigned" if used else "ok"), 409 if used else 204, "DELETE",
                          f"/roles/{rid}")
            if r.status == 204 and not used:
                del m.roles[rid]

    def a_assign(self) -> None:
        m, rng = self.m, self.rng
        case = rng.choice(["create", "create", "delete", "dup", "missing"])
        if case in ("delete", "dup") and not m.assignments:
            case = "create"
        if case == "create" and (not m.roles or not m.scratch_tenants):
            case = "missing"
        if case == "create":
            rid, scope = rng.choice(sorted(m.roles)), f"/tenants/{rng.choice(sorted(m.scratch_tenants))}"
            dup = (rid, scope) in m.assignments.values()
            r = self.call("assign_create/" + ("dup" if dup else "ok"), 409 if dup else 201, "POST", "/assignments",
                          {"principal": self.extra, "role": rid, "scope": scope})
            if r.status == 201 and not dup:
                m.assignments[r.body["id"]] = (rid, scope)
        elif case == "dup":
            rid, scope = rng.choice(sorted(m.assignments.values()))
            self.call("assign_create/dup", 409, "POST", "/assignments", {"principal": self.extra, "role": rid,
                                                                         "scope": scope})
        elif case == "missing":
            self.call("assign_delete/missing", 404, "DELETE", f"/assignments/{uuid.uuid4()}")
        else:
            aid = rng.choice(sorted(m.assignments))
            r = self.call("assign_delete/ok", 204, "DELETE", f"/assignments/{aid}")
            if r.status == 204:
                del m.assignments[aid]


def run_threads(actors: list[Actor], steps: int) -> None:
    """Every actor runs `steps` steps in its own thread, all at the same time."""
    def go(a: Actor) -> None:
        for _ in range(steps):
            try:
                a.step()
            except DaemonGone:
                return
            except Exception as exc:  # a driver bug or an unexpected body shape: a violation, not a hang
                a.stats.violation(f"actor{a.idx} step {a.step_no}: driver exception {exc!r}")
                return

    threads = [threading.Thread(target=go, args=(a,), name=f"soak-actor{a.idx}") for a in actors]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def wait_for(pred: Any, timeout: float, interval: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > end:
            return got
        time.sleep(interval)
