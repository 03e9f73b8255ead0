"""Tenant networks as API resources, and the daemon's side of VM NICs.

Networks belong to a tenant (`/tenants/{t}/networks/{id}` is their RBAC scope; actions network/read and
network/write). The store holds networks and NICs (`bulkhead.network.service.SCHEMA`); the host is made to
match the store by `NetworkService.sync` (reconcile): inside the transaction that creates or deletes a
network (a host failure rolls the change back: 503), after a VM with NICs is created or deleted, before a
VM with NICs starts, and when the daemon starts. A sync always reads the store under its lock, so two
syncs never apply different snapshots out of order.

VM NICs: each NIC of a create request names a network of the VM's own tenant (another tenant's network
is reported exactly like a missing one, 422); `NetworkService.new_nic` pins its MAC and addresses. At VM
start the daemon creates the taps inside the tenant namespace and hands them to the backend: open fds
(`NetConfig.tap_fd`, the jailed worker gets its own duplicate; the daemon's copies close when the start
returns, so the tap dies with the worker), or, for a backend that opens taps by name (ProcessBackend),
persistent taps and the tenant namespace (`VmSpec.netns`).

`DryNetworkService` is the NetworkService for tests and `serve --backend fake`: the same validation, no
host changes. Raises ApiError (404/409/422/503) like the other operations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Response

from bulkhead.control import rbac
from bulkhead.control.models import NetworkCountersOut, NetworkCreate, NetworkOut
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.backend import VmBackend, VmSpec
from bulkhead.daemon.routing import Ctx, NameRef, router
from bulkhead.daemon.service import ApiError, Core, ReqCtx
from bulkhead.errors import ConfigError, HostError
from bulkhead.network.model import Network, Nic
from bulkhead.network.service import NetworkService, network_from_row, nic_from_row, nic_row
from bulkhead.runtime.config import NetConfig, RateLimit

__all__ = ["DryNetworkService", "TenantNetworkService", "network_routes"]


class DryNetworkService(NetworkService):
    """Validation without host changes (tests, `serve --backend fake`): sync records its inputs and
    returns no actions; taps are names without fds."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.synced: list[tuple[int, int]] = []  # (networks, nics) per sync

    def sync(self, networks: Any, nics: Any) -> list[str]:
        self.synced.append((len(list(networks)), len(list(nics))))
        return []

    @contextlib.contextmanager
    def vm_nets(self, nics: Any) -> Iterator[list[Any]]:
        yield [NetConfig(self.tap_name(n), n.mac, RateLimit(n.rate.bytes_per_sec, n.rate.ops_per_sec))
               for n in sorted(nics, key=lambda n: n.index)]

    def create_persistent_tap(self, nic: Nic) -> tuple[str, str]:
        return self.config.netns(nic.tenant), self.tap_name(nic)

    def counters(self, tenant: str) -> dict[str, tuple[int, int]]:
        return {}


def _nw(row: Any) -> Network:
    return network_from_row(dict(row))


def _nc(row: Any) -> Nic:
    return nic_from_row(dict(row))


def _net_out(row: Any) -> dict[str, Any]:
    return {**_nw(row).to_dict(), "created": row["created"]}


def _nic_out(n: Nic) -> dict[str, Any]:
    d = n.to_dict()
    d.pop("vm")
    return d


class TenantNetworkService:
    """Tenant networks (routes below) and the VM NICs on them; `net` makes the host match the store."""

    def __init__(self, core: Core, net: NetworkService) -> None:
        self.core = core
        self.store = core.store
        self.net = net

    # ------------------------------------------------------------------ host synchronisation
    def _net_rows(self) -> tuple[list[Network], list[Nic]]:
        try:
            nets = [_nw(r) for r in self.store.q("SELECT * FROM networks")]
            nics = [_nc(r) for r in self.store.q("SELECT * FROM nics")]
        except ConfigError as exc:
            raise HostError(f"the state database holds an invalid network record: {exc}") from None
        return nets, nics

    def net_sync(self) -> list[str]:
        """Make the host match the stored networks and NICs; returns the actions taken. Raises HostError."""
        with self.store.writer():  # serialized with the group commit: the host follows the batch's state
            nets, nics = self._net_rows()
            return self.net.sync(nets, nics)

    def _sync_or_503(self, what: str) -> list[str]:
        try:
            return self.net_sync()
        except HostError as exc:
            raise ApiError.of(exc, f"the host could not {what}: {exc}") from None

    def net_sync_quietly(self, reason: str) -> None:
        """A sync after a committed change: a failure is audited (system event) and repaired by the next
        sync; the change itself stands."""
        try:
            actions = self.net_sync()
        except HostError as exc:
            with contextlib.suppress(ApiError):
                self.core.event("system", "network.reconcile", result="error", detail={"reason": reason, "error": str(exc)})
            return
        if actions:
            with contextlib.suppress(ApiError):
                self.core.event("system", "network.reconcile", result="ok",
                           detail={"reason": reason, "actions": actions[:100]})

    @contextlib.contextmanager
    def _host_follows_store(self, what: str) -> Iterator[dict[str, bool]]:
        """Around a transaction that changes the host inside it (network create/delete): when the
        transaction does not commit (the audit append or the commit fails after the host was changed:
        ApiError 503; or any refusal), the host is synced back to the committed store before the answer
        (fail closed, issue 12 soak finding A: a refused create leaves no namespace, bridge or dnsmasq)."""
        touched = {"host": False}  # set by the caller just before it changes the host
        try:
            yield touched
        except BaseException:
            if touched["host"]:
                self.net_sync_quietly(f"{what} rolled back")
            raise

    def dhcp_watch(self) -> bool:
        """For the daemon's monitor: a network whose dnsmasq is gone (killed, crashed) is restored by a
        sync now rather than at the next network change (issue 12, soak finding G). True when it synced."""
        if isinstance(self.net, DryNetworkService):
            return False
        from bulkhead.network import host

        dead = [r["id"] for r in self.store.q("SELECT id FROM networks")
                if not host.dnsmasq_alive(self.net.config, r["id"])]
        if not dead:
            return False
        self.net_sync_quietly(f"dnsmasq watch: {len(dead)} network(s) without their DHCP server")
        return True

    def reconcile_networks(self) -> list[str]:
        """Daemon start: rebuild what should exist and remove what should not; audited as a
        `network.reconcile` system event. A host failure is audited and returned as no actions."""
        try:
            actions = self.net_sync()
        except HostError as exc:
            self.core.event("system", "network.reconcile", result="error", detail={"reason": "daemon start",
                                                                             "error": str(exc)})
            return []
        self.core.event("system", "network.reconcile", result="ok",
                   detail={"reason": "daemon start", "actions": actions[:200], "count": len(actions)})
        return actions

    # ------------------------------------------------------------------ networks
    def network_create(self, ctx: ReqCtx, tenant: str, body: Any) -> dict[str, Any]:
        self.core.authorize_in_tenant(ctx, "network/write", tenant)
        created = now_iso()
        with self._host_follows_store("network create") as touched, self.core.mutation(ctx, "201") as c:
            # validation, insert and host change in one transaction
            rows = self.store.q("SELECT * FROM networks WHERE tenant = ?", (tenant,))
            if any(r["name"] == body.name for r in rows):
                raise ApiError(409, f"a network named {body.name!r} already exists in this tenant")
            try:
                net = self.net.new_network(tenant, body.model_dump(), [_nw(r) for r in rows])
            except ConfigError as exc:
                raise ApiError.of(exc) from None
            ctx.detail.update(network=net.id, ipv4_subnet=str(net.ipv4), egress=net.egress)
            c.execute("INSERT INTO networks(id, tenant, name, ipv4, ipv6, egress, created) VALUES (?,?,?,?,?,?,?)",
                      (net.id, tenant, net.name, str(net.ipv4), str(net.ipv6) if net.ipv6 else None,
                       int(net.egress), created))
            touched["host"] = True
            ctx.detail["host_actions"] = len(self._sync_or_503("create the network"))
        return {**net.to_dict(), "created": created}

    def _network(self, ctx: ReqCtx, net_id: str, action: str) -> Any:
        return self.core.owned_row(ctx, "network", net_id, action)

    def network_get(self, ctx: ReqCtx, net_id: str) -> dict[str, Any]:
        return _net_out(self._network(ctx, net_id, "network/read"))

    def network_list(self, ctx: ReqCtx, tenant: str) -> list[dict[str, Any]]:
        ctx.action, ctx.scope, ctx.decision = "network/read", rbac.tenant_scope(tenant), "allow"
        rows = self.store.q("SELECT * FROM networks WHERE tenant = ? ORDER BY name", (tenant,))
        return [_net_out(r) for r in self.core.visible_rows(ctx, "network", rows)]

    def network_delete(self, ctx: ReqCtx, net_id: str) -> None:
        self._network(ctx, net_id, "network/write")
        with self._host_follows_store("network delete") as touched, self.core.mutation(ctx, "204") as c:
            if self.store.q1("SELECT 1 FROM nics WHERE network = ?", (net_id,)):
                raise ApiError(409, "VMs still have NICs on the network; delete those VMs first")
            c.execute("DELETE FROM networks WHERE id = ?", (net_id,))
            touched["host"] = True
            ctx.detail["host_actions"] = len(self._sync_or_503("remove the network"))

    def network_counters(self, ctx: ReqCtx, net_id: str) -> dict[str, Any]:
        """Drop counters: `<mac>/<reason>` for each NIC of the network (reasons mac, ip, arp, nd, proto,
        dhcp-chaddr)
        and `tenant/<name>` for the tenant namespace's own (to_host, forward, unknown_port)."""
        row = self._network(ctx, net_id, "network/read")
        nics = [_nc(r) for r in self.store.q("SELECT * FROM nics WHERE network = ?", (net_id,))]
        try:
            raw = self.net.counters(row["tenant"])
        except HostError as exc:
            raise ApiError.of(exc, f"cannot read the network's counters: {exc}") from None
        taps = {self.net.tap_name(n) + "_": n.mac for n in nics}
        prefix = self.net.config.prefix + "n"
        out: dict[str, dict[str, int]] = {}
        for name, (packets, nbytes) in sorted(raw.items()):
            tap = next((t for t in taps if name.startswith(t)), None)
            if tap is not None:
                out[f"{taps[tap]}/{name[len(tap):]}"] = {"packets": packets, "bytes": nbytes}
            elif not name.startswith(prefix):  # another network's NIC: not this network's business
                out[f"tenant/{name}"] = {"packets": packets, "bytes": nbytes}
        return {"network": net_id, "counters": out}

    # ------------------------------------------------------------------ VM NICs
    def attach_nics(self, c: Any, vm_id: str, tenant: str, nics: Any) -> list[dict[str, Any]]:
        """Validate the NICs of a VM create request and insert their rows (inside the create transaction).
        Returns the NICs as stored in the VM's spec. Raises ApiError 422."""
        built: list[Nic] = []
        for i, n in enumerate(nics):
            net_id = str(n.network)
            row = self.store.q1("SELECT * FROM networks WHERE id = ? AND tenant = ?", (net_id, tenant))
            if row is None:  # a missing network and another tenant's network get the same answer
                raise ApiError(422, f"network {net_id} was not found in tenant {tenant}")
            spec: dict[str, Any] = {"network": net_id}
            if n.ipv4 is not None:
                spec["ipv4"] = n.ipv4
            if n.mac is not None:
                spec["mac"] = n.mac
            if n.rate is not None:
                spec["rate"] = n.rate.model_dump()
            try:
                existing = [_nc(r) for r in self.store.q("SELECT * FROM nics WHERE network = ?", (net_id,))]
                nic = self.net.new_nic(vm_id, tenant, i, _nw(row), existing + built, spec)
            except ConfigError as exc:
                raise ApiError.of(exc) from None
            built.append(nic)
        for nic in built:
            r = nic_row(nic)
            c.execute("INSERT INTO nics(vm, idx, network, tenant, mac, ipv4, ipv6, bytes_per_sec, ops_per_sec) "
                      "VALUES (?,?,?,?,?,?,?,?,?)", (r["vm"], r["idx"], r["network"], r["tenant"], r["mac"],
                                                    r["ipv4"], r["ipv6"], r["bytes_per_sec"], r["ops_per_sec"]))
        return [_nic_out(n) for n in built]

    def _vm_nics(self, vm_id: str) -> list[Nic]:
        try:
            return [_nc(r) for r in self.store.q("SELECT * FROM nics WHERE vm = ? ORDER BY idx", (vm_id,))]
        except ConfigError as exc:
            raise HostError(f"the state database holds an invalid NIC record: {exc}") from None

    def nic_configs(self, vm_id: str) -> tuple[NetConfig, ...]:
        """The VM's NICs as the runtime sees them (tap name, pinned MAC, rate), without fds: what a start
        runs and what the launch measurement covers."""
        return tuple(NetConfig(self.net.tap_name(n), n.mac, RateLimit(n.rate.bytes_per_sec, n.rate.ops_per_sec))
                     for n in self._vm_nics(vm_id))

    def start_with_nics(self, backend: VmBackend, vm_id: str, spec: VmSpec) -> int:
        """backend.start with the VM's NICs realised on the host (taps in the tenant namespace). Raises
        HostError."""
        nics = self._vm_nics(vm_id)
        if not nics:
            return backend.start(vm_id, spec)
        self.net_sync()  # the bridge and the NICs' guard rules exist before any tap does
        netns = self.net.config.netns(nics[0].tenant)
        if getattr(backend, "opens_taps_by_name", False):
            nets = []
            for nic in nics:
                netns, tap = self._persistent_tap(nic)
                nets.append(NetConfig(tap, nic.mac, RateLimit(nic.rate.bytes_per_sec, nic.rate.ops_per_sec)))
            return backend.start(vm_id, replace(spec, nics=tuple(nets), netns=netns))
        with self.net.vm_nets(nics) as opened:
            return backend.start(vm_id, replace(spec, nics=tuple(opened), netns=netns))

    def _persistent_tap(self, nic: Nic) -> tuple[str, str]:
        make = getattr(self.net, "create_persistent_tap", None)
        if make is not None:
            return make(nic)  # type: ignore[no-any-return]
        from bulkhead.network import host

        return host.create_persistent_tap(nic, self.net.config)


def network_routes(svc: Callable[[], TenantNetworkService]) -> APIRouter:
    r = router()

    @r.post("/tenants/{tenant_id}/networks", response_model=NetworkOut, status_code=201)
    def network_create(tenant_id: UUID | NameRef, body: NetworkCreate, ctx: ReqCtx = Ctx) -> Any:
        return svc().network_create(ctx, svc().core.tenant_ref(str(tenant_id)), body)

    @r.get("/tenants/{tenant_id}/networks", response_model=list[NetworkOut])
    def network_list(tenant_id: UUID | NameRef, ctx: ReqCtx = Ctx) -> Any:
        return svc().network_list(ctx, svc().core.tenant_ref(str(tenant_id)))

    @r.get("/networks/{network_id}", response_model=NetworkOut)
    def network_get(network_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().network_get(ctx, str(network_id))

    @r.delete("/networks/{network_id}", status_code=204)
    def network_delete(network_id: UUID, ctx: ReqCtx = Ctx) -> Response:
        svc().network_delete(ctx, str(network_id))
        return Response(status_code=204)

    @r.get("/networks/{network_id}/counters", response_model=NetworkCountersOut)
    def network_counters(network_id: UUID, ctx: ReqCtx = Ctx) -> Any:
        return svc().network_counters(ctx, str(network_id))

    return r
