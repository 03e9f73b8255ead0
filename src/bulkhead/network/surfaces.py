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
    declare(
        "net-frame",
        "overlay-underlay-udp",
        owner="bulkhead.network.overlay",
        boundary="underlay-host",
        accepts="any UDP datagram from the underlay to a host: only WireGuard (listen port) is served, by "
        "wireguard-go or the kernel, which drops what does not authenticate as a configured peer; plain "
        "VXLAN to the VXLAN port from any interface but the WireGuard one is dropped and counted "
        "(underlay_vxlan), as is a VNI from a peer that does not carry its network (overlay_vni) and anything "
        "else arriving through the tunnel (overlay_other)",
        in_kernel=True,
        third_party="wireguard-go",
        spec="WireGuard whitepaper §5; RFC 7348",
        test="tests/test_network_overlay.py",
    )
    declare(
        "net-frame",
        "overlay-peer-frames",
        owner="bulkhead.network.overlay_model",
        boundary="tenant-tenant",
        accepts="VXLAN frames from an authenticated peer host (its overlay address only: WireGuard allowed-IPs) "
        "into the tenant network of their VNI; a frame claiming a local NIC's MAC, the gateway's MAC or "
        "address, DHCP, router advertisements or a non-IP ethertype is dropped and counted (ovl_in_*)",
        in_kernel=True,
        test="tests/test_network_overlay.py",
    )
