"""The tree is the map: layers import one way, no module imports itself back, modules stay short.

Layers of ``fastpo.engine`` (``fastpo.kernels`` below them all)::

    kernels  <-  losses  <-  data  <-  model  <-  online  <-  train
                    ^
                    +------  integrations (kernels and losses only)

``errors`` and ``_extras`` at the engine root may be imported by every engine layer. Every import
counts, at module level or inside a function (a lazy import hides a dependency, it does not
remove it), ``TYPE_CHECKING`` blocks included. Read from the source, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastpo.kernels": ROOT / "kernels", "fastpo.engine": ROOT / "engine"}
MAX_LINES = 400

# what each layer may import (besides itself); "root" = fastpo.engine's own modules
# (errors, _extras, the package)
ALLOWED = {
    "kernels": set(),
    "root": set(),
    "losses": {"kernels", "root"},
    "data": {"kernels", "losses", "root"},
    "model": {"kernels", "losses", "data", "root"},
    "online": {"kernels", "losses", "data", "model", "root"},
    "integrations": {"kernels", "losses", "root"},
    "train": {"kernels", "losses", "data", "model", "online", "root"},
}
ENGINE_LAYERS = ("losses", "data", "model", "online", "integrations", "train")

def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of fastpo.kernels and fastpo.engine."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fastpo modules ``name`` imports (relative imports resolved; ``from package import
    submodule`` counted as the submodule)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # fastpo.kernels.ops.x -> fastpo.kernels.ops
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> str:
    parts = name.split(".")
    if parts[1] == "kernels":
        return "kernels"
    if len(parts) > 2 and parts[2] in ENGINE_LAYERS:
        return parts[2]
    return "root"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer(target) != layer(name) and layer(target) not in ALLOWED[layer(name)]:
                bad.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def long_modules() -> dict[str, int]:
    return {str(path.relative_to(ROOT)): n for path in modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}


def test_the_graph_is_read_from_the_real_tree():
    edges = graph()
    assert "fastpo.engine.losses.registry" in edges["fastpo.engine.losses"]
    assert "fastpo.engine.data.batch" in edges["fastpo.engine.train.loop"]
    assert "fastpo.engine.data.segments" in edges["fastpo.engine.model.attention"]
    # from . import pairwise
    assert "fastpo.engine.losses.pairwise" in edges["fastpo.engine.losses.registry"]


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_layers_import_one_way():
    assert upward_imports(graph()) == []


def test_the_checks_catch_what_they_look_for():
    edges = {"fastpo.engine.data.batch": {"fastpo.engine.model.attention"},
             "fastpo.engine.model.attention": {"fastpo.engine.data.batch"},
             "fastpo.engine.losses.registry": {"fastpo.engine.train.config"},
             "fastpo.kernels.ops": {"fastpo.engine.errors"}}
    assert cycles(edges) == [["fastpo.engine.data.batch", "fastpo.engine.model.attention"]]
    assert upward_imports(edges) == [
        "fastpo.engine.data.batch (data) imports fastpo.engine.model.attention (model)",
        "fastpo.engine.losses.registry (losses) imports fastpo.engine.train.config (train)",
        "fastpo.kernels.ops (kernels) imports fastpo.engine.errors (root)",
    ]


def test_modules_stay_short():
    over = long_modules()
    assert over == {}, f"over {MAX_LINES} lines (split by idea): {over}"
