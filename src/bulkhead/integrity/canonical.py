"""Canonical JSON: the one byte encoding that is hashed and signed.

Rules: UTF-8, object keys sorted, no insignificant whitespace, ASCII-escaped non-ASCII characters,
only str/int/bool/None/list/dict values (floats are refused: they have no single canonical form).
"""

from __future__ import annotations

import json
from typing import Any

from bulkhead.integrity.errors import IntegrityError

__all__ = ["canonical_json", "check_canonical_value"]


def check_canonical_value(value: Any, where: str = "$") -> None:
    """Raise IntegrityError if `value` holds anything but str, int, bool, None, list or str-keyed dict."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_canonical_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise IntegrityError(f"canonical JSON: key at {where} is not a string")
            check_canonical_value(v, f"{where}.{k}")
        return
    raise IntegrityError(f"canonical JSON: value at {where} has unsupported type {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    """Return the canonical UTF-8 encoding of `value`. Raises IntegrityError on unsupported values."""
    check_canonical_value(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
