"""Fixtures of the fleet tests: one real 3-member etcd cluster (TLS for clients, its own data dirs) for the
session; each test's fleet lives under its own key namespace, with its own controller state dir, shared
directory and agents (tests/fleet/kit.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fleet.kit import Fleet

from bulkhead.fleet.etcdrun import EtcdCluster


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian etcd-server; ./install.sh installs it)")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fleet(etcd: EtcdCluster, tmp_path: Path) -> Iterator[Fleet]:
    for i in range(etcd.n):  # a test that took a member down gets it back for the next one
        etcd.start_member(i)
    f = Fleet(etcd, tmp_path)
    try:
        yield f
    finally:
        f.close()
