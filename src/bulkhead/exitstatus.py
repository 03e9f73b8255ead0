"""The exit status of every `bulkhead` command: one table from exception type to status (pure).

Every CLI (`bulkhead run`/`demo`, the daemon's client commands, `manifest`/`attest`/`dev`, the dispatcher)
maps an error it reports through `exit_status`, and runtime/exits.py takes the same numbers for the
VM exit statuses of `bulkhead run`, so a host error exits 4 wherever it happens. docs/ARCHITECTURE.md
prints `markdown_table()` (tests/test_layering.py checks the doc matches the code).
"""

from __future__ import annotations

__all__ = ["STATUS", "error_table", "exit_status", "markdown_table"]

# kind -> status. The even values are shared with the VM exit statuses of `bulkhead run` (runtime/exits.py).
STATUS: dict[str, int] = {
    "ok": 0,
    "refused": 1,  # the other side said no: the API refused the request, integrity could not be shown
    "config-error": 2,  # the user's input is wrong: a flag, a file, a config, an image
    "unreachable": 3,  # client commands only: no daemon answered at the endpoints tried (named in the message)
    "host-error": 4,  # the host lacks something: KVM, a capability, a permission, the daemon, the TPM
}


def error_table() -> tuple[tuple[type[BaseException], str, str], ...]:
    """(exception type, kind, meaning), most specific first: the first isinstance match wins.

    Imported lazily: integrity.errors loads the integrity package, which the VM start path must not pay for."""
    from bulkhead.errors import ConfigError, DaemonUnreachable, HostError, RefusedError
    from bulkhead.integrity.errors import IntegrityError, TpmError

    return (
        (DaemonUnreachable, "unreachable", "no daemon answered at the endpoints tried (each is named)"),
        (TpmError, "host-error", "the TPM is missing, unreachable or refused a command"),
        (IntegrityError, "refused", "integrity could not be shown (a file differs, a quote does not verify)"),
        (RefusedError, "refused", "the daemon's API refused the request (the message says why)"),
        (ConfigError, "config-error", "bad flag, configuration or image (ImageError included)"),
        (HostError, "host-error", "the host lacks something (KVM, a capability, a permission, the daemon)"),
    )


def exit_status(exc: BaseException) -> int | None:
    """The exit status for `exc`, or None when it is not an error a CLI reports (let it propagate)."""
    for cls, kind, _ in error_table():
        if isinstance(exc, cls):
            return STATUS[kind]
    return None


def markdown_table() -> str:
    """The table as docs/ARCHITECTURE.md prints it."""
    rows = ["| exception | status | meaning |", "|---|---|---|"]
    for cls, kind, meaning in error_table():
        rows.append(f"| `{cls.__module__}.{cls.__name__}` | {STATUS[kind]} ({kind}) | {meaning} |")
    return "\n".join(rows)
