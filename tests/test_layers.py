"""The package reads top-down: imports run one way through the layers, with no cycle.

The import graph is built from the source (``ast``), so a violation fails here before anything runs.
Layers, lowest first (a module may import its own layer and the ones below):

0. base      ``shapeflow`` (the package), ``fileio``, ``config``
1. geometry  ``geometry/*`` (numpy only, no torch), ``metrics``, ``render``
2. nn        ``nn/*``, ``sparse/*`` (the sparse-voxel engine), ``flow``, ``sampling``, ``checkpoint``
3. models    ``models/*``
4. data      ``data/*``, ``decode``
5. train     ``train/*``
6. app       ``generate``, ``evaluate``, ``demo``, ``app/*`` (the web app)
7. cli       ``cli``, ``commands/*``, ``__main__``

Imports inside functions are allowed for shapeflow modules only in the cli layer (they keep
``shapeflow --help`` fast) or with a ``# lazy: <reason>`` comment on the line (an optional or
version-dependent module); an import inside a function that only dodges a cycle is an error. Imports
under ``if TYPE_CHECKING:`` are type hints and do not count. The ruff configuration (``ruff.toml`` files
per layer folder) enforces the same bans at lint time; :func:`test_ruff_bans_follow_the_layers` keeps it
in step with the table here.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "shapeflow"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("shapeflow", "shapeflow.fileio", "shapeflow.config")),
    ("geometry", ("shapeflow.geometry", "shapeflow.metrics", "shapeflow.render")),
    ("nn", ("shapeflow.nn", "shapeflow.sparse", "shapeflow.flow", "shapeflow.sampling", "shapeflow.checkpoint")),
    ("models", ("shapeflow.models",)),
    ("data", ("shapeflow.data", "shapeflow.decode")),
    ("train", ("shapeflow.train",)),
    ("app", ("shapeflow.generate", "shapeflow.evaluate", "shapeflow.demo", "shapeflow.app")),
    ("cli", ("shapeflow.cli", "shapeflow.commands", "shapeflow.__main__")),
]


def layer_of(module: str) -> int:
    """Index of the layer of a dotted module name: the longest matching prefix wins."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = i, len(p)
    assert best is not None, f"{module} is in no layer"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported shapeflow module, line, inside a function)`` for every import of a shapeflow module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_func = {c.lineno for f in funcs for c in ast.walk(f) if isinstance(c, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # "from shapeflow.models import pretrained" may name a submodule: count the submodule then
            names = []
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.append(sub if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                             or (SRC.parent / Path(*sub.split(".")) / "__init__.py").exists() else base)
        else:
            continue
        for name in names:
            if name == "shapeflow" or name.startswith("shapeflow."):
                out.append((name, node.lineno, node.lineno in in_func))
    return out


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        g[module_name(path)] = {name for name, _, _ in imports(path)}
    return g


def test_every_module_is_in_a_layer():
    for path in SRC.rglob("*.py"):
        layer_of(module_name(path))


def test_imports_follow_the_layer_order():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        for name, line, _ in imports(path):
            if layer_of(name) > layer_of(me):
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {me} ({LAYERS[layer_of(me)][0]}) imports "
                           f"{name} ({LAYERS[layer_of(name)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    # implicit edges to parent packages are not counted: importing a.b runs a/__init__, which may import a.c
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n not in g:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_of_shapeflow_only_where_they_belong():
    bad = []
    cli = layer_of("shapeflow.cli")
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in sorted({line for _, line, in_func in imports(path) if in_func}):
            if layer_of(me) != cli and "# lazy:" not in lines[line - 1]:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {lines[line - 1].strip()}")
    assert not bad, "imports inside functions (move them to the top, or say why with '# lazy:'):\n" + "\n".join(bad)


def test_geometry_is_torch_free():
    for path in sorted((SRC / "geometry").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m == "torch" or m.startswith("torch.") for m in mods), f"{path}: imports torch"


def test_ruff_bans_follow_the_layers():
    """Each layer folder's ruff.toml bans exactly the shapeflow packages of the layers above it."""
    for folder in ("geometry", "nn", "sparse", "models", "data", "train"):
        cfg = tomllib.loads((SRC / folder / "ruff.toml").read_text(encoding="utf-8"))
        banned = set(cfg["lint"]["flake8-tidy-imports"]["banned-api"])
        mine = layer_of(f"shapeflow.{folder}")
        above = {p for i, (_, prefixes) in enumerate(LAYERS) if i > mine for p in prefixes} - {"shapeflow.__main__"}
        assert banned >= above, f"{folder}/ruff.toml does not ban {sorted(above - banned)}"
        below = {p for i, (_, prefixes) in enumerate(LAYERS) if i <= mine for p in prefixes}
        assert not banned & below, f"{folder}/ruff.toml bans its own or a lower layer: {sorted(banned & below)}"
