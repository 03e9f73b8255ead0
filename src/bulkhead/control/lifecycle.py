"""VM lifecycle as a transition table (pure).

States: `stopped` (defined, not running), `running`, `paused`, `exited` (the VMM process ended on its own;
the exit status is kept), `lost` (it was running when the daemon stopped; see docs/API.md for the restart
policy). Operations list the states they are allowed from; anything else is a conflict (HTTP 409).
"""

from __future__ import annotations

from bulkhead.errors import ConfigError

__all__ = ["STATES", "TRANSITIONS", "LifecycleError", "next_state"]

STATES: tuple[str, ...] = ("stopped", "running", "paused", "exited", "lost")

# operation -> (allowed from, resulting state)
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "start": (frozenset({"stopped", "exited", "lost"}), "running"),
    "stop": (frozenset({"running", "paused"}), "stopped"),
    "shutdown": (frozenset({"running"}), "stopped"),  # graceful: the guest is asked first (a paused one cannot act)
    "reboot": (frozenset({"running", "paused"}), "running"),  # a fresh VMM for the same VM, console kept
    "pause": (frozenset({"running"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "delete": (frozenset({"stopped", "exited", "lost"}), "deleted"),
    "exit": (frozenset({"running", "paused"}), "exited"),
    "lose": (frozenset({"running", "paused"}), "lost"),
}


class LifecycleError(ConfigError):
    """The operation is not allowed in the VM's current state (HTTP 409)."""


def next_state(state: str, op: str) -> str:
    """The state after `op` from `state`. Raises LifecycleError when the table does not allow it."""
    entry = TRANSITIONS.get(op)
    if entry is None:
        raise LifecycleError(f"unknown VM operation {op!r}")
    allowed, result = entry
    if state not in allowed:
        hint = " (stop it first)" if op == "delete" else ""
        raise LifecycleError(f"cannot {op} a VM that is {state}{hint}")
    return result
