"""A fleet controller's leadership: campaign, renewal, resumption, resignation (rule F4, docs/FLEET.md).

etcd's election recipe (the leader key bound to the controller's lease, created only if absent; its
create revision is the fencing token that every controller write compares): etcd docs, "Leases" and
the concurrency API's election. Pure of scheduling: Controller (fleet/controller.py) inherits it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from bulkhead.errors import HostError
from bulkhead.fleet.model import FleetTiming, encode, fence_deadline, key
from bulkhead.fleet.store import Cmp, EtcdStore, Op

__all__ = ["Emit", "Leadership"]

Emit = Callable[[str, str, dict[str, Any]], None]  # (kind, action, detail): audited by the API layer


class Leadership:
    """The leader-lease half of a controller. Its owner sets these in __init__."""

    store: EtcdStore
    ident: str
    t: FleetTiming
    emit: Emit
    clock: Callable[[], float]
    lease: int
    leader_rev: int
    deadline: float
    lost_seen: dict[str, float]
    _stop: threading.Event

    # ---- election -----------------------------------------------------------------------------------
    def campaign(self) -> bool:
        """Try once to become the leader (or to resume a leadership it still holds, `reclaim`).
        True when this controller leads now."""
        if self.reclaim():
            return True
        sent = self.clock()
        if not self.lease:
            self.lease = self.store.grant(int(self.t.ttl))
            self.deadline = fence_deadline(sent, self.t.ttl, self.t.fence_margin)
        ok, rev = self.store.txn([Cmp(key("leader"), "CREATE", 0)],
                                 [Op(key("leader"), encode({"id": self.ident, "lease": self.lease}), self.lease)])
        if ok:
            self.leader_rev = rev
            self.lost_seen.clear()  # rule F3 restarts from this controller's own observations
            self.emit("system", "fleet.leader", {"id": self.ident, "revision": rev})
        return ok

    def reclaim(self) -> bool:
        """Resume the leadership after a deposition that etcd never saw (rule F4, resumption).

        A renewal that waits past TTL - margin (etcd electing a new leader of its own after a member
        stopped, say) deposes this controller although its lease may still be alive. It then keeps the
        lease and the leader key's create revision. If a keepalive now succeeds and the leader key still
        carries that create revision, no other controller can have led in between: a leader's key is
        created by its own campaign, with a new revision, and the key could only go with the lease.
        So it leads again at once, instead of waiting out its own lease as a standby (which left the
        fleet without a leader for a whole TTL). It acted on nothing while deposed, and the lost-host
        timers start over from its own observations (rule F3), which only delays rescheduling."""
        if not (self.lease and self.leader_rev):
            return False
        sent = self.clock()
        ttl = self.store.keepalive(self.lease)  # HostError: etcd still away; the next round retries
        if ttl <= 0:  # the lease expired or was revoked: the leader key went with it
            self.lease = self.leader_rev = 0
            return False
        ok, _ = self.store.txn([self._lead()], [])
        if not ok:  # another controller's key: it led meanwhile; keep the live lease to campaign with
            self.leader_rev = 0
            return False
        self.deadline = fence_deadline(sent, min(float(ttl), self.t.ttl), self.t.fence_margin)
        self.lost_seen.clear()
        self.emit("system", "fleet.leader", {"id": self.ident, "revision": self.leader_rev, "resumed": True})
        return True

    def renew(self) -> bool:
        """Keep the leadership lease; False once it is lost or could not be renewed in time."""
        sent = self.clock()
        try:
            ttl = self.store.keepalive(self.lease)
        except HostError:
            return self.clock() < self.deadline
        if ttl <= 0:
            return False
        self.deadline = fence_deadline(sent, min(float(ttl), self.t.ttl), self.t.fence_margin)
        return True

    def _lead(self) -> Cmp:
        return Cmp(key("leader"), "CREATE", self.leader_rev)

    def resign(self) -> None:
        if self.lease:
            with contextlib.suppress(HostError):
                self.store.revoke(self.lease)
        self.lease = self.leader_rev = 0

    def _keep(self, lost: threading.Event) -> None:
        """Renew the leadership lease every keepalive (a thread of its own: a renewal can block for
        the endpoints' timeouts during a partition), and set `lost` as soon as the renewal deadline
        passes or a renewal is refused, whatever the renewals and the tick are blocked on."""
        def renewer() -> None:
            while not lost.is_set() and not self._stop.is_set():
                if not self.renew():
                    lost.set()
                    return
                lost.wait(self.t.keepalive)

        threading.Thread(target=renewer, name="fleet-leader-renew", daemon=True).start()
        while not lost.is_set() and not self._stop.is_set():
            if self.clock() >= self.deadline:
                lost.set()
            lost.wait(0.05)
        if not self._stop.is_set():
            print(f"bulkhead fleet: {self.ident} deposed: it no longer holds the leadership",
                  flush=True)
