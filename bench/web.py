"""Item 1: why the outbox exists. POST /users/register with a mail server that takes 1 s a mail.

Four servers, each one uvicorn process on 127.0.0.1 with its own scratch database and its own
slow SMTP sink (``bench.sink.Sink(delay=1.0)``: every mail is answered 1 s after its DATA):

- ``outbox``: this project, the real ``outbox web`` (rate limits off) and one ``outbox relay``;
- ``inline``: the seed's first version, the handler sends the mail before answering;
- ``celery``: the seed's second version, ``.delay()`` after the commit, a Celery worker (threads
  pool of 16) on RabbitMQ sends it;
- ``nomail``: the same handler sending nothing, the floor.

All four hash the password with ``web.passwords.hash_password`` (argon2id in a thread) and
write the user row in one transaction (``bench/signup_apps.py`` for the last three).

16 concurrent clients post unique addresses. Argon2id is CPU-bound (about 0.2 s of a 2-core
machine per hash), so with 16 clients in a closed loop every variant queues on the CPU and its
latency is mostly that queue, the same for all (Little's law: 16 clients / the rate). Two
windows per variant and run, therefore:

- *paced*: the 16 clients together offer half the floor's capacity (measured in the warm-up),
  each client waiting for its answer before its next request; p50 and p99 come from here;
- *saturated*: the 16 clients post back to back; requests/s (and its p99) come from here.

Variants are interleaved run by run (the order rotates). The outage window (--full): the same
paced load for ``outage_seconds`` against ``outbox`` and then ``celery``, RabbitMQ stopped with
``rabbitmqctl stop_app`` for 10 s in the middle of each; afterwards, a bounded wait for the
mails to drain, then users committed (rows), mails delivered (the sink's count) and the
difference, lost.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.harness import ROOT, Bench, Relays, connect, fetch_value, free_port, log, stop_processes
from bench.sink import Sink
from bench.stats import median, percentile

MAIL_DELAY_S = 1.0
CLIENTS = 16
OUTAGE_S = 10.0
DRAIN_BOUND_S = 30.0  # after an outage window, wait at most this long for the mails
PASSWORD = "correct horse battery staple"
LABELS = {
    "outbox": "(a) this project: outbox web + relay",
    "inline": "(b) seed v1: handler sends the mail",
    "celery": "(c) seed v2: Celery .delay() after commit",
    "nomail": "(d) no mail at all (floor)",
}
LOG_DIR = ROOT / "bench" / "results"


class Server:
    """One variant: its database, its slow sink, its uvicorn process (and relay or worker)."""

    def __init__(self, b: Bench, kind: str) -> None:
        self.kind = kind
        self.url = b.create_db(f"web_{kind}")
        self.sink = Sink(delay=MAIL_DELAY_S).start()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.relays: Relays | None = None
        self.logf = open(LOG_DIR / f"web-{kind}.log", "ab")
        env = {**os.environ, "BENCH_DATABASE_URL": self.url, "BENCH_SMTP_URL": self.sink.url}
        if kind == "outbox":
            env.update(
                DATABASE_URL=self.url,
                SECRET_KEY="bench",
                BASE_URL="http://127.0.0.1:8000",
                RATE_LIMIT_PER_IP="off",
                RATE_LIMIT_PER_EMAIL="off",
                SMTP_URL=self.sink.url,
                MAIL_FROM="noreply@example.com",
            )
            cmd = [sys.executable, "-m", "outbox", "web", "--port", str(self.port)]
            # Concurrency 32: a mail takes 1 s, so the relay delivers up to 32 a second.
            self.relays = Relays(self.url, self.sink.url, 1, concurrency=32, log_dir=LOG_DIR)
            self.relays.start()
        else:
            cmd = [sys.executable, "-m", "bench.signup_apps", kind, "--port", str(self.port)]
        if kind == "celery":
            env["BENCH_CELERY"] = "1"
            self._purge(env)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "bench.signup_apps",
                        "worker",
                        "-Q",
                        "bench_signup",
                        "--pool=threads",
                        "-c",
                        "16",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                        "-l",
                        "warning",
                        "-n",
                        f"signup{uuid.uuid4().hex[:6]}@%h",
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=self.logf,
                    stderr=self.logf,
                )
            )
        self.procs.append(
            subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.logf, stderr=self.logf)
        )
        self._wait_up()

    @staticmethod
    def _purge(env: dict[str, str]) -> None:
        os.environ["BENCH_CELERY"] = "1"
        from bench.signup_apps import QUEUE, celery_app

        with celery_app().connection_for_write() as conn:
            conn.default_channel.queue_declare(QUEUE, durable=True, auto_delete=False)
            conn.default_channel.queue_purge(QUEUE)

    def _wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{self.kind}: exited with {p.returncode}, see {LOG_DIR}")
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.kind} did not start")

    def users(self) -> int:
        with connect(self.url) as conn:
            return int(fetch_value(conn, "SELECT count(*) FROM users"))

    def queued(self) -> int | None:
        """Mails still waiting: outbox rows not sent, or messages in Celery's queue."""
        if self.kind == "outbox":
            with connect(self.url) as conn:
                return int(fetch_value(conn, "SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
        if self.kind == "celery":
            from bench.signup_apps import QUEUE, celery_app

            with celery_app().connection_for_write() as conn:
                ch = conn.default_channel
                return int(ch.queue_declare(QUEUE, passive=True).message_count)
        return None

    def wait_mails(self, n: int, timeout: float) -> int:
        self.sink.wait_count(n, timeout, every=0.25)
        return self.sink.count()

    def stop(self) -> None:
        stop_processes(self.procs)
        if self.relays is not None:
            self.relays.stop()
        self.sink.stop()
        self.logf.close()


# --- the load ----------------------------------------------------------------------------------


async def _load(
    base: str,
    seconds: float,
    rate: float | None,
    tag: str,
    during: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """16 clients for ``seconds``: back to back (``rate`` None) or together offering ``rate``
    requests/s. Returns latencies (ms) of the 2xx answers, errors, and answers per second."""
    lat: list[float] = []
    errors = 0
    kinds: Counter[str] = Counter()  # what the errors were: HTTP status or exception name
    interval = CLIENTS / rate if rate else 0.0
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        started = time.monotonic()
        end = started + seconds

        async def one_client(k: int) -> None:
            nonlocal errors
            due = started + (k * interval / CLIENTS if interval else 0.0)
            i = 0
            while due < end:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                email = f"{tag}-{k}-{i}-{uuid.uuid4().hex[:8]}@example.com"
                t0 = time.perf_counter()
                try:
                    answer = await client.post(
                        "/users/register", json={"email": email, "password": PASSWORD}
                    )
                    ok = answer.status_code == 202
                    if not ok:
                        kinds[str(answer.status_code)] += 1
                except httpx.HTTPError as exc:
                    ok = False
                    kinds[type(exc).__name__] += 1
                if ok:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1
                i += 1
                due = max(due + interval, time.monotonic())

        tasks = [asyncio.create_task(one_client(k)) for k in range(CLIENTS)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    return {"lat": lat, "errors": errors, "rps": len(lat) / elapsed, "error_kinds": dict(kinds)}


def load(
    base: str,
    seconds: float,
    rate: float | None,
    tag: str,
    during: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    return asyncio.run(_load(base, seconds, rate, tag, during))


# --- RabbitMQ outage ---------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def outage(s: Server, seconds: float, rate: float) -> dict[str, Any]:
    """Paced load for ``seconds``; RabbitMQ is stopped for OUTAGE_S from a quarter in."""
    users0, mails0 = s.users(), s.sink.count()
    window: dict[str, float] = {}

    async def during() -> None:
        await asyncio.sleep(seconds / 4)
        window["stopped"] = time.monotonic()
        await asyncio.to_thread(_rabbitmqctl, "stop_app")
        try:
            await asyncio.sleep(OUTAGE_S)
        finally:
            await asyncio.to_thread(_rabbitmqctl, "start_app")
            window["started"] = time.monotonic()

    try:
        result = load(s.base, seconds, rate, f"outage-{s.kind}", during)
    finally:  # whatever happened above: RabbitMQ must be running again
        _rabbitmqctl("start_app")
    committed = s.users() - users0
    t0 = time.monotonic()
    delivered = s.wait_mails(mails0 + committed, timeout=DRAIN_BOUND_S) - mails0
    drain_s = time.monotonic() - t0
    queued = s.queued()
    out = {
        "committed": committed,
        "answered_ok": len(result["lat"]),
        "errors": result["errors"],
        "error_kinds": result["error_kinds"],
        "delivered": delivered,
        "lost": committed - delivered,
        "drain_s": round(drain_s, 1),
        "still_queued": queued,
        "broker_stopped_s": round(window["started"] - window["stopped"], 1),
        "p99_ms": percentile(result["lat"], 99),
    }
    log(f"outage {s.kind}: {out}")
    return out


# --- the item ----------------------------------------------------------------------------------


def item1_web(b: Bench) -> dict[str, Any]:
    sz = b.sizes
    kinds = ["outbox", "inline", "celery", "nomail"] if sz.peers else ["outbox", "inline", "nomail"]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    try:
        for kind in kinds:
            servers[kind] = Server(b, kind)  # (a failed start leaves its db to drop_all)
        # Warm-up, back to back: also the floor's capacity, which sets the paced rate.
        warm: dict[str, dict[str, Any]] = {}
        for kind in kinds:
            warm[kind] = load(servers[kind].base, sz.web_warm_s, None, f"warm-{kind}")
            log(f"web warm-up {kind}: {warm[kind]['rps']:.1f}/s")
        rate = max(1.0, round(warm["nomail"]["rps"] / 2, 1))
        paced: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        sat: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for run in range(sz.web_runs or sz.runs):
            order = kinds[run % len(kinds) :] + kinds[: run % len(kinds)]
            for kind in order:
                r = load(servers[kind].base, sz.web_seconds, rate, f"p{run}-{kind}")
                paced[kind].append(r)
                if sz.web_saturated:
                    sat[kind].append(
                        load(servers[kind].base, sz.web_warm_s, None, f"s{run}-{kind}")
                    )
                log(
                    f"web run {run} {kind}: p50 {percentile(r['lat'], 50):.0f} ms, "
                    f"p99 {percentile(r['lat'], 99):.0f} ms, errors {r['errors']}"
                )
        variants: dict[str, Any] = {}
        for kind in kinds:
            runs = paced[kind]
            sat_runs = sat[kind] or [warm[kind]]
            variants[kind] = {
                "p50": median([percentile(r["lat"], 50) for r in runs]),
                "p99": median([percentile(r["lat"], 99) for r in runs]),
                "p99_runs": [percentile(r["lat"], 99) for r in runs],
                "requests": sum(len(r["lat"]) for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "rps": median([r["rps"] for r in sat_runs]),
                "sat_p99": median([percentile(r["lat"], 99) for r in sat_runs]),
                "rps_from": "saturated runs" if sat[kind] else "warm-up",
            }
        # All the paced runs' mails must arrive in the end (a sanity check, not a figure).
        for kind in kinds:
            if kind != "nomail":
                s = servers[kind]
                n = s.users()
                got = s.wait_mails(n, timeout=30)
                variants[kind]["mails"] = f"{got}/{n}"
        result: dict[str, Any] = {
            "labels": {k: LABELS[k] for k in kinds},
            "variants": variants,
            "rate": rate,
            "clients": CLIENTS,
            "mail_delay_s": MAIL_DELAY_S,
            "window_s": sz.web_seconds,
            "runs": sz.web_runs or sz.runs,
        }
        if sz.web_outage_s:
            result["outage"] = {}
            for kind in ("outbox", "celery"):
                if kind in servers:
                    try:
                        result["outage"][kind] = outage(servers[kind], sz.web_outage_s, rate)
                    except Exception as exc:
                        log(f"outage {kind} failed: {exc!r}")
                        result["outage"][kind] = {"error": f"{type(exc).__name__}: {exc}"}
        return result
    finally:
        for s in servers.values():
            try:
                s.stop()
            except Exception as exc:
                log(f"stopping {s.kind}: {exc!r}")
            b.drop_db(s.url)


__all__ = ["item1_web"]
