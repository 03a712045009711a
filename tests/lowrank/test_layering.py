"""The import graph of the package: no cycles, and every arrow runs down the layers (docs/layout.md).

Every module under ``src/lowrank/`` and ``kernels/`` (installed as ``lowrank.kernels``) is parsed with ``ast``;
imports inside functions count, imports under ``if TYPE_CHECKING:`` do not (they never run). Importing
``a.b.c`` also runs the ``__init__`` of ``a.b``: those implicit arrows count too. ``lowrank/__init__.py`` is
lazy, so ``from lowrank import name`` is an arrow to the module its ``_EXPORTS`` table names.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: the layers, top to bottom: a module may import modules of its own layer or of a layer below
LAYERS = ("app", "train", "models/io", "nn", "ops", "kernels/ext", "format")

#: every module's layer. A new module fails the test until it is added here.
LAYER_OF = {
    # the package face, the command line, reports
    "lowrank": "app",
    "lowrank.__main__": "app",
    "lowrank.cli": "app",
    "lowrank.cli.commands": "app",
    "lowrank.cli.loading": "app",
    "lowrank.cli.parser": "app",
    "lowrank.env": "app",
    "lowrank.report": "app",
    # the training loop and evaluation
    "lowrank.train": "train",
    "lowrank.evaluate": "train",
    "lowrank.distributed": "train",
    # models, files, data, optimizer, loss
    "lowrank.models": "models/io",
    "lowrank.adapters": "models/io",
    "lowrank.loading": "models/io",
    "lowrank.saving": "models/io",
    "lowrank.adapters.errors": "models/io",
    "lowrank.adapters.merge": "models/io",
    "lowrank.adapters.peft_format": "models/io",
    "lowrank.adapters.quantized": "models/io",
    "lowrank.peft_bridge": "models/io",
    "lowrank.freeze": "models/io",
    "lowrank.optim": "models/io",
    "lowrank.loss": "models/io",
    "lowrank.data": "models/io",
    "lowrank.data.make_datasets": "models/io",
    # modules
    "lowrank.nn": "nn",
    "lowrank.nn.linear_nf4": "nn",
    "lowrank.nn.lora": "nn",
    # autograd ops, the dispatch point, the public 4-bit weight API
    "lowrank.ops": "ops",
    "lowrank.ops.dispatch": "ops",
    "lowrank.ops.lora": "ops",
    "lowrank.ops.lora_multi": "ops",
    "lowrank.ops.nf4": "ops",
    "lowrank.ops.spec": "ops",
    "lowrank.nf4": "ops",
    # Triton kernels and the C++ extension's loader
    "lowrank.kernels": "kernels/ext",
    "lowrank.kernels.dropout": "kernels/ext",
    "lowrank.kernels.lora_matmul": "kernels/ext",
    "lowrank.kernels.nf4": "kernels/ext",
    "lowrank._ext": "kernels/ext",
    # the bottom: formats and the shared file and dtype homes (no lowrank imports)
    "lowrank.dtypes": "format",
    "lowrank.files": "format",
    "lowrank.config": "format",
    "lowrank.nf4_format": "format",
    "lowrank.trackers": "format",  # stdlib only at import (each tracker is imported when asked for); config uses it
}

#: cycles known to exist (none: a new cycle fails the test; a listed one that disappears must be deleted here)
KNOWN_CYCLES: list[frozenset[str]] = []


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    parts = parts[1:] if parts[0] == "src" else ["lowrank", *parts]  # kernels/ installs as lowrank.kernels
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    files = [*(REPO / "src" / "lowrank").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
    return {module_name(f): f for f in sorted(files)}


def lazy_exports() -> dict[str, str]:
    """``_EXPORTS`` of lowrank/__init__.py: name -> module."""
    tree = ast.parse((REPO / "src" / "lowrank" / "__init__.py").read_text())
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) else None)
        )
        if isinstance(target, ast.Name) and target.id == "_EXPORTS":
            return ast.literal_eval(node.value)
    raise AssertionError("src/lowrank/__init__.py has no _EXPORTS table")


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imports_of(name: str, path: Path, modules: dict[str, Path], exports: dict[str, str]) -> set[str]:
    """The project modules ``name`` imports when it runs (any function included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base == "lowrank":  # the lazy package face: the module that defines the name
                    found.add(exports.get(alias.name, "lowrank"))
                else:
                    found.add(base)
    deps = set()
    ancestors = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
    for dep in found:
        if dep not in modules:
            continue  # not ours
        parts = dep.split(".")
        for i in range(2, len(parts) + 1):  # the module and the __init__ of each package above it
            deps.add(".".join(parts[:i]))
    return {d for d in deps if d not in ancestors and d != "lowrank"}


def import_graph() -> dict[str, set[str]]:
    modules, exports = source_modules(), lazy_exports()
    return {name: imports_of(name, path, modules, exports) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unknown = sorted(set(source_modules()) - set(LAYER_OF))
    assert not unknown, (
        f"modules without a layer: {unknown}; add each to LAYER_OF in tests/lowrank/test_layering.py "
        f"(one of {LAYERS}) and to docs/layout.md"
    )
    stale = sorted(set(LAYER_OF) - set(source_modules()))
    assert not stale, f"LAYER_OF names modules that no longer exist: {stale}; remove them"
    assert set(LAYER_OF.values()) <= set(LAYERS)


def test_arrows_run_downward():
    graph = import_graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(
        f"{a} ({LAYER_OF[a]}) imports {b} ({LAYER_OF[b]})"
        for a, deps in graph.items()
        for b in deps
        if a in LAYER_OF and b in LAYER_OF and rank[LAYER_OF[b]] < rank[LAYER_OF[a]]
    )
    assert not upward, "imports against the layer order " + " -> ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_no_import_cycles():
    found = cycles(import_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles (imports inside functions included): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_the_checker_sees_function_level_and_implicit_package_imports(tmp_path):
    """The graph code itself: a cycle hidden in a function, a parent package's __init__, TYPE_CHECKING."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lowrank import train\n"
        "def f():\n    from lowrank.ops.dispatch import choose\n"
        "from lowrank import prepare_model, nf4\n"
    )
    module = tmp_path / "m.py"
    module.write_text(source)
    modules = {m: module for m in ("lowrank", "lowrank.ops", "lowrank.ops.dispatch", "lowrank.nf4", "lowrank.models")}
    deps = imports_of("lowrank.x", module, modules, {"prepare_model": "lowrank.models", "train": "lowrank.train"})
    assert deps == {"lowrank.ops", "lowrank.ops.dispatch", "lowrank.nf4", "lowrank.models"}
