"""What a guest's NIC can send into tenant networks, as attack surfaces (docs/NETWORK.md)."""

from __future__ import annotations

__all__ = ["declare_surfaces"]


def declare_surfaces() -> None:
    from bulkhead.surface import declare

    declare(
        "net-frame",
        "nic-ingress-filter",
        owner="bulkhead.network.rules",
        boundary="guest-guest",
        accepts="any Ethernet frame from a VM's tap into its network's bridge; nftables bridge rules pin the "
        "NIC's source MAC, IPv4/IPv6, ARP sender and ND link-layer address; everything else is dropped and counted",
        in_kernel=True,
        test="tests/test_network_host.py",
    )
    declare(
        "net-frame",
        "tenant-segmentation",
        owner="bulkhead.network.host",
        boundary="tenant-tenant",
        accepts="frames of one tenant's bridge; each tenant has its own network namespace and no forwarding "
        "path to another tenant's, nor to the host's addresses except allowed services",
        in_kernel=True,
        test="tests/test_network_host.py",
    )
    declare(
        "net-frame",
        "dhcp-per-network",
        owner="bulkhead.network.host",
        boundary="guest-vmm",
        accepts="DHCPv4 requests on one network's bridge, answered by a dnsmasq bound to that bridge only, "
        "with static leases of the pinned addresses (third-party server, not bulkhead code)",
        in_kernel=True,
        third_party="dnsmasq",
        test="tests/test_network_host.py",
    )
