"""atheris harness for the console WebSocket's query parsing (bulkhead.daemon.consoleapi._query) and its
path match. A crash is any exception other than ApiError (the 4422 refusal a client sees).

Input: the raw query string bytes; the first byte also picks a path variant.

Run: .venv/bin/python fuzz/fuzz_console_query.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.daemon.consoleapi import CONSOLE_WS_PATH, _query
    from bulkhead.daemon.service import ApiError


def run(data: bytes) -> None:
    path = data[:64].decode("latin-1")
    m = CONSOLE_WS_PATH.match(path)
    if m is not None and len(m.group(1)) != 36:
        raise AssertionError(f"path {path!r} matched with a bad id")
    try:
        mode, offset, tail = _query({"query_string": data})
    except ApiError as exc:
        if exc.status != 422:
            raise AssertionError(f"status {exc.status}") from None
        return
    for v in (offset, tail):
        if v is not None and not 0 <= v < 10**15:
            raise AssertionError(f"number {v} out of range")
    if not isinstance(mode, str):
        raise AssertionError("mode is not a string")


def TestOneInput(data: bytes) -> None:
    run(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
