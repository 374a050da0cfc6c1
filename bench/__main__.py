"""``python -m bench --quick | --full``: run the suite, write docs/benchmarks.md and the charts.

Results are also kept as JSON in bench/results/ (not committed), written after each item so a
failure late in the run loses nothing; ``--report-only`` redraws the page from that file.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_ADMIN_URL, ROOT, SIZES, Bench, Sizes, log
from bench.sink import Sink

ITEMS = ["web", "smtp", "noop", "email", "latency", "scale", "notify", "stall", "snapshot"]


def run_item(b: Bench, item: str, sink: Sink) -> dict[str, Any]:
    from bench import ours

    s = b.sizes
    if item == "smtp":
        return ours.item2_smtp(b, sink)
    if item == "noop":
        result = ours.item3_noop(b, sink)
        if s.peers:
            from bench import peers

            result["peers"] = peers.throughput(b, sink, email=False)
        return result
    if item == "email":
        result = ours.item4_email_ours(b, sink)
        if s.peers:
            from bench import peers

            result["peers"] = peers.throughput(b, sink, email=True)
        return result
    if item == "latency":
        result = ours.item5_latency_ours(b, sink)
        if s.peers:
            from bench import peers

            result["peers"] = peers.latency(b, sink)
        return result
    if item == "scale":
        return ours.item6_scale(b, sink)
    if item == "notify":
        return ours.item7_notify(b, sink)
    if item == "web":
        from bench import web

        return web.item1_web(b)
    if item == "stall":
        from bench import stall

        return stall.item8_stall(b)
    if item == "snapshot":
        from bench import snapshot

        return snapshot.item9_snapshot(b, sink)
    raise ValueError(item)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_const", dest="size", const="full")
    mode.add_argument("--quick", action="store_const", dest="size", const="quick")
    mode.add_argument("--smoke", action="store_const", dest="size", const="smoke")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_ADMIN_URL,
        help="admin URL of the PostgreSQL to use (bench databases are created and dropped there)",
    )
    parser.add_argument(
        "--only",
        default=",".join(ITEMS),
        help=f"comma-separated items to run, of {','.join(ITEMS)}",
    )
    parser.add_argument("--no-peers", action="store_true", help="only this project's figures")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where the page and charts go")
    parser.add_argument("--results", default=None, help="JSON results file")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the clean-ups run: relays and workers stopped, bench
    # databases dropped, item 9's own cluster stopped and deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = args.size or "quick"
    sizes = SIZES[size]
    if args.no_peers:
        from dataclasses import replace

        sizes = replace(sizes, peers=False)
    results_path = Path(args.results or ROOT / "bench" / "results" / f"{size}.json")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    if args.report_only:
        data = json.loads(results_path.read_text())
    else:
        only = args.only.split(",")
        previous = None
        if set(only) != set(ITEMS) and results_path.exists():
            # Some items only: the others keep their stored results, and the page says so.
            previous = json.loads(results_path.read_text())
        data = run(args.database_url, sizes, only, results_path, previous=previous)
    from bench import report

    page = report.write(data, out, charts=sizes.charts)
    log(f"wrote {page}")
    failed = [k for k, v in data["items"].items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


def run(
    admin_url: str,
    sizes: Sizes,
    items: list[str],
    results_path: Path,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``items``; with ``previous`` (stored results), add to them instead of starting anew."""
    b = Bench(admin_url=admin_url, sizes=sizes)
    started = time.time()
    data: dict[str, Any] = {
        "size": sizes.name,
        "machine": b.machine(),
        "items": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if previous is not None:
        data = previous
        data.setdefault("notes", []).append(
            f"item(s) {', '.join(items)} run alone, after the rest, with the same --{sizes.name} "
            f"sizes on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; their comparisons are all "
            "within that run."
        )
    try:
        with Sink() as sink:
            for item in items:
                if item not in ITEMS:
                    raise SystemExit(f"unknown item {item!r}")
                t0 = time.monotonic()
                log(f"--- {item} ---")
                try:
                    data["items"][item] = run_item(b, item, sink)
                except Exception as exc:  # keep going: one broken item must not lose the rest
                    traceback.print_exc()
                    data["items"][item] = {"error": f"{type(exc).__name__}: {exc}"}
                data["items"][item]["seconds"] = round(time.monotonic() - t0, 1)
                if previous is None:
                    data["seconds"] = round(time.time() - started, 1)
                results_path.write_text(json.dumps(data, indent=1, default=str))
    finally:
        b.drop_all()
    log(f"total {time.time() - started:.0f}s")
    return data


if __name__ == "__main__":
    sys.exit(main())
