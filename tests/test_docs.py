"""The README and bench/README say only what the code does: every command shown parses, every config override
names a real stage-2 key, every repository path exists, Python blocks compile, and the official recipe names the
code's LLM and layer.

Nothing is run: commands go through the ``flame`` argument parser (``flame_pipeline.cli.build_parser``) and
overrides through :func:`stage2_train_vision.config.load_config`. Each check returns its problems as strings; the
last tests feed a document with one planted error per check, so every check is seen to fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from flame_pipeline.cli import build_parser
from stage2_train_vision.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "bench/README.md")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
OVERRIDE = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_]+)(?:=(\S+))?")
TOP = ("configs", "bench", "tests", "manifests", "pipeline", "stage1_embed_text", "stage2_train_vision", "eval",
       "flame_pipeline", ".ci")
REPO_PATH = re.compile(rf"(?<![\w.$~/-])((?:{'|'.join(re.escape(t) for t in TOP)})/[\w./*<>{{}},-]*|Makefile|pyproject\.toml)")
FILE_SUFFIXES = {"safetensors", "json", "toml", "md", "py", "png", "txt", "parquet", "zarr", "pth", "pt", "bin"}
GPU_HEADING = "## Train on GPUs"  # the official recipe's section of the README
MISTRAL_NEMO = re.compile(r"mistralai/Mistral-Nemo-[\w.-]+|Mistral-Nemo-[A-Za-z]+-2407")


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks."""
    return FENCE.findall(text)


def python_problems(text: str) -> list[str]:
    """Fenced ``python`` blocks that are not valid Python (they are compiled, never run)."""
    problems = []
    for block in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S):
        try:
            compile(block, "<README block>", "exec")
        except SyntaxError as e:
            problems.append(f"python block line {e.lineno}: {e.msg}")
    return problems


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks."""
    return INLINE.findall(FENCE.sub("", text))


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a shell block as token lists: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and ``|``; a leading ``VAR=value`` and a leading ``$`` prompt are dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (e.g. a JSON line in a text block)
            continue
        current: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in ("&&", "||", ";", "|"):
                while current and (current[0] == "$" or re.fullmatch(r"[A-Z_]+=\S*", current[0])):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
    return commands


def flame_argv(tokens: list[str]) -> list[str] | None:
    """The ``flame`` arguments a command amounts to: ``flame ...`` itself; ``python -m stage1_embed_text ...`` and
    ``accelerate launch ... -m stage1_embed_text ...`` = ``flame embed ...``; ``accelerate launch ...
    stage2_train_vision/train.py ...`` = ``flame train ...``; ``None`` for any other command."""
    if Path(tokens[0]).name == "flame":
        return tokens[1:]
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "stage1_embed_text":
            return ["embed", *tokens[i + 2:]]
        if tok.endswith("stage2_train_vision/train.py"):
            return ["train", *tokens[i + 1:]]
    return None


def all_commands(text: str) -> list[list[str]]:
    """Every ``flame`` argument list of the document's code blocks."""
    return [argv for block in code_blocks(text) for cmd in shell_commands(block) if (argv := flame_argv(cmd)) is not None]


def command_problems(text: str) -> list[str]:
    """Commands that the ``flame`` parser refuses, and ``flame train`` overrides that the config refuses."""
    problems = []
    for argv in all_commands(text):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code == 0:  # --help
                continue
            last = err.getvalue().strip().splitlines()[-1:] or ["?"]
            problems.append(f"flame {' '.join(argv)}: {last[0]}")
            continue
        if argv[0] == "train":
            try:
                load_config(None, args.overrides)
            except ConfigError as e:
                problems.append(f"flame {' '.join(argv)}: {e}")
    return problems


def override_problems(text: str) -> list[str]:
    """``section.key=value`` anywhere in code, and inline spans that are just ``section.key``, that are not a
    stage-2 config key (or not of its type); ``model.safetensors`` and the like are file names."""
    problems = []
    spans = inline_spans(text)
    for span in [*code_blocks(text), *spans]:
        for key, value in OVERRIDE.findall(span):
            if not value and (span != key or key.rsplit(".", 1)[1] in FILE_SUFFIXES):
                continue
            override = f"{key}={value}" if value else None
            try:
                if override:
                    load_config(None, [override])
                else:
                    section, name = key.split(".")
                    if name not in {f.name for f in dataclasses.fields(getattr(Config(), section))}:
                        raise ConfigError(f"unknown key {key}")
            except ConfigError as e:
                problems.append(f"{override or key}: {e}")
    return problems


def path_problems(text: str) -> list[str]:
    """Repository paths in code (blocks and spans) that do not exist; patterns and placeholders are skipped."""
    problems = []
    for span in [*code_blocks(text), *inline_spans(text)]:
        for path in REPO_PATH.findall(span):
            path = path.rstrip(".,:;")
            if any(c in path for c in "*<>{},") or path.endswith("..."):
                continue
            if not (ROOT / path).exists():
                problems.append(f"{path}: no such file or folder in the repository")
    return problems


def official_model_problems(text: str) -> list[str]:
    """In the README's GPU recipe, every ``--llm`` must be the code's official LLM and every ``--layer`` its
    readout layer; anywhere, a Mistral-Nemo model named must be that LLM."""
    from flame_pipeline.imports.cache import OFFICIAL_LLM, official_identity

    layer = official_identity().layer
    problems = [f"{m}: the official LLM is {OFFICIAL_LLM}" for m in MISTRAL_NEMO.findall(text)
                if m not in (OFFICIAL_LLM, OFFICIAL_LLM.split("/")[1])]
    start = text.find(GPU_HEADING)
    if start < 0:
        return [*problems, f"no section {GPU_HEADING!r}"]
    end = text.find("\n## ", start + 1)
    commands = all_commands(text[start:end if end > 0 else None])
    if not any("--llm" in argv for argv in commands):
        problems.append("the GPU recipe names no --llm")
    for argv in commands:
        for flag, want in (("--llm", OFFICIAL_LLM), ("--layer", str(layer))):
            if flag in argv and argv[argv.index(flag) + 1] != want:
                problems.append(f"flame {' '.join(argv)}: {flag} {argv[argv.index(flag) + 1]}, the recipe's is {want}")
    return problems


@pytest.mark.parametrize("name", DOCS)
def test_every_command_shown_parses(name):
    text = read(name)
    assert command_problems(text) == []


def test_the_readme_shows_the_main_commands():
    kinds = {argv[0] for argv in all_commands(read("README.md"))}
    assert {"manifest", "embed", "train", "eval", "import"} <= kinds


@pytest.mark.parametrize("name", DOCS)
def test_python_blocks_compile(name):
    assert python_problems(read(name)) == []


@pytest.mark.parametrize("name", DOCS)
def test_every_override_is_a_config_key(name):
    assert override_problems(read(name)) == []


@pytest.mark.parametrize("name", DOCS)
def test_every_repository_path_exists(name):
    assert path_problems(read(name)) == []


def test_the_official_recipe_names_the_codes_llm_and_layer():
    assert official_model_problems(read("README.md")) == []
    bench = read("bench/README.md")
    assert [m for m in MISTRAL_NEMO.findall(bench) if "Instruct" not in m] == []


def test_marked_sections_and_pointers():
    text = read("README.md")
    for marker in ("demo", "api", "fidelity"):
        begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
        assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), marker
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert {"Use a trained model", "Fidelity study", "Layout"} <= set(headings)
    # pyproject's pointers into the README name a section that exists
    pointers = re.findall(r'README "([^"]+)"', read("pyproject.toml"))
    assert pointers and all(any(h.startswith(p) for h in headings) for p in pointers), pointers
    for name in DOCS:  # the issue tracker and the SPEC are not part of the repository
        assert not re.search(r"\bissue \d+|SPEC §", read(name)), name


def test_eval_help_names_no_path_that_does_not_exist():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    description = sub.description
    assert "~/.cache" not in description and "runs/demo/" not in description and "SPEC §" not in description
    examples = [shlex.split(line) for line in description.splitlines() if line.strip().startswith("flame ")]
    assert len(examples) == 2
    problems = command_problems("```\n" + "\n".join(shlex.join(e) for e in examples) + "\n```\n")
    assert problems == []


BAD_DOC = """## Train on GPUs: planted errors

```bash
flame embed --manifest m --out c --no-such-flag
flame train --config configs/demo-cpu.toml optim.lrr=1
accelerate launch -m stage1_embed_text --manifest m --out c --llm mistralai/Mistral-Nemo-Base-2407 --layer 38
python bench/no_such_script.py
```

```python
import flame_pipeline
model = flame_pipeline.load("runs/my/train/model"
```

Set `data.modes=stream` or `train.batch_size=many`, or `train.epoch`; see `configs/nope.toml` and `pipeline/app/`.
"""


def test_each_check_finds_its_planted_error():
    commands = command_problems(BAD_DOC)
    assert len(commands) == 2
    assert "unrecognized arguments: --no-such-flag" in commands[0]
    assert "unknown key optim.lrr" in commands[1]
    overrides = override_problems(BAD_DOC)
    assert [p.split(":")[0] for p in overrides] == ["optim.lrr=1", "data.modes=stream", "train.batch_size=many",
                                                    "train.epoch"]
    assert path_problems(BAD_DOC) == ["bench/no_such_script.py: no such file or folder in the repository",
                                      "configs/nope.toml: no such file or folder in the repository",
                                      "pipeline/app/: no such file or folder in the repository"]
    models = official_model_problems(BAD_DOC)
    assert models[0].startswith("mistralai/Mistral-Nemo-Base-2407: the official LLM is mistralai/Mistral-Nemo-Instruct")
    assert any("--llm mistralai/Mistral-Nemo-Base-2407" in p for p in models)
    assert any("--layer 38, the recipe's is 39" in p for p in models)
    assert official_model_problems("no recipe here") == ["no section '## Train on GPUs'"]
    assert python_problems(BAD_DOC) == ["python block line 2: '(' was never closed"]


def test_shell_commands_split_and_map_to_flame():
    block = "A=1 flame eval --model m \\\n  --benchmark emoji --data d --out o  # a comment\nsource x && .venv/bin/flame --help\n"
    assert shell_commands(block) == [["flame", "eval", "--model", "m", "--benchmark", "emoji", "--data", "d", "--out",
                                      "o"], ["source", "x"], [".venv/bin/flame", "--help"]]
    assert flame_argv(["accelerate", "launch", "--num_processes", "8", "stage2_train_vision/train.py", "--config",
                       "c"]) == ["train", "--config", "c"]
    assert flame_argv([".venv-vllm/bin/python", "-m", "stage1_embed_text", "--manifest", "m"]) == [
        "embed", "--manifest", "m"]
    assert flame_argv(["python", "bench/gpu_check.py"]) is None


def test_readme_demo_block_is_what_the_demo_run_measured():
    """The README's demo numbers are rendered from bench/results/demo.json (a demo run's report), never typed."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "demo_readme.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
