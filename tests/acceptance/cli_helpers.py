"""Run the installed ``outbox`` console script in a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


def wait_healthy(base: str, proc: subprocess.Popen[str], *, timeout: float) -> None:
    """Wait until ``base``/healthz answers 200; fail at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited early: {proc.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{base} did not answer within {timeout:.0f} s")
        time.sleep(0.2)
