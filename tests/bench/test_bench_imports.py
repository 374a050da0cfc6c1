"""What the bench imports: no cycle among its own modules, and only named parts of the library.

Read from the source (module-level and lazy imports alike), so nothing here needs the peers'
environment. The library allow-list is the bench's whole coupling to ``outbox`` beyond the
public API: a library change that moves one of these names shows up here, not halfway through
a benchmark run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import outbox

BENCH = Path(__file__).resolve().parents[2] / "bench"
LIBRARY = Path(outbox.__file__).parent

# Beyond the public API (``outbox.__all__``, its public modules such as ``outbox.smtp``
# included), the library modules the bench may import from, with the names it may take (None:
# the module itself), and why it needs them.
LIBRARY_ALLOWED: dict[str, set[str] | None] = {
    # the SQL ceiling (item 3) and the NOTIFY cost (item 7) run the library's own statements
    "outbox.queries": None,
    # the latency producer and item 1's seed apps use the engine the app uses (web/app.py)
    "outbox.db": {"create_engine"},
}


def _imports(path: Path) -> Iterator[tuple[str, set[str] | None]]:
    """(module, names imported from it, or None for a plain ``import module``); ``from outbox
    import submodule`` counts as importing the submodule (unless the name is public API)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {alias.name for alias in node.names}
            if node.module == "outbox":
                submodules = {
                    n for n in names - set(outbox.__all__) if (LIBRARY / f"{n}.py").exists()
                }
                for name in submodules:
                    names.discard(name)
                    yield f"outbox.{name}", None
            yield node.module, names


def _bench_graph(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(root.glob("*.py")):
        deps = graph.setdefault(path.stem, set())
        for module, names in _imports(path):
            if module.startswith("bench."):
                deps.add(module.split(".")[1])
            elif module == "bench" and names:
                deps |= names
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        # Each cycle once: found from its smallest module, through larger ones only.
        for dep in sorted(graph.get(node, ())):
            if dep == trail[0]:
                found.append([*trail, dep])
            elif dep > trail[0] and dep not in trail:
                visit(dep, [*trail, dep])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_bench_modules_import_no_cycle() -> None:
    graph = _bench_graph(BENCH)
    assert {"ours", "peers"} <= set(graph)  # the files were found
    assert _cycles(graph) == []


def test_bench_imports_only_the_named_parts_of_the_library() -> None:
    outside = []
    for path in sorted(BENCH.glob("*.py")):
        for module, names in _imports(path):
            if module == "outbox":
                if names is not None and not names <= set(outbox.__all__):
                    outside.append(f"{path.name}: from outbox import {sorted(names)}")
                continue
            if not module.startswith("outbox.") or module.split(".")[1] in outbox.__all__:
                continue  # not the library, or one of its public modules
            if module not in LIBRARY_ALLOWED:
                outside.append(f"{path.name}: {module}")
                continue
            allowed = LIBRARY_ALLOWED[module]
            if allowed is not None and names is not None and not names <= allowed:
                outside.append(f"{path.name}: from {module} import {sorted(names - allowed)}")
    assert outside == []
