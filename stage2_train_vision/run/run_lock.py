"""One training run per output folder: ``OUTPUT_DIR/train.lock`` (:class:`RunLock`).

Two runs writing one folder would overwrite each other's checkpoints and export, and each would say it
succeeded. The lock is an OS file lock (``filelock``: ``flock`` on Linux), so the kernel releases it when its
holder exits, killed or not: there is never a stale lock to delete. The file also names its holder (host, pid,
start time), which a refused run prints.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline.errors import FlameError

LOCK = "train.lock"


class RunLockError(FlameError, RuntimeError):
    """Another run holds the output folder."""


class RunLock:
    """At most one training run per output folder. Take it on the main process only.

    Args:
        output_dir: the run's ``train.output_dir`` (created if absent).
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock without waiting.

        Raises:
            RunLockError: another run holds it (the message names its host, pid and start time).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        before = self.holder()  # read first: some filelock versions truncate the file when they try to lock it
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self.holder() or before
            who = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                   if holder else "another process")
            raise RunLockError(
                f"output folder {self.path.parent} is in use by {who} ({self.path}); wait for that run or choose "
                "another train.output_dir"
            ) from None
        self._lock = lock
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(self.path, "r+", encoding="utf-8") as f:
            f.truncate(0)
            json.dump(mine, f)
            f.flush()

    def release(self) -> None:
        """Release the lock if held (the file stays; an unlocked file means no run)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def holder(self) -> dict[str, Any]:
        """The holder the file names (``{}`` when empty or unreadable)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
