"""VM counters (`bulkhead run --stats FILE`): collected (machine_stats), carried, written (pure but for write_stats).

Machine.stats() is a nested dict. In the jail the worker sends its counters to the host in one `stats`
message (sandbox/protocol.py), whose payload is a flat, schema-checked mapping of identifier -> integer:
`flatten_counters` makes it ("devices:virtio-blk0:fault.desc-chain-loop": 1, "vcpu_exits:0": 41, ...; the
path separator is ":" because counter names themselves contain ".") and
`nest_counters` turns it back into the nested shape, so the file has the same keys jailed or not. Only
integer counters travel; the host adds what it knows itself (the exit reason, the events it received).
A key is lower-cased and any character outside [a-z0-9_.-] becomes "_" (a tap named "Tap:1" shows as
"virtio-net-tap_1").
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_COUNTERS", "flatten_counters", "machine_stats", "nest_counters", "write_stats"]

MAX_COUNTERS = 256  # entries of one stats message (19 virtio devices with ~10 counters each fit)
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
SEP = ":"


def _key(part: object) -> str:
    text = str(part).lower()
    return "".join(ch if ch in _KEY_CHARS else "_" for ch in text) or "_"


def machine_stats(m: Any, stop_reason: Any) -> dict[str, Any]:
    """The counters of Machine `m` (runtime/vm.py Machine.stats) as the nested dict --stats writes."""
    resident = 0
    if m.mem is not None and not m.mem.closed:
        resident = sum(n for r in m.mem.regions for _, n in r.resident_runs())
    return {
        "exit": None if stop_reason is None else stop_reason._asdict(),
        "vcpu_exits": [r.exits for r in m.runners],
        "pio_unclaimed": {"reads": m.pio.unclaimed_reads, "writes": m.pio.unclaimed_writes},
        "mmio_unclaimed": {"reads": m.mmio.unclaimed_reads, "writes": m.mmio.unclaimed_writes},
        "post_code_writes": getattr(getattr(m, "post", None), "writes", 0),
        "guest_resident_bytes": resident,
        "devices": {t.name: {**getattr(t.device, "stats", {}), **t.stats} for t in m.transports},
        "events": [{"time": t, "event": e, **d} for t, e, d in m.events],
    }


def flatten_counters(stats: dict[str, Any]) -> dict[str, int]:
    """The non-negative integer leaves of `stats` (dicts and lists, any depth), keyed by "a:b:c" paths.

    Keys stay within the protocol's 64-character identifiers; at most MAX_COUNTERS entries (first ones)."""
    out: dict[str, int] = {}

    def walk(prefix: str, value: object) -> None:
        if len(out) >= MAX_COUNTERS:
            return
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list | tuple):
            items = enumerate(value)
        else:
            if type(value) is int and value >= 0 and len(prefix) <= 64:
                out[prefix] = value
            return
        for k, v in items:
            walk(f"{prefix}{SEP}{_key(k)}" if prefix else _key(k), v)

    walk("", stats)
    return out


def nest_counters(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of flatten_counters: "a:b:c" keys -> nested dicts; a level whose keys are 0..n-1 -> a list."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        node = root
        *path, leaf = key.split(SEP)
        for part in path:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[leaf] = value

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and sorted(node) == sorted(str(i) for i in range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node

    return lists(root)  # type: ignore[no-any-return]


def write_stats(path: str, stats: dict[str, Any]) -> None:
    """Write the counters as indented JSON (what `bulkhead run --stats FILE` leaves)."""
    with open(path, "w") as f:
        json.dump(stats, f, indent=1, default=str)
