"""Attack-surface registry: every guest- or client-reachable entry point, declared in the module that
implements it, collected from the running code by `bulkhead surface [--json]`.

Convention (every module that owns an entry point follows it):

    def declare_surfaces() -> None:
        from bulkhead.surface import declare          # import inside: keeps the module import-light
        declare("pio", "serial-com1", owner=__name__, boundary="guest-vmm",
                accepts="1-byte accesses at offsets 0-7", base=0x3F8, length=8)

- The function is a module-level `def declare_surfaces() -> None:` (written exactly so, at column 0:
  discovery finds modules by that text, without importing anything else). It only calls `declare`;
  it has no other side effects and may be called any number of times.
- `kind` is one of `KINDS`; `name` is unique within its kind (kebab-case, e.g. "virtio-blk-queue0");
  `owner` is the module that handles the input (normally `__name__`); `boundary` is one of
  `BOUNDARIES`; `accepts` says in one sentence what input the entry point takes and how bad input
  is contained. Extra keyword arguments are metadata: str, int, bool, None, or lists of those.
- `pio` and `mmio` entries must give `base` and `length` (ints): the range registered on the bus.
  Declare it from the same constants the runtime registers with, and let a runtime test check
  `uncovered("pio", bus_ranges) == []`, so a registration without a declaration fails.
- Recommended metadata: `handler` (function or method names), `fuzz` (harness path, when one exists),
  `spec` (the document the parser follows).

`collect()` finds the modules under the bulkhead package that define `declare_surfaces`, imports
them, calls each, and returns `inventory()`: a list of plain dicts sorted by (kind, name), stable
across runs, ready for JSON. `bulkhead surface --check FILE` diffs it against a reviewed copy.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "BOUNDARIES",
    "KINDS",
    "SurfaceError",
    "clear",
    "collect",
    "declare",
    "discover",
    "inventory",
    "main",
    "render_json",
    "render_table",
    "uncovered",
]

KINDS = (
    "pio",
    "mmio",
    "virtio-queue",
    "virtio-config",
    "kvm-exit",
    "msr",
    "cpuid",
    "boot-parser",
    "worker-message",
    "api-route",
    "net-frame",
)

# The boundaries of docs/THREAT_MODEL.md. "x-y": input crosses from x (less trusted) into y.
BOUNDARIES = (
    "guest-vmm",  # guest code -> VMM devices, exit handlers, boot structures it can influence
    "guest-guest",  # one VM -> another VM (shared host resources)
    "image-vmm",  # user-supplied kernel/initrd/disk images -> parsers in the VMM
    "worker-daemon",  # jailed per-VM worker -> daemon / supervisor
    "client-daemon",  # API client -> management daemon
    "tenant-tenant",  # one tenant -> another tenant's resources
    "host-integrity",  # installed code and configuration -> measured launch
    "underlay-host",  # the network between fleet hosts (and other hosts on it) -> a host's overlay
)

_RANGE_KINDS = ("pio", "mmio")
_FIELDS = ("kind", "name", "owner", "boundary", "accepts")
_DEF_RE = re.compile(r"^def declare_surfaces\(", re.MULTILINE)

MetaValue = str | int | bool | None | list[str | int | bool | None]
Entry = dict[str, object]

_entries: dict[tuple[str, str], Entry] = {}


class SurfaceError(ValueError):
    """A declaration is malformed or conflicts with another one (a programming error)."""


def _meta_value(key: str, value: object) -> MetaValue:
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, list | tuple):
        items: list[str | int | bool | None] = []
        for item in value:
            if item is not None and not isinstance(item, str | int | bool):
                raise SurfaceError(f"metadata {key!r} holds a {type(item).__name__}; use str/int/bool/None")
            items.append(item)
        return items
    raise SurfaceError(f"metadata {key!r} is a {type(value).__name__}; use str/int/bool/None or a list")


def declare(kind: str, name: str, *, owner: str, boundary: str, accepts: str, **meta: object) -> None:
    """Record one entry point. Declaring an identical entry again is a no-op.

    Raises SurfaceError for an unknown kind or boundary, an empty name/owner/accepts, metadata that
    is not JSON-plain, a pio/mmio entry without int `base` and positive int `length`, or a second,
    different entry with the same (kind, name).
    """
    if kind not in KINDS:
        raise SurfaceError(f"unknown surface kind {kind!r}; expected one of {', '.join(KINDS)}")
    if boundary not in BOUNDARIES:
        raise SurfaceError(f"unknown boundary {boundary!r}; expected one of {', '.join(BOUNDARIES)}")
    for field, text in (("name", name), ("owner", owner), ("accepts", accepts)):
        if not isinstance(text, str) or not text.strip():
            raise SurfaceError(f"surface {kind}/{name!r}: {field} must be a non-empty string")
    entry: Entry = {"kind": kind, "name": name, "owner": owner, "boundary": boundary, "accepts": accepts}
    for key in sorted(meta):
        entry[key] = _meta_value(key, meta[key])
    if kind in _RANGE_KINDS:
        base, length = entry.get("base"), entry.get("length")
        if (
            not isinstance(base, int)
            or isinstance(base, bool)
            or base < 0
            or not isinstance(length, int)
            or isinstance(length, bool)
            or length <= 0
        ):
            raise SurfaceError(f"{kind} surface {name!r} needs int base >= 0 and int length > 0")
    old = _entries.get((kind, name))
    if old is not None and old != entry:
        raise SurfaceError(f"surface {kind}/{name} declared twice with different content ({old['owner']})")
    _entries[(kind, name)] = entry


def clear() -> None:
    """Forget every declaration (collect() starts from an empty registry)."""
    _entries.clear()


def inventory() -> list[Entry]:
    """The declared entries as plain dicts (copies), sorted by (kind order in KINDS, name)."""
    order = {k: i for i, k in enumerate(KINDS)}
    keys = sorted(_entries, key=lambda kn: (order[kn[0]], kn[1]))
    return [dict(_entries[k]) for k in keys]


def discover(root: Path | None = None, package: str = "bulkhead") -> list[str]:
    """Names of the modules under `root` (the bulkhead package by default) whose source defines
    `declare_surfaces` at module level, sorted. Reads source text only; imports nothing."""
    if root is None:
        root = Path(__file__).resolve().parent
    names: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if any(not p.isidentifier() for p in parts):
            continue
        name = ".".join([package, *parts])
        if name == __name__:
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if _DEF_RE.search(text):
            names.append(name)
    return names


def collect(modules: Iterable[str] | None = None) -> list[Entry]:
    """Clear the registry, import each module (default: `discover()`), call its
    `declare_surfaces()`, and return `inventory()`.

    Raises SurfaceError when a module has no callable `declare_surfaces` or declares badly, and
    ImportError when a module cannot be imported (e.g. an optional dependency is missing)."""
    clear()
    for name in discover() if modules is None else modules:
        module = importlib.import_module(name)
        func = getattr(module, "declare_surfaces", None)
        if not callable(func):
            raise SurfaceError(f"module {name} has no callable declare_surfaces()")
        func()
    return inventory()


def uncovered(
    kind: str, ranges: Iterable[tuple[int, int, str]], entries: Sequence[Entry] | None = None
) -> list[tuple[int, int, str]]:
    """The (base, length, name) bus ranges not wholly inside one declared `kind` entry
    (default: the current inventory). A runtime test asserts this is empty for its buses."""
    declared = [
        (int(str(e["base"])), int(str(e["length"])))
        for e in (inventory() if entries is None else entries)
        if e.get("kind") == kind
    ]
    return [
        (base, length, name)
        for base, length, name in ranges
        if not any(b <= base and base + length <= b + n for b, n in declared)
    ]


def render_json(entries: Sequence[Entry]) -> str:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline): the committed format."""
    return json.dumps(list(entries), indent=2, sort_keys=True) + "\n"


def _cell(entry: Entry) -> str:
    extra = []
    for key, value in entry.items():
        if key in _FIELDS:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and key in ("base", "length", "index"):
            extra.append(f"{key}={value:#x}")
        else:
            extra.append(f"{key}={value}")
    return " ".join(extra)


def render_table(entries: Sequence[Entry]) -> str:
    """A human-readable table: one row per entry, then the entry's accepted input indented."""
    header = ("KIND", "NAME", "BOUNDARY", "OWNER")
    rows = [(str(e["kind"]), str(e["name"]), str(e["boundary"]), str(e["owner"])) for e in entries]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for entry, row in zip(entries, rows, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.append(f"    accepts: {entry['accepts']}")
        extra = _cell(entry)
        if extra:
            lines.append(f"    {extra}")
    kinds = sorted({str(e["kind"]) for e in entries})
    lines.append(f"{len(entries)} surfaces ({', '.join(kinds) if kinds else 'none'})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """`bulkhead surface [--json] [--check FILE]`. Exit 0 on success, 1 when --check finds a
    difference (printed as a unified diff), 2 for a missing/unreadable FILE, 3 when a module cannot
    be imported, 4 when a declaration is malformed."""
    parser = argparse.ArgumentParser(
        prog="bulkhead surface", description="Print the attack-surface inventory."
    )
    parser.add_argument("--json", action="store_true", help="print canonical JSON instead of a table")
    parser.add_argument(
        "--check", metavar="FILE", help="compare with a reviewed inventory (JSON); exit 1 on a difference"
    )
    args = parser.parse_args(list(argv))
    try:
        entries = collect()
    except ImportError as exc:
        from bulkhead.exitstatus import STATUS

        print(f"bulkhead surface: cannot import {exc.name or exc}: {exc}", file=sys.stderr)
        return STATUS["host-error"]
    except SurfaceError as exc:
        print(f"bulkhead surface: {exc}", file=sys.stderr)
        return 4
    current = render_json(entries)
    if args.check:
        try:
            reviewed = Path(args.check).read_text(encoding="utf-8")
        except OSError as exc:
            print(f"bulkhead surface: cannot read {args.check}: {exc.strerror}", file=sys.stderr)
            return 2
        if reviewed == current:
            print(f"attack surface matches {args.check} ({len(entries)} surfaces)")
            return 0
        diff = difflib.unified_diff(
            reviewed.splitlines(keepends=True), current.splitlines(keepends=True), args.check, "code"
        )
        sys.stdout.write("".join(diff))
        print(
            f"attack surface differs from {args.check}: review the change, then update it with "
            f"`bulkhead surface --json > {args.check}`"
        )
        return 1
    sys.stdout.write(current if args.json else render_table(entries))
    return 0
