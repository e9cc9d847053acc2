"""The per-step training log every run writes: ``OUTPUT_DIR/metrics.jsonl`` (one JSON object per optimizer step).

A plain file any tool reads (``pandas.read_json(path, lines=True)``, ``jq``, DuckDB's ``read_json``), written by the
main process whether or not a tracker is configured. Each line::

    {"step": 12, "epoch": 0.6, "images": 1536, "loss": 4.21, "lr": 0.00025, "logit_scale": 10.02,
     "logit_bias": -9.98, "images_per_s": 171.3, "data_wait_s": 0.012, "step_s": 0.747}

``images_per_s`` and ``step_s`` are this step's (wall time since the previous step ended), ``data_wait_s`` the
part of it spent waiting for the data loader. A resumed run keeps the lines up to its checkpoint's step and drops
later ones (logged by the interrupted run after its last checkpoint), so the file has each step once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends one line per step to ``OUTPUT_DIR/metrics.jsonl``; a no-op on non-main processes.

    Args:
        output_dir: the run's folder.
        resume_step: the step training continues after (0 for a fresh run, whose file starts empty).
        enabled: ``False`` on processes other than the main one.
    """

    def __init__(self, output_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(output_dir) / METRICS
        self._f = None
        if not enabled:
            return
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a line cut by a kill ends what can be kept
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8")
        self._f.write("".join(line + "\n" for line in kept))
        self._f.flush()

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and flush it (a kill loses at most the line being written)."""
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
