"""Checks for device state restored from a snapshot: hostile input, validated before any field is set.

A device's `save_state()` returns a JSON-ready dict of plain ints, bools and base64 strings;
`load_state(doc)` calls `fields(doc, spec)` first, which raises ValueError naming the bad field (the
snapshot layer turns it into a SnapshotError), so a refused document changes nothing.
"""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["blob", "fields"]


def fields(doc: object, spec: dict[str, tuple[int, int] | str], what: str) -> dict[str, Any]:
    """`spec`: name -> (low, high) for an int in that closed range, "bool" or "blob:N" (base64, <= N bytes).
    The document must have exactly these names."""
    if not isinstance(doc, dict) or set(doc) != set(spec):
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{what} state has the wrong fields ({got}, expected {sorted(spec)})")
    out: dict[str, Any] = {}
    for name, rule in spec.items():
        value = doc[name]
        if rule == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{what} state field {name} is not a boolean")
            out[name] = value
        elif isinstance(rule, str) and rule.startswith("blob:"):
            out[name] = blob(value, int(rule[5:]), f"{what} state field {name}")
        else:
            assert isinstance(rule, tuple)
            low, high = rule
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{what} state field {name} is not an integer in [{low}, {high}]")
            out[name] = value
    return out


def blob(value: object, limit: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > (limit * 4) // 3 + 4:
        raise ValueError(f"{what} is not base64 of at most {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None
    if len(data) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    return data


def b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode()
