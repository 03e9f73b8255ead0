"""The daemon's side of tenant networks: storage schema, row <-> value conversion, and the calls it makes.

The daemon keeps networks and NICs in its SQLite store (`SCHEMA`), converts rows with `network_from_row`
/ `nic_from_row`, and calls a `NetworkService`:

    svc = NetworkService(HostConfig())            # daemon start
    svc.sync(all_networks, all_nics)              # daemon start, and after every network/NIC change
    net = svc.new_network(tenant, body, existing) # POST /tenants/{t}/networks (validates; ConfigError)
    nic = svc.new_nic(vm_id, tenant, i, net, existing_nics, spec)   # VM create, per NIC
    with svc.vm_nets(nics) as nets:               # VM start: NetConfig(tap, mac, rate, tap_fd) per NIC
        backend.start(..., nets)                  #   the fds are closed when the block ends
    svc.counters(tenant)                          # drop counters for the API / audit

Everything but `sync`, `vm_nets` and `counters` is pure. Raises ConfigError for bad input and HostError
for host failures (the daemon maps them to 422 and 503).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from bulkhead.errors import ConfigError, HostError
from bulkhead.network.model import Network, Nic, NicRate, attach_nic, make_network
from bulkhead.network.state import HostConfig

__all__ = ["SCHEMA", "NetworkService", "network_from_row", "network_row", "nic_from_row", "nic_row"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS networks(id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,
  ipv4 TEXT NOT NULL, ipv6 TEXT, egress INTEGER NOT NULL, created TEXT NOT NULL, UNIQUE(tenant, name));
CREATE TABLE IF NOT EXISTS nics(vm TEXT NOT NULL, idx INTEGER NOT NULL, network TEXT NOT NULL,
  tenant TEXT NOT NULL, mac TEXT NOT NULL, ipv4 TEXT NOT NULL, ipv6 TEXT, bytes_per_sec INTEGER NOT NULL,
  ops_per_sec INTEGER NOT NULL, PRIMARY KEY(vm, idx), UNIQUE(network, ipv4), UNIQUE(network, mac));
CREATE INDEX IF NOT EXISTS nics_network ON nics(network);
"""


def network_row(n: Network) -> dict[str, Any]:
    return {"id": n.id, "tenant": n.tenant, "name": n.name, "ipv4": str(n.ipv4),
            "ipv6": str(n.ipv6) if n.ipv6 else None, "egress": int(n.egress)}


def network_from_row(row: Mapping[str, Any]) -> Network:
    """A stored row back to a Network (re-validated: a tampered row raises ConfigError)."""
    return make_network(str(row["id"]), str(row["tenant"]), str(row["name"]), str(row["ipv4"]),
                        str(row["ipv6"]) if row["ipv6"] else None, egress=bool(row["egress"]))


def nic_row(n: Nic) -> dict[str, Any]:
    return {"vm": n.vm_id, "idx": n.index, "network": n.network_id, "tenant": n.tenant, "mac": n.mac,
            "ipv4": str(n.ipv4), "ipv6": str(n.ipv6) if n.ipv6 else None,
            "bytes_per_sec": n.rate.bytes_per_sec, "ops_per_sec": n.rate.ops_per_sec}


def nic_from_row(row: Mapping[str, Any]) -> Nic:
    """A stored row back to a Nic. Raises ConfigError for a malformed row."""
    try:
        return Nic(str(row["vm"]), int(row["idx"]), str(row["network"]), str(row["tenant"]), str(row["mac"]),
                   IPv4Address(str(row["ipv4"])), IPv6Address(str(row["ipv6"])) if row["ipv6"] else None,
                   NicRate(int(row["bytes_per_sec"]), int(row["ops_per_sec"])))
    except (KeyError, ValueError, TypeError):
        raise ConfigError("a stored NIC record is malformed") from None


class NetworkService:
    """What the daemon calls. Thread-safe (host operations are serialised in bulkhead.network.host)."""

    def __init__(self, config: HostConfig | None = None) -> None:
        self.config = config or HostConfig()

    # --- pure -------------------------------------------------------------------------------------------
    def new_network(self, tenant: str, body: Mapping[str, Any], existing: Iterable[Network]) -> Network:
        """Validate a create request {name, ipv4_subnet, ipv6_prefix?, egress?}. Raises ConfigError."""
        unknown = set(body) - {"name", "ipv4_subnet", "ipv6_prefix", "egress"}
        if unknown:
            raise ConfigError(f"unknown network field(s): {', '.join(sorted(unknown))}")
        return make_network(str(uuid.uuid4()), tenant, body.get("name", ""), body.get("ipv4_subnet", ""),
                            body.get("ipv6_prefix"), egress=body.get("egress", False), existing=existing,
                            reserved=[self.config.uplink_pool])

    def new_nic(self, vm_id: str, tenant: str, index: int, net: Network, existing: Iterable[Nic],
                spec: Mapping[str, Any]) -> Nic:
        """Validate one NIC of a VM create request {network, ipv4?, mac?, rate?: {bytes_per_sec,
        ops_per_sec}}; `existing` = every NIC stored on that network. Raises ConfigError."""
        unknown = set(spec) - {"network", "ipv4", "mac", "rate"}
        if unknown:
            raise ConfigError(f"unknown NIC field(s): {', '.join(sorted(unknown))}")
        rate = spec.get("rate") or {}
        if not isinstance(rate, Mapping) or set(rate) - {"bytes_per_sec", "ops_per_sec"}:
            raise ConfigError("NIC rate takes bytes_per_sec and ops_per_sec")
        return attach_nic(vm_id, tenant, index, net, existing, ipv4=spec.get("ipv4"), mac=spec.get("mac"),
                          rate=NicRate(rate.get("bytes_per_sec", 0), rate.get("ops_per_sec", 0)))

    def tap_name(self, nic: Nic) -> str:
        return self.config.tap(nic.vm_id, nic.index)

    # --- host -------------------------------------------------------------------------------------------
    def sync(self, networks: Iterable[Network], nics: Iterable[Nic]) -> list[str]:
        """reconcile(); returns the actions taken as text (for the audit log). Raises HostError."""
        from bulkhead.network import host

        return [str(a) for a in host.reconcile(networks, nics, self.config)]

    @contextlib.contextmanager
    def vm_nets(self, nics: Iterable[Nic]) -> Iterator[list[Any]]:
        """Create each NIC's tap and yield `bulkhead.config.NetConfig`s carrying the open fds (sorted by NIC
        index); the daemon's copies of the fds are closed when the block ends (the worker keeps its own).
        Raises HostError."""
        from bulkhead.config import NetConfig, RateLimit
        from bulkhead.network import host

        fds: list[int] = []
        try:
            out = []
            for nic in sorted(nics, key=lambda n: n.index):
                fd = host.create_tap_for_nic(nic, self.config)
                fds.append(fd)
                out.append(NetConfig(self.tap_name(nic), nic.mac,
                                     RateLimit(nic.rate.bytes_per_sec, nic.rate.ops_per_sec), fd))
            yield out
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def counters(self, tenant: str) -> dict[str, tuple[int, int]]:
        """The tenant's named drop counters. Raises HostError."""
        from bulkhead.network import host

        try:
            return host.read_counters(self.config, tenant)
        except OSError as exc:
            raise HostError(f"cannot read the network counters: {exc}") from None
