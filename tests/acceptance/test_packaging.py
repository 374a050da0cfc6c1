"""The two distributions as a user installs them: built wheels in fresh virtualenvs.

The library's wheel gives `import outbox` and the library commands with none of the web stack;
the signup app's wheel, installed on top, brings `outbox web` / `outbox dev` and everything they
need (templates, the service's migrations) without the repository beside it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import cli_env, wait_healthy
from web.capture import CaptureServer, free_port

ROOT = Path(__file__).resolve().parents[2]
APP_ONLY = {"starlette", "uvicorn", "pgserver", "aiosmtpd", "jinja2", "alembic", "argon2-cffi"}

pytestmark = pytest.mark.timeout(600)


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd="/",  # away from the checkout, whose folders Python would otherwise import
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Built from copies: an in-tree build leaves build/ folders (web/build/lib/web/...) behind.
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT / "outbox", src / "outbox", ignore=skip)
    shutil.copytree(ROOT / "web", src / "web", ignore=skip)  # migrations/ link followed
    shutil.copytree(ROOT / "migrations", src / "migrations", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    for project in (src, src / "web"):
        built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, project)
        assert built.returncode == 0, built.stderr
    found = {w.name.split("-")[0]: w for w in out.glob("*.whl")}
    assert set(found) == {"outbox", "outbox_signup"}
    return found


def new_venv(path: Path, *wheel_files: Path) -> Path:
    venv.create(path, with_pip=True)
    pip = run(
        path / "bin" / "python",
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        *wheel_files,
    )
    assert pip.returncode == 0, pip.stderr
    return path / "bin"


@pytest.fixture(scope="module")
def library_bin(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path]) -> Path:
    return new_venv(tmp_path_factory.mktemp("lib") / "venv", wheels["outbox"])


@pytest.fixture(scope="module")
def app_bin(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path]) -> Iterator[Path]:
    yield new_venv(
        tmp_path_factory.mktemp("app") / "venv", wheels["outbox"], wheels["outbox_signup"]
    )


def test_library_wheel_holds_only_the_outbox_package(wheels: dict[str, Path]) -> None:
    names = zipfile.ZipFile(wheels["outbox"]).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"outbox"}


def test_library_installs_without_the_web_stack(library_bin: Path) -> None:
    listed = run(library_bin / "python", "-m", "pip", "list", "--format=json")
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "outbox" in installed
    assert installed & APP_ONLY == set()
    assert run(library_bin / "python", "-c", "import web").returncode != 0


def test_library_commands_run_from_the_wheel(
    library_bin: Path, empty_db_url: str, smtp_server: CaptureServer
) -> None:
    env = cli_env(DATABASE_URL=empty_db_url, SMTP_URL=smtp_server.url, PATH="/usr/bin:/bin")
    outbox = library_bin / "outbox"
    migrated = run(outbox, "migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(libpq_url(empty_db_url)) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload) VALUES ('email', "
            """'{"to": "a@example.test", "subject": "s", "text": "t"}')"""
        )
    relayed = run(outbox, "relay", "--once", env=env)
    assert relayed.returncode == 0, relayed.stderr
    assert len(smtp_server.mails) == 1
    status = run(outbox, "status", "--json", env=env)
    assert json.loads(status.stdout)["sent"] == 1
    for command in ("dead", "purge --older-than 7d", "retry --all-dead"):
        done = run(outbox, *command.split(), env=env)
        assert done.returncode == 0, (command, done.stderr)


@pytest.mark.parametrize("command", ["web", "dev"])
def test_library_alone_says_in_one_line_how_to_get_the_app(library_bin: Path, command: str) -> None:
    result = run(library_bin / "outbox", command, env=cli_env(PATH="/usr/bin:/bin"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"outbox {command}: the signup app is not installed; from a checkout: pip install -e ./web"
    ]


def test_app_wheel_migrates_and_serves_without_the_repository(
    app_bin: Path, empty_db_url: str, tmp_path: Path
) -> None:
    env = cli_env(PATH="/usr/bin:/bin")
    migrate = run(
        app_bin / "python",
        "-c",
        f"from web import migrate; migrate.upgrade_url({empty_db_url!r})",
        env=env,
    )
    assert migrate.returncode == 0, migrate.stderr
    port = free_port()
    server = subprocess.Popen(
        [app_bin / "outbox", "web", "--port", str(port)],
        env={**env, "DATABASE_URL": empty_db_url, "SECRET_KEY": "k", "BASE_URL": "http://x.test"},
        cwd=tmp_path,  # nowhere near the repository
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, server, timeout=30)
        page = httpx.get(f"{base}/users/register")
        assert page.status_code == 200 and "<form" in page.text
    finally:
        server.terminate()
        server.wait(10)


def test_library_alone_says_the_dashboard_needs_its_extra(library_bin: Path) -> None:
    env = cli_env(PATH="/usr/bin:/bin", ADMIN_PASSWORD="pw", DATABASE_URL="postgresql://x@h/db")
    result = run(library_bin / "outbox", "admin", env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.endswith("pip install 'outbox[dashboard]'")
