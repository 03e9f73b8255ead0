"""The `bulkhead` command. Keeps the start path lean: each subcommand's module is imported only when used."""

from __future__ import annotations

import sys

# subcommand -> (module, function, one-line help). The function takes argv (list[str]) and returns an exit status.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("bulkhead.runtime.cli", "run_main", "boot a kernel or payload in a new VM"),
    "demo": ("bulkhead.runtime.cli", "demo_main", "boot the shipped demo guest"),
    "surface": ("bulkhead.surface", "main", "print the attack-surface inventory"),
    "init": ("bulkhead.daemon.cli", "init_main", "create the CA, server and first admin certificates"),
    "serve": ("bulkhead.daemon.cli", "serve_main", "run the management daemon (bulkheadd)"),
    "cert": ("bulkhead.daemon.cli", "cert_main", "issue or revoke client certificates"),
    "vm": ("bulkhead.daemon.cli", "vm_main", "manage VMs through the daemon"),
    "snapshot": ("bulkhead.daemon.snapshot_cli", "snapshot_main", "list and delete VM snapshots (docs/SNAPSHOT.md)"),
    "tenant": ("bulkhead.daemon.cli", "tenant_main", "manage tenants"),
    "network": ("bulkhead.daemon.cli", "network_main", "manage tenant networks through the daemon"),
    "role": ("bulkhead.daemon.cli", "role_main", "manage role definitions and assignments"),
    "audit": ("bulkhead.daemon.cli", "audit_main", "show, export and verify the audit log"),
    "manifest": ("bulkhead.integrity.cli", "manifest_main", "build, sign and verify the signed code manifest"),
    "attest": ("bulkhead.integrity.cli", "attest_main", "TPM attestation: enroll, quote, verify"),
    "dev": ("bulkhead.integrity.cli", "dev_main", "development helpers (dev tpm: run a swtpm)"),
    "integrity": ("bulkhead.daemon.cli", "integrity_main", "host integrity state from the daemon (GET /integrity)"),
    "image": ("bulkhead.daemon.ops_cli", "image_main", "import, list and delete kernel/initrd images"),
    "ui": ("bulkhead.daemon.ui_cli", "ui_main", "the web console: `ui login` prints a single-use login link"),
    "fleet": ("bulkhead.fleet.cli", "fleet_main", "the fleet: controller, hosts, VMs across hosts (docs/FLEET.md)"),
    "worker": ("bulkhead.sandbox.worker", "main", "(internal) the jailed per-VM worker"),
    "zygote": ("bulkhead.sandbox.forkspawn", "serve", "(internal) the daemon's fork server of pool workers"),
}


def _usage() -> str:
    lines = ["usage: bulkhead <command> [options]", "", "commands:"]
    for name, (_, _, text) in COMMANDS.items():
        if not text.startswith("(internal)"):
            lines.append(f"  {name:<10} {text}")
    lines.append("")
    lines.append("Run `bulkhead <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        from bulkhead import __version__

        print(f"bulkhead {__version__}")
        return 0
    entry = COMMANDS.get(args[0])
    if args[0] == "serve" and any(a == "--fleet" or a.startswith("--fleet=") for a in args):
        entry = ("bulkhead.fleet.cli", "agent_main", "")  # a host agent joining a fleet (docs/FLEET.md)
    if entry is None:
        print(f"bulkhead: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module_name, func_name, _ = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        from bulkhead.exitstatus import STATUS

        if exc.name and exc.name.startswith("bulkhead"):
            print(f"bulkhead: command {args[0]!r} is not available in this build ({exc.name} missing)", file=sys.stderr)
            return STATUS["host-error"]
        print(f"bulkhead: command {args[0]!r} needs {exc.name!r}: run ./install.sh", file=sys.stderr)
        return STATUS["host-error"]
    func = getattr(module, func_name)
    return int(func(args[1:]))


def daemon_main() -> int:
    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
