"""Seccomp allow-lists per role, as data (pure).

The reviewable data lives in ``sandbox/seccomp/*.json`` (one file per role, plus ``ioctls.json`` for
ioctl request numbers written as (dir, type, nr, size) exactly as in the kernel headers). This module
turns a role's data into a flat list of `Rule` values; `bulkhead.sandbox.jail.install_seccomp` hands
them to libseccomp. Nothing here does I/O other than reading the package's own JSON files.

Placeholders in argument filters, resolved by `build_rules`:
  "self_pid"   -> the pid the filtered process has (1 for the worker: pid 1 of its PID namespace)
  "ioctl_list" -> one rule per allowed ioctl request number (kvm + generic, + nic with a NIC)
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, NamedTuple

from bulkhead.errors import ConfigError

__all__ = [
    "ARG_OPS",
    "ROLES",
    "ArgCheck",
    "Rule",
    "build_rules",
    "ioc",
    "ioctl_numbers",
    "load_role",
]

ROLES = ("worker", "reaper")
ARG_OPS = ("eq", "ne", "masked_eq")
_DIRS = {"none": 0, "w": 1, "r": 2, "rw": 3}


def ioc(direction: str, typ: int, nr: int, size: int) -> int:
    """The kernel's _IOC(dir, type, nr, size) for x86-64 (asm-generic/ioctl.h). Raises ConfigError."""
    if direction not in _DIRS:
        raise ConfigError(f"ioctl direction must be one of {', '.join(_DIRS)}, not {direction!r}")
    if not (0 <= typ < 256 and 0 <= nr < 256 and 0 <= size < (1 << 14)):
        raise ConfigError("ioctl type/nr must fit in 8 bits and size in 14 bits")
    return (_DIRS[direction] << 30) | (size << 16) | (typ << 8) | nr


class ArgCheck:
    """Compare syscall argument `index`: eq/ne against value, or (arg & mask) == value. Immutable; a plain
    class (a NamedTuple's `index` would shadow tuple.index, a dataclass costs its import on the start path)."""

    __slots__ = ("index", "mask", "op", "value")
    index: int
    op: str
    value: int
    mask: int

    def __init__(self, index: int, op: str, value: int, mask: int = 0) -> None:
        for name, v in (("index", index), ("op", op), ("value", value), ("mask", mask)):
            object.__setattr__(self, name, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ArgCheck is immutable (cannot set {name!r})")

    def _key(self) -> tuple[int, str, int, int]:
        return (self.index, self.op, self.value, self.mask)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArgCheck) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"ArgCheck(index={self.index}, op={self.op!r}, value={self.value}, mask={self.mask})"


class Rule(NamedTuple):
    """One libseccomp rule: `action` is "allow" or "errno"; all `args` must hold (AND)."""

    syscall: str
    action: str
    args: tuple[ArgCheck, ...] = ()
    errno: int = 0


def _load_json(name: str) -> dict[str, Any]:
    with open(os.path.join(os.path.dirname(os.path.realpath(__file__)), "seccomp", name), encoding="utf-8") as f:
        text = f.read()
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"seccomp data {name} must be a JSON object")
    return data


def ioctl_numbers(nic: bool) -> dict[str, int]:
    """name -> request number of every ioctl the worker may issue (TUN ones only with a NIC)."""
    data = _load_json("ioctls.json")
    groups = ["kvm", "generic"] + (["nic"] if nic else [])
    out: dict[str, int] = {}
    for group in groups:
        for name, direction, typ, nr, size in data[group]:
            if direction == "raw":
                out[name] = int(typ, 16)
            else:
                out[name] = ioc(direction, int(typ, 16), int(nr, 16), int(size))
    return out


def load_role(role: str) -> dict[str, Any]:
    """The raw policy data of a role. Raises ConfigError for an unknown role or malformed data."""
    if role not in ROLES:
        raise ConfigError(f"unknown seccomp role {role!r} (known: {', '.join(ROLES)})")
    data = _load_json(f"{role}.json")
    if data.get("role") != role or data.get("default_action") != "kill_process":
        raise ConfigError(f"seccomp data for {role!r} must name its role and default to kill_process")
    return data


def _arg(spec: dict[str, Any], self_pid: int) -> ArgCheck:
    op = spec["op"]
    if op not in ARG_OPS:
        raise ConfigError(f"seccomp argument op must be one of {', '.join(ARG_OPS)}, not {op!r}")
    raw = spec["value"]
    value = self_pid if raw == "self_pid" else int(raw, 0)
    mask = int(spec.get("mask", "0"), 0)
    return ArgCheck(int(spec["index"]), op, value, mask)


def build_rules(role: str, *, nic: bool = False, vsock: bool = False, self_pid: int = 1) -> list[Rule]:
    """Every rule of `role`, placeholders resolved; the role's "vsock" group only with `vsock` (a VM with a
    virtio-vsock device: AF_UNIX socket, connect, accept4, shutdown). Raises ConfigError on malformed data."""
    data = load_role(role)
    rules: list[Rule] = []
    seen: set[str] = set()
    for group in data["allow"]:
        for name in group["names"]:
            if name in seen:
                raise ConfigError(f"seccomp role {role!r} lists {name!r} twice")
            seen.add(name)
            rules.append(Rule(name, "allow"))
    for cond in data["conditional"] + (data.get("vsock", []) if vsock else []):
        name = cond["name"]
        if name in seen:
            raise ConfigError(f"seccomp role {role!r} lists {name!r} both plainly and conditionally")
        seen.add(name)
        if any(a["value"] == "ioctl_list" for a in cond["args"]):
            for number in sorted(set(ioctl_numbers(nic).values())):
                rules.append(Rule(name, "allow", (ArgCheck(1, "eq", number),)))
            continue
        rules.append(Rule(name, "allow", tuple(_arg(a, self_pid) for a in cond["args"])))
    for item in data["errno"]:
        name = item["name"]
        if name in seen:
            raise ConfigError(f"seccomp role {role!r} lists {name!r} twice")
        seen.add(name)
        rules.append(Rule(name, "errno", errno=int(getattr(errno, item["errno"]))))
    return rules
