"""`bulkhead run` and `bulkhead demo`. Lean imports: this is the VM start path."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bulkhead.config import BOOT_PROTOCOLS
from bulkhead.errors import ConfigError, HostError

if TYPE_CHECKING:
    import argparse

    from bulkhead.config import VmConfig
    from bulkhead.runtime.exits import ExitReason

__all__ = ["demo_main", "run_main"]


def _parser() -> argparse.ArgumentParser:
    """argparse is used only to render --help (see _RUN_FLAGS for why)."""
    import argparse

    p = argparse.ArgumentParser(
        add_help=False,
        prog="bulkhead run",
        description="Boot a Linux kernel (bzImage or vmlinux ELF) or a PVH ELF payload in a new VM.",
        epilog="Exit status: the guest's debug-exit status (odd), or an even status naming why the VM "
        "stopped: 0 poweroff, 2 usage/config error, 4 host error, 6 guest reset, 8 triple fault, "
        "10 halted with interrupts disabled, 12 KVM internal error, 14 guest fault, 24 saved by --snapshot-on-exit, 130 interrupted.",
    )
    p.add_argument(
        "--kernel", metavar="PATH", help="kernel image: bzImage, vmlinux ELF or PVH ELF (required unless --restore)"
    )
    p.add_argument("--initrd", metavar="PATH", help="initial ramdisk")
    p.add_argument("--cmdline", default="", metavar="TEXT", help="kernel command line")
    p.add_argument("--mem", type=int, default=128, metavar="MiB", help="guest memory in MiB (default 128)")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    p.add_argument("--serial", default="stdio", metavar="stdio|none|FILE", help="where COM1 output goes")
    p.add_argument(
        "--boot", default="auto", choices=BOOT_PROTOCOLS, help="boot protocol (default: by image)"
    )
    p.add_argument(
        "--drive", action="append", default=[], metavar="PATH[,ro]", help="virtio-blk drive (repeatable)"
    )
    p.add_argument(
        "--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]", help="virtio-net NIC on a tap"
    )
    p.add_argument("--rng", action="store_true", help="virtio-rng device fed by the host's getrandom")
    p.add_argument("--vsock", metavar="PATH[,cid=N]",
                   help="virtio-vsock: host streams via the unix socket PATH ('CONNECT <port>'), guest streams "
                   "to port P reach PATH_P (docs/VSOCK.md)")
    p.add_argument("--no-jail", action="store_true", help="development: run the VM in this process, unjailed")
    p.add_argument("--expected-digest", metavar="SHA256", help="refuse to boot unless the launch digest matches")
    p.add_argument(
        "--stats", metavar="FILE", help="write VM counters (exits, contained accesses, devices) as JSON"
    )
    p.add_argument(
        "--no-ioeventfd", action="store_true", help=argparse.SUPPRESS
    )  # benchmarks: naive notify path
    p.add_argument("--snapshot-on-exit", metavar="FILE",
                   help="when the host stops the VM (SIGINT/SIGTERM), save it to FILE instead of discarding it")
    p.add_argument("--restore", metavar="FILE", help="resume the VM saved in snapshot FILE instead of booting")
    p.add_argument("--clone", action="store_true",
                   help="with --restore: allow restoring a snapshot that was restored before (duplicates guest "
                   "secrets and RNG state)")
    p.add_argument("--snapshot-key", metavar="FILE",
                   help="this host's snapshot key (default /var/lib/bulkhead/snapshot.key as root, "
                   "~/.local/state/bulkhead/snapshot.key otherwise; created on first snapshot)")
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print why the VM stopped")
    return p


# The flags of `bulkhead run`: name -> (kind, dest). Parsed by a small table-driven parser because argparse
# (with gettext, locale and shutil) costs more start-up time than the whole VM build (measured: ~17 ms of
# a ~60 ms start); argparse still renders --help.
_RUN_FLAGS: dict[str, tuple[str, str]] = {
    "--kernel": ("str", "kernel"),
    "--initrd": ("str", "initrd"),
    "--cmdline": ("str", "cmdline"),
    "--mem": ("int", "mem"),
    "--cpus": ("int", "cpus"),
    "--serial": ("str", "serial"),
    "--boot": ("str", "boot"),
    "--drive": ("list", "drive"),
    "--net": ("list", "net"),
    "--rng": ("bool", "rng"),
    "--vsock": ("str", "vsock"),
    "--no-jail": ("bool", "no_jail"),
    "--stats": ("str", "stats"),
    "--expected-digest": ("str", "expected_digest"),
    "--no-ioeventfd": ("bool", "no_ioeventfd"),
    "--quiet": ("bool", "quiet"),
    "--snapshot-on-exit": ("str", "snapshot_on_exit"),
    "--restore": ("str", "restore"),
    "--clone": ("bool", "clone"),
    "--snapshot-key": ("str", "snapshot_key"),
    "-q": ("bool", "quiet"),
}
_RUN_DEFAULTS: dict[str, object] = {
    "kernel": None, "initrd": None, "cmdline": "", "mem": 128, "cpus": 1, "serial": "stdio", "boot": "auto",
    "drive": [], "net": [], "rng": False, "vsock": None, "no_jail": False, "stats": None, "no_ioeventfd": False, "quiet": False,
    "expected_digest": None, "snapshot_on_exit": None, "restore": None, "clone": False, "snapshot_key": None,
}  # fmt: skip


def parse_run_args(argv: list[str]) -> dict[str, object]:
    """Parse `bulkhead run` flags. Raises ConfigError naming the bad flag."""
    ns: dict[str, object] = {k: (list(v) if isinstance(v, list) else v) for k, v in _RUN_DEFAULTS.items()}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        spec = _RUN_FLAGS.get(name)
        if spec is None:
            raise ConfigError(f"unknown option {arg!r} (see bulkhead run --help)")
        kind, dest = spec
        if kind == "bool":
            if eq:
                raise ConfigError(f"{name} takes no value")
            ns[dest] = True
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"{name} needs a value")
        if kind == "int":
            try:
                ns[dest] = int(value, 0)
            except ValueError:
                raise ConfigError(f"{name} takes an integer, not {value!r}") from None
        elif kind == "list":
            ns[dest].append(value)  # type: ignore[attr-defined]
        else:
            ns[dest] = value
    if ns["restore"] is not None:
        for flag, dest in (("--kernel", "kernel"), ("--initrd", "initrd"), ("--drive", "drive"), ("--net", "net"),
                           ("--rng", "rng"), ("--vsock", "vsock")):
            if ns[dest]:
                raise ConfigError(f"--restore takes the VM from the snapshot; {flag} cannot be given with it")
        ns["kernel"] = ns["restore"]  # placeholder for the config check; the snapshot's own config is used
    elif ns["clone"]:
        raise ConfigError("--clone only applies with --restore")
    if ns["kernel"] is None:
        raise ConfigError("--kernel PATH is required (or --restore FILE)")
    if ns["boot"] not in BOOT_PROTOCOLS:
        raise ConfigError(f"--boot must be {', '.join(BOOT_PROTOCOLS[:-1])} or {BOOT_PROTOCOLS[-1]}, not {ns['boot']!r}")
    return ns


def _config_from_args(ns: dict[str, object]) -> VmConfig:
    from bulkhead.config import VmConfig, parse_drive, parse_net, parse_vsock

    return VmConfig(
        kernel=str(ns["kernel"]),
        initrd=ns["initrd"],
        cmdline=str(ns["cmdline"]),
        mem_mib=int(ns["mem"]),  # type: ignore[call-overload]
        cpus=int(ns["cpus"]),  # type: ignore[call-overload]
        serial=str(ns["serial"]),
        boot_protocol=str(ns["boot"]),
        drives=tuple(parse_drive(d) for d in ns["drive"]),  # type: ignore[attr-defined]
        nets=tuple(parse_net(n) for n in ns["net"]),  # type: ignore[attr-defined]
        rng=bool(ns["rng"]),
        expected_digest=ns["expected_digest"],
        vsock=parse_vsock(str(ns["vsock"])) if ns["vsock"] is not None else None,
    )


def _report(prefix: str, exc: BaseException) -> None:
    print(f"{prefix}: {exc}", file=sys.stderr)


def run_main(argv: list[str]) -> int:
    """Entry point of `bulkhead run`. Returns the process exit status."""
    from bulkhead.runtime.exits import EXIT_STATUS

    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    try:
        ns = parse_run_args(argv)
        config = _config_from_args(ns)
    except ConfigError as exc:
        _report("bulkhead run", exc)
        return EXIT_STATUS["config-error"]
    # --stats never weakens the sandbox: the jailed worker sends its counters over the protocol.
    # --no-ioeventfd (hidden, benchmarks of the naive notify path) needs the in-process VMM.
    extra: dict[str, object] = {"stats_path": ns["stats"], "ioeventfd": not ns["no_ioeventfd"]}
    jail = not (ns["no_jail"] or ns["no_ioeventfd"])
    if ns["snapshot_on_exit"] or ns["restore"]:
        try:
            config = _snapshot_options(ns, config, extra)
        except ConfigError as exc:
            from bulkhead.exitstatus import exit_status

            _report("bulkhead run", exc)
            return exit_status(exc) or EXIT_STATUS["config-error"]
    cleanup = extra.pop("cleanup", None)
    try:
        return _run_config(config, quiet=bool(ns["quiet"]), jail=jail, extra=extra)
    finally:
        if callable(cleanup):
            cleanup()


def _snapshot_options(ns: dict[str, object], config: VmConfig, extra: dict[str, object]) -> VmConfig:
    """Authenticate and decrypt the snapshot to restore into memfds, and/or load the host key for
    --snapshot-on-exit. Returns the configuration to run. Raises ConfigError/SnapshotError."""
    import uuid

    from bulkhead.runtime.snapshot import (
        RestoreSource,
        SnapshotTarget,
        decrypt_into,
        guest_memfds,
        load_restore_state,
        open_restore,
        scrub_memfd,
    )
    from bulkhead.snapshot.keys import default_key_path, load_host_key, record_restore

    if config.vsock:
        raise ConfigError("--snapshot-on-exit and --restore do not support virtio-vsock yet "
                          "(virtio-blk, virtio-net and virtio-rng are supported; docs/SNAPSHOT.md)")
    key_path = str(ns["snapshot_key"] or default_key_path())
    vm_id = uuid.uuid4().hex
    if ns["restore"]:
        restore = open_restore(str(ns["restore"]), host_key=lambda: load_host_key(key_path, create=False),
                               serial=config.serial, expected_digest=config.expected_digest)
        try:
            memory_fd, state_fd = guest_memfds(restore.config.mem_bytes)
            decrypt_into(restore, memory_fd, state_fd)  # every memory chunk authenticated before a vCPU exists
        finally:
            restore.close()
        header, state = load_restore_state(state_fd)
        snapshot_id, clone = header["snapshot_id"], bool(ns["clone"])
        # Recorded once the machine is rebuilt, before its guest runs.
        extra["restore"] = RestoreSource(header, state, memory_fd, state_fd,
                                         lambda: record_restore(key_path, snapshot_id, clone=clone))
        config = restore.config
        vm_id = header["vm_id"] if not clone else vm_id
    else:
        memory_fd, state_fd = guest_memfds(config.mem_bytes)
    mem_bytes = config.mem_bytes

    def cleanup() -> None:
        scrub_memfd(memory_fd, mem_bytes)  # guest RAM: zeroed before the pages go
        os.close(memory_fd)
        os.close(state_fd)

    extra["cleanup"] = cleanup
    if ns["snapshot_on_exit"]:
        extra["snapshot"] = SnapshotTarget(str(ns["snapshot_on_exit"]), load_host_key(key_path, create=True), vm_id,
                                           memory_fd, state_fd)
    return config


def _run_config(config: VmConfig, *, quiet: bool, jail: bool, extra: dict[str, object] | None = None) -> int:
    from bulkhead.runtime.exits import EXIT_STATUS

    runner: Callable[[VmConfig], ExitReason]
    if jail and os.geteuid() == 0 and _jail_available():
        from bulkhead.sandbox.supervisor import run_jailed

        stats_path = (extra or {}).get("stats_path")
        snap = {k: v for k, v in (extra or {}).items() if k in ("snapshot", "restore")}

        def runner(cfg: VmConfig) -> ExitReason:
            return run_jailed(cfg, stats_path=stats_path, **snap)  # type: ignore[arg-type]
    else:
        if jail and os.geteuid() == 0:
            print(
                "bulkhead run: warning: the jail is not available in this build; running unjailed",
                file=sys.stderr,
            )
        elif not jail:
            print(
                "bulkhead run: warning: --no-jail: the VM runs in this process without the sandbox",
                file=sys.stderr,
            )
        from bulkhead.runtime.vm import run_vm

        opts: dict[str, Any] = dict(extra or {})

        def runner(cfg: VmConfig) -> ExitReason:
            return run_vm(cfg, **opts)
    restore_tty = _console_tty(config)
    try:
        reason = runner(config)
    except (ConfigError, HostError) as exc:
        from bulkhead.exitstatus import exit_status

        _report("bulkhead run", exc)
        return exit_status(exc) or EXIT_STATUS["host-error"]
    except KeyboardInterrupt:
        return EXIT_STATUS["interrupted"]
    finally:
        restore_tty()
    if not quiet:
        print(f"bulkhead: {reason.describe()}", file=sys.stderr)
    return int(reason.status)


def _console_tty(config: VmConfig) -> Callable[[], None]:
    """With the console on a terminal, pass keys to the guest as typed (cbreak: no line buffering, no local
    echo; Ctrl-C still stops the VM). Returns the function that restores the terminal."""
    if config.serial != "stdio" or not os.isatty(0):
        return lambda: None
    import termios
    import tty

    try:
        saved = termios.tcgetattr(0)
        tty.setcbreak(0)
    except termios.error:
        return lambda: None

    def restore() -> None:
        try:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        except termios.error:
            pass

    return restore


def _jail_available() -> bool:
    """The jail needs the sandbox package and libseccomp's Python binding (pyseccomp)."""
    import importlib.util

    if importlib.util.find_spec("pyseccomp") is None:
        return False
    try:
        from bulkhead.sandbox import supervisor
    except ImportError:
        return False
    return hasattr(supervisor, "run_jailed")


def demo_main(argv: list[str]) -> int:
    """`bulkhead demo`: build (once, cached) and boot the shipped demo guest."""
    import argparse

    from bulkhead.runtime.exits import EXIT_STATUS

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ConfigError(f"{self.prog}: {message}")

    p = _Parser(prog="bulkhead demo", description="Boot the demo guest shipped with bulkhead.")
    p.add_argument("--cpus", type=int, default=2, help="vCPUs (default 2)")
    p.add_argument("--mem", type=int, default=128, help="guest memory in MiB (default 128)")
    p.add_argument("--no-jail", action="store_true", help="development: run unjailed")
    try:
        ns = p.parse_args(argv)
    except ConfigError as exc:
        _report("bulkhead demo", exc)
        return EXIT_STATUS["config-error"]
    except SystemExit as exc:
        return int(exc.code or 0)
    from bulkhead.guests.build import build

    try:
        image = build("demo.c")
    except (ConfigError, HostError) as exc:
        _report("bulkhead demo: cannot build the demo guest", exc)
        return EXIT_STATUS["host-error"]
    from bulkhead.config import VmConfig

    try:
        cpus = max(1, ns.cpus)
        config = VmConfig(kernel=str(image), cmdline="console=ttyS0 demo=1", mem_mib=ns.mem, cpus=cpus)
    except ConfigError as exc:
        _report("bulkhead demo", exc)
        return EXIT_STATUS["config-error"]
    status = _run_config(config, quiet=True, jail=not ns.no_jail)
    if status == 1:  # the demo guest wrote 0 to the debug-exit port: success
        print("bulkhead demo: the guest ran and exited cleanly.", file=sys.stderr)
        return 0
    print(f"bulkhead demo: the guest did not exit cleanly (status {status})", file=sys.stderr)
    return status or 1
