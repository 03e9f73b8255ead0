"""`bulkhead vm snapshot NAME [--to NAME] [--then resume|pause|stop]`, `bulkhead vm restore SNAPSHOT [--name NEW]
[--clone]` and `bulkhead snapshot list|get|delete`, through the daemon (docs/SNAPSHOT.md "The daemon",
docs/API.md "Snapshots"). Built on daemon/cli.py's helpers; `bulkhead vm` dispatches its two commands here.
"""

from __future__ import annotations

from typing import Any

from bulkhead.daemon.cli import VM_COLS, _client, _common, _out, _Parser, _run, _vm_id
from bulkhead.errors import ConfigError

__all__ = ["snapshot_main", "vm_snapshot_main"]

SNAP_COLS = ["id", "name", "vm_name", "tenant", "bytes", "restores", "created"]


def _snapshot_id(c: Any, ref: str) -> str:
    """A snapshot by id or by name (names are unique within a tenant; an ambiguous name is refused)."""
    rows = c.get("/snapshots")
    found = [s for s in rows if ref in (s["id"], s["name"])]
    if len(found) == 1:
        return str(found[0]["id"])
    if len(found) > 1:
        raise ConfigError(f"snapshot name {ref!r} is used in several tenants: give its id")
    if len(ref) == 36 and ref.count("-") == 4:
        return ref  # the daemon answers (404 when it does not exist or is not visible)
    raise ConfigError(f"no snapshot {ref!r} (or you may not see it)")


def vm_snapshot_main(argv: list[str]) -> int:
    """`bulkhead vm snapshot|restore ...` (argv starts with the command)."""
    p = _Parser(prog="bulkhead vm", description="snapshot a VM, or restore one from a snapshot")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sn = sub.add_parser("snapshot", help="save a running VM (pause, save, then --then)")
    sn.add_argument("vm")
    sn.add_argument("--to", metavar="NAME", help="the snapshot's name (default: VM name and time)")
    sn.add_argument("--then", choices=("resume", "pause", "stop"), default="resume",
                    help="what the VM does once saved (default resume)")
    rs = sub.add_parser("restore", help="a new VM from a snapshot, in a fresh jailed worker")
    rs.add_argument("snapshot")
    rs.add_argument("--name", help="the new VM's name")
    rs.add_argument("--clone", action="store_true",
                    help="allow a second restore of the snapshot (duplicates the guest's secrets and RNG state)")
    for sp in (sn, rs):
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "snapshot":
                body = {"name": args.to, "then": args.then}
                return _out(args, c.post(f"/vms/{_vm_id(c, args.vm)}/snapshot", body), SNAP_COLS)
            body = {"name": args.name, "clone": args.clone}
            return _out(args, c.post(f"/snapshots/{_snapshot_id(c, args.snapshot)}/restore", body), VM_COLS)

    return _run(go)


def snapshot_main(argv: list[str]) -> int:
    """`bulkhead snapshot list|get|delete`."""
    p = _Parser(prog="bulkhead snapshot", description="list and delete VM snapshots through the daemon")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    ls = sub.add_parser("list")
    parsers = [ls]
    for name, text in (("get", "one snapshot"), ("delete", "scrub (overwrite, fsync) and delete a snapshot")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("snapshot")
        parsers.append(sp)
    for sp in parsers:
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "list":
                return _out(args, c.get("/snapshots"), SNAP_COLS)
            sid = _snapshot_id(c, args.snapshot)
            if args.cmd == "get":
                return _out(args, c.get(f"/snapshots/{sid}"), SNAP_COLS)
            return _out(args, c.delete(f"/snapshots/{sid}"), SNAP_COLS)

    return _run(go)
