"""One writing job per cache directory: ``writer.lock`` (:class:`CacheLock`)."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from typing import Any

from filelock import FileLock, Timeout

from pipeline.cache.files import CacheFiles
from pipeline.cache.meta import CacheError

log = logging.getLogger(__name__)


class CacheLock:
    """At most one writing job per cache directory: ``writer.lock``, locked with ``filelock`` by the job's rank 0.

    The lock is the operating system's file lock (``filelock.FileLock``): the kernel releases it when the holder
    exits in any way, a ``kill -9`` included, so a killed job's lock is taken over by the next one without any
    liveness guessing. The file's content names the holder (host, pid, start time): a second job finds the lock
    held and stops with a one-line :class:`CacheError` naming that process, instead of recomputing shards or
    deleting the first job's temporary files. The file is removed when the job ends.

    Args:
        files: the cache's paths.
    """

    def __init__(self, files: CacheFiles):
        self.path = files.lock
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock. Raises :class:`CacheError` naming the holder if another live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self._holder()
            raise CacheError(
                f"cache {self.path.parent} is being written by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('started', '?')}; wait for that job, or delete "
                f"{self.path} if it is dead"
            ) from None
        previous = self._holder()
        if previous and previous.get("pid") != self.mine["pid"]:
            log.warning("taking over %s from process %s on %s, which no longer holds it", self.path,
                        previous.get("pid"), previous.get("host"))
        self._lock = lock
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.mine, f)

    def release(self) -> None:
        """Remove the lock file and release the lock if this process holds it."""
        if self._lock is None:
            return
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def _holder(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}
