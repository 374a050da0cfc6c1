"""The README's in-process recipe, run as written (only its two URLs point at our servers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg

from outbox.settings import libpq_url
from web.capture import CaptureServer

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- in-process recipe: tests/integration/test_readme.py runs this block -->"


def recipe() -> str:
    text = README.read_text()
    after = text[text.index(MARKER) + len(MARKER) :]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match is not None
    return match.group(1)


def test_readme_in_process_recipe_delivers_mail(db_url: str, smtp_server: CaptureServer) -> None:
    code = recipe()
    assert "postgresql+psycopg://app@db.example/app" in code and "smtp://mail.example:587" in code
    code = code.replace("postgresql+psycopg://app@db.example/app", db_url).replace(
        "smtp://mail.example:587", smtp_server.url
    )
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload) VALUES ('email', "
            """'{"to": "reader@example.test", "subject": "From the README", "text": "hi"}')"""
        )

    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert run.returncode == 0, run.stderr
    assert "sent=1" in run.stdout
    [mail] = smtp_server.mails
    assert mail.message["Subject"] == "From the README"
