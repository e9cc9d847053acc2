"""The package layers (README "Layout"): the folders are the architecture, every import points down, folders and
modules stay small enough to read.

The layers are an ordered list of folders, from the bottom: ``pipeline`` (the shared core: the cache format in
``pipeline/cache``, errors, atomic writes, assets, machine facts) < ``manifests`` < ``stage1_embed_text`` <
``stage2_train_vision`` < ``eval`` < ``flame_pipeline`` (the ``flame`` command, demo, inspect, imports of FLAME's
released artifacts). A module may import its own layer and any layer below; imports inside functions count too,
and are the exception (only where an optional or torch-heavy dependency must not load for ``flame --help``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("pipeline", "manifests", "stage1_embed_text", "stage2_train_vision", "eval", "flame_pipeline")
"""The layer folders, bottom first."""
# Each defers torch (or vLLM/transformers) until a subcommand runs, so `flame --help` and `import flame_pipeline`
# stay light: the flame CLI's subcommand runners (embed, train, eval, demo, import x3, inspect, index, search,
# eval's checkpoint-file import) and flame_pipeline's lazy `load` / `FlameModel`.
MAX_FUNCTION_LOCAL_IMPORTS = 13
MAX_MODULES_PER_FOLDER = 12
"""Modules directly in one folder (``__init__.py`` and ``__main__.py`` not counted); more means a concept wants its
own sub-package."""
NOT_LAYERS = {"tests", "bench", "configs", "docs", "scripts"}


def _layer(module: str) -> int | None:
    """Index in LAYERS of a dotted module name of the project, else None (a third-party module)."""
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def _modules():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree: ast.Module):
    """(imported module, inside a function?) for every import statement."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, in_function
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield child.module, in_function
            yield from visit(child, inner)
    yield from visit(tree, False)


def test_the_layers_are_the_top_level_packages():
    """Every top-level Python package of the repository is a layer (nothing sits beside the ordered list)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_LAYERS
    assert packages == set(LAYERS)
    assert all((ROOT / layer / "__init__.py").is_file() for layer in LAYERS)


def test_no_folder_holds_more_than_a_dozen_modules():
    crowded = []
    for layer in LAYERS:
        for folder in [ROOT / layer, *(p.parent for p in (ROOT / layer).rglob("*/__init__.py"))]:
            modules = [p.name for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
            if len(modules) > MAX_MODULES_PER_FOLDER:
                crowded.append(f"{folder.relative_to(ROOT)}: {len(modules)} modules")
    assert crowded == []


def test_every_import_points_down_the_layers():
    upward = []
    for name, _, tree in _modules():
        mine = _layer(name)
        for target, _ in _imports(tree):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_function_local_imports_of_our_own_packages_are_the_exception():
    local = [f"{name} -> {target}" for name, _, tree in _modules() for target, inside in _imports(tree)
             if inside and _layer(target) is not None]
    assert len(local) <= MAX_FUNCTION_LOCAL_IMPORTS, "\n".join(local)


MAX_MODULE_LINES = 600  # one concept in one file beats a split made to meet a number
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_small():
    """A module holds one concept and a function fits on one screen (issues 15, 22); bench/ scripts are exempt."""
    big = []
    for name, path, tree in _modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{name}.{node.name}: {length} lines")
    assert big == []
