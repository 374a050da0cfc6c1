"""`outbox` is a library that knows nothing of the signup app: no module of it imports `web`,
at module level or lazily inside a function. The app reaches the `outbox` CLI only through the
`outbox.commands` entry points it declares."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def web_imports(path: Path) -> list[int]:
    """The line of every import of the ``web`` package in ``path``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        if any(name == "web" or name.startswith("web.") for name in names):
            found.append(node.lineno)
    return found


def test_boundaries_outbox_never_imports_web() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "outbox").rglob("*.py"))
        for line in web_imports(path)
    ]
    assert offenders == []


def test_boundaries_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from web.app import create_app\n    import web\n")
    assert web_imports(sample) == [2, 3]
