"""schemathesis against a live `outbox web` (uvicorn on 127.0.0.1) and its /openapi.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.acceptance.cli_helpers import cli_env, start_cli, wait_healthy
from web.capture import free_port

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
# Every check about the server's own answers. Left out: positive_data_acceptance, because
# "format: email" admits addresses the standard's validator rightly refuses (no dot in the
# domain, special-use names), and the checks about auth and resources this API does not have.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
    ]
)


def test_openapi_schemathesis_finds_no_failure(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = cli_env(
        DATABASE_URL=db_url,
        SECRET_KEY="schemathesis",
        BASE_URL="http://127.0.0.1:8000",
        RATE_LIMIT_PER_IP="off",  # let every generated request reach the real code
        RATE_LIMIT_PER_EMAIL="off",
    )
    server = start_cli("web", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server, timeout=30)
        result = subprocess.run(
            [
                SCHEMATHESIS,
                "run",
                f"{base}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                "60",
                "--seed",
                "1",
                "--workers",
                "2",
                "--no-color",
            ],
            cwd=tmp_path,  # its example database and reports stay out of the repository
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout.lower()
