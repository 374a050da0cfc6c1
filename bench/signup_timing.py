"""Does a signup answer take as long for a registered address as for a new one?

Starts `outbox web` on a scratch database, then alternates POST /users/register for a new
address and for one already registered, N times each, over real HTTP, and prints the medians
and their difference. A measurement for the notes, not a test: timings on a shared machine are
noisy, so the two kinds are interleaved and compared within one run.

    .venv/bin/python -m bench.signup_timing [--requests 200] [--admin-url postgresql://...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench.harness import create_database, drop_database, free_port, migrate_service

OUTBOX = str(Path(sys.executable).with_name("outbox"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    name = f"outbox_timing_{uuid.uuid4().hex[:8]}"
    create_database(args.admin_url, name)
    db_url = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
    port = free_port()
    server = None
    try:
        migrate_service(db_url)
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "SECRET_KEY": "timing",
            "BASE_URL": "http://127.0.0.1:8000",
            "RATE_LIMIT_PER_IP": "off",
            "RATE_LIMIT_PER_EMAIL": "off",
        }
        server = subprocess.Popen(
            [OUTBOX, "web", "--port", str(port)], env=env, stderr=subprocess.DEVNULL
        )
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(100):
                try:
                    client.get("/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            password = "correct horse battery"
            client.post(
                "/users/register", json={"email": "known@example.com", "password": password}
            )
            for n in range(10):  # warm-up
                client.post(
                    "/users/register", json={"email": f"w{n}@example.com", "password": password}
                )
            new: list[float] = []
            known: list[float] = []
            for n in range(args.requests):
                for email, bucket in ((f"new{n}@example.com", new), ("known@example.com", known)):
                    started = time.perf_counter()
                    answer = client.post(
                        "/users/register", json={"email": email, "password": password}
                    )
                    bucket.append((time.perf_counter() - started) * 1000)
                    assert answer.status_code == 202, answer.text
        new_median, known_median = statistics.median(new), statistics.median(known)
        print(f"requests per kind: {args.requests}")
        print(f"median new address:        {new_median:7.2f} ms")
        print(f"median registered address: {known_median:7.2f} ms")
        print(
            f"difference (registered - new): {known_median - new_median:+.2f} ms "
            f"({(known_median - new_median) / new_median:+.1%})"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        drop_database(args.admin_url, name)


if __name__ == "__main__":
    main()
