"""A/B of the relay itself: the no-op drain (item 3) and the latency at 100/s (item 5), in one run.

``python -m bench.ab_relay [--before DIR] [--only noop,latency] [--rounds N] [--n ROWS]``

A runs ``outbox relay`` from ``--before`` (a checkout of the code to compare with, e.g. made by
``git archive main | tar -x -C /tmp/base``), B from this checkout; both with this venv's
packages. Rounds alternate A and B on one database, so machine noise falls on both alike:

- **noop**: two relay processes, batch 1000, drain ``--n`` no-op rows filled in one transaction
  and NOTIFYed; rate over the 10-90 % window of ``sent_at`` (as item 3), and the relays' CPU
  time per message (user + system, from the NOTIFY to the drained table), which other work on
  the machine disturbs far less than the rate;
- **latency**: one relay process, 100 enqueues/s for ``--seconds`` through ``outbox.enqueue``,
  commit -> SMTP sink acceptance, p50 and p99 (as item 5).

Only ratios between A and B of the same run mean anything: the machine is shared.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    DEFAULT_ADMIN_URL,
    NOTIFY_CHANNEL,
    ROOT,
    Bench,
    Relays,
    connect,
    fill_outbox,
    log,
    sent_times,
    truncate_outbox,
    wait_drained,
)
from bench.ours import produce_outbox
from bench.runner import latency_run
from bench.sink import Sink
from bench.stats import median, rate_10_90


class RelaysAt(Relays):
    """``Relays`` run from another checkout: ``python -m outbox`` imports the code of its cwd."""

    def __init__(self, root: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root = root

    def start(self, *, wait_listening: bool = True, timeout: float = 30.0) -> RelaysAt:
        for i in range(self.n):
            logf = open(self.log_dir / f"ab-relay-{i}.log", "ab")  # closed by stop()
            self._logs.append(logf)
            self.procs.append(
                subprocess.Popen(self.cmd, env=self.env, cwd=self.root, stdout=logf, stderr=logf)
            )
        if wait_listening:
            self.wait_listening(timeout)
        return self


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes ``pids`` used so far (those still alive)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def backend_pids(url: str) -> list[int]:
    """The server processes of the relays' sessions on ``url``'s database."""
    with connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'outbox-%%'"
        ).fetchall()
    return [row[0] for row in rows]


def noop_round(root: Path, url: str, sink: Sink, n: int) -> tuple[float, float, float]:
    """(rate, relay CPU and its server processes' CPU, microseconds per message): the CPU
    figures hold better than the rate when other work shares the machine."""
    with RelaysAt(
        root,
        url,
        sink.url,
        2,
        batch_size=1000,
        concurrency=16,
        imports=("bench.noop",),
        poll_interval=30,
    ) as relays:
        truncate_outbox(url)
        fill_outbox(url, n, topic="noop", email=False)
        procs = [p.pid for p in relays.procs]
        backends = backend_pids(url)
        cpu, server = cpu_seconds(procs), cpu_seconds(backends)
        with connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
        if not wait_drained(url, timeout=300, every=0.1):
            raise TimeoutError("relay did not drain")
        cpu, server = cpu_seconds(procs) - cpu, cpu_seconds(backends) - server
        return rate_10_90(sent_times(url)), cpu / n * 1e6, server / n * 1e6


def latency_round(root: Path, url: str, sink: Sink, seconds: float) -> dict[str, float]:
    with RelaysAt(root, url, sink.url, 1, concurrency=16, poll_interval=5):
        latency_run("outbox", produce_outbox, url, sink, 50, 1.0)  # warm-up
        return latency_run("outbox", produce_outbox, url, sink, 100, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_relay")
    parser.add_argument("--before", required=True, help="checkout of the code to compare with")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--only", default="noop,latency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=60_000, help="rows per no-op drain")
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency round")
    args = parser.parse_args(argv)
    sides = {"A": Path(args.before).resolve(), "B": ROOT}
    from bench.harness import SIZES

    b = Bench(admin_url=args.admin_url, sizes=SIZES["smoke"])
    sink = Sink().start()
    try:
        if "noop" in args.only:
            url = b.create_db("ab_noop")
            rates: dict[str, list[float]] = {"A": [], "B": []}
            cpus: dict[str, list[float]] = {"A": [], "B": []}
            servers: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    rate, cpu, server = noop_round(sides[side], url, sink, args.n)
                    rates[side].append(rate)
                    cpus[side].append(cpu)
                    servers[side].append(server)
                    log(
                        f"noop round {r} {side}: {rate:.0f}/s, relay CPU {cpu:.1f} us/message,"
                        f" its PostgreSQL backends {server:.1f} us/message"
                    )
            a, bb = median(rates["A"]), median(rates["B"])
            ca, cb = median(cpus["A"]), median(cpus["B"])
            sa, sb = median(servers["A"]), median(servers["B"])
            log(f"noop: A {a:.0f}/s  B {bb:.0f}/s  B/A {bb / a:.2f}")
            log(f"noop relay CPU: A {ca:.1f} us/msg  B {cb:.1f} us/msg  A/B {ca / cb:.2f}")
            log(f"noop backend CPU: A {sa:.1f} us/msg  B {sb:.1f} us/msg  A/B {sa / sb:.2f}")
            b.drop_db(url)
        if "latency" in args.only:
            url = b.create_db("ab_latency")
            lat: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    lat[side].append(latency_round(sides[side], url, sink, args.seconds))
                    x = lat[side][-1]
                    log(f"latency round {r} {side}: p50 {x['p50']:.2f} ms p99 {x['p99']:.2f} ms")
            for side in ("A", "B"):
                p50 = median([x["p50"] for x in lat[side]])
                p99 = median([x["p99"] for x in lat[side]])
                log(f"latency {side}: p50 {p50:.2f} ms  p99 {p99:.2f} ms (medians of rounds)")
            b.drop_db(url)
    finally:
        sink.stop()
        b.drop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
