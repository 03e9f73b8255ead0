"""The fleet's pure core: etcd key layout, records, host states, the scheduler and the fencing rules.

No I/O: values in, values out (tests/fleet/test_model.py property-tests it with hypothesis). The
design and the fencing argument are in docs/FLEET.md; section names below refer to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bulkhead.errors import ConfigError

__all__ = [
    "HOST_STATES", "PREFIX", "FleetTiming", "HostView", "Placement", "VmDemand", "decode", "encode",
    "fence_deadline", "host_state", "key", "lost_reschedulable", "place", "valid_host_id",
]

PREFIX = "/bulkhead/"
HOST_STATES = ("ready", "unattested", "draining", "lost")
MAX_HOST_ID = 63


def key(kind: str, *parts: str) -> str:
    """The etcd key of a record (docs/FLEET.md "Keys"). kind: hosts | known | nonce | evidence | attest |
    drain | vms | assign | running | disks | exit | leader | lost | checkpoint | witnessed | flagged."""
    return PREFIX + "/".join((kind, *parts))


def valid_host_id(name: str) -> str:
    """A host id: 1..63 characters of [a-z0-9-], not starting with '-'. Raises ConfigError."""
    ok = 0 < len(name) <= MAX_HOST_ID and name[0] != "-" and all(c.isdigit() or "a" <= c <= "z" or c == "-"
                                                                  for c in name)
    if not ok:
        raise ConfigError(f"host id {name!r}: use 1-{MAX_HOST_ID} characters a-z, 0-9 and '-'")
    return name


def encode(obj: Mapping[str, Any]) -> str:
    """Records are canonical JSON (sorted keys); never pickle."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def decode(text: str | bytes | None) -> dict[str, Any] | None:
    """A record, or None for a missing or malformed value (a malformed record is treated as absent:
    whoever wrote it cannot make the reader crash)."""
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True)
class FleetTiming:
    """docs/FLEET.md "Fencing": lease TTL, keepalive period, the agent's self-fence margin and the
    controller's grace before it reschedules a lost host's VMs."""

    ttl: float = 3.0
    keepalive: float = 1.0
    fence_margin: float = 0.75
    grace: float = 1.0
    attest_interval: float = 5.0
    attest_max_age: float = 15.0

    def __post_init__(self) -> None:
        if not (1 <= self.ttl <= 300):
            raise ConfigError("the lease TTL must be 1..300 seconds")
        if not (0 < self.keepalive < self.ttl - self.fence_margin):
            raise ConfigError("keepalive must be shorter than TTL minus the fence margin")
        if not (0 < self.fence_margin < self.ttl):
            raise ConfigError("the fence margin must be between 0 and the TTL")
        if self.grace < 0:
            raise ConfigError("the grace must not be negative")
        if not (0 < self.attest_interval < self.attest_max_age):
            raise ConfigError("attestation interval must be shorter than its maximum age")


def fence_deadline(last_ok_sent: float, ttl: float, margin: float) -> float:
    """docs/FLEET.md "Fencing" rule F2: the agent's monotonic time by which every VM it runs must be
    stopped unless a keepalive sent later has succeeded. A keepalive sent at t that succeeds means the lease
    cannot expire before t + ttl on etcd's side (etcd starts the new TTL when it *receives* the request,
    which is after t), so stopping by t + ttl - margin stops before expiry, with `margin` for clock rate."""
    return last_ok_sent + ttl - margin


def lost_reschedulable(observed_lost: float, grace: float) -> float:
    """docs/FLEET.md rule F3: the controller time after which a lost host's VMs may be reassigned: the
    lease has already expired when the host is observed lost (its key went with the lease), and the
    agent stopped its VMs before that expiry (F2); `grace` covers clock rate differences."""
    return observed_lost + grace


@dataclass(frozen=True)
class HostView:
    """What the controller knows of a host (from etcd and its own verdicts)."""

    name: str
    alive: bool  # its lease-bound registration exists
    mem_mib: int = 0
    vcpus: int = 0
    slots: int = 0
    trusted: bool = False
    attested_at: float | None = None  # controller wall time of the last passing verification
    drained: bool = False
    reasons: tuple[str, ...] = ()


def host_state(h: HostView, now: float, max_age: float) -> str:
    """ready | unattested | draining | lost (docs/FLEET.md "Host states"). Lost wins over everything
    (the host cannot act), an operator's drain over attestation; only `ready` is schedulable."""
    if not h.alive:
        return "lost"
    if h.drained:
        return "draining"
    if not h.trusted or h.attested_at is None or now - h.attested_at > max_age or h.attested_at > now + max_age:
        return "unattested"
    return "ready"


@dataclass(frozen=True)
class VmDemand:
    id: str
    tenant: str
    mem_mib: int
    cpus: int


@dataclass
class Placement:
    """place()'s answer: vm id -> host for the VMs it placed, vm id -> reason for the others."""

    assigned: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)


def place(pending: Iterable[VmDemand], hosts: Iterable[HostView], running: Mapping[str, tuple[str, VmDemand]],
          *, now: float, max_age: float, dedicated: frozenset[str] = frozenset()) -> Placement:
    """The scheduler (docs/FLEET.md "Scheduling"): deterministic, the same policy every time.

    `running`: vm id -> (host, demand) of VMs already placed (they use capacity). Rules, in order:
      1. only `ready` hosts (alive, not drained, fresh passing attestation);
      2. capacity: memory, vCPUs and slots left after what is already placed;
      3. dedicated tenants: a host holding a dedicated tenant's VM takes no other tenant's VM, and a dedicated
         tenant's VM goes only to a host with no other tenant's VM;
      4. spread: fewest VMs of the same tenant first, then most free memory, then the host name.
    Pending VMs are placed in id order so that the result does not depend on input order."""
    ready = {h.name: h for h in hosts if host_state(h, now, max_age) == "ready"}
    mem = {n: h.mem_mib for n, h in ready.items()}
    cpu = {n: h.vcpus for n, h in ready.items()}
    slots = {n: h.slots for n, h in ready.items()}
    tenants: dict[str, dict[str, int]] = {n: {} for n in ready}
    for host, d in running.values():
        if host in ready:
            mem[host] -= d.mem_mib
            cpu[host] -= d.cpus
            slots[host] -= 1
            tenants[host][d.tenant] = tenants[host].get(d.tenant, 0) + 1
    out = Placement()
    for d in sorted(pending, key=lambda v: v.id):
        if not ready:
            out.unplaced[d.id] = "no host is ready (alive, attested, not draining)"
            continue
        best: tuple[int, int, str] | None = None
        why = "no ready host has the capacity"
        for n in sorted(ready):
            if mem[n] < d.mem_mib or cpu[n] < d.cpus or slots[n] < 1:
                continue
            others = [t for t in tenants[n] if t != d.tenant]
            if (d.tenant in dedicated and others) or any(t in dedicated for t in others):
                why = "no ready host with capacity is free of other tenants (dedicated hosts)"
                continue
            rank = (tenants[n].get(d.tenant, 0), -mem[n], n)
            if best is None or rank < best:
                best = rank
        if best is None:
            out.unplaced[d.id] = why
            continue
        n = best[2]
        out.assigned[d.id] = n
        mem[n] -= d.mem_mib
        cpu[n] -= d.cpus
        slots[n] -= 1
        tenants[n][d.tenant] = tenants[n].get(d.tenant, 0) + 1
    return out
