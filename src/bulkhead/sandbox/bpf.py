"""Compiled seccomp programs, cached per policy, loaded without libseccomp (docs/SANDBOX.md "Compiled filters").

    prog = program_for("reaper", self_pid=os.getpid())   # as root, before pivot_root and the uid drop
    ...
    load_program(prog)                                    # step 7: no_new_privs, then seccomp(2) with TSYNC

libseccomp (through pyseccomp, jail.compile_program) compiles the rules of policy.build_rules into a
classic BPF program (struct sock_filter[], linux/filter.h). Compiling at every start cost the jailed path
the pyseccomp import and two compilations. Here a program is compiled once per (role, nic, rules,
libseccomp version, machine) and kept in a root-owned 0600 file under /run/bulkhead/seccomp (tmpfs);
later starts read it and load it with seccomp(SECCOMP_SET_MODE_FILTER, TSYNC | TSYNC_ESRCH), the flags
libseccomp's own load uses.

The reaper's rules contain its own pid (`self_pid`), so the cached entry is a template: the program is
compiled for two sentinel pids, the instructions in which the two differ are the pid's slots (each a
BPF_JMP|BPF_JEQ|BPF_K constant), and everything else must be identical, else no template is made and
the rules are compiled directly. The result for a real pid equals libseccomp's own compilation for that
pid (tests/test_sandbox_bpf.py compares them for many pids and every role).

A cache file is believed only as bulkhead._boot.DigestCache believes its file: this process is root, the
file is a regular file (O_NOFOLLOW) owned by root without group/other bits, in a root-owned directory no
one else may write. Anything else is ignored and the program compiled afresh.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from typing import Any

from bulkhead.errors import HostError
from bulkhead.sandbox.policy import Rule, build_rules

__all__ = ["CACHE_DIR", "load_program", "program_for"]

CACHE_DIR = "/run/bulkhead/seccomp"
_FORMAT = "bulkhead-bpf/1"
_SENTINELS = (0x7FFF_FF01, 0x7FFF_FF02)  # above pid_max (2^22): no other constant of a policy
_INSN = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER = 1
_FLAGS = 1 | 16  # SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH
_PR_SET_NO_NEW_PRIVS = 38


def _libseccomp_version() -> str:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "unknown"
    lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
    v = lib.seccomp_version().contents
    return f"{v[0]}.{v[1]}.{v[2]}"


def _key(role: str, nic: bool, rules: list[Rule], vsock: bool = False) -> str:
    text = f"{_FORMAT}|{role}|{nic}|{vsock}|{_libseccomp_version()}|{os.uname().machine}|{rules!r}"
    return hashlib.sha256(text.encode()).hexdigest()


def _trusted_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return os.geteuid() == 0 and st.st_uid == 0 and not st.st_mode & 0o022


def _read(path: str) -> dict[str, Any] | None:
    if not _trusted_dir(os.path.dirname(path)):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o077 or (st.st_mode & 0o170000) != 0o100000:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    ok = isinstance(data, dict) and isinstance(data.get("program"), str) and isinstance(data.get("slots"), list)
    return data if ok else None


def _write(path: str, entry: dict[str, Any]) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if not _trusted_dir(os.path.dirname(path)):
            return
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(json.dumps(entry))
        os.replace(tmp, path)
    except OSError:
        return  # the cache only saves time


def _template(role: str, nic: bool, vsock: bool = False) -> dict[str, Any] | None:
    """Compile for both sentinels; the differing instructions must be JEQ constants holding them."""
    from bulkhead.sandbox.jail import compile_program

    a, b = (compile_program(build_rules(role, nic=nic, vsock=vsock, self_pid=s)) for s in _SENTINELS)
    if len(a) != len(b) or len(a) % _INSN.size:
        return None
    slots = []
    for off in range(0, len(a), _INSN.size):
        ia, ib = _INSN.unpack_from(a, off), _INSN.unpack_from(b, off)
        if ia == ib:
            continue
        if ia[:3] != ib[:3] or ia[0] != _JEQ_K or (ia[3], ib[3]) != _SENTINELS:
            return None
        slots.append(off)
    return {"program": a.hex(), "slots": slots}


def _fill(entry: dict[str, Any], self_pid: int) -> bytes:
    prog = bytearray(bytes.fromhex(entry["program"]))
    for off in entry["slots"]:
        code, jt, jf, k = _INSN.unpack_from(prog, off)
        if code != _JEQ_K or k != _SENTINELS[0]:
            raise ValueError("slot is not the sentinel comparison")
        _INSN.pack_into(prog, off, code, jt, jf, self_pid)
    return bytes(prog)


def program_for(role: str, *, nic: bool = False, vsock: bool = False, self_pid: int = 1,
                cache_dir: str | None = CACHE_DIR) -> bytes:
    """The BPF program of `role` (policy.build_rules with these arguments), from the cache when it holds a
    trusted entry for exactly these rules, else compiled (and cached). Call as root before pivot_root.
    Raises HostError when libseccomp cannot compile the rules."""
    if not 0 < self_pid < _SENTINELS[0]:
        raise HostError(f"seccomp: pid {self_pid} out of range")
    rules = build_rules(role, nic=nic, vsock=vsock, self_pid=_SENTINELS[0])
    path = None if cache_dir is None else os.path.join(cache_dir, _key(role, nic, rules, vsock) + ".json")
    entry = _read(path) if path is not None else None
    if entry is None:
        entry = _template(role, nic, vsock)
        if entry is None:  # not templatable: compile for this pid directly, uncached
            from bulkhead.sandbox.jail import compile_program

            return compile_program(build_rules(role, nic=nic, vsock=vsock, self_pid=self_pid))
        if path is not None and os.geteuid() == 0:
            _write(path, entry)
    try:
        return _fill(entry, self_pid)
    except (ValueError, KeyError, TypeError, struct.error):
        from bulkhead.sandbox.jail import compile_program

        return compile_program(build_rules(role, nic=nic, vsock=vsock, self_pid=self_pid))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_program(program: bytes) -> int:
    """Step 7: set no_new_privs and load `program` for every thread of this process (TSYNC, as libseccomp
    loads). Returns the number of instructions. Raises HostError when the kernel refuses it."""
    count = len(program) // _INSN.size
    if count == 0 or count > 4096 or len(program) % _INSN.size:
        raise HostError(f"seccomp: a program of {len(program)} bytes is not a BPF program")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise HostError(f"seccomp: prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    nr = _SYS_SECCOMP.get(os.uname().machine)
    if nr is None:
        raise HostError(f"seccomp: no syscall number known for {os.uname().machine}")
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(_SECCOMP_SET_MODE_FILTER), ctypes.c_long(_FLAGS),
                      ctypes.byref(fprog))
    if rc != 0:
        err = ctypes.get_errno()
        why = os.strerror(err) if rc < 0 else f"thread {rc} could not be synchronised"
        raise HostError(f"seccomp: loading the filter failed: {why}")
    return count
