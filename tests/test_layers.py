"""The import contract: layers import downwards only, and no module imports itself round a cycle.

Every ``import``/``from ... import`` of ``pipeline`` and ``models`` in the library counts,
wherever it stands: at the top of a module or inside a function (lazy). Only imports under
``if TYPE_CHECKING:`` are left out: they never run (annotations only). The layers follow the data flow (see README "Code layout")::

    core → reading → tiles, synthetic → models → patch → slide_model → analysis
         → clinical, outputs, evaluation, training → batch → review → command-line entry points

A module may import its own layer or any layer below; importing a higher layer fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: (module prefix, layer); the longest matching prefix decides. Lower numbers are lower layers.
LAYERS: list[tuple[str, int]] = [
    ("pipeline", 0),  # the package itself: version and the demo label only
    ("pipeline.core", 0),
    ("pipeline.reading", 1),
    ("pipeline.tiles", 2),
    ("pipeline.synthetic", 2),
    ("models", 3),
    ("pipeline.patch", 4),
    ("pipeline.slide_model", 5),
    ("pipeline.analysis", 6),
    ("pipeline.result", 6),
    ("pipeline.clinical", 7),
    ("pipeline.outputs", 7),
    ("pipeline.evaluation", 7),
    ("pipeline.training", 7),
    ("pipeline.batch", 8),
    ("pipeline.review", 9),
    ("pipeline.evaluate", 10),
    ("pipeline.doctor", 10),
    ("pipeline.demo", 10),
    ("pipeline.__main__", 10),
    ("pipeline.schema", 10),
]


def layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"module {module} has no layer in tests/test_layers.py: add it to LAYERS")
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    files = sorted((REPO / "pipeline").rglob("*.py")) + sorted((REPO / "models").rglob("*.py"))
    return {module_name(f): f for f in files if "__pycache__" not in f.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """Every project module ``path`` imports (resolved to the longest known module name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            if n.split(".")[0] in ("pipeline", "models"):
                r = resolve(n)
                if r is not None and r != module:
                    found.add(r)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = library_modules()
    known = set(mods)
    return {m: imported_modules(p, m, known) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in library_modules():
        layer_of(m)


def test_imports_go_downwards_only():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in import_graph().items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m) and not (d == "pipeline" or m.startswith(d + "."))
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package's __init__ re-exporting its own submodules is not a cycle of the data flow
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "cycle_graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_cycle_finder_finds_cycles(cycle_graph, expected):
    assert _cycles(cycle_graph) == expected


def test_an_upward_import_is_caught(tmp_path):
    """The checker itself: a lazy upward import in a function body is found."""
    f = tmp_path / "x.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.outputs import report\n"
        "def f():\n    from pipeline.batch.runner import run_batch\n"
    )
    deps = imported_modules(
        f, "pipeline.reading.x", {"pipeline.batch.runner", "pipeline.batch", "pipeline", "pipeline.outputs.report"}
    )
    assert deps == {"pipeline.batch.runner"}
    assert layer_of("pipeline.batch.runner") > layer_of("pipeline.reading.slide")
