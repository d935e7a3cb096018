"""The private work folder (`{DECRYPT_DOWNLOAD_PATH}/.incoming`): plaintext being decrypted, processors'
work folders. Each process names its files after a prefix of its own (`plain-{prefix}-{n}.part`,
`job-{prefix}-{n}`) and holds a lock on `proc-{prefix}.lock` for its whole life. What a process that died
left behind — decrypted, unverified plaintext among it — is removed by the next process to start,
whatever its age: its lock is free. Replicas sharing the folder keep theirs (their locks are held).
Files of no known process (an earlier version's, or where the file system cannot lock) go after
STALE_AFTER untouched. A clean stop removes what its own process left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import time
from pathlib import Path

from uploads_consumer.observability import get_logger

log = get_logger("uploads_consumer.workdir")

STALE_AFTER = 6 * 3600.0
_OPEN = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def owner_of(name: str) -> str | None:
    """`plain-3f2a9c01ab12-7.part`, `job-3f2a9c01ab12-7` → `3f2a9c01ab12`: the process that made it."""
    parts = name.split("-")
    return parts[1] if len(parts) >= 3 and parts[0] in ("plain", "job") else None


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


class WorkFolder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(exist_ok=True, mode=0o700)
        self.prefix = secrets.token_hex(6)
        self._lock_path = self.path / f"proc-{self.prefix}.lock"
        self._lock_fd: int | None = self._take(self._lock_path)
        if self._lock_fd is None:  # no lock on this file system: an earlier process's files go by age alone
            self._lock_path.unlink(missing_ok=True)
        self.remove_leftovers()

    @staticmethod
    def _take(path: Path) -> int | None:
        """The lock on `path`, or None when another process holds it or the file system has no locks."""
        try:
            fd = os.open(path, _OPEN, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.warning("the work folder cannot be locked; leftovers go after 6 hours", error=exc.strerror)
            return None
        return fd

    def remove_leftovers(self) -> None:
        """Remove what processes that died left, and what no process owns once STALE_AFTER old."""
        alive = {self.prefix}
        dead: list[tuple[str, int]] = []
        for lock in self.path.glob("proc-*.lock"):
            prefix = lock.name[len("proc-") : -len(".lock")]
            if prefix == self.prefix:
                continue
            fd = self._take(lock)
            if fd is None:
                alive.add(prefix)
            else:
                dead.append((prefix, fd))
        gone = {prefix for prefix, _ in dead}
        cutoff = time.time() - STALE_AFTER
        removed = 0
        for path in [*self.path.glob("plain-*.part"), *self.path.glob("job-*")]:
            owner = owner_of(path.name)
            if owner in alive:
                continue
            if owner in gone or self._untouched_since(path, cutoff):
                _remove(path)
                removed += 1
        for prefix, fd in dead:  # its files gone, the lock file goes too (still held: no one else takes it)
            (self.path / f"proc-{prefix}.lock").unlink(missing_ok=True)
            os.close(fd)
        if removed:
            log.info("removed what stopped processes left in the work folder", files=removed)

    @staticmethod
    def _untouched_since(path: Path, cutoff: float) -> bool:
        """A live job touches its folder's files every second or so: untouched since `cutoff`, it is nobody's."""
        try:
            times = [path.stat().st_mtime]
            if path.is_dir():
                times += [p.stat().st_mtime for p in path.iterdir()]
        except OSError:
            return False
        return max(times) < cutoff

    def close(self) -> None:
        """At a clean stop: whatever this process left (work cut short past the grace), then its lock."""
        for path in [*self.path.glob(f"plain-{self.prefix}-*.part"), *self.path.glob(f"job-{self.prefix}-*")]:
            _remove(path)
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
