"""A tap fd whose interface the host removed is a host error, not the caller's configuration (issue 12,
soak finding F: a running VM whose tap was deleted was reported with reason `config-error`)."""

from __future__ import annotations

import os
import subprocess

import pytest

from bulkhead.errors import ConfigError, HostError
from bulkhead.runtime.tap import TapBackend, open_tap

pytestmark = pytest.mark.root


def test_an_adopted_tap_removed_from_the_host_is_a_host_error() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    name = f"bhadopt{os.getpid() % 100000}"
    tap = open_tap(name)
    try:
        subprocess.run(["ip", "link", "del", name], check=True)  # the attack: the host deletes the tap
        fd = os.dup(tap.fd)
        with pytest.raises(HostError, match="removed from the host"):
            TapBackend.adopt(fd)
        os.close(fd)
    finally:
        tap.close()
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def test_a_non_tap_fd_is_still_a_config_error() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ConfigError, match="not a tap device"):
            TapBackend.adopt(r)
    finally:
        os.close(r)
        os.close(w)
