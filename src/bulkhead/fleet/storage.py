"""The storage-side fence for shared disks (docs/FLEET.md "Storage").

etcd's disk claims (rule F1) make at most one writable attachment fleet-wide *as etcd sees it*. The
storage must also refuse a writer whose claim is stale (Kleppmann's fencing token; etcd's own advice:
a lock is not mutual exclusion, the revision is the token): every writable attachment first raises
`<disk>.fence`, under flock, to its token; a token lower than the one recorded is refused. On a
distributed filesystem or block device the same check belongs in the storage server (documented).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from bulkhead.errors import HostError

__all__ = ["DiskFence", "StaleToken"]


class StaleToken(HostError):
    """A writer presented a fencing token lower than one the storage already saw."""


class DiskFence:
    def __init__(self, disks_dir: Path) -> None:
        self.dir = disks_dir

    def _path(self, disk: str) -> Path:
        if not disk or "/" in disk or disk.startswith("."):
            raise HostError(f"bad disk id {disk!r}")
        return self.dir / f"{disk}.fence"

    def current(self, disk: str) -> int:
        try:
            return int(self._path(disk).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def acquire(self, disk: str, token: int) -> None:
        """Record `token` as the disk's newest writer; raise StaleToken when a newer one was seen."""
        path = self._path(disk)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise HostError(f"cannot open the fence of disk {disk}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
            seen = int(raw) if raw.isdigit() else 0
            if token < seen:
                raise StaleToken(f"disk {disk}: fencing token {token} is older than {seen}; refused")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(token).encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
