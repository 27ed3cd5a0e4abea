"""What recording served responses in the feedback store costs, and what a failing store does to serving.

    python bench/feedback_capture_bench.py [--model DIR] [--moderation-model DIR] [--stores sqlite,postgresql]
                                           [--seconds 15] [--repeats 3] [--concurrency 32] [--out FILE]

For each store (SQLite in WAL mode; PostgreSQL, a throwaway server started here with Debian's initdb/pg_ctl):
1. Throughput: /v1/moderations at --concurrency on short HH texts, from one server with capture off and one with
   capture on (`--feedback-db`), alternating, --repeats times; the ratio on/off per repeat and its median.
2. Failure: a load run during which the store fails: PostgreSQL is stopped (`pg_ctl stop -m immediate`) halfway;
   SQLite is locked by another connection's exclusive transaction (writers wait, then fail). Every response's
   status is counted, and the server's keel_feedback_write_failures_total shows that writes really failed.
Default models: the ones `keel serve` serves by default. Prints JSON; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse_bench import cpu  # noqa: E402
from bench.loadgen import run_load  # noqa: E402
from bench.serve_bench import keel_serve, moderation_payload, short_texts  # noqa: E402
from tests.helpers import ThrowawayPostgres  # noqa: E402


def throughput(base: str, payloads: list[dict], concurrency: int, seconds: float) -> float:
    asyncio.run(run_load(f"{base}/v1/moderations", payloads[:64], 4, 2.0))  # warm-up
    return asyncio.run(run_load(f"{base}/v1/moderations", payloads, concurrency, seconds)).summary()["requests_per_s"]


def write_failures(base: str) -> float:
    found = re.search(r"^keel_feedback_write_failures_total (\S+)$", httpx.get(f"{base}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def failing_store_run(base: str, payloads: list[dict], concurrency: int, seconds: float, fail: threading.Timer
                      ) -> dict:
    fail.start()
    result = asyncio.run(run_load(f"{base}/v1/moderations", payloads, concurrency, seconds))
    fail.join()
    return {"statuses": result.statuses, "requests": sum(result.statuses.values()),
            "failed_requests": sum(n for status, n in result.statuses.items() if status != 200)}


def bench_store(kind: str, args: argparse.Namespace, payloads: list[dict], serve_args: list[str]) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="keel-capture-"))
    postgres = ThrowawayPostgres() if kind == "postgresql" else None
    url = postgres.url if postgres else f"sqlite:///{folder / 'feedback.db'}"
    report: dict = {"store": kind}
    try:
        with keel_serve(*serve_args) as (off, _), keel_serve(*serve_args, "--feedback-db", url) as (on, _):
            runs = []
            for _ in range(args.repeats):
                runs.append({"off": throughput(off, payloads, args.concurrency, args.seconds),
                             "on": throughput(on, payloads, args.concurrency, args.seconds)})
            report["throughput_runs"] = runs
            report["on_over_off"] = statistics.median(r["on"] / r["off"] for r in runs)
            before = write_failures(on)
            if postgres is not None:
                fail = threading.Timer(args.seconds / 2, postgres.stop)
            else:
                lock = sqlite3.connect(folder / "feedback.db", check_same_thread=False)

                def hold_lock() -> None:  # the writer's transactions wait for it, then fail: a stuck database
                    lock.execute("BEGIN EXCLUSIVE")
                    time.sleep(max(args.seconds, 8.0))  # longer than SQLite's 5-second busy timeout
                    lock.rollback()

                fail = threading.Timer(args.seconds / 2, hold_lock)
            report["store_failing"] = failing_store_run(on, payloads, args.concurrency, args.seconds * 1.5, fail)
            time.sleep(6)  # the writer's last batches fail after SQLAlchemy's and SQLite's own timeouts
            report["store_failing"]["write_failures_counted"] = write_failures(on) - before
    finally:
        if postgres is not None:
            postgres.remove()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="reward-model directory (default: keel serve's default)")
    parser.add_argument("--moderation-model", type=Path, help="moderation-model directory (default: keel serve's)")
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per throughput measurement")
    parser.add_argument("--repeats", type=int, default=3, help="throughput measurements per setting")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections")
    parser.add_argument("--texts", type=int, default=200, help="distinct short HH texts sent round-robin")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    from keel.core.bundled import default_model_dir

    model = args.model or default_model_dir("reward")
    moderation = args.moderation_model or default_model_dir("moderation")
    serve_args = ["--model", str(model), "--moderation-model", str(moderation)]
    payloads = [moderation_payload(text) for text in short_texts(model, args.texts)]
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu(),
              "concurrency": args.concurrency, "seconds": args.seconds, "texts": len(payloads),
              "stores": [bench_store(kind, args, payloads, serve_args) for kind in args.stores.split(",")]}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
