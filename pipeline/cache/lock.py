"""One writing job per cache directory: ``writer.lock`` (:class:`CacheLock`)."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from typing import Any

from pipeline.cache.files import CacheFiles
from pipeline.cache.meta import CacheError

log = logging.getLogger(__name__)


class CacheLock:
    """At most one writing job per cache directory: ``writer.lock``, created exclusively by the job's rank 0.

    The file names the holder (host, pid, start time). A second job finds it and stops with a one-line
    :class:`CacheError` instead of recomputing shards or deleting the first job's temporary files. A lock whose
    holder is a dead process on this host (a killed job) is taken over; one from another host is only reported
    (its liveness cannot be checked from here): delete the file if that job is gone.

    Args:
        files: the cache's paths.
    """

    def __init__(self, files: CacheFiles):
        self.path = files.lock
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def acquire(self) -> None:
        """Take the lock. Raises :class:`CacheError` if another live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == self.mine["host"] and not _pid_alive(holder.get("pid")):
                    log.warning("taking over %s from process %s, which is no longer running", self.path, holder.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise CacheError(
                    f"cache {self.path.parent} is being written by process {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')}; wait for that job, or delete {self.path} "
                    "if it is dead"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.mine, f)
            return

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unreadable: assume alive, never take over blindly
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
