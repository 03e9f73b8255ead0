"""The seccomp allow-lists (data) and the cgroup plumbing that needs no root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pyseccomp
import pytest

from bulkhead.errors import ConfigError, HostError
from bulkhead.sandbox import policy
from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup, detect_version
from bulkhead.sandbox.jail import IdAllocator, JailSpec

# Calls that would undo the sandbox or reach outside it. None may appear on any allow-list.
FORBIDDEN = {
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "kill",
    "tkill", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "socket", "socketpair",
    "connect", "bind", "listen", "accept", "accept4", "open_by_handle_at", "name_to_handle_at", "keyctl",
    "add_key", "request_key", "userfaultfd", "io_uring_setup", "setuid", "setgid", "setresuid", "setresgid",
    "setgroups", "capset", "prctl", "seccomp", "personality", "mknod", "mknodat", "open_tree", "move_mount",
    "fsopen", "fsmount", "mount_setattr", "pidfd_open", "pidfd_getfd", "swapon", "reboot", "iopl", "ioperm",
    "syslog", "quotactl", "acct", "settimeofday", "clock_settime", "sethostname", "setdomainname",
    "unlinkat", "renameat2", "linkat", "symlinkat", "mkdirat", "fchownat", "fchmodat", "memfd_create",
}


@pytest.mark.parametrize("role", policy.ROLES)
def test_every_rule_names_a_real_syscall_and_nothing_forbidden(role: str) -> None:
    rules = policy.build_rules(role, nic=True, self_pid=1234)
    names = {r.syscall for r in rules}
    for name in names:
        assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0, name
    plain = {r.syscall for r in rules if not r.args}
    assert not plain & FORBIDDEN, plain & FORBIDDEN
    # The one conditional exception: the reaper may re-raise the worker's signal on itself only.
    for r in rules:
        if r.syscall in FORBIDDEN:
            assert (role, r.syscall) == ("reaper", "kill") and r.args[0].value == 1234


def test_conditional_rules_are_really_conditional() -> None:
    rules = policy.build_rules("worker", nic=False, self_pid=1)
    plain = {r.syscall for r in rules if r.action == "allow" and not r.args}
    assert {"clone", "ioctl", "tgkill"}.isdisjoint(plain)
    (clone,) = [r for r in rules if r.syscall == "clone"]
    (check,) = clone.args
    clone_thread, clone_vm, clone_newuser = 0x10000, 0x100, 0x10000000
    thread_flags = 0x3D0F00  # what glibc's pthread_create passes
    assert thread_flags & check.mask == check.value  # threads pass
    assert (thread_flags | clone_newuser) & check.mask != check.value  # a new user namespace does not
    assert 0x11 & check.mask != check.value  # fork(): SIGCHLD only
    assert check.value == clone_thread | clone_vm
    (tgkill,) = [r for r in rules if r.syscall == "tgkill"]
    assert tgkill.args[0].op == "eq" and tgkill.args[0].value == 1
    assert next(r for r in rules if r.syscall == "clone3").action == "errno"


def test_tun_ioctls_only_with_a_nic() -> None:
    without, with_nic = policy.ioctl_numbers(nic=False), policy.ioctl_numbers(nic=True)
    assert "TUNSETIFF" not in without and "TUNSETIFF" in with_nic
    assert "KVM_RUN" in without
    nums = {r.args[0].value for r in policy.build_rules("worker", nic=False) if r.syscall == "ioctl"}
    assert with_nic["TUNSETOFFLOAD"] not in nums and without["KVM_RUN"] in nums


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_ioctl_numbers_match_the_kernel_headers(tmp_path: Path) -> None:
    numbers = policy.ioctl_numbers(nic=True)
    lines = "".join(f'printf("{n} %#lx\\n", (unsigned long)({n}));\n' for n in numbers)
    src = tmp_path / "ioc.c"
    src.write_text("#include <stdio.h>\n#include <linux/kvm.h>\n#include <linux/if_tun.h>\n"
                   "#include <sys/ioctl.h>\nint main(void){\n" + lines + "return 0;}\n")
    exe = tmp_path / "ioc"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    from_headers = {name: int(v, 16) for name, v in (line.split() for line in out.splitlines())}
    assert from_headers == numbers


def test_every_kvm_ioctl_the_hypervisor_layer_defines_is_allowed() -> None:
    c = pytest.importorskip("bulkhead.hypervisor.kvm.constants")
    allowed = policy.ioctl_numbers(nic=True)
    defined = {k: v for k, v in vars(c).items()
               if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == 0xAE and v > 0xFF}
    assert defined, "no KVM ioctl constants found"
    for name, value in defined.items():
        assert allowed.get(name) == value, f"{name} ({value:#x}) is not on the worker's ioctl allow-list"


def test_tap_ioctls_the_runtime_uses_are_allowed() -> None:
    tap = pytest.importorskip("bulkhead.runtime.tap")
    allowed = policy.ioctl_numbers(nic=True)
    for name in ("TUNSETIFF", "TUNGETIFF", "TUNSETOFFLOAD", "TUNSETVNETHDRSZ"):
        assert allowed[name] == getattr(tap, name)


def test_bad_policy_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown seccomp role 'daemon' \(known: worker, reaper\)"):
        policy.load_role("daemon")
    with pytest.raises(ConfigError, match="ioctl direction must be one of none, w, r, rw, not"):
        policy.ioc("sideways", 0xAE, 0, 0)
    with pytest.raises(ConfigError, match=r"worker: malformed jail spec \('binds'\)"):
        JailSpec.from_json('{"vm_id": 1}')
    good = JailSpec("x", "/r", 100000, 100000).to_json()
    assert JailSpec.from_json(good).uid == 100000
    with pytest.raises(ConfigError, match="root"):
        JailSpec.from_json(good.replace('"uid":100000', '"uid":0'))


# --- cgroups without root ---------------------------------------------------------------------------


def test_detect_v1_when_unified_lacks_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("\n")
    info = (f"30 25 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
            "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
            "32 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
            "33 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
    assert detect_version(info) == (1, {"memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids",
                                        "cpu": "/sys/fs/cgroup/cpu,cpuacct"})
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert detect_version(info) == (2, {"unified": str(tmp_path)})
    with pytest.raises(HostError, match="no cgroup hierarchy with the memory, pids and cpu"):
        detect_version("31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")


def test_v2_group_writes_limits_and_delegates_controllers(tmp_path: Path) -> None:
    cg = VmCgroup("vm1", CgroupLimits(96 << 20, 40, 150_000), parent="/bulkhead", version=2,
                  mounts={"unified": str(tmp_path)})
    cg.create()
    d = tmp_path / "bulkhead" / "vm1"
    assert (d / "memory.max").read_text() == str(96 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "40"
    assert (d / "cpu.max").read_text() == "150000 100000"
    for parent in (tmp_path, tmp_path / "bulkhead"):
        assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_kills() == 1
    assert cg.procs_files == [str(d / "cgroup.procs")]


def test_id_allocator_is_unique_and_reclaims_dead_owners(tmp_path: Path) -> None:
    ids = IdAllocator(str(tmp_path), base=200_000, count=3)
    a, b = ids.allocate("a"), ids.allocate("b")
    assert (a, b) == (200_000, 200_001) and ids.owner(a) == "a"
    (tmp_path / "200002").write_text("ghost 999999999\n")  # its allocating process is gone
    assert ids.allocate("c") == 200_002
    with pytest.raises(HostError, match="no free VM uid"):
        ids.allocate("d")
    ids.release(a)
    assert ids.allocate("d") == a


# --- mutation-testing survivors (issue 15): _IOC boundaries and known answers, malformed role data -------

def test_ioc_known_answers_from_the_kernel_headers():
    """linux/kvm.h and linux/if_tun.h request numbers, computed by asm-generic/ioctl.h's _IOC."""
    assert policy.ioc("none", 0xAE, 0x00, 0) == 0xAE00                # KVM_GET_API_VERSION
    assert policy.ioc("none", 0xAE, 0x80, 0) == 0xAE80                # KVM_RUN
    assert policy.ioc("w", 0xAE, 0x46, 32) == 0x4020AE46              # KVM_SET_USER_MEMORY_REGION
    assert policy.ioc("r", 0xAE, 0x81, 144) == 0x8090AE81             # KVM_GET_REGS
    assert policy.ioc("rw", 0xAE, 0x05, 8) == 0xC008AE05              # KVM_GET_SUPPORTED_CPUID
    assert policy.ioc("w", 0x54, 0xCA, 4) == 0x400454CA               # TUNSETIFF
    assert policy.ioctl_numbers(nic=True)["TUNSETIFF"] == 0x400454CA
    assert "TUNSETIFF" not in policy.ioctl_numbers(nic=False)


def test_ioc_field_boundaries():
    assert policy.ioc("rw", 255, 255, (1 << 14) - 1) == (3 << 30) | (0x3FFF << 16) | 0xFFFF
    assert policy.ioc("none", 0, 0, 0) == 0
    for typ, nr, size in ((256, 0, 0), (0, 256, 0), (0, 0, 1 << 14), (-1, 0, 0), (0, -1, 0), (0, 0, -1)):
        with pytest.raises(ConfigError, match="must fit"):
            policy.ioc("rw", typ, nr, size)
    with pytest.raises(ConfigError, match="direction"):
        policy.ioc("wr", 0, 0, 0)


def test_ioctl_rules_follow_the_list_and_later_conditionals_are_kept():
    rules = policy.build_rules("worker", nic=False, self_pid=77)
    ioctl = [r for r in rules if r.syscall == "ioctl"]
    assert sorted(r.args[0].value for r in ioctl) == sorted(set(policy.ioctl_numbers(False).values()))
    assert {(r.action, r.args[0].index, r.args[0].op, len(r.args)) for r in ioctl} == {("allow", 1, "eq", 1)}
    data = policy.load_role("worker")
    names = {r.syscall for r in rules}
    assert {c["name"] for c in data["conditional"]} <= names  # every conditional after ioctl is there too
    assert all(r.action == "allow" for r in rules if r.syscall in {c["name"] for c in data["conditional"]})
    tg = next(r for r in rules if r.syscall == "tgkill")
    assert tg.args == (policy.ArgCheck(0, "eq", 77, 0),)


def _fake_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc: object, role: str = "worker") -> None:
    d = tmp_path / "seccomp"
    d.mkdir(exist_ok=True)
    real = Path(policy.__file__).resolve().parent / "seccomp" / "ioctls.json"
    (d / "ioctls.json").write_text(real.read_text())
    (d / f"{role}.json").write_text(__import__("json").dumps(doc))
    monkeypatch.setattr(policy, "__file__", str(tmp_path / "policy.py"))


def _doc(**kw: object) -> dict[str, object]:
    return {"role": "worker", "default_action": "kill_process", "allow": [], "conditional": [], "errno": [], **kw}


@pytest.mark.parametrize(("doc", "match"), [
    ([1, 2], "must be a JSON object"),
    (_doc(role="reaper"), "must name its role"),
    (_doc(default_action="allow"), "default to kill_process"),
    (_doc(allow=[{"names": ["read", "read"]}]), "twice"),
    (_doc(allow=[{"names": ["read"]}], conditional=[{"name": "read", "args": []}]), "both plainly"),
    (_doc(allow=[{"names": ["read"]}], errno=[{"name": "read", "errno": "ENOSYS"}]), "twice"),
    (_doc(conditional=[{"name": "x", "args": [{"index": 0, "op": "gt", "value": "1"}]}]), "argument op"),
])
def test_malformed_role_data_is_a_config_error(tmp_path, monkeypatch, doc, match):
    _fake_role(tmp_path, monkeypatch, doc)
    with pytest.raises(ConfigError, match=match):
        policy.build_rules("worker")


def test_well_formed_fake_role_builds_exactly_its_rules(tmp_path, monkeypatch):
    _fake_role(tmp_path, monkeypatch, _doc(
        allow=[{"names": ["read", "write"]}],
        conditional=[{"name": "kill", "args": [{"index": 0, "op": "eq", "value": "self_pid"}]},
                     {"name": "fcntl", "args": [{"index": 1, "op": "masked_eq", "value": "0x4", "mask": "0xf"}]}],
        errno=[{"name": "clone3", "errno": "ENOSYS"}]))
    assert policy.build_rules("worker", self_pid=9) == [
        policy.Rule("read", "allow"), policy.Rule("write", "allow"),
        policy.Rule("kill", "allow", (policy.ArgCheck(0, "eq", 9, 0),)),
        policy.Rule("fcntl", "allow", (policy.ArgCheck(1, "masked_eq", 4, 0xF),)),
        policy.Rule("clone3", "errno", errno=38)]


def test_conditionals_after_the_ioctl_list_are_kept(tmp_path, monkeypatch):
    _fake_role(tmp_path, monkeypatch, _doc(conditional=[
        {"name": "ioctl", "args": [{"index": 1, "op": "eq", "value": "ioctl_list"}]},
        {"name": "kill", "args": [{"index": 0, "op": "eq", "value": "self_pid"}]}]))
    rules = policy.build_rules("worker", self_pid=5)
    assert rules[-1] == policy.Rule("kill", "allow", (policy.ArgCheck(0, "eq", 5, 0),))
    assert len(rules) == len(set(policy.ioctl_numbers(False).values())) + 1
