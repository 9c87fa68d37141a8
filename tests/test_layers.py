"""The layout is the architecture: hybrid_ds's imports point down the layers and never form a cycle.

Every ``import``/``from ... import`` of a hybrid_ds module is read from the source (top-level and
function-local alike, so a local import cannot hide a cycle) and checked against ``LAYERS``: a
module may import its own package's modules and the packages of lower layers, nothing above or
beside it. docs/architecture.md describes the same layers.
"""

from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hybrid_ds")

# Bottom to top. Packages on one line are siblings: they may not import each other.
LAYERS = [
    ["assets"],
    ["config"],
    ["data", "models", "optim", "rewards"],
    ["engine"],
    ["rollout", "reference"],
    ["algorithms"],
    ["run"],
    ["train", "report", "checkpoint"],  # entry modules: python -m hybrid_ds.<name>
]
LEVEL = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
MAX_LINES = 500


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The hybrid_ds modules ``name`` imports (resolved to modules, not names inside them)."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] == "hybrid_ds" and t != "hybrid_ds" and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[1]


def test_every_package_has_a_layer():
    tops = {_top(m) for m in MODULES if m != "hybrid_ds"}
    assert tops <= set(LEVEL), f"place these in LAYERS (and docs/architecture.md): {sorted(tops - set(LEVEL))}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, deps in graph.items():
        if mod == "hybrid_ds":
            continue
        for dep in deps:
            a, b = _top(mod), _top(dep)
            if a != b and LEVEL[b] >= LEVEL[a]:
                wrong.append(f"{mod} imports {dep} ({b} is {'beside' if LEVEL[a] == LEVEL[b] else 'above'} {a})")
    return sorted(wrong)


def test_imports_point_down():
    wrong = _upward(GRAPH)
    assert not wrong, "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_import_cycle():
    cycle = _cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_cycles_and_upward_imports():
    """The two checks above can fail: an injected upward edge and an injected cycle are found."""
    toy = {"hybrid_ds.config.a": {"hybrid_ds.run.b"}, "hybrid_ds.run.b": set()}
    assert _upward(toy) == ["hybrid_ds.config.a imports hybrid_ds.run.b (run is above config)"]
    assert _cycle(toy) == []
    toy["hybrid_ds.run.b"].add("hybrid_ds.config.a")
    assert set(_cycle(toy)) == {"hybrid_ds.config.a", "hybrid_ds.run.b"}
    assert _upward({"hybrid_ds.data.x": {"hybrid_ds.models.y"}}) == [
        "hybrid_ds.data.x imports hybrid_ds.models.y (models is beside data)"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    n = sum(1 for _ in open(MODULES[name]))
    assert n <= MAX_LINES, f"{MODULES[name]}: {n} lines (split it by responsibility, <= {MAX_LINES})"


def test_architecture_doc_names_every_module_and_only_real_ones():
    """docs/architecture.md matches the code: every module path it names exists, and it names
    every module of the package (entry points, ``__init__`` and ``__main__`` aside)."""
    import re

    doc = open(os.path.join(os.path.dirname(PKG), "docs", "architecture.md")).read()
    named = set(re.findall(r"`(hybrid_ds/[\w/]+\.py)`", doc))
    root = os.path.dirname(PKG)
    missing = sorted(p for p in named if not os.path.isfile(os.path.join(root, p)))
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    real = {os.path.relpath(p, root) for p in MODULES.values()
            if os.path.basename(p) not in ("__init__.py", "__main__.py")}
    unnamed = sorted(real - named)
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"
    for pkg in {_top(m) for m in MODULES if m != "hybrid_ds"}:
        assert f"`{pkg}" in doc, f"docs/architecture.md does not describe {pkg}"
