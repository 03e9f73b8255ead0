"""`bulkhead image import|list|delete`, `bulkhead attest policy show|allow-digest|revoke-digest` and
`bulkhead vm stats`: the operations commands, through the daemon (docs/API.md "Images", "Attestation
policy", "Per-VM stats"). Built on daemon/cli.py's helpers (connection, tables, exit statuses);
daemon/cli.py and integrity/cli.py dispatch here by name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from bulkhead.daemon.cli import _client, _common, _out, _Parser, _run, _state_dir, _vm_id
from bulkhead.errors import ConfigError, HostError

__all__ = ["copy_with_progress", "image_main", "policy_main", "vm_stats"]

PROGRESS_MIN = 8 << 20  # files at least this large show progress (on a terminal)
_CHUNK = 1 << 20


def copy_with_progress(src: Path, dst: Path, out: Any = None) -> str:
    """Copy `src` to the new file `dst` (0600, must not exist), returning its sha256. Shows a progress line
    on `out` (default stderr when it is a terminal) for files of PROGRESS_MIN bytes or more."""
    out = out if out is not None else (sys.stderr if sys.stderr.isatty() else None)
    try:
        total = src.stat().st_size
        fin = open(src, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read {src}: {exc.strerror}") from None
    h = hashlib.sha256()
    done = 0
    show = out is not None and total >= PROGRESS_MIN
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        fin.close()
        raise HostError(f"cannot write into the image store {dst.parent}: {exc.strerror}") from None
    with fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if show:
                out.write(f"\rimporting {src.name}: {done >> 20}/{total >> 20} MiB ({100 * done // max(total, 1)}%)")
                out.flush()
        fout.flush()
        os.fsync(fout.fileno())
    if show:
        out.write("\n")
    return h.hexdigest()


IMAGE_COLS = ["name", "kind", "size", "sha256", "imported", "by"]


def image_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead image", description="the daemon's image store (kernels and initrds)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    im = sub.add_parser("import", help="copy FILE into the image store (sha256 recorded, kind validated)")
    im.add_argument("file", type=Path)
    im.add_argument("--name", help="image name (default: the file's name)")
    im.add_argument("--initrd", action="store_true", help="an initrd (not validated as a kernel)")
    ls = sub.add_parser("list", help="images in the store")
    dl = sub.add_parser("delete", help="remove an image no VM uses")
    dl.add_argument("name")
    for sp in (im, ls, dl):
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "list":
                rows = c.get("/images")
                if not args.json:
                    rows = [{**r, "sha256": (r["sha256"] or "")[:16]} for r in rows]
                return _out(args, rows, IMAGE_COLS)
            if args.cmd == "delete":
                c.delete(f"/images/{args.name}")
                if not args.json:
                    print(f"deleted image {args.name}")
                return 0
            return _import(c, args)

    return _run(go)


def _import(c: Any, args: argparse.Namespace) -> int:
    src: Path = args.file
    if not src.is_file():
        raise ConfigError(f"{src} is not a file")
    name = args.name or src.name
    store = _state_dir(args) / "images"
    if not store.is_dir():
        raise HostError(f"the image store {store} does not exist: `image import` runs on the daemon's host "
                        "(as root, next to its state directory; --state-dir to choose it)")
    staged = store / f".import-{secrets.token_hex(8)}"
    try:
        digest = copy_with_progress(src, staged)
        res = c.post("/images", {"name": name, "staged": staged.name, "sha256": digest, "initrd": bool(args.initrd)})
    finally:
        staged.unlink(missing_ok=True)  # the daemon renamed it on success
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(f"imported {name}: {res['kind']}, {res['size']} bytes, sha256 {res['sha256']}")
    return 0


def policy_main(argv: list[str]) -> int:
    """`bulkhead attest policy show|allow-digest|revoke-digest` (through the daemon, audited)."""
    p = _Parser(prog="bulkhead attest policy", description="the attestation policy, edited through the daemon")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sh = sub.add_parser("show", help="the policy the daemon uses")
    al = sub.add_parser("allow-digest", help="allow a digest (default kind vm-launch)")
    rv = sub.add_parser("revoke-digest", help="remove a digest")
    for sp in (al, rv):
        sp.add_argument("digest", help="SHA-256, hex (see `bulkhead vm measurement`)")
        sp.add_argument("--kind", default="vm-launch", choices=["vm-launch", "manifest", "config"])
    for sp in (sh, al, rv):
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "show":
                res = c.get("/integrity/policy")
            else:
                digest = args.digest.strip().lower()
                path = "allow" if args.cmd == "allow-digest" else "revoke"
                res = c.post(f"/integrity/policy/{path}", {"digest": digest, "kind": args.kind})
        if args.json:
            print(json.dumps(res, indent=2, sort_keys=True))
            return 0
        print(f"policy {res['path']} ({res['format']})")
        for kind, values in res["allowed"].items():
            print(f"  {kind}: {len(values)} allowed")
            for v in values:
                print(f"    {v}")
        return 0

    return _run(go)


def vm_stats(c: Any, args: argparse.Namespace) -> int:
    """`bulkhead vm stats NAME [--json]`."""
    res = c.get(f"/vms/{_vm_id(c, args.vm)}/stats")
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(f"{res['name']} ({res['tenant_name'] or res['tenant']}): {res['state']}")
    if not res["available"]:
        print("  no counters yet (the VM has not run)")
        return 0
    print(f"  exits            {res['exits_total']} ({', '.join(f'vcpu{i} {n}' for i, n in enumerate(res['exits']))})")
    ca = res["contained_accesses"]
    print("  contained        " + ", ".join(f"{bus} {ops.get('read', 0)} reads {ops.get('write', 0)} writes"
                                            for bus, ops in ca.items()))
    for title, key in (("device I/O bytes", "io_bytes"), ("virtqueue faults", "virtqueue_faults"),
                       ("throttled", "throttled")):
        rows = res[key]
        if not rows:
            print(f"  {title:<16} none")
            continue
        for dev, vals in rows.items():
            print(f"  {title:<16} {dev}: " + ", ".join(f"{k} {v}" for k, v in vals.items()))
            title = ""
    return 0
