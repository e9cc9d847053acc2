"""Stage 2's structure (issue 15): the micro-step as one function, imports that point down, atomic outputs."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from pipeline.cache.store import CacheIdentity
from stage2_train_vision.config import Config, ModelConfig, load_config
from stage2_train_vision.export import export_model
from stage2_train_vision.init_from import apply_init_from
from stage2_train_vision.loss import contrastive_loss
from stage2_train_vision.model import FlameVisionModel
from stage2_train_vision.step import prepare_step, train_step

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stage2_train_vision"
OWN = ("pipeline", "manifests", "stage1_embed_text", "stage2_train_vision", "eval")


def _tiny_model(seed: int = 0) -> FlameVisionModel:
    torch.manual_seed(seed)
    return FlameVisionModel(ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, width=32,
                                        num_heads=2, proj_hidden=64, out_dim=16))


def _batch(n: int = 8, positives: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g),
            "texts": F.normalize(torch.randn(n, positives, 16, generator=g), dim=-1),
            "text_valid": torch.ones(n, positives, dtype=torch.bool), "image_valid": torch.ones(n, dtype=torch.bool)}


@pytest.fixture
def fresh_accelerate():
    yield
    AcceleratorState._reset_state()
    GradientState._reset_state()


def test_train_step_accumulates_then_steps_optimizer_and_schedule_once(fresh_accelerate):
    cfg = load_config(None, ["optim.lr=1e-2", "optim.warmup_steps=0", "optim.grad_clip=1.0"])
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    parts = prepare_step(cfg, accelerator, _tiny_model(), total_steps=4)
    parts.model.train()
    before = {k: v.clone() for k, v in parts.core.state_dict().items()}
    batch = _batch()
    with torch.no_grad():
        expected = contrastive_loss(cfg.loss.kind, parts.model(batch["images"]), batch["texts"], batch["text_valid"],
                                    parts.core.temperature(), parts.core.logit_bias, batch["image_valid"])

    first = train_step(parts, batch)
    assert not first.synced and parts.scheduler.last_epoch == 0  # accumulation only: nothing stepped
    assert all(torch.equal(before[k], v) for k, v in parts.core.state_dict().items())
    assert not first.loss.requires_grad and first.loss.dtype == torch.float32
    torch.testing.assert_close(first.loss, expected, rtol=0, atol=0)  # the loss of the weights before the step

    second = train_step(parts, _batch(seed=1))
    assert second.synced and parts.scheduler.last_epoch == 1
    assert not torch.equal(before["projector.0.weight"], parts.core.state_dict()["projector.0.weight"])
    assert all(p.grad is None for p in parts.model.parameters())  # zero_grad(set_to_none=True) after the step


def _imports(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Own-package modules imported at the top of ``path``, and (line, module) of those imported in functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OWN:
            top.append(node.module)
        elif isinstance(node, ast.Import):
            top += [a.name for a in node.names if a.name.split(".")[0] in OWN]
    nested = [(n.lineno, n.module) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in OWN]
    return top, nested


def test_imports_point_down_without_cycles_and_only_cli_defers_one():
    graph, nested = {}, {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = f"stage2_train_vision.{path.stem}"
        top, inner = _imports(path)
        assert not [m for m in top if m.split(".")[0] == "eval" or m.startswith("pipeline.app")], name  # layers
        graph[name] = {m for m in top if m.startswith("stage2_train_vision.")}
        if inner:
            nested[name] = inner
    # the one deferred import: `flame train` loads torch/timm/accelerate only when it runs
    assert {k: [m for _, m in v] for k, v in nested.items()} == {"stage2_train_vision.cli": ["stage2_train_vision"]}
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import cycle: {' -> '.join([*visiting, m])}"
        if m in done or m not in graph:
            return
        visiting.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        visiting.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_flame_train_registers_without_importing_torch():
    code = ("import argparse, sys, stage2_train_vision.cli as c; "
            "c.add_parser(argparse.ArgumentParser().add_subparsers()); "
            "sys.exit(int(any(m.split('.')[0] in ('torch', 'timm', 'accelerate') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}).returncode == 0


def _identity(**kw) -> CacheIdentity:
    base = dict(llm="test-llm", llm_fingerprint="f0", tokenizer="t", layer=3, readout="pre_norm", dim=16,
                prompt_set="flame", prompt_set_hash="h0", facets=("a", "b"))
    return CacheIdentity(**{**base, **kw})


def test_export_writes_only_its_three_files_and_init_from_names_text_side_differences(tmp_path, caplog):
    model = _tiny_model()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "NOTES").write_text("kept")
    export_model(model, model.cfg, Config().data, _identity().to_dict(), tmp_path / "m", {"steps": 1})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["NOTES", "README.md", "config.json",
                                                                  "model.safetensors"]
    assert (tmp_path / "m" / "NOTES").read_text() == "kept"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["train"] == {"steps": 1}

    cfg = load_config(None, [f"model.init_from={json.dumps(str(tmp_path / 'm'))}"])
    with caplog.at_level(logging.WARNING, logger="stage2_train_vision.init_from"):
        out = apply_init_from(cfg, _identity(layer=5, facets=("x",)))  # facets are not essential
    assert out.model.width == 32 and out.model.out_dim == 16
    assert [r.getMessage() for r in caplog.records] == [
        "model.init_from was trained against another text side than this cache (cache identity mismatch: layer: "
        "cache has 5, expected 3)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stage2_train_vision.init_from"):
        apply_init_from(cfg, _identity())
    assert not caplog.records
