"""`bulkhead run` and `bulkhead demo`. Lean imports: this is the VM start path."""

from __future__ import annotations

import argparse
import os
import sys

from bulkhead.errors import ConfigError, HostError

__all__ = ["demo_main", "run_main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bulkhead run",
        description="Boot a Linux kernel (bzImage or vmlinux ELF) or a PVH ELF payload in a new VM.",
        epilog="Exit status: the guest's debug-exit status (odd), or an even status naming why the VM "
        "stopped: 0 poweroff, 2 usage/config error, 4 host error, 6 guest reset, 8 triple fault, "
        "10 halted with interrupts disabled, 12 KVM internal error, 14 guest fault, 130 interrupted.",
    )
    p.add_argument(
        "--kernel", required=True, metavar="PATH", help="kernel image: bzImage, vmlinux ELF or PVH ELF"
    )
    p.add_argument("--initrd", metavar="PATH", help="initial ramdisk")
    p.add_argument("--cmdline", default="", metavar="TEXT", help="kernel command line")
    p.add_argument("--mem", type=int, default=128, metavar="MiB", help="guest memory in MiB (default 128)")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    p.add_argument("--serial", default="stdio", metavar="stdio|none|FILE", help="where COM1 output goes")
    p.add_argument(
        "--boot", default="auto", choices=("auto", "linux", "pvh"), help="boot protocol (default: by image)"
    )
    p.add_argument(
        "--drive", action="append", default=[], metavar="PATH[,ro]", help="virtio-blk drive (repeatable)"
    )
    p.add_argument(
        "--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]", help="virtio-net NIC on a tap"
    )
    p.add_argument("--rng", action="store_true", help="virtio-rng device fed by the host's getrandom")
    p.add_argument("--no-jail", action="store_true", help="development: run the VM in this process, unjailed")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print why the VM stopped")
    return p


def _config_from_args(ns: argparse.Namespace) -> object:
    from bulkhead.runtime.config import VmConfig, parse_drive, parse_net

    return VmConfig(
        kernel=ns.kernel,
        initrd=ns.initrd,
        cmdline=ns.cmdline,
        mem_mib=ns.mem,
        cpus=ns.cpus,
        serial=ns.serial,
        boot_protocol=ns.boot,
        drives=tuple(parse_drive(d) for d in ns.drive),
        nets=tuple(parse_net(n) for n in ns.net),
        rng=ns.rng,
    )


def _report(prefix: str, exc: BaseException) -> None:
    print(f"{prefix}: {exc}", file=sys.stderr)


def run_main(argv: list[str]) -> int:
    """Entry point of `bulkhead run`. Returns the process exit status."""
    from bulkhead.runtime.exits import EXIT_STATUS

    try:
        ns = _parser().parse_args(argv)
        config = _config_from_args(ns)
    except ConfigError as exc:
        _report("bulkhead run", exc)
        return EXIT_STATUS["config-error"]
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return _run_config(config, quiet=ns.quiet, jail=not ns.no_jail)


def _run_config(config: object, *, quiet: bool, jail: bool) -> int:
    from bulkhead.runtime.exits import EXIT_STATUS

    if jail and os.geteuid() == 0 and _jail_available():
        from bulkhead.sandbox.supervisor import run_jailed

        runner = run_jailed
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

        runner = run_vm
    try:
        reason = runner(config)
    except ConfigError as exc:
        _report("bulkhead run", exc)
        return EXIT_STATUS["config-error"]
    except HostError as exc:
        _report("bulkhead run", exc)
        return EXIT_STATUS["host-error"]
    except KeyboardInterrupt:
        return EXIT_STATUS["interrupted"]
    if not quiet:
        print(f"bulkhead: {reason.describe()}", file=sys.stderr)
    return int(reason.status)


def _jail_available() -> bool:
    try:
        from bulkhead.sandbox import supervisor
    except ImportError:
        return False
    return hasattr(supervisor, "run_jailed")


def demo_main(argv: list[str]) -> int:
    """`bulkhead demo`: build (once, cached) and boot the shipped demo guest."""
    from bulkhead.runtime.exits import EXIT_STATUS

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
    from bulkhead.runtime.config import VmConfig

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
