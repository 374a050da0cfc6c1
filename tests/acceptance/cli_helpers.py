"""Run the installed ``outbox`` console script in a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OUTBOX = str(Path(sys.executable).with_name("outbox"))


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SMTP_URL")}
    env.update(overrides)
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTBOX, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [OUTBOX, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
