"""The package layers (README "Layout"): every import of the project's own code points down; modules stay small.

From the bottom: ``pipeline`` (the shared core) < ``manifests`` < ``stage1_embed_text`` < ``stage2_train_vision``
< ``eval`` < ``flame_pipeline`` (the public API, the ``flame`` command, demo, inspect, import). A module may import its own layer
and any layer below; imports inside functions count too, and are the exception (only where an optional or
torch-heavy dependency must not load for ``flame --help``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("pipeline", "manifests", "stage1_embed_text", "stage2_train_vision", "eval", "flame_pipeline")
# Each defers torch (or vLLM/transformers) until a subcommand runs, so `flame --help` and `import flame_pipeline`
# stay light: the flame CLI's subcommand runners (embed, train, eval, demo, import x3, inspect, index, search,
# eval's checkpoint-file import) and flame_pipeline's lazy `load` / `FlameModel`.
MAX_FUNCTION_LOCAL_IMPORTS = 13


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


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_small():
    """One job per file and a function you can read on one screen (issue 15); bench/ scripts are exempt."""
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
