"""Training plots (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.atomic import atomic_file  # noqa: E402


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Save a PNG of loss against optimizer step to ``path`` (atomically, :func:`pipeline.atomic.atomic_file`)
    and return it. The format follows ``path``'s suffix, as ``savefig`` would choose it."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(list(steps), list(losses), lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:  # the temporary name has no meaningful suffix: name the format
        fig.savefig(tmp, format=path.suffix[1:] or plt.rcParams["savefig.format"])
    plt.close(fig)
    return path
