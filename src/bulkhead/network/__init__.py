"""Tenant-segmented virtual networks (issue 8): pure model + plan, and host realisation.

Pure: `model` (networks, NICs, MACs, IPAM), `rules` (nftables rulesets), `state` (desired host state and
the reconcile plan). Edge: `host` (pyroute2, nft, dnsmasq), `standin` (guest stand-ins for tests and
benchmarks). See docs/NETWORK.md.
"""

from bulkhead.network.model import Network, Nic, NicRate, allocate_ipv4, attach_nic, make_network, nic_mac
from bulkhead.network.state import HostConfig, HostState, desired_state, plan

__all__ = [
    "HostConfig",
    "HostState",
    "Network",
    "Nic",
    "NicRate",
    "allocate_ipv4",
    "attach_nic",
    "desired_state",
    "make_network",
    "nic_mac",
    "plan",
]
