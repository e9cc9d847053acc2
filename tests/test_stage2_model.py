"""Stage-2 building blocks: config loading, the model, optimizer groups, schedule, transforms, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from stage2_train_vision.config import CLIP_MEAN, CLIP_STD, ConfigError, ImageConfig, ModelConfig, load_config
from stage2_train_vision.data.transforms import eval_transform, train_transform
from stage2_train_vision.export import export_model, load_exported
from stage2_train_vision.model import FlameVisionModel, projector_hidden
from stage2_train_vision.optim import build_optimizer, build_scheduler, param_groups

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(img_size=32, patch_size=8, depth=1, width=32, num_heads=2, proj_hidden=64, out_dim=16)


def test_official_recipe_config():
    cfg = load_config(REPO / "configs" / "flame-cc3m-vitb16.toml")
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    assert (m.name, m.img_size, m.final_norm, m.proj_hidden, m.out_dim) == ("vit_base_patch16_224", 224, False, 5120, None)
    assert (d.positives, d.crop_scale, d.interpolation, d.mean, d.std) == (6, (0.9, 1.0), "bicubic", CLIP_MEAN, CLIP_STD)
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps) == (5e-4, (0.9, 0.95), 1e-8, 0.5, 2000)
    assert (t.epochs, t.batch_size, t.mixed_precision, cfg.loss.kind) == (32, 3072, "launcher", "sigmoid")


def test_demo_config_and_typed_overrides():
    cfg = load_config(REPO / "configs" / "demo-cpu.toml",
                      ["data.manifest=/m", "data.cache=/c", "optim.lr=2e-3", "train.project_name=p1",
                       "data.crop_scale=[0.8, 1]", "model.out_dim=640", "data.expect={layer = 17}"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.model.patch_size, cfg.model.depth) == (200, 128, 8, 4)
    assert (cfg.model.img_size, cfg.data.manifest, cfg.data.cache, cfg.optim.lr) == (64, "/m", "/c", 2e-3)
    assert (cfg.train.project_name, cfg.data.crop_scale, cfg.model.out_dim, cfg.data.expect) == (
        "p1", (0.8, 1.0), 640, {"layer": 17})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown key optim.lrr \(known: betas, eps, grad_clip, lr, min_lr_ratio, warmup_steps, weight_decay\)"),
        ("optimizer.lr=1", "unknown section 'optimizer'"),
        ("train.epochs=two", r"train.epochs: expected int, got 'two'"),
        ("train.epochs=true", r"train.epochs: expected int, got True"),
        ("optim.betas=[0.9]", r"optim.betas: expected a list of 2 values, got \[0.9\]"),
        ("lr=1", "must be section.key"),
    ],
)
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_model_shapes_norms_and_init():
    torch.manual_seed(0)
    model = FlameVisionModel(TINY)
    x = torch.randn(2, 3, 32, 32)
    emb, feats = model(x), model.features(x)
    assert emb.shape == (2, 16) and feats.shape == (2, 32) and model.width == 32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert isinstance(model.backbone.norm, nn.Identity) and model.backbone.num_prefix_tokens == 1
    tokens = model.tokens(x)
    assert tokens.shape == (2, 16, 32)  # (32 / 8)^2 patch tokens, the class token dropped
    torch.testing.assert_close(feats, tokens.mean(1))
    torch.testing.assert_close(emb, nn.functional.normalize(model.projector(tokens).mean(1), dim=-1))
    assert [type(m) for m in model.projector] == [nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm]
    assert (model.projector[0].in_features, model.projector[0].out_features, model.projector[2].out_features) == (32, 64, 16)
    assert model.temperature().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model.temperature().item() == 100.0


def test_final_norm_option_and_default_projector_width():
    kept = FlameVisionModel(ModelConfig(**{**TINY.__dict__, "final_norm": True}))
    assert isinstance(kept.backbone.norm, nn.LayerNorm)
    assert projector_hidden(ModelConfig(), 640) == 4096 and projector_hidden(ModelConfig(), 5120) == 5120
    with pytest.raises(ConfigError, match="out_dim .* is unset"):
        FlameVisionModel(ModelConfig())


def test_no_weight_decay_on_biases_norms_1d_and_logit_params():
    model = FlameVisionModel(TINY)
    decay, no_decay = param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted([
        "backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.attn.proj.weight",
        "backbone.blocks.0.mlp.fc1.weight", "backbone.blocks.0.mlp.fc2.weight",
        "projector.0.weight", "projector.2.weight",
    ])
    assert {"logit_scale", "logit_bias", "projector.3.weight", "projector.3.bias", "backbone.blocks.0.norm1.weight"} <= {
        names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cosine_schedule_with_linear_warmup():
    model = FlameVisionModel(TINY)
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=2"]).optim
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


@pytest.mark.parametrize("warmup, total, min_ratio", [(2, 6, 0.0), (5, 40, 0.1), (0, 9, 0.0), (10, 10, 0.0)])
def test_cosine_schedule_equals_transformers_after_warmup_and_its_next_step_during_it(warmup, total, min_ratio):
    """Issue 21 item 4: ours is transformers' cosine schedule except that warm-up step s trains at transformers'
    step s + 1 (never at lr 0, as open_clip_train's cosine_lr), and past total_steps it stays at min_ratio."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from stage2_train_vision.optim import cosine_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio).lr_lambdas[0]
    for s in range(total + 3):
        ours = cosine_with_warmup(s, warmup, total, min_ratio)
        if s < warmup:
            assert ours == pytest.approx(ref(s + 1), abs=1e-15) and ref(s) == s / warmup
        elif s <= total:
            assert ours == pytest.approx(ref(s), abs=1e-15)
        else:
            assert ours == pytest.approx(min_ratio, abs=1e-15)


def test_transforms_sizes_and_exact_normalisation():
    cfg = ImageConfig(32)
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    out = eval_transform(cfg)(red)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), rtol=0, atol=1e-5)
    pixels = torch.from_numpy(np.full((3, 64, 64), 255, np.uint8))
    train = train_transform({"size": 32, "crop_scale": [0.9, 1.0]})
    aug = train(pixels, np.random.default_rng(0))
    assert aug.shape == (3, 32, 32)
    torch.testing.assert_close(aug[0], torch.full((32, 32), (1 - CLIP_MEAN[0]) / CLIP_STD[0]), rtol=0, atol=1e-5)
    assert torch.equal(train(red, np.random.default_rng(5)), train(red, np.random.default_rng(5)))


def test_random_resized_crop_parameters():
    train = train_transform(ImageConfig(32))
    rng = np.random.default_rng(0)
    crops = [train.crop_params(64, 64, rng) for _ in range(200)]
    areas = [h * w / 64**2 for _, _, h, w in crops]
    assert 0.9 - 0.05 <= min(areas) and max(areas) <= 1.0
    assert all(0 <= t <= 64 - h and 0 <= left <= 64 - w for t, left, h, w in crops)
    assert len(set(crops)) > 20
    assert train.crop_params(10, 100, rng) == (0, 43, 10, 13)  # too wide for any draw: central crop at 4:3


def test_export_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FlameVisionModel(TINY)
    identity = {"llm": "test-llm", "dim": 16, "layer": 3}
    data_cfg = load_config(None, []).data
    export_model(model, TINY, data_cfg, identity, tmp_path, {"steps": 3})
    loaded, config = load_exported(tmp_path)
    assert not loaded.training
    assert set(config) == {"library_name", "architectures", "format_version", "model", "image", "cache_identity",
                           "text_encoder", "train"}
    assert (config["library_name"], config["architectures"], config["format_version"]) == (
        "flame-pipeline", ["FlameVisionModel"], 2)
    assert config["text_encoder"] == {"kind": "local", "path": identity["llm"]}
    assert config["image"] == {"size": 32, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                               "interpolation": "bicubic", "crop_scale": [0.9, 1.0]}
    assert config["cache_identity"] == identity and config["train"] == {"steps": 3}
    assert config["model"]["out_dim"] == 16 and config["model"]["final_norm"] is False
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.features(x), model.features(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["patch_size"] == 8
    with pytest.raises(FileNotFoundError, match="not an exported flame model"):
        load_exported(tmp_path / "nope")


def test_cli_arguments():
    import argparse

    from stage2_train_vision.cli import add_arguments

    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", "c.toml", "--resume", "optim.lr=1e-3"])
    assert (args.config, args.resume, args.overrides) == ("c.toml", "latest", ["optim.lr=1e-3"])
    assert parser.parse_args(["--config", "c.toml", "--resume-from", "ck/step-0000010"]).resume == "ck/step-0000010"
    assert parser.parse_args(["--config", "c.toml"]).resume is None


@pytest.mark.parametrize("damage", ["no out_dim", "other weights"])
def test_flame_eval_refuses_an_export_that_cannot_be_rebuilt_in_one_line(tmp_path, capsys, damage):
    """A config.json without model.out_dim, or weights of another width: ExportError naming the file, exit 2."""
    from flame_pipeline.cli import main as flame_main
    from tests.helpers.images import write_png

    export_model(FlameVisionModel(TINY), TINY, load_config(None, []).data, {"llm": "test-llm", "dim": 16}, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    if damage == "no out_dim":
        del config["model"]["out_dim"]
        message = f"{tmp_path}/m/config.json: ModelConfig.out_dim (D) is unset: it comes from the cache identity"
    else:
        config["model"]["out_dim"] = 8
        message = f"{tmp_path}/m/model.safetensors does not fit {tmp_path}/m/config.json (Error(s) in loading"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    write_png(tmp_path / "b" / "0.jpg")
    (tmp_path / "b" / "dataset_coco.json").write_text(json.dumps(
        {"images": [{"filename": "0.jpg", "split": "test", "sentences": [{"raw": "a red square"}]}]}))
    rc = flame_main(["eval", "--model", str(tmp_path / "m"), "--benchmark", "coco", "--data", str(tmp_path / "b"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"flame eval: {message}"), err
