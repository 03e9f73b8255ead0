"""`bulkhead init | serve | cert | vm | tenant | role | audit`: the daemon and its command-line client.

Every client command talks to the daemon (mTLS or the local socket, see client.py), prints a readable
table by default and the raw JSON with --json. `audit verify` reads the audit files directly (a verifier
must not trust the daemon). Exit status: 0 ok, 1 the API refused (the message says why), 2 bad usage
(ConfigError), 4 host problem (HostError: daemon unreachable, files unreadable); bulkhead.exitstatus is the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bulkhead.errors import ConfigError, HostError

__all__ = ["audit_main", "cert_main", "init_main", "integrity_main", "network_main", "role_main", "serve_main",
           "tenant_main", "vm_main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and message.endswith(f"required: {sub.dest}"):  # no subcommand: name them
            raise ConfigError(f"{self.prog} needs a command: {', '.join(sub.choices)} "
                              f"(`{self.prog} COMMAND --help` for its options)")
        raise ConfigError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser, client: bool = True) -> None:
    p.add_argument("--state-dir", type=Path, default=None, help="default $BULKHEAD_STATE_DIR or /var/lib/bulkhead")
    if client:
        p.add_argument("--url", help="https://host:port of the daemon")
        p.add_argument("--socket", help="the daemon's local Unix socket")
        p.add_argument("--cert", help="client certificate (PEM)")
        p.add_argument("--key", help="client key (PEM)")
        p.add_argument("--ca", help="CA certificate (PEM)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _state_dir(args: argparse.Namespace) -> Path:
    from bulkhead.daemon.daemon import default_state_dir

    return args.state_dir or default_state_dir()


def _run(fn: Callable[[], int]) -> int:
    from bulkhead.daemon.client import ClientError
    from bulkhead.exitstatus import exit_status

    try:
        return fn()
    except ClientError as exc:
        if isinstance(exc.detail, list):  # validation errors: "where: what" per problem
            detail = "; ".join(
                f"{'.'.join(map(str, e.get('loc', [])[1:])) or 'request'}: {e.get('msg', '')}" if isinstance(e, dict)
                else str(e) for e in exc.detail)
        else:
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        print(f"bulkhead: refused ({exc.status}): {detail}", file=sys.stderr)
        return exit_status(exc) or 1
    except (ConfigError, HostError) as exc:
        print(f"bulkhead: {exc}", file=sys.stderr)
        return exit_status(exc) or 1


def _client(args: argparse.Namespace) -> Any:
    from bulkhead.daemon.client import ApiClient, resolve_endpoint

    ep = resolve_endpoint(_state_dir(args), url=args.url, socket=args.socket, cert=args.cert, key=args.key, ca=args.ca)
    return ApiClient(ep)


def human(v: Any) -> str:
    """A value as a person reads it: no Python reprs (None, [], {}, True)."""
    if v is None or v == "" or v == [] or v == {}:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ",".join(human(x) for x in v)
    if isinstance(v, dict):
        return " ".join(f"{k}={human(x)}" for k, x in v.items() if x not in (None, "", [], {}))
    return str(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """A plain-text table; cells are shortened to 40 characters, except the last column (e.g. DETAIL),
    which is printed whole."""

    def cell(v: Any, last: bool) -> str:
        s = human(v)
        return s if last or len(s) <= 40 else s[:37] + "..."

    cells = [[cell(r.get(c), i == len(cols) - 1) for i, c in enumerate(cols)] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _out(args: argparse.Namespace, data: Any, cols: Sequence[str]) -> int:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif data is None:
        print("ok")
    elif isinstance(data, list):
        print(table(data, cols) if data else "(none)")
    else:
        width = max(len(k) for k in data) if data else 0
        for k, v in data.items():
            print(f"{k.ljust(width)}  {human(v)}")
    return 0


def _names(c: Any, path: str) -> dict[str, str]:
    """id -> name of the tenants or principals the caller may list ({} when it may not)."""
    from bulkhead.daemon.client import ClientError

    try:
        return {str(x["id"]): str(x["name"]) for x in c.get(path)}
    except ClientError:
        return {}


def _named(rows: Any, key: str, names: dict[str, str]) -> Any:
    """Rows (or one row) with `key` shown by name when known (the id stays in --json output)."""
    if isinstance(rows, dict):
        return {**rows, key: names.get(str(rows.get(key)), rows.get(key))}
    return [{**r, key: names.get(str(r.get(key)), r.get(key))} for r in rows]


# ---------------------------------------------------------------------- init / serve
def init_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead init", description="create the CA, server and first admin certificates")
    _common(p, client=False)
    p.add_argument("--admin-name", default="admin")
    p.add_argument("--host", action="append", dest="hosts", help="server certificate name/IP (repeatable)")
    p.add_argument("--force", action="store_true", help="start over in an existing state directory")

    def go() -> int:
        args = p.parse_args(argv)
        from bulkhead.daemon.setup import init_state_dir

        lock = None
        if args.force:  # a directory a daemon serves is never wiped under it (HostError names the holder)
            from bulkhead.daemon.server import lock_state_dir

            lock = lock_state_dir(_state_dir(args))
        try:
            sd = init_state_dir(_state_dir(args), args.admin_name, args.hosts, args.force)
        finally:
            if lock is not None:
                os.close(lock)
        print(f"initialized {sd.root}\n  CA          {sd.ca_cert}\n  server      {sd.server_cert}\n"
              f"  admin cert  {sd.admin_cert} (key {sd.admin_key}, Owner at /)\n  audit key   {sd.audit_pub}")
        return 0

    return _run(go)


def serve_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead serve", description="run the management daemon (bulkheadd)")
    _common(p, client=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443, help="0 picks a free port (written to serve.json)")
    p.add_argument("--ui-port", type=int, default=None, help="also serve the web console on this port, where a "
                   "browser may log in with `bulkhead ui login` instead of a certificate (docs/UI.md; 0: free port)")
    p.add_argument("--engine", default="casbin", choices=["casbin", "pure"], help="RBAC evaluator")
    p.add_argument("--backend", default="auto", choices=["auto", "jail", "process", "fake"],
                   help="jail: one jailed worker per VM (root; the default as root); process: UNJAILED "
                   "`bulkhead run` children (development, non-root; warns); fake: no VMs (testing)")
    p.add_argument("--network", choices=["host", "dry"], default=None,
                   help="host: realise tenant networks on this host (default); dry: validate only, change "
                   "nothing (default with --backend fake)")
    p.add_argument("--net-prefix", default="bh", help="1-4 characters naming every network object bulkhead owns")
    g = p.add_argument_group("integrity (docs/INTEGRITY.md)")
    g.add_argument("--tpm", metavar="TCTI", help="the TPM: device:/dev/tpmrm0 or swtpm:host=H,port=P "
                   "(default $BULKHEAD_TCTI, else /dev/tpmrm0 when present; none: untrusted, no VM starts)")
    g.add_argument("--dev-tpm", action="store_true",
                   help="development: run a software TPM under <state-dir>/integrity/devtpm (enrolled, with a "
                   "starting policy when none exists)")
    g.add_argument("--policy", type=Path, help="attestation policy (default <state-dir>/integrity/policy.json)")
    g.add_argument("--enrollment", type=Path,
                   help="AK enrollment from `bulkhead attest enroll` (default <state-dir>/integrity/enrollment.json)")
    g.add_argument("--event-log", type=Path, help="measurement event log (default <state-dir>/integrity/events.jsonl)")
    g.add_argument("--integrity", default="gate", choices=["gate", "off"],
                   help="off: no integrity gate; refused unless --backend fake (no guest can run); audited")
    p.add_argument("--log-format", default="logfmt", choices=["logfmt", "json"],
                   help="stderr log lines (one per request and lifecycle event; the journal under systemd)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    w = p.add_argument_group("audit witnesses (docs/AUDIT.md)")
    w.add_argument("--witness", help="NAME|URL[,...]: push checkpoints to these registered witnesses "
                   "(default: every one under <state-dir>/witnesses)")
    w.add_argument("--witness-quorum", type=int, default=0, help="cosignatures needed (default: all witnesses)")
    w.add_argument("--witness-grace", type=float, default=0.0,
                   help="seconds without a witness quorum before mutations are refused (default 0: fail closed)")
    w.add_argument("--checkpoint-interval", type=float, default=60.0, help="seconds between checkpoints")

    def go() -> int:
        args = p.parse_args(argv)
        from bulkhead.daemon.backend import make_backend
        from bulkhead.daemon.integrity import IntegrityOptions
        from bulkhead.daemon.logsetup import configure
        from bulkhead.daemon.server import serve

        configure(args.log_format, args.log_level)
        if args.integrity == "off" and args.backend != "fake":
            raise ConfigError("--integrity off is accepted only with --backend fake (no guest can run)")
        if args.dev_tpm and args.tpm:
            raise ConfigError("--dev-tpm and --tpm exclude each other")
        sd = _state_dir(args)
        opts = IntegrityOptions(args.integrity, args.tpm, args.dev_tpm, args.policy, args.enrollment, args.event_log)
        policy, enrollment, log = opts.paths(sd)
        config = {"state_dir": str(sd.resolve()), "listen": f"{args.host}:{args.port}", "engine": args.engine,
                  "backend": args.backend, "integrity": args.integrity,
                  "tpm": "dev-tpm" if args.dev_tpm else (opts.resolve_tcti() or "none"),
                  "policy": str(policy), "enrollment": str(enrollment), "event_log": str(log)}
        backend = make_backend(args.backend, console_root=sd / "vms")
        from bulkhead.daemon.witness import WitnessOptions

        wsel = [x for x in (args.witness or "").split(",") if x]
        wopts = WitnessOptions.registered(sd / "witnesses", wsel, quorum=args.witness_quorum,
                                          grace=args.witness_grace, checkpoint_interval=args.checkpoint_interval)
        config["witnesses"] = ",".join(s.name for s in wopts.witnesses)
        return serve(sd, args.host, args.port, backend, args.engine, integrity=opts, config=config,
                     net=_network_service(args), witnesses=wopts, ui_port=args.ui_port)

    return _run(go)


def _network_service(args: argparse.Namespace) -> Any:
    """The daemon's NetworkService for `serve`: the host's (prefix --net-prefix), or a dry one."""
    from bulkhead.daemon.networks import DryNetworkService
    from bulkhead.network.service import NetworkService
    from bulkhead.network.state import HostConfig

    config = HostConfig(prefix=args.net_prefix)
    mode = args.network or ("dry" if args.backend == "fake" else "host")
    return DryNetworkService(config) if mode == "dry" else NetworkService(config)


# ---------------------------------------------------------------------- cert
def cert_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead cert", description="issue or revoke client certificates (principals)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    iss = sub.add_parser("issue", help="issue a certificate for a principal (key made locally)")
    iss.add_argument("name")
    iss.add_argument("--days", type=int, default=365)
    iss.add_argument("--out", type=Path, default=Path("."), help="directory for NAME.pem / NAME.key")
    rev = sub.add_parser("revoke", help="revoke every certificate of a principal")
    rev.add_argument("principal", help="principal id or name")
    lst = sub.add_parser("list", help="list principals")
    for sp in (iss, rev, lst):
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "list":
                return _out(args, c.get("/principals"), ["id", "name", "kind", "revoked", "not_after"])
            if args.cmd == "revoke":
                pid = _principal_id(c, args.principal)
                return _out(args, c.post(f"/principals/{pid}/revoke"), [])
            from bulkhead.daemon import pki

            key = pki.new_key()
            res = c.post("/principals", {"name": args.name, "csr_pem": pki.make_csr(key, args.name).decode(),
                                         "days": args.days})
            args.out.mkdir(parents=True, exist_ok=True)
            pki.write_private(args.out / f"{args.name}.key", pki.key_pem(key))
            pki.write_private(args.out / f"{args.name}.pem", res["certificate_pem"].encode(), 0o644)
            pki.write_private(args.out / "ca.pem", res["ca_pem"].encode(), 0o644)
            if args.json:
                print(json.dumps(res["principal"], indent=2))
            else:
                print(f"issued {args.out / (args.name + '.pem')} (key {args.out / (args.name + '.key')}) "
                      f"for principal {res['principal']['id']}")
            return 0

    return _run(go)


def _principal_id(c: Any, ref: str) -> str:
    for pr in c.get("/principals"):
        if ref in (pr["id"], pr["name"]):
            return str(pr["id"])
    raise ConfigError(f"no principal named {ref!r}")


# ---------------------------------------------------------------------- tenant
def _tenant_id(c: Any, ref: str) -> str:
    for t in c.get("/tenants"):
        if ref in (t["id"], t["name"]):
            return str(t["id"])
    raise ConfigError(f"no tenant {ref!r} (or you may not see it)")


def tenant_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead tenant", description="manage tenants")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    cr = sub.add_parser("create")
    cr.add_argument("name")
    ls = sub.add_parser("list")
    gt = sub.add_parser("get")
    gt.add_argument("tenant")
    dl = sub.add_parser("delete")
    dl.add_argument("tenant")
    for sp in (cr, ls, gt, dl):
        _common(sp)
    cols = ["id", "name", "created"]

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "create":
                return _out(args, c.post("/tenants", {"name": args.name}), cols)
            if args.cmd == "list":
                return _out(args, c.get("/tenants"), cols)
            tid = _tenant_id(c, args.tenant)
            if args.cmd == "get":
                return _out(args, c.get(f"/tenants/{tid}"), cols)
            return _out(args, c.delete(f"/tenants/{tid}"), cols)

    return _run(go)


# ---------------------------------------------------------------------- vm (and disks)
VM_COLS = ["id", "tenant", "name", "state", "kernel", "mem_mib", "cpus", "exit_status"]


def vm_main(argv: list[str]) -> int:
    if argv and argv[0] in ("snapshot", "restore"):  # daemon/snapshot_cli.py
        import importlib

        return int(importlib.import_module("bulkhead.daemon.snapshot_cli").vm_snapshot_main(argv))
    p = _Parser(prog="bulkhead vm", description="manage VMs and disk images through the daemon")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    cr = sub.add_parser("create")
    cr.add_argument("--tenant", required=True, help="tenant id or name")
    cr.add_argument("--name", required=True)
    cr.add_argument("--kernel", required=True, help="image name in the daemon's image directory")
    cr.add_argument("--initrd")
    cr.add_argument("--cmdline", default="")
    cr.add_argument("--mem", type=int, default=128)
    cr.add_argument("--cpus", type=int, default=1)
    cr.add_argument("--drive", action="append", default=[], help="DISK_ID[,ro]")
    cr.add_argument("--net", action="append", default=[],
                    help="NETWORK[,ip=A.B.C.D][,mac=MAC][,bw=BYTES_PER_S][,ops=PACKETS_PER_S] (network id or name)")
    cr.add_argument("--rng", action="store_true")
    cr.add_argument("--vsock-cid", type=int, metavar="CID",
                    help="a virtio-vsock device with this guest CID (3..4294967294, unique on the host); the host "
                         "side is a unix socket under the VM's state directory (docs/VSOCK.md)")
    cr.add_argument("--expected-digest", metavar="SHA256",
                    help="launch digest the VM must have to start (see `bulkhead vm measurement`)")
    ls = sub.add_parser("list")
    ls.add_argument("--tenant")
    parsers = [cr, ls]
    for name in ("get", "start", "stop", "pause", "resume", "delete", "events", "measurement", "stats", "reboot"):
        sp = sub.add_parser(name)
        sp.add_argument("vm")
        parsers.append(sp)
        if name == "stop":  # stop is a force stop, as it always was; --force says so explicitly
            sp.add_argument("--force", action="store_true", help="stop at once (the default; see `vm shutdown`)")
    sd = sub.add_parser("shutdown", help="ask the guest to power off (Ctrl-Alt-Del), force-stop after --timeout")
    sd.add_argument("vm")
    sd.add_argument("--timeout", type=float, default=30.0, help="seconds before the force stop (default 30)")
    co = sub.add_parser("console", help="attach to the serial console (read-write, detach with Ctrl-])")
    co.add_argument("vm")
    co.add_argument("--follow", action="store_true", help="read-only: follow the output")
    co.add_argument("--once", action="store_true", help="print the buffered output and exit")
    co.add_argument("--offset", type=int, default=None, help="start at this byte of the output")
    co.add_argument("--tail", type=int, default=None, help="start this many bytes before the end (default 4096)")
    parsers += [sd, co]
    dc = sub.add_parser("disk-create")
    dc.add_argument("--tenant", required=True)
    dc.add_argument("--name", required=True)
    dc.add_argument("--size", type=int, required=True, help="MiB")
    dls = sub.add_parser("disk-list")
    dls.add_argument("--tenant", required=True)
    dd = sub.add_parser("disk-delete")
    dd.add_argument("disk")
    parsers += [dc, dls, dd]
    for sp in parsers:
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            return _vm_cmd(c, args)

    return _run(go)


def _vm_id(c: Any, ref: str) -> str:
    for v in c.get("/vms"):
        if ref in (v["id"], v["name"]):
            return str(v["id"])
    if len(ref) == 36 and ref.count("-") == 4:
        return ref  # let the daemon answer (404 when it does not exist or is not visible)
    raise ConfigError(f"no VM {ref!r} (or you may not see it)")


def _vm_cmd(c: Any, args: argparse.Namespace) -> int:
    disk_cols = ["id", "tenant", "name", "size_mib", "created"]
    if args.cmd == "create":
        drives = []
        for d in args.drive:
            disk, _, opt = d.partition(",")
            if opt not in ("", "ro", "rw"):
                raise ConfigError(f"--drive {d!r}: the only options are ro and rw")
            drives.append({"disk": disk, "read_only": opt == "ro"})
        tenant_id = _tenant_id(c, args.tenant)
        nics = [_nic_arg(c, tenant_id, n) for n in args.net]
        body = {"tenant": tenant_id, "name": args.name, "kernel": args.kernel,
                "initrd": args.initrd, "cmdline": args.cmdline, "mem_mib": args.mem, "cpus": args.cpus,
                "drives": drives, "nics": nics, "rng": args.rng}
        if args.expected_digest:
            body["expected_digest"] = args.expected_digest.strip().lower()
        if args.vsock_cid is not None:
            body["vsock_cid"] = args.vsock_cid
        return _out(args, c.post("/vms", body), VM_COLS)
    if args.cmd == "list":
        tenant = _tenant_id(c, args.tenant) if args.tenant else None
        vms = c.get("/vms", tenant=tenant)
        return _out(args, vms if args.json else _named(vms, "tenant", _names(c, "/tenants")), VM_COLS)
    if args.cmd == "disk-create":
        body = {"name": args.name, "size_mib": args.size}
        return _out(args, c.post(f"/tenants/{_tenant_id(c, args.tenant)}/disks", body), disk_cols)
    if args.cmd == "disk-list":
        return _out(args, c.get(f"/tenants/{_tenant_id(c, args.tenant)}/disks"), disk_cols)
    if args.cmd == "disk-delete":
        return _out(args, c.delete(f"/disks/{args.disk}"), disk_cols)
    vid = _vm_id(c, args.vm)
    if args.cmd == "get":
        vm = c.get(f"/vms/{vid}")
        return _out(args, vm if args.json else _named(vm, "tenant", _names(c, "/tenants")), VM_COLS)
    if args.cmd == "delete":
        return _out(args, c.delete(f"/vms/{vid}"), VM_COLS)
    if args.cmd == "events":
        events = c.get(f"/vms/{vid}/events")
        if not args.json:  # DETAIL whole (the last column), principals by name
            who = _names(c, "/principals")
            for e in events:
                try:
                    d = json.loads(e["detail"]) if isinstance(e["detail"], str) else e["detail"]
                except ValueError:
                    continue
                if isinstance(d, dict) and "by" in d:
                    d["by"] = who.get(str(d["by"]), d["by"])
                e["detail"] = d
        return _out(args, events, ["time", "event", "detail"])
    if args.cmd == "stats":  # daemon/ops_cli.py, by name (it builds on this module)
        import importlib

        return int(importlib.import_module("bulkhead.daemon.ops_cli").vm_stats(c, args))
    if args.cmd == "measurement":
        return _out(args, c.get(f"/vms/{vid}/measurement"), [])
    if args.cmd == "console":
        if args.once or args.json:
            res = c.get(f"/vms/{vid}/console", offset=args.offset or 0)
            if args.json:
                print(json.dumps(res))
            else:
                sys.stdout.write(res["data"])
            return 0
        from bulkhead.daemon.consoleclient import attach

        return attach(c.endpoint, vid, write=not args.follow, offset=args.offset, tail=args.tail, label=args.vm)
    if args.cmd == "shutdown":
        res = c.call("POST", f"/vms/{vid}/shutdown", params={"timeout": args.timeout}, timeout=args.timeout + 30)
        if not args.json:
            how = res["shutdown"]
            print("the guest powered off" if how["graceful"] else
                  f"the guest did not power off within {args.timeout:g} s: stopped by force"
                  if how["method"] else "the guest could not be asked: stopped by force", file=sys.stderr)
        return _out(args, res, VM_COLS)
    return _out(args, c.post(f"/vms/{vid}/{args.cmd}"), VM_COLS)


# ---------------------------------------------------------------------- integrity
def integrity_main(argv: list[str]) -> int:
    """`bulkhead integrity status`: the daemon's host integrity (exit 0 trusted, 1 untrusted or off)."""
    p = _Parser(prog="bulkhead integrity", description="the daemon's host integrity state (GET /integrity)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    st = sub.add_parser("status", help="trusted or untrusted, with every reason")
    _common(st)

    def go() -> int:
        if not argv:  # no subcommand: the usage, not argparse's "arguments are required: cmd"
            print(p.format_usage().rstrip() + "\n\n  status   the daemon's host integrity (exit 0 trusted)")
            return 2
        args = p.parse_args(argv)
        with _client(args) as c:
            res = c.get("/integrity")
        _out(args, res, [])
        return 0 if res.get("state") == "trusted" else 1

    return _run(go)


def _nic_arg(c: Any, tenant: str, spec: str) -> dict[str, Any]:
    """`NETWORK[,ip=..][,mac=..][,bw=..][,ops=..]` -> a NIC of a VM create request. Raises ConfigError."""
    ref, *opts = spec.split(",")
    nic: dict[str, Any] = {"network": _network_id(c, tenant, ref)}
    rate: dict[str, int] = {}
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq or k not in ("ip", "mac", "bw", "ops"):
            raise ConfigError(f"--net {spec!r}: options are ip=, mac=, bw= and ops=")
        if k in ("bw", "ops"):
            if not v.isdigit():
                raise ConfigError(f"--net {spec!r}: {k}= takes a non-negative integer")
            rate["bytes_per_sec" if k == "bw" else "ops_per_sec"] = int(v)
        else:
            nic["ipv4" if k == "ip" else "mac"] = v
    if rate:
        nic["rate"] = rate
    return nic


# ---------------------------------------------------------------------- network
NET_COLS = ["id", "tenant", "name", "ipv4_subnet", "ipv4_gateway", "ipv6_prefix", "egress"]


def _network_id(c: Any, tenant: str, ref: str) -> str:
    for n in c.get(f"/tenants/{tenant}/networks"):
        if ref in (n["id"], n["name"]):
            return str(n["id"])
    if len(ref) == 36 and ref.count("-") == 4:
        return ref  # let the daemon answer
    raise ConfigError(f"no network {ref!r} in the tenant (or you may not see it)")


def network_main(argv: list[str]) -> int:
    """`bulkhead network create|list|get|delete|counters`: tenant networks through the daemon."""
    p = _Parser(prog="bulkhead network", description="manage tenant networks through the daemon")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    cr = sub.add_parser("create")
    cr.add_argument("--tenant", required=True, help="tenant id or name")
    cr.add_argument("--name", required=True)
    cr.add_argument("--ipv4", required=True, help="subnet, e.g. 10.1.0.0/24")
    cr.add_argument("--ipv6", help="optional /64 prefix")
    cr.add_argument("--egress", action="store_true", help="allow traffic to the outside (NAT)")
    ls = sub.add_parser("list")
    ls.add_argument("--tenant", required=True)
    parsers = [cr, ls]
    for name in ("get", "delete", "counters"):
        sp = sub.add_parser(name)
        sp.add_argument("network", help="network id (or name with --tenant)")
        sp.add_argument("--tenant", help="tenant id or name, to find a network by name")
        parsers.append(sp)
    for sp in parsers:
        _common(sp)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "create":
                body = {"name": args.name, "ipv4_subnet": args.ipv4, "ipv6_prefix": args.ipv6, "egress": args.egress}
                return _out(args, c.post(f"/tenants/{_tenant_id(c, args.tenant)}/networks", body), NET_COLS)
            if args.cmd == "list":
                return _out(args, c.get(f"/tenants/{_tenant_id(c, args.tenant)}/networks"), NET_COLS)
            nid = _network_id(c, _tenant_id(c, args.tenant), args.network) if args.tenant else args.network
            if args.cmd == "get":
                return _out(args, c.get(f"/networks/{nid}"), NET_COLS)
            if args.cmd == "delete":
                return _out(args, c.delete(f"/networks/{nid}"), NET_COLS)
            res = c.get(f"/networks/{nid}/counters")
            if args.json:
                return _out(args, res, [])
            rows = [{"counter": k, **v} for k, v in res["counters"].items()]
            return _out(args, rows, ["counter", "packets", "bytes"])

    return _run(go)


# ---------------------------------------------------------------------- role
def role_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead role", description="role definitions and assignments")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    ls = sub.add_parser("list")
    sh = sub.add_parser("show")
    sh.add_argument("role")
    cr = sub.add_parser("create")
    cr.add_argument("--name", required=True)
    cr.add_argument("--description", default="")
    cr.add_argument("--action", action="append", required=True, dest="actions")
    cr.add_argument("--not-action", action="append", default=[], dest="not_actions")
    cr.add_argument("--scope", action="append", required=True, dest="scopes", help="assignable scope")
    dl = sub.add_parser("delete")
    dl.add_argument("role")
    asg = sub.add_parser("assign", help="assign ROLE to PRINCIPAL at SCOPE")
    asg.add_argument("principal", help="principal id or name")
    asg.add_argument("role", help="role id or name")
    asg.add_argument("scope", help="/, /tenants/<id> or /tenants/<id>/vms/<id>")
    un = sub.add_parser("unassign")
    un.add_argument("assignment")
    al = sub.add_parser("assignments")
    al.add_argument("--principal")
    for sp in (ls, sh, cr, dl, asg, un, al):
        _common(sp)
    cols = ["id", "name", "builtin", "actions", "not_actions", "assignable_scopes"]
    acols = ["id", "principal_id", "role_name", "scope"]

    def role_id(c: Any, ref: str) -> str:
        for r in c.get("/roles"):
            if ref in (r["id"], r["name"]):
                return str(r["id"])
        raise ConfigError(f"no role {ref!r}")

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            if args.cmd == "list":
                return _out(args, c.get("/roles"), cols)
            if args.cmd == "show":
                return _out(args, c.get(f"/roles/{role_id(c, args.role)}"), cols)
            if args.cmd == "create":
                body = {"name": args.name, "description": args.description, "actions": args.actions,
                        "not_actions": args.not_actions, "assignable_scopes": args.scopes}
                return _out(args, c.post("/roles", body), cols)
            if args.cmd == "delete":
                return _out(args, c.delete(f"/roles/{role_id(c, args.role)}"), cols)
            if args.cmd == "assign":
                body = {"principal": args.principal, "role": args.role, "scope": args.scope}
                return _out(args, c.post("/assignments", body), acols)
            if args.cmd == "unassign":
                return _out(args, c.delete(f"/assignments/{args.assignment}"), acols)
            pid = _principal_id(c, args.principal) if args.principal else None
            rows = c.get("/assignments", principal=pid)
            if not args.json:
                rows = [{**r, "principal": n} for r, n in
                        zip(rows, [x["principal_id"] for x in _named(rows, "principal_id", _names(c, "/principals"))],
                            strict=True)]
            return _out(args, rows, acols if args.json else ["id", "principal", "role_name", "scope"])

    return _run(go)


# ---------------------------------------------------------------------- audit
def audit_main(argv: list[str]) -> int:
    """`bulkhead audit show|export|verify|checkpoint|prove|witness` (docs/AUDIT.md)."""
    if argv[:1] == ["witness"]:  # dispatched by name, like bulkhead.cli's table: witness_cli builds on this module
        import importlib

        return int(importlib.import_module("bulkhead.daemon.witness_cli").witness_main(argv[1:]))
    p = _Parser(prog="bulkhead audit", description="show, export, prove and verify the audit log")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sh = sub.add_parser("show")
    ex = sub.add_parser("export", help="all matching records as JSON lines, each with its leaf input (`leaf`)")
    for sp in (sh, ex):
        sp.add_argument("--since", help="ISO time, e.g. 2026-01-31 or 2026-01-31T12:00:00")
        sp.add_argument("--principal", help="principal id or name")
        sp.add_argument("--vm", help="VM id or name")
        _common(sp)
    sh.add_argument("--limit", type=int, default=100)
    ex.add_argument("--out", type=Path, help="file (default stdout)")
    ve = sub.add_parser("verify", help="verify the audit files directly (no daemon needed)")
    _common(ve, client=False)
    ve.add_argument("--db", type=Path)
    ve.add_argument("--verifier-key", help="the log's note verifier key (text or file; default <state-dir>/audit.vkey)")
    ve.add_argument("--pub", type=Path, help="audit public key (PEM), named by the database's origin")
    ve.add_argument("--checkpoint", type=Path, help="a checkpoint note kept elsewhere (default <state-dir>/audit.checkpoint)")
    ve.add_argument("--witness", action="append", default=[],
                    help="check against this witness's latest cosigned checkpoint (registered name or URL; "
                    "repeatable, comma lists; `all`: every registered witness)")
    ve.add_argument("--json", action="store_true")
    cp = sub.add_parser("checkpoint", help="print the latest signed checkpoint (C2SP signed note)")
    _common(cp, client=False)
    cp.add_argument("--verifier-key", action="store_true", help="print the note verifier key instead")
    pr = sub.add_parser("prove", help="inclusion / consistency proofs (RFC 9162), from the files or the API")
    psub = pr.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    pi = psub.add_parser("inclusion")
    pi.add_argument("seq", type=int)
    pi.add_argument("--size", type=int, help="tree size (default: the current one)")
    pc = psub.add_parser("consistency")
    pc.add_argument("old", type=int)
    pc.add_argument("new", type=int)
    for sp in (pi, pc):
        _common(sp)
        sp.add_argument("--db", type=Path, help="read this database instead of asking the daemon")

    def go() -> int:
        args = p.parse_args(argv)
        if args.cmd == "verify":
            return _verify(args)
        if args.cmd == "checkpoint":
            return _checkpoint(args)
        if args.cmd == "prove":
            return _prove(args)
        with _client(args) as c:
            principal = args.principal
            if principal and len(principal) != 36:
                principal = _principal_id(c, principal)
            vm = args.vm
            if vm and not (len(vm) == 36 and vm.count("-") == 4):
                vm = _vm_id(c, vm)  # a VM name, as the vm commands accept
            params = {"since": args.since, "principal": principal, "vm": vm}
            if args.cmd == "show":
                recs = c.get("/audit", **params, limit=max(1, min(args.limit, 10000)))
                if not args.json:
                    recs = _named(recs, "principal", _names(c, "/principals"))
                return _out(args, recs, ["seq", "time", "kind", "principal", "action", "decision", "result", "vm"])
            out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
            after = 0
            try:
                while True:
                    recs = c.get("/audit", **params, after=after, limit=10000, leaf="true")
                    for r in recs:
                        out.write(json.dumps(r, sort_keys=True) + "\n")
                    if len(recs) < 10000:
                        return 0
                    after = recs[-1]["seq"]
            finally:
                if out is not sys.stdout:
                    out.close()

    return _run(go)


def _prove(args: argparse.Namespace) -> int:
    if args.db is None and (args.url or args.socket or not (_state_dir(args) / "audit.db").exists()):
        with _client(args) as c:
            if args.kind == "inclusion":
                res = c.get("/audit/proof/inclusion", seq=args.seq, size=args.size)
            else:
                res = c.get("/audit/proof/consistency", old=args.old, new=args.new)
        return _out(args, res, [])
    from bulkhead.daemon.auditlog import TreeReader, _readonly

    conn = _readonly(args.db or _state_dir(args) / "audit.db")
    try:
        size = int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        t = TreeReader(conn)
        try:
            if args.kind == "inclusion":
                n = size if args.size is None else args.size
                if n > size:
                    raise ConfigError(f"the log has {size} records, not {n}")
                res = t.inclusion(args.seq, n)
            else:
                if args.new > size:
                    raise ConfigError(f"the log has {size} records, not {args.new}")
                res = t.consistency(args.old, args.new)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    finally:
        conn.close()
    return _out(args, res, [])


def _checkpoint(args: argparse.Namespace) -> int:
    from bulkhead.daemon.auditlog import _readonly, load_verifier

    root = _state_dir(args)
    if args.verifier_key:
        print(str(load_verifier(root / "audit.vkey", root / "audit.db")))
        return 0
    conn = _readonly(root / "audit.db")
    try:
        row = conn.execute("SELECT note FROM head WHERE id = 1").fetchone()
    finally:
        conn.close()
    if row is None:
        raise HostError(f"{root / 'audit.db'} has no signed checkpoint (wiped?)")
    sys.stdout.write(row[0])
    return 0


def _verify(args: argparse.Namespace) -> int:
    from bulkhead.daemon.auditlog import load_verifier, verify_files

    root = _state_dir(args)
    db = args.db or root / "audit.db"
    vk = args.verifier_key if args.verifier_key else (None if args.pub else root / "audit.vkey")
    verifier = load_verifier(vk, db, args.pub)
    cp = args.checkpoint or root / "audit.checkpoint"
    extra: list[Any] = []
    if args.witness:
        from bulkhead.daemon.witness import witness_checkpoints

        extra = witness_checkpoints(root, [w for x in args.witness for w in x.split(",") if w], verifier)
    rep = verify_files(db, verifier, cp, extra)
    if args.json:
        print(json.dumps(rep.as_dict()))
    elif rep.ok:
        wit = f", {len(extra)} from witnesses" if extra else ""
        print(f"audit log OK: {rep.records} records, {rep.checkpoints_checked} signed checkpoints checked{wit}, "
              f"root {rep.root}")
    else:
        where = f"first bad record {rep.first_bad}: " if rep.first_bad else ""
        print(f"audit log BAD: {where}{rep.problem}")
    return 0 if rep.ok else 1
