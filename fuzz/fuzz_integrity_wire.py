"""atheris harness for the TPM wire parsers (bulkhead.integrity.tpmwire). A crash is any exception
other than IntegrityError.

Input: first byte selects the parser (0 TPMT_PUBLIC, 1 TPMT_SIGNATURE, 2 TPMS_ATTEST quote); the rest is
the structure. For a parsed public area, name computation and key construction are exercised too.

Run: .venv/bin/python fuzz/fuzz_integrity_wire.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.integrity.errors import IntegrityError
    from bulkhead.integrity.tpmwire import parse_public, parse_quote_attest, parse_signature, public_name


def run(data: bytes) -> None:
    if not data:
        return
    which, body = data[0] % 3, data[1:]
    try:
        if which == 0:
            area = parse_public(body)
            public_name(body)
            area.public_key()
        elif which == 1:
            parse_signature(body)
        else:
            info = parse_quote_attest(body)
            for sel in info.selections:
                assert all(0 <= p < 64 for p in sel.pcrs)
    except IntegrityError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
