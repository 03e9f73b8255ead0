"""`bulkhead fleet serve | hosts | vm | drain | undrain | enroll` and the agent side of `bulkhead serve --fleet`.

Exit status as every bulkhead CLI (bulkhead.exitstatus): 0 ok, 1 refused, 2 bad usage, 4 host problem;
`fleet serve` ends with 3 when it was deposed (lost the leadership: restart it, it stands by).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkhead.daemon.cli import _client, _common, _out, _Parser, _run, _state_dir, vm_main
from bulkhead.errors import ConfigError, HostError

__all__ = ["agent_main", "fleet_main"]

DEPOSED = 3
HOST_COLS = ["host", "state", "vms", "mem_free_mib", "attestation_age_s", "trusted"]


def _etcd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd-ca", help="CA of the etcd members' certificates (PEM); default $BULKHEAD_ETCD_CA")
    p.add_argument("--etcd-cert", help="this member's etcd client certificate; default $BULKHEAD_ETCD_CERT")
    p.add_argument("--etcd-key", help="its key; default $BULKHEAD_ETCD_KEY")
    p.add_argument("--etcd-namespace", default="", metavar="/PREFIX",
                   help="a key prefix for this fleet's records (several fleets on one etcd)")
    p.add_argument("--etcd-user", help="the etcd user (docs/FLEET.md \"etcd access control\"): host-<id> for "
                   "an agent, the controller's user for `fleet serve`")
    p.add_argument("--etcd-password-file", type=Path, help="a file holding that user's password")
    p.add_argument("--ttl", type=float, default=3.0, help="lease TTL in seconds (default 3)")
    p.add_argument("--grace", type=float, default=1.0, help="seconds past a lost host's lease expiry before "
                   "its VMs are rescheduled (default 1)")


def _store(urls: str, args: argparse.Namespace) -> Any:
    from bulkhead.fleet.etcdrun import ClientTls
    from bulkhead.fleet.store import EtcdStore

    ca = args.etcd_ca or os.environ.get("BULKHEAD_ETCD_CA")
    cert = args.etcd_cert or os.environ.get("BULKHEAD_ETCD_CERT")
    key = args.etcd_key or os.environ.get("BULKHEAD_ETCD_KEY")
    tls = None
    if ca or cert or key:
        if not (ca and cert and key):
            raise ConfigError("--etcd-ca, --etcd-cert and --etcd-key go together")
        for f in (ca, cert, key):
            if not Path(f).is_file():
                raise ConfigError(f"{f}: no such file")
        tls = ClientTls(ca, cert, key)
    password = None
    if args.etcd_user:
        if args.etcd_password_file is None or not args.etcd_password_file.is_file():
            raise ConfigError("--etcd-user needs --etcd-password-file (an existing file)")
        password = args.etcd_password_file.read_text().strip()
    return EtcdStore(urls, tls, timeout=max(0.5, args.ttl / 4), namespace=args.etcd_namespace,
                     user=args.etcd_user, password=password)


def _timing(args: argparse.Namespace) -> Any:
    from bulkhead.fleet.model import FleetTiming

    ttl = float(args.ttl)
    return FleetTiming(ttl=ttl, keepalive=ttl / 3, fence_margin=ttl / 4, grace=float(args.grace))


def _stop_on_signals(stop: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


# ---------------------------------------------------------------------- the agent
def _agent_backend(args: Any, host: str, sd: Path) -> Any:
    """The agent's VM backend; a jail gets a per-host jail directory, cgroup parent and uid range, and what
    a killed agent left there is cleaned."""
    from bulkhead.daemon.backend import make_backend

    kind = ("jail" if os.geteuid() == 0 else "process") if args.backend == "auto" else args.backend
    options = None
    if kind == "jail":
        from bulkhead.sandbox.supervisor import JailOptions, cleanup_stale

        if not 1000 <= args.uid_base <= (1 << 31) - 100_000:
            raise ConfigError("--uid-base: 1000..2^31-100000")
        options = JailOptions(base_dir=str(args.jail_dir or f"/run/bulkhead/fleet-{host}"),
                              cgroup_parent=f"/bulkhead-fleet/{host}", uid_base=args.uid_base)
        Path(options.base_dir).mkdir(parents=True, exist_ok=True)
        cleaned = cleanup_stale(options.base_dir, options.cgroup_parent)
        if cleaned:
            print(f"bulkhead agent {host}: cleaned {len(cleaned)} stale jail(s)", file=sys.stderr)
    return make_backend(kind, console_root=sd / "vms", options=options)


def _agent_attestor(args: Any, sd: Path, config: dict[str, str]) -> tuple[Any, Any]:
    """(TpmAttestor or None, the dev swtpm to stop or None): the agent quotes only with --tpm/--dev-tpm."""
    if not (args.dev_tpm or args.tpm):
        return None, None
    from bulkhead.daemon.integrity import check_code
    from bulkhead.fleet.agent import TpmAttestor, agent_config_digest
    from bulkhead.integrity.eventlog import UNVERIFIED_MANIFEST_DIGEST

    code, failure = check_code("daemon")
    if failure is not None:
        raise HostError(str(failure))
    tcti, sw = args.tpm, None
    if args.dev_tpm:
        sw, tcti = _dev_tpm(sd)
    digest = code.get("manifest_digest")
    attestor = TpmAttestor(tcti, sd / "integrity" / "events.jsonl",
                           digest if isinstance(digest, str) else UNVERIFIED_MANIFEST_DIGEST,
                           agent_config_digest(config))
    return attestor, sw


def agent_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead serve --fleet", description="join a fleet as a host agent (docs/FLEET.md)")
    _common(p, client=False)
    p.add_argument("--fleet", required=True, metavar="URL[,URL...]", help="the etcd endpoints")
    p.add_argument("--host-id", required=True, help="this host's name in the fleet (a-z, 0-9, -)")
    p.add_argument("--shared-dir", type=Path, required=True, help="the directory every host reaches (images/, disks/)")
    p.add_argument("--backend", default="auto", choices=["auto", "jail", "process", "fake"])
    p.add_argument("--mem", type=int, default=0, help="MiB offered to VMs (default: 3/4 of this host's memory)")
    p.add_argument("--vcpus", type=int, default=0, help="vCPUs offered (default: 2 per CPU)")
    p.add_argument("--slots", type=int, default=16, help="at most this many VMs (default 16)")
    p.add_argument("--jail-dir", type=Path, help="jail base directory (default /run/bulkhead/fleet-HOST: several "
                   "agents on one machine never share one)")
    p.add_argument("--uid-base", type=int, default=100_000, help="first uid of this host's jailed workers "
                   "(give each agent on one machine its own range)")
    g = p.add_argument_group("attestation")
    g.add_argument("--tpm", metavar="TCTI", help="the TPM (device:/dev/tpmrm0, swtpm:host=H,port=P)")
    g.add_argument("--dev-tpm", action="store_true", help="development: a software TPM under <state-dir>/integrity/devtpm; "
                   "its enrollment is written to <state-dir>/integrity/enrollment.json for the controller")
    _etcd_args(p)

    def go() -> int:
        args = p.parse_args(argv)
        from bulkhead.fleet.agent import Agent
        from bulkhead.fleet.model import valid_host_id

        host = valid_host_id(args.host_id)
        sd = _state_dir(args)
        sd.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not args.shared_dir.is_dir():
            raise ConfigError(f"--shared-dir {args.shared_dir}: not a directory")
        for sub in ("images", "disks"):
            (args.shared_dir / sub).mkdir(exist_ok=True)
        timing = _timing(args)
        store = _store(args.fleet, args)
        backend = _agent_backend(args, host, sd)
        mem = args.mem or int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 / 4 / (1 << 20))
        vcpus = args.vcpus or 2 * (os.cpu_count() or 1)
        config = {"host": host, "backend": args.backend, "shared_dir": str(args.shared_dir.resolve()),
                  "ttl": str(timing.ttl)}
        attestor, sw = _agent_attestor(args, sd, config)
        from bulkhead.fleet.hostlog import HostLog

        hostlog = HostLog(sd, host)  # its vkey, <state>/audit.vkey, is what the operator enrols
        hostlog.record("agent.start", backend=args.backend)
        agent = Agent(store, host, backend, shared_dir=args.shared_dir, state_dir=sd, capacity=(mem, vcpus, args.slots),
                      timing=timing, attestor=attestor, hostlog=hostlog)
        _stop_on_signals(agent.stop)
        print(f"bulkhead agent {host}: joining {args.fleet}", file=sys.stderr, flush=True)
        try:
            agent.run()
        finally:
            backend.shutdown()
            if sw is not None:
                sw.stop()
        return 0

    return _run(go)


def stop_stale_dev_tpm(sd: Path) -> None:
    """A SIGKILLed agent leaves its dev swtpm running on the TPM state (swtpm is not tied to its parent):
    stop that one process, named by <state-dir>/integrity/devtpm.pid and checked by its command line."""
    pidfile = sd / "integrity" / "devtpm.pid"
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if cmdline and cmdline[0].endswith(b"swtpm") and f"dir={sd / 'integrity' / 'devtpm'}".encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def _dev_tpm(sd: Path) -> tuple[Any, str]:
    from bulkhead.integrity.tpm import SwTpm, Tpm, enroll

    stop_stale_dev_tpm(sd)
    sw = SwTpm(str(sd / "integrity" / "devtpm")).start()
    if sw.proc is not None:
        (sd / "integrity" / "devtpm.pid").write_text(str(sw.proc.pid))
    # Each SIGKILLed agent leaves a TPM that was not shut down in order, which counts as a dictionary-attack
    # failure against the (DA-protected) AK; a few kill rounds put a TPM in lockout and quotes fail (seen in
    # tests/fleet). A development TPM's lockout is cleared here (empty lockout auth); a real TPM's is not.
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["tpm2_dictionarylockout", "--clear-lockout", "-T", sw.tcti],
                       capture_output=True, timeout=10, check=False)
    enr = sd / "integrity" / "enrollment.json"
    if not enr.exists():
        with Tpm(sw.tcti) as tpm:
            e = enroll(tpm)
        enr.write_text(json.dumps(e.to_dict(), indent=1, sort_keys=True))
    return sw, sw.tcti


# ---------------------------------------------------------------------- the controller
def _serve(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead fleet serve", description="run a fleet controller (leader-elected through etcd)")
    _common(p, client=False)
    p.add_argument("--etcd", required=True, metavar="URL[,URL...]")
    p.add_argument("--shared-dir", type=Path, required=True, help="images/ and disks/ every host reaches")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443, help="0 picks a free port (written to serve.json when leading)")
    p.add_argument("--ui-port", type=int, metavar="PORT",
                   help="also serve the web console (/ui, docs/UI.md) there while leading; 0 picks a free port")
    p.add_argument("--id", help="this controller's name (default HOSTNAME-PID)")
    p.add_argument("--dedicated", action="append", default=[], metavar="TENANT_ID",
                   help="a tenant whose VMs get hosts of their own (repeatable)")
    p.add_argument("--untrusted", choices=["drain", "stop"], default="drain",
                   help="VMs of a host failing attestation: moved to ready hosts (drain; stopped when none can "
                   "take them only with stop)")
    _etcd_args(p)

    def go() -> int:
        args = p.parse_args(argv)
        from bulkhead.fleet.controller import Controller
        from bulkhead.fleet.service import run_controller

        sd = _state_dir(args)
        if not (sd / "state.db").exists():
            raise HostError(f"{sd} is not an initialized state directory; run `bulkhead init --state-dir {sd}`")
        store = _store(args.etcd, args)
        ident = args.id or f"{socket.gethostname()}-{os.getpid()}"
        ctl = Controller(store, ident, sd, timing=_timing(args), dedicated=frozenset(args.dedicated),
                         untrusted=args.untrusted, rbac=bool(args.etcd_user))
        _stop_on_signals(ctl.stop)
        why = run_controller(ctl, sd, args.shared_dir, args.host, args.port, args.ui_port)
        return DEPOSED if why == "deposed" else 0

    return _run(go)


def _hosts(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead fleet hosts", description="the fleet's hosts: state, VMs, free memory, attestation age")
    _common(p)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            return _out(args, c.get("/hosts"), HOST_COLS)

    return _run(go)


def _drain(argv: list[str], undo: bool) -> int:
    name = "undrain" if undo else "drain"
    p = _Parser(prog=f"bulkhead fleet {name}", description=f"{name} a host (its VMs move to ready hosts)")
    p.add_argument("hostname")
    _common(p)

    def go() -> int:
        args = p.parse_args(argv)
        with _client(args) as c:
            return _out(args, c.post(f"/hosts/{args.hostname}/{name}", {}), HOST_COLS)

    return _run(go)


def _enroll(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead fleet enroll", description="provision a host's AK enrollment and policy to the controller")
    p.add_argument("hostname")
    p.add_argument("--enrollment", type=Path, required=True, help="from `bulkhead attest enroll` on that host")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--policy", type=Path, help="that host's attestation policy")
    g.add_argument("--dev-policy-from", type=Path, metavar="EVENTS.jsonl",
                   help="development: a policy allowing exactly the manifest and configuration digests this "
                   "event log of the host shows now (trust on first use; production writes --policy)")
    p.add_argument("--audit-vkey", type=Path, metavar="FILE",
                   help="that host's audit log verifier key (<its state dir>/audit.vkey): the fleet witnesses "
                   "its log only with this key (docs/FLEET.md \"Witnessing\")")
    _common(p, client=False)

    def go() -> int:
        args = p.parse_args(argv)
        from bulkhead.fleet.model import valid_host_id
        from bulkhead.integrity.policy import POLICY_FORMAT, parse_enrollment, parse_policy

        host = valid_host_id(args.hostname)
        try:
            enr = parse_enrollment(args.enrollment.read_text())
            if args.policy:
                policy_text = args.policy.read_text()
            else:
                from bulkhead.integrity.host import read_event_log

                events = read_event_log(str(args.dev_policy_from))
                allowed = {k: sorted({e.digest for e in events if e.kind == k}) for k in ("manifest", "config")}
                policy_text = json.dumps({"format": POLICY_FORMAT, "ek_sha256": enr.ek_sha256,
                                          "pcrs": {"host": 14, "vm": 15}, "allowed": {**allowed, "vm-launch": []},
                                          "max_age_s": 300, "interval_s": 30, "running_vms_when_untrusted": "keep"})
            parse_policy(policy_text)
            vkey = None
            if args.audit_vkey:
                from bulkhead.control.note import NoteError, Verifier

                vkey = args.audit_vkey.read_text().strip()
                try:
                    Verifier.parse(vkey)
                except NoteError as exc:
                    raise ConfigError(f"--audit-vkey {args.audit_vkey}: not a verifier key: {exc}") from None
        except OSError as exc:
            raise ConfigError(str(exc)) from None
        d = _state_dir(args) / "hosts" / host
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.enrollment, d / "enrollment.json")
        (d / "policy.json").write_text(policy_text)
        if vkey is not None:
            (d / "audit.vkey").write_text(vkey + "\n")
        print(f"enrolled {host} -> {d}")
        return 0

    return _run(go)


def _dev_etcd(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead fleet dev-etcd", description="development: run a local etcd cluster with client TLS "
                "(DIR/endpoints, client certificate DIR/pki/client.pem) until interrupted")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--members", type=int, default=3)

    def go() -> int:
        args = p.parse_args(argv)
        import time

        from bulkhead.fleet.etcdrun import EtcdCluster

        if not 1 <= args.members <= 7:
            raise ConfigError("--members: 1..7")
        cluster = EtcdCluster(args.dir.resolve(), args.members)
        stop: list[bool] = []
        _stop_on_signals(lambda: stop.append(True))
        cluster.start()
        try:
            tls = cluster.client_tls("client")
            (args.dir / "endpoints").write_text(",".join(cluster.endpoints) + "\n")
            print(f"etcd: {','.join(cluster.endpoints)}\n  --etcd-ca {tls.ca} --etcd-cert {tls.cert} --etcd-key {tls.key}",
                  flush=True)
            while not stop:
                time.sleep(0.5)
        finally:
            cluster.stop()
        return 0

    return _run(go)


def fleet_main(argv: list[str]) -> int:
    cmds: dict[str, Callable[[list[str]], int]] = {"serve": _serve, "hosts": _hosts, "vm": vm_main, "enroll": _enroll,
                                                   "dev-etcd": _dev_etcd,
            "drain": lambda a: _drain(a, False), "undrain": lambda a: _drain(a, True)}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in cmds:
        print("usage: bulkhead fleet {serve|hosts|vm|drain|undrain|enroll|dev-etcd} [options]\n\n"
              "  serve    run a controller: --etcd URL[,..] --state-dir DIR --shared-dir DIR\n"
              "  hosts    the fleet's hosts (--json)\n"
              "  vm       create|list|get|start|stop|delete, the options of `bulkhead vm`\n"
              "  drain    HOST: move its VMs away and place nothing on it (undrain: undo)\n"
              "  enroll   HOST --enrollment F --policy P: trust a host's TPM for attestation\n"
              "  dev-etcd --dir D: development, a local 3-member etcd with client TLS",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(cmds[argv[0]](argv[1:]))

