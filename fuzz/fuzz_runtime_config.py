"""atheris harness for the VM configuration parsers (bulkhead.runtime.config and the `bulkhead run`
flag parser): parse_drive, parse_net, parse_run_args and VmConfig validation.

Input: byte 0 selects the parser (0 parse_drive, 1 parse_net, 2 parse_run_args on NUL-separated
arguments, 3 VmConfig built from the parsed flags); the rest is UTF-8 text (undecodable bytes are
replaced). A crash is any exception other than ConfigError, or an accepted value that breaks the
documented limits (id > 20 bytes, negative rate, tap name not 1-15 safe characters, multicast MAC).

Run: .venv/bin/python fuzz/fuzz_runtime_config.py -max_total_time=60 /tmp/bh-fuzz/runtime_config fuzz/corpus/runtime_config
Regenerate the seeds: .venv/bin/python fuzz/fuzz_runtime_config.py --write-seeds
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.errors import ConfigError
    from bulkhead.runtime.cli import _config_from_args, parse_run_args
    from bulkhead.runtime.config import parse_drive, parse_net

_TAP = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

SEEDS = {
    "drive_plain": b"\x00disk.img",
    "drive_opts": b"\x00/tmp/d.img,ro,id=serial-1,bw=1048576,iops=100",
    "drive_bad": b"\x00d.img,,ro",
    "net_plain": b"\x01tap=tap0",
    "net_mac": b"\x01tap=bh-0,mac=52:54:00:12:34:56,bw=1000,ops=10",
    "run_args": b"\x02--kernel\x00k.elf\x00--mem\x0064\x00--cpus=2\x00--drive\x00d.img,ro\x00--rng",
    "config": b"\x03--kernel\x00k.elf\x00--cmdline\x00console=ttyS0\x00--net\x00tap=t0\x00--boot\x00pvh",
}


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    which, text = data[0] & 3, data[1:].decode("utf-8", "replace")
    try:
        if which == 0:
            d = parse_drive(text)
            if len(d.drive_id.encode()) > 20 or d.rate.bytes_per_sec < 0 or d.rate.ops_per_sec < 0 or not d.path:
                raise AssertionError(f"parse_drive accepted out-of-limit {d!r}")
        elif which == 1:
            n = parse_net(text)
            if not _TAP.match(n.tap) or (n.mac and int(n.mac[:2], 16) & 1):
                raise AssertionError(f"parse_net accepted out-of-limit {n!r}")
        else:
            ns = parse_run_args(text.split("\x00"))
            if which == 3:
                cfg = _config_from_args(ns)
                if not (2 <= cfg.mem_mib <= 65536 and 1 <= cfg.cpus <= 32 and "\x00" not in cfg.cmdline):
                    raise AssertionError(f"VmConfig accepted out-of-limit {cfg!r}")
    except ConfigError:
        return


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (directory / name).write_bytes(data)


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "runtime_config")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
