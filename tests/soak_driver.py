"""The soak's driver: setup, the invariants checked after every round, the faults injected between rounds,
and the report (used by tests/test_soak.py and bench/soak.py). See tests/soak_model.py for the model."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from soak_model import LIVE, Actor, Admin, Stats, TenantModel, run_threads, wait_for
from soak_world import World

FAULTS = ("dnsmasq", "worker", "tap", "lock-state", "lock-audit", "lock-concurrent", "enospc",
          "enospc-concurrent", "swtpm", "daemon")
CI_FAULTS = FAULTS


class Soak:
    def __init__(self, root: Path, seed: int, actors: int = 3, ops_per_round: int = 12, prefix: str | None = None,
                 log: Any = print, sigterm_idle_client: bool = False) -> None:
        self.seed = seed
        self.sigterm_idle_client = sigterm_idle_client
        self.rng = random.Random(f"{seed}/driver")
        self.prefix = prefix or "s" + "".join(random.Random(seed).choices("0123456789abcdef", k=3))
        self.world = World(root, self.prefix, log=log)
        self.stats = Stats(seed)
        self.n_actors = actors
        self.ops_per_round = ops_per_round
        self.log = log
        self.actors: list[Actor] = []
        self.admin: Admin | None = None
        self.tenants: list[TenantModel] = []
        self.probe: dict[str, str] = {}
        self.known_vms: set[str] = set()
        self.rounds = 0
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        w = self.world
        w.setup()
        root = w.root_api()
        try:
            for i in range(self.n_actors):
                r = root.call("POST", "/tenants", {"name": f"soak-t{i}"})
                assert r.status == 201, r
                t = TenantModel(r.body["id"], f"soak-t{i}")
                self.tenants.append(t)
                pid = w.issue_identity(root, f"soak-actor{i}")
                a = root.call("POST", "/assignments", {"principal": pid, "role": "Contributor",
                                                       "scope": f"/tenants/{t.id}"})
                assert a.status == 201, a
            extra = w.issue_identity(root, "soak-extra")
            r = root.call("POST", "/tenants", {"name": "soak-probe"})
            assert r.status == 201, r
            self.probe["tenant"] = r.body["id"]
            v = root.call("POST", "/vms", {"tenant": r.body["id"], "name": "probe", "kernel": "idle", "mem_mib": 8})
            assert v.status == 201, v
            self.probe["vm"], self.probe["state"] = v.body["id"], "stopped"
            w.allow_launch(root.call("GET", f"/vms/{v.body['id']}/measurement").body["digest"])
        finally:
            root.close()
        for i, t in enumerate(self.tenants):
            self.actors.append(Actor(i, self.seed, w, t, [o for o in self.tenants if o is not t], self.stats))
        self.admin = Admin(self.seed, w, self.stats, extra)
        for actor in self.all_actors():
            actor.connect()

    def all_actors(self) -> list[Actor]:
        return [*self.actors, *([self.admin] if self.admin else [])]

    def reconnect(self) -> None:
        for a in self.all_actors():
            a.connect()

    # ------------------------------------------------------------------ invariants
    def model_vms(self) -> dict[str, str]:
        out = {v.id: v.state for t in self.tenants for v in t.vms.values()}
        out[self.probe["vm"]] = self.probe["state"]
        self.known_vms |= set(out)
        return out

    def check(self, label: str) -> None:
        s, w = self.stats, self.world
        if not w.daemon_alive():
            s.violation(f"{label}: the daemon is not running (exit {w.proc.returncode if w.proc else None}); "
                        f"log tail:\n{w.daemon_tail()}")
            return
        s.inv("daemon-up")
        api = w.root_api()
        try:
            self._check_lists(label, api)
        finally:
            api.close()
        missing = s.acked - w.audit_request_ids()
        s.inv("acknowledged-in-audit", len(s.acked))
        if missing:
            s.violation(f"{label}: {len(missing)} acknowledged requests have no audit record: {sorted(missing)[:5]}")
        ok, out = w.audit_verify()
        s.inv("audit-verify")
        if not ok:
            s.violation(f"{label}: audit verify failed: {out}")
        self._check_host(label)

    def _check_lists(self, label: str, api: Any) -> None:
        s = self.stats
        want_vms = self.model_vms()
        r = api.call("GET", "/vms")
        got = {v["id"]: v["state"] for v in r.body} if r.status == 200 else r
        s.inv("list-vms")
        if got != want_vms:
            s.violation(f"{label}: GET /vms {got} != model {want_vms}")
        assert self.admin is not None
        want_t = {t.id for t in self.tenants} | set(self.admin.m.scratch_tenants) | {self.probe["tenant"]}
        r = api.call("GET", "/tenants")
        s.inv("list-tenants")
        if r.status != 200 or {t["id"] for t in r.body} != want_t:
            s.violation(f"{label}: GET /tenants {r.status} {r.body} != model {want_t}")
        for t in self.tenants:
            for what, want in (("networks", set(t.nets)), ("disks", set(t.disks))):
                r = api.call("GET", f"/tenants/{t.id}/{what}")
                s.inv(f"list-{what}")
                if r.status != 200 or {x["id"] for x in r.body} != want:
                    s.violation(f"{label}: GET /tenants/{t.id}/{what} {r.status} {r.body} != model {want}")
        r = api.call("GET", "/roles")
        s.inv("list-roles")
        custom = {x["id"] for x in r.body if not x.get("builtin")} if r.status == 200 else None
        if custom != set(self.admin.m.roles):
            s.violation(f"{label}: custom roles {custom} != model {set(self.admin.m.roles)}")
        r = api.call("GET", "/assignments", params={"principal": self.admin.extra})
        s.inv("list-assignments")
        got_a = {x["id"] for x in r.body} if r.status == 200 else None
        if got_a != set(self.admin.m.assignments):
            s.violation(f"{label}: assignments {got_a} != model {set(self.admin.m.assignments)}")

    def expected_host(self) -> dict[str, Any]:
        cfg = self.world.cfg
        live = {vid for vid, st in self.model_vms().items() if st in LIVE}
        want: dict[str, Any] = {"netns": set(), "links": {}, "dnsmasq": set()}
        for t in self.tenants:
            if not t.nets:
                continue
            ns = cfg.netns(t.id)
            want["netns"].add(ns)
            links = {cfg.bridge(n) for n in t.nets}
            for v in t.vms.values():
                if v.state in LIVE:
                    links |= {cfg.tap(v.id, i) for i in range(len(v.nets))}
            want["links"][ns] = links
            want["dnsmasq"] |= {cfg.bridge(n) for n in t.nets}
        want["live"] = live
        return want

    def _check_host(self, label: str) -> None:
        s, p = self.stats, self.prefix
        want = self.expected_host()
        got = self.world.observe(self.known_vms)
        problems = []
        if got["netns"] != want["netns"]:
            problems.append(f"namespaces {sorted(got['netns'])} != model {sorted(want['netns'])}")
        for ns in want["netns"] & got["netns"]:
            if got["links"][ns] != want["links"][ns]:
                problems.append(f"links in {ns}: extra {sorted(got['links'][ns] - want['links'][ns])}, missing "
                                f"{sorted(want['links'][ns] - got['links'][ns])}")
            if got["tables"][ns] != {f"bridge {p}_guard", f"inet {p}_tenant"}:
                problems.append(f"nft tables in {ns}: {sorted(got['tables'][ns])}")
        if set(got["dnsmasq"]) != want["dnsmasq"] or any(len(v) != 1 for v in got["dnsmasq"].values()):
            problems.append(f"dnsmasq {got['dnsmasq']} != one per bridge {sorted(want['dnsmasq'])}")
        for key in ("cgroups", "jails", "workers"):
            if got[key] != want["live"]:
                problems.append(f"{key}: extra {sorted(got[key] - want['live'])}, missing "
                                f"{sorted(want['live'] - got[key])}")
        s.inv("host-objects")
        if problems:
            s.violation(f"{label}: host state differs from the model: " + "; ".join(problems))

    # ------------------------------------------------------------------ faults
    def live_vms(self, with_nics: bool = False) -> list[tuple[Actor, Any]]:
        return [(a, v) for a in self.actors for v in a.t.vms.values() if v.state in LIVE and (v.nets or not with_nics)]

    def fault(self, kind: str) -> None:
        """Inject one fault and check the documented reaction; counted only when it could be injected."""
        done = getattr(self, "f_" + kind.replace("-", "_"))()
        if done:
            self.stats.faults[kind] += 1
        self.check(f"after fault {kind}")

    def _root(self) -> Any:
        return self.world.root_api()

    def _expect(self, label: str, r: Any, allowed: tuple[int, ...]) -> None:
        self.stats.op(label, r.status, r.elapsed)
        if r.status not in allowed:
            self.stats.violation(f"{label}: {r.status} {r.body!r}, allowed {allowed}")
        elif 200 <= r.status < 300:
            with self.stats.lock:
                self.stats.acked.add(r.request_id)

    def _ensure_live(self, with_nics: bool) -> list[tuple[Actor, Any]]:
        """A running VM (with a NIC) for the faults that need one: the operator starts a stopped one, or
        creates one (and its network) in an actor's tenant; the actor's model is updated accordingly."""
        live = self.live_vms(with_nics)
        if live:
            return live
        api = self._root()
        try:
            cands = [(a, v) for a in self.actors for v in a.t.vms.values() if v.state not in LIVE
                     and (v.nets or not with_nics)]
            if not cands:
                a = self.rng.choice(self.actors)
                if not a.t.nets:
                    used = {sub for _, sub in a.t.nets.values()}
                    subnet = next(a._subnet(k) for k in range(8) if a._subnet(k) not in used)
                    r = api.call("POST", f"/tenants/{a.t.id}/networks", {"name": "fault-net", "ipv4_subnet": str(subnet)})
                    self._expect("fault/prepare-net", r, (201,))
                    if r.status != 201:
                        return []
                    a.t.nets[r.body["id"]] = ("fault-net", subnet)
                net = sorted(a.t.nets)[0]
                name = f"fault-vm{self.rounds}"
                r = api.call("POST", "/vms", {"tenant": a.t.id, "name": name, "kernel": "idle", "mem_mib": 8,
                                              "nics": [{"network": net}]})
                self._expect("fault/prepare-vm", r, (201,))
                if r.status != 201:
                    return []
                from soak_model import MVm

                vm = MVm(r.body["id"], name, "stopped", [net], [])
                a.t.vms[vm.id] = vm
                self.world.allow_launch(api.call("GET", f"/vms/{vm.id}/measurement").body["digest"])
                cands = [(a, vm)]
            a, vm = self.rng.choice(cands)
            r = api.call("POST", f"/vms/{vm.id}/start")
            self._expect("fault/prepare-start", r, (200,))
            if r.status == 200:
                vm.state = "running"
        finally:
            api.close()
        return self.live_vms(with_nics)

    def f_dnsmasq(self) -> bool:
        nets = [(t, n) for t in self.tenants for n in t.nets]
        if not nets:
            return False
        _, n = self.rng.choice(nets)
        if self.world.kill_dnsmasq(self.world.cfg.bridge(n)) is None:
            self.stats.violation(f"fault dnsmasq: no dnsmasq for network {n}")
            return False
        bridge = self.world.cfg.bridge(n)
        t0 = time.monotonic()  # the daemon's monitor restores it (dhcp_watch), no network change needed
        if not wait_for(lambda: bridge in self.world.observe(set())["dnsmasq"], 15, 0.5):
            self.stats.violation(f"fault dnsmasq: the dnsmasq of network {n} was not restored within 15 s")
            self._trigger_sync("dnsmasq")
        else:
            self.stats.note(f"a killed dnsmasq was restored by the daemon in {time.monotonic() - t0:.1f} s")
        return True

    def _trigger_sync(self, why: str) -> None:
        """A network change (create and delete one in the probe tenant): the daemon syncs the host."""
        api = self._root()
        try:
            r = api.call("POST", f"/tenants/{self.probe['tenant']}/networks",
                         {"name": "probe-net", "ipv4_subnet": "10.250.0.0/24"})
            self._expect(f"fault/{why}-sync", r, (201,))
            if r.status == 201:
                self._expect(f"fault/{why}-sync", api.call("DELETE", f"/networks/{r.body['id']}"), (204,))
        finally:
            api.close()

    def f_worker(self) -> bool:
        live = self._ensure_live(with_nics=False)
        if not live:
            return False
        _, vm = self.rng.choice(live)
        if not self.world.kill_worker(vm.id):
            self.stats.violation(f"fault worker: VM {vm.id} has no worker process")
            return False
        api = self._root()
        try:
            got = wait_for(lambda: (r := api.call("GET", f"/vms/{vm.id}")).status == 200
                           and r.body["state"] == "exited" and r, 15)
            if not got:
                self.stats.violation(f"fault worker: VM {vm.id} not marked exited after its worker was killed")
                return True
            vm.state = "exited"
            ev = api.call("GET", f"/vms/{vm.id}/events").body
            reason = json.loads(ev[-1]["detail"]).get("reason") if ev else None
            self.stats.inv("worker-exit-reason")
            if (ev[-1]["event"], reason) != ("exited", "worker-crash"):
                self.stats.violation(f"fault worker: last event {ev[-1]!r}, expected exited/worker-crash")
        finally:
            api.close()
        return True

    def f_tap(self) -> bool:
        live = self._ensure_live(with_nics=True)
        if not live:
            return False
        a, vm = self.rng.choice(live)
        cfg = self.world.cfg
        if not self.world.delete_link(cfg.netns(a.t.id), cfg.tap(vm.id, 0)):
            self.stats.violation(f"fault tap: could not delete the tap of {vm.id}")
            return False
        time.sleep(1.0)
        api = self._root()
        try:
            r = api.call("GET", f"/vms/{vm.id}")
            self._expect("fault/tap-get", r, (200,))
            state = r.body.get("state") if r.status == 200 else None
            ev = api.call("GET", f"/vms/{vm.id}/events").body or [{}]
            self.stats.note(f"a VM whose tap vanished is {state!r} one second later (last event "
                            f"{ev[-1].get('event')} {ev[-1].get('detail', '')[:160]})")
            if state in LIVE:
                r = api.call("POST", f"/vms/{vm.id}/stop")
                self._expect("fault/tap-stop", r, (200,))
                vm.state = "stopped" if r.status == 200 else vm.state
            elif state in ("exited", "stopped"):
                vm.state = state
            if vm.state == "stopped":  # a fresh start makes a fresh tap
                r = api.call("POST", f"/vms/{vm.id}/start")
                self._expect("fault/tap-restart", r, (200,))
                vm.state = "running" if r.status == 200 else vm.state
        finally:
            api.close()
        return True

    def _lock(self, db: str) -> bool:
        hold = 3.0
        th = self.world.hold_exclusive(db, hold)
        api = self._root()
        try:
            t0 = time.monotonic()
            r2 = api.call("GET", "/tenants")
            self._expect(f"fault/{db}-locked-read", r2, (200, 503))
            name = f"lock-{db.split('.')[0]}-{self.rounds}"
            r = api.call("POST", "/tenants", {"name": name})
            self._expect(f"fault/{db}-locked-write", r, (201, 503))
            if r.status == 201:
                assert self.admin is not None
                self.admin.m.scratch_tenants[r.body["id"]] = name
            self.stats.note(f"{db} held exclusively for {hold:.0f}s: a read answered {r2.status} after "
                            f"{r2.elapsed:.1f}s, then a write {r.status} after {r.elapsed:.1f}s")
            th.join(30)
            rest = max(0.0, hold - (time.monotonic() - t0))
            time.sleep(rest)
            self._expect(f"fault/{db}-after-lock", api.call("GET", "/whoami"), (200,))
        finally:
            api.close()
        return True

    def f_lock_state(self) -> bool:
        return self._lock("state.db")

    def f_lock_audit(self) -> bool:
        return self._lock("audit.db")

    def f_lock_concurrent(self) -> bool:
        """A round of every actor while another connection holds state.db, then audit.db, exclusively
        (2 s each): requests wait (busy timeout) or are refused 503; a refused change changed nothing,
        which the lists and host checks after the round verify."""
        import threading

        def locker() -> None:
            time.sleep(0.3)
            for db in ("state.db", "audit.db"):
                self.world.hold_exclusive(db, 2.0).join(30)

        th = threading.Thread(target=locker, daemon=True)
        self.stats.tolerate_503 = True
        try:
            th.start()
            run_threads(self.all_actors(), self.ops_per_round)
            th.join(60)
        finally:
            self.stats.tolerate_503 = False
        return True

    def f_enospc_concurrent(self) -> bool:
        """A round of every actor while the state filesystem fills up for 2 s: a refused (503) change must
        have changed nothing (no VM started, no network realised), which the checks after the round see."""
        import threading

        done = threading.Event()

        def filler() -> None:
            time.sleep(0.3)
            ballast = self.world.fill_disk()
            done.wait(2.0)
            ballast.unlink()

        th = threading.Thread(target=filler, daemon=True)
        self.stats.tolerate_503 = True
        try:
            th.start()
            run_threads(self.all_actors(), self.ops_per_round)
            done.set()
            th.join(60)
        finally:
            self.stats.tolerate_503 = False
        time.sleep(0.5)
        before = len(self.stats.violations)
        self._check_host("enospc-concurrent, before the next sync")
        if len(self.stats.violations) > before:  # a refused change left the host changed (finding A): the
            self._trigger_sync("enospc")  # violation stands; the next sync must still repair it
        return True

    def f_enospc(self) -> bool:
        w, s = self.world, self.stats
        assert self.admin is not None
        free = w.free()
        try:
            ballast = w.fill_disk()
        except OSError as exc:
            s.violation(f"fault enospc: cannot create the ballast ({exc}); {free >> 20} MiB were free")
            return False
        s.note(f"state filesystem filled: {free >> 20} MiB of ballast")
        api = self._root()
        refused = 0
        try:
            for i in range(4):
                name = f"full-{self.rounds}-{i}"
                r = api.call("POST", "/tenants", {"name": name})
                self._expect("fault/enospc-write", r, (201, 503))
                if r.status == 201:
                    self.admin.m.scratch_tenants[r.body["id"]] = name
                else:
                    refused += 1
                    detail = str(r.body)
                    if "Traceback" in detail or not detail.strip():
                        s.violation(f"fault enospc: unclear refusal {r.body!r}")
            r = api.call("GET", "/tenants")
            self._expect("fault/enospc-read", r, (200, 503))
            s.note(f"state filesystem full: {refused}/4 writes refused; a read answered {r.status}")
            if not w.daemon_alive():
                s.violation(f"fault enospc: the daemon died on a full disk:\n{w.daemon_tail()}")
                return True
        finally:
            ballast.unlink()
            api.close()
        api = self._root()
        try:
            name = f"recovered-{self.rounds}"
            got = wait_for(lambda: (r := api.call("POST", "/tenants", {"name": name})).status in (201, 409) and r, 20,
                           0.5)
            if not got:
                s.violation("fault enospc: requests still refused 20 s after the space came back")
            else:
                tid = got.body["id"] if got.status == 201 else next(
                    t["id"] for t in api.call("GET", "/tenants").body if t["name"] == name)
                self.admin.m.scratch_tenants[tid] = name
                with s.lock:
                    s.acked.add(got.request_id)
        finally:
            api.close()
        return True

    def f_swtpm(self) -> bool:
        w, s = self.world, self.stats
        pids = w.swtpm_pids()
        if not pids:
            s.violation("fault swtpm: no swtpm process of this daemon")
            return False
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        api = self._root()
        try:
            vm = self.probe["vm"]
            if self.probe["state"] in LIVE:
                self._expect("fault/swtpm-probe-stop", api.call("POST", f"/vms/{vm}/stop"), (200,))
                self.probe["state"] = "stopped"
            r = api.call("POST", f"/vms/{vm}/start")
            self._expect("fault/swtpm-start", r, (503,))  # the launch cannot be measured: fail closed
            if r.status == 200:
                self.probe["state"] = "running"
            st = api.call("GET", "/integrity")
            s.note(f"swtpm killed: a VM start answered {r.status} ({str(r.body)[:120]}); GET /integrity then said "
                   f"{st.body.get('state')!r}")
            if st.body.get("state") == "trusted":  # a failed TPM call makes the host untrusted at once
                s.violation("fault swtpm: with its TPM gone, GET /integrity still says 'trusted' while VM starts "
                            "are refused 503")
        finally:
            api.close()
        self._restart(signal.SIGTERM, "swtpm")  # the dev TPM comes back with the daemon
        api = self._root()
        try:
            r = api.call("POST", f"/vms/{self.probe['vm']}/start")
            self._expect("fault/swtpm-recovered-start", r, (200,))
            if r.status == 200:
                self.probe["state"] = "running"
        finally:
            api.close()
        return True

    def f_daemon(self) -> bool:
        self._restart(signal.SIGKILL, "daemon")
        return True

    def _restart(self, sig: int, why: str) -> None:
        """Stop the daemon with `sig`, start it again on the same state dir, and check the restart policy:
        every VM that was running or paused is `lost` (with a vm.lost record), nothing else changed."""
        w, s = self.world, self.stats
        idle = None
        if self.sigterm_idle_client and sig == signal.SIGTERM and self.actors and self.actors[0].api is not None:
            idle = self.actors[0].api  # one idle keep-alive TLS client stays connected (issue 12: SIGTERM slow)
            idle.call("GET", "/whoami")
            self.actors[0].api = None
        for a in self.all_actors():
            if a.api is not None:
                a.api.close()
                a.api = None
        was_live = [vid for vid, st in self.model_vms().items() if st in LIVE]
        took = w.stop_daemon(sig)
        if idle is not None:
            idle.close()
            if took > 2.0:
                s.finding(f"SIGTERM takes more than 2 s with one idle keep-alive TLS client connected ({took:.0f} s)")
        s.note(f"{why}: daemon stopped by signal {sig} in {took:.2f}s")
        if not wait_for(lambda: not w.swtpm_pids(), 5):  # PR_SET_PDEATHSIG: the dev TPM dies with its daemon
            s.violation(f"the --dev-tpm swtpm outlives a daemon stopped by signal {sig} (pids {w.swtpm_pids()})")
            for p in w.swtpm_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGTERM)
            wait_for(lambda: not w.swtpm_pids(), 5)
        for t in self.tenants:
            for v in t.vms.values():
                if v.state in LIVE:
                    v.state = "lost"
        if self.probe["state"] in LIVE:
            self.probe["state"] = "lost"
        try:
            w.start_daemon()
        except RuntimeError as exc:
            s.violation(f"restart after {why}: the daemon did not come back: {exc}\n{w.daemon_tail()}")
            raise
        api = self._root()
        try:
            st = api.call("GET", "/integrity").body
        finally:
            api.close()
        if st.get("state") != "trusted":  # the AK has noDA: no dictionary-attack lockout after unclean ends
            s.violation(f"restart after {why}: the host is not trusted: {st.get('reasons')}")
        self.reconnect()
        api = self._root()
        try:
            for vid in was_live:
                recs = api.call("GET", "/audit", params={"vm": vid, "limit": 1000}).body
                s.inv("vm-lost-record")
                if not any(x["action"] == "vm.lost" for x in recs):
                    s.violation(f"restart after {why}: VM {vid} was running but has no vm.lost record")
        finally:
            api.close()

    # ------------------------------------------------------------------ the run
    def run(self, seconds: float, fault_every: int = 1, faults: tuple[str, ...] = FAULTS) -> None:
        """Rounds until `seconds` have passed (or a violation); a fault after every `fault_every` rounds,
        cycling through `faults` in a seeded order."""
        order = list(faults)
        self.rng.shuffle(order)
        end = self.t0 + seconds
        k = 0
        while time.monotonic() < end and not self.stats.violations:
            self.rounds += 1
            run_threads(self.all_actors(), self.ops_per_round)
            self.check(f"round {self.rounds}")
            if self.stats.violations or time.monotonic() >= end:
                break
            if self.rounds % fault_every == 0:
                kind = order[k % len(order)]
                k += 1
                try:
                    self.fault(kind)
                except RuntimeError:
                    break
            self.log(f"round {self.rounds}: {sum(self.stats.ops.values())} ops, faults {dict(self.stats.faults)}, "
                     f"{len(self.stats.violations)} violations")

    def report(self) -> dict[str, Any]:
        s = self.stats
        wall = time.monotonic() - self.t0
        ops = sum(s.ops.values())
        return {"seed": self.seed, "prefix": self.prefix, "wall_s": round(wall, 1), "rounds": self.rounds,
                "actors": self.n_actors, "operations": ops, "ops_per_s": round(ops / wall, 2) if wall else 0,
                "max_latency_s": round(s.latency_max, 2), "by_kind": dict(sorted(s.ops.items())),
                "statuses": dict(sorted(s.statuses.items())), "faults": dict(sorted(s.faults.items())),
                "invariants": dict(sorted(s.invariants.items())), "notes": sorted(set(s.notes)),
                "findings": sorted(set(s.findings)), "violations": s.violations}

    def close(self) -> None:
        for a in self.all_actors():
            if a.api is not None:
                a.api.close()
        self.world.teardown()
