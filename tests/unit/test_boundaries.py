"""`outbox` is a library that knows nothing of the signup app: it must not import `web`, except
in the two composition roots (`outbox web`, `outbox dev`), lazily inside the command."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSITION_ROOTS = {"outbox/cli.py", "outbox/dev.py"}


def _web_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level?) of every import of the ``web`` package in ``path``."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        if any(name == "web" or name.startswith("web.") for name in names):
            found.append((node.lineno, id(node) in module_level))
    return found


def test_boundaries_outbox_does_not_import_web() -> None:
    offenders = []
    for path in sorted((ROOT / "outbox").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for line, top_level in _web_imports(path):
            if rel not in COMPOSITION_ROOTS or top_level:
                offenders.append(f"{rel}:{line}")
    assert offenders == []
