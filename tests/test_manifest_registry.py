"""The manifest source registry (issue 15): sources register where they are defined, the CLI reads the registry.

Also the one alpha compositing (:func:`manifests.images.composite_on_white`), whose exact rounding the emoji
manifest bytes depend on, and the import cost of the ``flame`` command line (no torch, no webdataset).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flame_pipeline.cli import main
from manifests import registry
from manifests.cli import description
from manifests.images import composite_on_white
from manifests.schema import ManifestError, ManifestInfo


def test_sources_and_option_groups_keep_their_help_order():
    assert [s.name for s in registry.sources()] == ["emoji", "webdataset", "parquet", "csv", "folder"]
    assert [title for title, _ in registry.option_groups()] == ["webdataset", "parquet / csv", "folder", "emoji"]
    table = description().split("Sources and their inputs:\n\n")[1].split("\n\n")[0].splitlines()
    assert table[0] == table[-1] == "=" * 14 + "  " + "=" * 80
    assert table[1] == "``emoji``       none (the embedded emoji data set, SPEC §9)"
    assert table[4] == "``csv``         CSV/TSV files (open_clip ``filepath``/``title``)"


def test_a_source_registered_in_its_module_reaches_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    monkeypatch.setattr(registry, "_OPTIONS", list(registry._OPTIONS))
    calls = []

    @registry.register_options("fake", rank=60)
    def _add(group):
        group.add_argument("--flavour", default="plain", help="fake flavour")

    @registry.register_source("fake", inputs="fake files", rank=60)
    def _build(args):
        calls.append((args.inputs, args.flavour, registry.common_options(args)))
        return ManifestInfo(source={"name": "fake"}, counts={"total": 0})

    with pytest.raises(SystemExit):
        main(["manifest", "--help"])
    help_text = capsys.readouterr().out
    assert "{emoji,webdataset,parquet,csv,folder,fake}" in help_text
    assert "``fake``        fake files" in help_text and "--flavour FLAVOUR" in help_text
    assert main(["manifest", "fake", "a", "b", "--out", str(tmp_path), "--flavour", "x", "--limit", "3"]) == 0
    assert calls == [(["a", "b"], "x", {"split": "train", "on_duplicate": "error", "limit": 3})]
    assert "manifest (fake) written to" in capsys.readouterr().out
    assert main(["manifest", "fake", "--out", str(tmp_path)]) == 2
    assert "source 'fake' needs at least one input" in capsys.readouterr().err
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_source("fake", inputs="again", rank=70)(lambda args: None)
    n_options = len(registry._OPTIONS)
    registry.register_options("fake", rank=60)(_add)  # the same function again (a reloaded module)
    registry.register_source("fake", inputs="fake files", rank=60)(_build)
    assert len(registry._OPTIONS) == n_options and registry.source("fake").build is _build


def test_unknown_source_is_a_manifest_error():
    with pytest.raises(ManifestError, match="unknown manifest source 'nope'"):
        registry.source("nope")


def test_the_manifest_command_line_imports_neither_torch_nor_webdataset():
    code = "import sys, manifests.cli; print(sorted({'torch', 'webdataset'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


def test_composite_on_white_rounds_exactly_for_every_colour_and_alpha():
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, 255 - c, c, a], axis=-1).astype(np.uint8)
    out = np.asarray(composite_on_white(Image.fromarray(rgba, "RGBA")), dtype=np.int64)
    value, alpha = rgba[..., :3].astype(np.int64), a[..., None]
    assert np.array_equal(out, (value * alpha + 255 * (255 - alpha) + 127) // 255)  # round(); 255 is odd
    opaque = Image.fromarray(rgba[..., :3], "RGB")
    assert np.array_equal(np.asarray(composite_on_white(opaque)), rgba[..., :3])
