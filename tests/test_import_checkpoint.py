"""`flame import checkpoint` (issue 13): official-format FLAME checkpoints -> exported models, and model.init_from.

The official checkpoints are built here from open_clip's own ``VisionTransformer`` and a FLAME projector with
random weights, saved the way open_clip's training script saves them (``{"epoch", "name", "state_dict",
"optimizer"}``, DDP ``module.`` prefix, a stand-in ``text.*`` tensor for the LLM). The reference embedding is the
official forward computed with open_clip's modules: tokens without ``ln_post`` -> projector per token -> mean over
patch tokens -> L2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file, save_file
from torch import nn

from eval.run import load_model
from flame_pipeline.cli import main as flame_main
from flame_pipeline.imports.cache import official_identity
from flame_pipeline.imports.checkpoint import CheckpointImportError, import_checkpoint
from pipeline.cache.store import CacheIdentity, CacheIdentityError
from stage2_train_vision.config import ConfigError, load_config
from stage2_train_vision.export import load_exported
from stage2_train_vision.train import train
from tests.helpers.stage2_data import COLOURS, key, make_cache, make_manifest, tiny_overrides

# (width, depth, patch, image size, D): two shapes that differ in every inferred dimension
SHAPES = [(128, 2, 8, 32, 48), (192, 3, 16, 48, 64)]


class OfficialFlame(nn.Module):
    """The tensors of an official FLAME checkpoint: ``visual`` (open_clip), ``mm`` (projector), ``text`` (stand-in
    for the LLM), ``logit_scale``, ``logit_bias``; random weights (LayerNorms included) from ``seed``."""

    def __init__(self, width: int, depth: int, patch: int, image: int, dim: int, seed: int = 0, act=nn.GELU):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = VisionTransformer(image_size=image, patch_size=patch, width=width, layers=depth,
                                        heads=width // 64, mlp_ratio=4.0, output_dim=32, act_layer=act)
        self.mm = nn.Sequential(nn.Linear(width, max(dim, 4096)), nn.GELU(), nn.Linear(max(dim, 4096), dim),
                                nn.LayerNorm(dim))
        self.text = nn.Linear(8, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(12.5)))
        self.logit_bias = nn.Parameter(torch.tensor(-9.0))
        with torch.no_grad():
            for p in self.visual.parameters():
                p.add_(0.05 * torch.randn_like(p))
            for p in self.mm[3].parameters():
                p.add_(0.1 * torch.randn_like(p))

    @torch.no_grad()
    def official_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's patch embedding + ln_pre (``_embeds``) and transformer, no ln_post; mm; patch mean; L2."""
        tokens = self.visual.transformer(self.visual._embeds(images))
        return F.normalize(self.mm(tokens[:, 1:]).mean(dim=1), dim=-1)

    def checkpoint(self) -> dict:
        state = {f"module.{k}": v.clone() for k, v in self.state_dict().items()}
        return {"epoch": 7, "name": "flame-test-run", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]}}


def identity(dim: int) -> CacheIdentity:
    return CacheIdentity(llm="test-llm", llm_fingerprint="f0", tokenizer="t", layer=3, readout="pre_norm", dim=dim,
                         prompt_set="flame", prompt_set_hash="h0", facets=tuple(f"facet{j}" for j in range(11)))


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", SHAPES, ids=["w128-d2-p8", "w192-d3-p16"])
def test_imported_model_equals_the_official_forward(shape, tmp_path):
    width, depth, patch, image, dim = shape
    official = OfficialFlame(*shape).eval()
    torch.save(official.checkpoint(), tmp_path / "epoch_7.pt")

    config = import_checkpoint(tmp_path / "epoch_7.pt", tmp_path / "model", identity(dim))
    model, loaded = load_exported(tmp_path / "model")
    x = _images(image)
    with torch.no_grad():
        diff = (model(x) - official.official_embedding(x)).abs().max().item()
    assert diff <= 1e-4, diff
    m = loaded["model"]
    assert (m["width"], m["depth"], m["patch_size"], m["img_size"], m["num_heads"]) == (width, depth, patch, image,
                                                                                        width // 64)
    assert (m["proj_hidden"], m["out_dim"], m["final_norm"]) == (4096, dim, False)
    assert math.isclose(model.temperature().item(), 12.5, rel_tol=1e-6) and model.logit_bias.item() == -9.0
    assert config["train"]["imported"]["epoch"] == 7 and config["train"]["imported"]["name"] == "flame-test-run"
    assert loaded["cache_identity"]["llm"] == "test-llm"
    assert not any(k.startswith("text") for k in load_file(tmp_path / "model" / "model.safetensors"))
    _, _, transform = load_model(tmp_path / "model")  # what flame eval loads
    assert transform(torch.rand(3, image + 8, image + 8)).shape == (3, image, image)


def test_cli_safetensors_and_default_identity(tmp_path):
    """A .safetensors file (module. prefix) through the CLI; the default identity is the official text side."""
    official = OfficialFlame(64, 1, 8, 32, 5120, seed=3).eval()
    save_file(official.checkpoint()["state_dict"], tmp_path / "flame.safetensors")
    rc = flame_main(["import", "checkpoint", str(tmp_path / "flame.safetensors"), "--out", str(tmp_path / "m")])
    assert rc == 0
    model, config = load_exported(tmp_path / "m")
    assert config["cache_identity"] == official_identity().to_dict()
    ident = config["cache_identity"]
    assert (ident["llm"], ident["layer"], ident["dim"], ident["position_mode"], ident["bos_marker"]) == (
        "mistralai/Mistral-Nemo-Instruct-2407", 39, 5120, "continuous", "keep")
    x = _images(32, 2)
    with torch.no_grad():
        assert (model(x) - official.official_embedding(x)).abs().max().item() <= 1e-4


def test_quick_gelu_tower(tmp_path):
    official = OfficialFlame(64, 2, 8, 32, 16, seed=6, act=QuickGELU).eval()
    torch.save(official.checkpoint(), tmp_path / "q.pt")
    x = _images(32)
    for quick, close in ((True, True), (False, False)):  # the activation leaves no tensor: it is the user's word
        import_checkpoint(tmp_path / "q.pt", tmp_path / f"m{quick}", identity(16), quick_gelu=quick)
        with torch.no_grad():
            diff = (load_exported(tmp_path / f"m{quick}")[0](x) - official.official_embedding(x)).abs().max().item()
        assert (diff <= 1e-4) == close, diff


def test_folder_with_one_checkpoint_and_identity_file(tmp_path):
    official = OfficialFlame(64, 1, 8, 32, 16, seed=4).eval()
    (tmp_path / "ckpt").mkdir()
    torch.save(official.checkpoint(), tmp_path / "ckpt" / "epoch_1.pt")
    (tmp_path / "ident.json").write_text(json.dumps(identity(16).to_dict()))
    rc = flame_main(["import", "checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m"),
                     "--identity", str(tmp_path / "ident.json")])
    assert rc == 0 and load_exported(tmp_path / "m")[1]["cache_identity"]["dim"] == 16


class Payload:
    """An arbitrary object: weights_only loading must refuse it."""


def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert flame_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after progress bars
    assert err.startswith("flame import:") and "\n" not in err and "Traceback" not in err
    return err


def test_refused_pickle_is_one_line_exit_2(tmp_path, capsys):
    ckpt = OfficialFlame(64, 1, 8, 32, 16).checkpoint()
    ckpt["args"] = Payload()
    torch.save(ckpt, tmp_path / "evil.pt")
    err = _one_line_exit_2(["import", "checkpoint", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "m")], capsys)
    assert "refused" in err and "Payload" in err
    assert not (tmp_path / "m").exists()


def test_non_flame_and_unknown_layouts_are_refused(tmp_path, capsys):
    state = OfficialFlame(64, 1, 8, 32, 16).checkpoint()
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("module.mm.")}
    torch.save(state, tmp_path / "openclip.pt")
    err = _one_line_exit_2(["import", "checkpoint", str(tmp_path / "openclip.pt"), "--out", str(tmp_path / "a")],
                           capsys)
    assert "not a FLAME checkpoint" in err
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    err = _one_line_exit_2(["import", "checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "b")], capsys)
    assert "no visual.*" in err
    torch.save(OfficialFlame(64, 1, 8, 32, 16).checkpoint(), tmp_path / "d16.pt")
    with pytest.raises(ConfigError, match="D=16"):  # projector D vs the identity's D
        import_checkpoint(tmp_path / "d16.pt", tmp_path / "c", official_identity())
    torch.save(OfficialFlame(64, 1, 8, 32, 16).checkpoint(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointImportError, match="zip"):  # cannot be memory-mapped
        import_checkpoint(tmp_path / "legacy.pt", tmp_path / "d", identity(16))


def test_train_init_from_an_imported_model(tmp_path):
    """``model.init_from`` takes the architecture and weights of the imported model; with lr 0 the exported model
    after one step is the imported one, bit for bit. A model of another D than the cache is refused."""
    make_manifest(tmp_path / "man", n=12, n_test=2)
    make_cache(tmp_path / "cache", [key(i) for i in range(12)], classes=[i % len(COLOURS) for i in range(12)])
    official = OfficialFlame(64, 1, 8, 32, 16, seed=5).eval()
    torch.save(official.checkpoint(), tmp_path / "epoch_9.pt")
    assert flame_main(["import", "checkpoint", str(tmp_path / "epoch_9.pt"), "--out", str(tmp_path / "init"),
                       "--identity", str(tmp_path / "cache")]) == 0

    overrides = tiny_overrides(tmp_path / "man", tmp_path / "cache", tmp_path / "run",
                               **{"model.init_from": str(tmp_path / "init"), "optim.lr": 0.0, "train.max_steps": 1})
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 1
    before, after = load_file(tmp_path / "init" / "model.safetensors"), load_file(tmp_path / "run" / "model" /
                                                                                   "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    run_cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())["model"]
    assert (run_cfg["name"], run_cfg["width"], run_cfg["proj_hidden"]) == ("vit_base_patch16_clip_224", 64, 4096)

    torch.save(OfficialFlame(64, 1, 8, 32, 48).checkpoint(), tmp_path / "d48.pt")
    import_checkpoint(tmp_path / "d48.pt", tmp_path / "init48", identity(48))
    bad = tiny_overrides(tmp_path / "man", tmp_path / "cache", tmp_path / "run48",
                         **{"model.init_from": str(tmp_path / "init48"), "train.max_steps": 1})
    with pytest.raises(CacheIdentityError, match="D=48"):
        train(load_config(None, bad))


def test_missing_source_is_a_user_error(tmp_path, capsys):
    for src in (str(tmp_path / "nope.pt"), "runs/nope.pt"):  # the second looks like owner/name but is a file name
        assert flame_main(["import", "checkpoint", src, "--out", str(tmp_path / "m")]) == 2
        assert "nope.pt" in capsys.readouterr().err
