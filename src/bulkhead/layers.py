"""The layering of bulkhead's modules, as data (docs/ARCHITECTURE.md prints `render()`).

A module may import only modules of its own layer or of a layer below it; a module of a pure layer
imports only pure modules. tests/test_layering.py walks every import of src/bulkhead with `ast` (module
level, inside functions and under TYPE_CHECKING alike) and fails on any import circle between modules
and on any arrow against this table. A module belongs to the layer of its longest matching pattern:
"pkg" matches pkg and everything under it, "=pkg" only the module pkg itself (a package's __init__).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["EXCEPTIONS", "LAYERS", "Layer", "layer_of", "render"]


class Layer(NamedTuple):
    name: str
    pure: bool
    patterns: tuple[str, ...]
    note: str = ""


# Bottom first.
LAYERS: tuple[Layer, ...] = (
    Layer("foundation", True, ("=bulkhead", "bulkhead.errors", "bulkhead.integrity.errors", "bulkhead.exitstatus",
                               "bulkhead.surface", "bulkhead.config", "bulkhead.layers", "bulkhead._boot"),
          "error taxonomy and the exit-status table, the pre-import integrity gate (stdlib only), attack-surface registry, the VM configuration "
          "declaration (fields + limits), this table"),
    Layer("memory, bus", True, ("bulkhead.memory", "bulkhead.bus"),
          "guest physical map, bounds-checked guest RAM, PIO/MMIO range registry"),
    Layer("devices, boot", True, ("bulkhead.devices", "bulkhead.boot", "bulkhead.testing", "bulkhead.guests.report"),
          "register machines, virtio; image parsing and boot structures; test doubles"),
    Layer("control models", True, ("bulkhead.control", "bulkhead.integrity", "bulkhead.network",
                                   "bulkhead.sandbox.policy", "bulkhead.sandbox.protocol", "bulkhead.snapshot",
                                   "bulkhead.fleet.model", "bulkhead.fleet.witnessing"),
          "API models, RBAC, audit records; integrity verdicts; network model/rules/plan; seccomp lists; "
          "the worker protocol; the snapshot file format and the live-migration stream; the fleet's keys, host states, scheduler and fencing rules, the judging of hosts' audit checkpoints"),
    Layer("hypervisor", False, ("bulkhead.hypervisor",), "the only code that touches /dev/kvm"),
    Layer("host services", False, ("=bulkhead.integrity", "bulkhead.integrity.tpm", "bulkhead.integrity.host",
                                   "bulkhead.network.host", "bulkhead.network.overlay", "bulkhead.network.service",
                                   "bulkhead.network.standin",
                                   "bulkhead.guests", "bulkhead.snapshot.keys"),
          "TPM access, host integrity, nftables/pyroute2/dnsmasq, WireGuard/VXLAN overlay, guest builds (gcc), "
          "the snapshot host key; the integrity "
          "package's __init__ re-exports its host API"),
    Layer("runtime", False, ("bulkhead.runtime",), "Machine, vCPU threads, I/O loop, virtio wiring, taps, console"),
    Layer("sandbox", False, ("bulkhead.sandbox",), "jail, cgroups, supervisor (host side), worker, jailed backend"),
    Layer("daemon", False, ("bulkhead.daemon",), "HTTPS+mTLS API, store, audit log, services, client"),
    Layer("fleet", False, ("bulkhead.fleet",), "etcd store, host agent, controller, fleet API, local etcd clusters"),
    Layer("entry points", False, ("bulkhead.cli", "bulkhead.__main__", "bulkhead.runtime.cli",
                                  "bulkhead.daemon.cli", "bulkhead.daemon.witness_cli", "bulkhead.daemon.ops_cli", "bulkhead.clitree",
                                  "bulkhead.daemon.snapshot_cli", "bulkhead.daemon.ui_cli",
                                  "bulkhead.integrity.cli", "bulkhead.fleet.cli"),
          "the `bulkhead` commands"),
)

# (importer, imported, reason): arrows against LAYERS that are allowed on purpose. Empty: there are none.
EXCEPTIONS: tuple[tuple[str, str, str], ...] = ()


def layer_of(module: str) -> int:
    """Index into LAYERS of `module` (longest matching pattern). Raises KeyError for an unplaced module."""
    best, best_len = -1, -1
    for i, layer in enumerate(LAYERS):
        for pat in layer.patterns:
            exact = pat.startswith("=")
            name = pat.lstrip("=")
            if module == name or (not exact and module.startswith(name + ".")):
                rank = 2 * len(name) + exact  # an exact pattern beats a package pattern of the same name
                if rank > best_len:
                    best, best_len = i, rank
    if best < 0:
        raise KeyError(f"{module} is in no layer of bulkhead.layers.LAYERS")
    return best


def render() -> str:
    """The layer picture docs/ARCHITECTURE.md shows (top first)."""
    width = 76
    lines = []
    for layer in reversed(LAYERS):
        kind = "pure" if layer.pure else "edge"
        mods = ", ".join(p[1:].removeprefix("bulkhead.") + " (__init__ only)" if p.startswith("=")
                         else p.removeprefix("bulkhead.") for p in layer.patterns)
        lines.append("+" + "-" * width + "+")
        lines.append(f"| {layer.name + ' (' + kind + ')':<{width - 1}}|")
        text = mods
        while text:
            cut = text if len(text) <= width - 3 else text[: text.rfind(" ", 0, width - 3)]
            lines.append(f"|   {cut:<{width - 3}}|")
            text = text[len(cut) :].lstrip()
        below = LAYERS[LAYERS.index(layer) - 1]
        if not layer.pure and below.pure:
            lines.append("+" + "=" * width + "+")
            lines.append(f"| {'^ edge: I/O, KVM, processes     v pure: values in, values out':<{width - 1}}|")
    lines.append("+" + "-" * width + "+")
    return "\n".join(lines)
