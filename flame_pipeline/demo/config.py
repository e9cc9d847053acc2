"""What `flame demo` runs (:class:`DemoConfig`): read by the subcommand for its defaults and by the runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.asset_list import DEFAULT_LLM

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


@dataclass
class DemoConfig:
    """What `flame demo` runs.

    Attributes:
        runs: root of run outputs; artifacts are reused from ``runs/demo-artifacts``.
        out: this run's directory (default ``runs/demo-<timestamp>``).
        full: all 7,572 images and every concept instead of the subset.
        train_bases / test_bases: base emoji kept from the train / test split in the subset.
        seed: split and subset seed.
        llm: stage-1 LLM (embedded name or path).
        train_config: stage-2 TOML; ``train_overrides`` are applied on top (``section.key=value``).
    """

    runs: Path = Path("runs")
    out: Path | None = None
    full: bool = False
    train_bases: int = 300
    test_bases: int = 150
    seed: int = 0
    llm: str = DEFAULT_LLM
    train_config: Path = CONFIG_DIR / "demo-cpu.toml"
    train_overrides: tuple[str, ...] = ()
