"""Try to break the scoring service: 10x overload, load shedding, recovery, memory, and SIGTERM under load.

    python bench/overload_bench.py [--model DIR] [--seconds 15]

`keel serve` runs in its own process on loopback. Load comes from an httpx client that counts every outcome:
HTTP statuses, refused connections (the server is not listening), dropped requests (accepted, then the
connection closed with no answer) and timeouts (hung). Memory is the server's resident set, sampled each second.
1. capacity at 32 concurrent requests; 2. overload with 10x the connections (320) at default settings;
3. recovery at 32; 4. overload with a small queue (--max-queue-texts 64), so load is shed with 429;
5. SIGTERM (with --drain-seconds 2) a third of the way (at most 4 s) into a 32-connection load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import keel_serve


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def hammer(url: str, concurrency: int, seconds: float, process: subprocess.Popen,
                 sigterm_after: float | None = None) -> dict:
    outcomes: Counter[str] = Counter()
    memory: list[float] = []
    stop_at = time.perf_counter() + seconds
    bodies = [{"input": [{"prompt": f"How do I bake bread, step {i}?", "response": "Mix flour, water, salt and "
               f"yeast, knead for ten minutes, let it rise for {i} hours, then bake."}]} for i in range(50)]

    async def worker(client: httpx.AsyncClient, index: int) -> None:
        n = index
        while time.perf_counter() < stop_at:
            n += concurrency
            try:
                response = await client.post(url, json=bodies[n % len(bodies)])
                outcomes[str(response.status_code)] += 1
            except httpx.ConnectError:
                outcomes["refused"] += 1
                await asyncio.sleep(0.05)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                outcomes["dropped"] += 1
            except httpx.TimeoutException:
                outcomes["timeout"] += 1

    async def watch() -> None:
        began = time.perf_counter()
        signalled = False
        while time.perf_counter() < stop_at and process.poll() is None:
            memory.append(rss_mb(process.pid))
            if sigterm_after is not None and not signalled and time.perf_counter() - began >= sigterm_after:
                process.send_signal(signal.SIGTERM)
                signalled = True
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(watch(), *(worker(client, i) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "outcomes": dict(outcomes),
            "answered_200_per_s": round(outcomes["200"] / elapsed, 1),
            "rss_mb_max": round(max(memory), 1) if memory else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="reward-model directory (default: the default model)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--output", type=Path, default=Path("runs/overload-bench.json"))
    args = parser.parse_args()
    model = (["--model", args.model] if args.model else []) + ["--moderation-model", "none"]
    report: dict = {}

    with keel_serve(*model) as (base, process):
        url = f"{base}/v1/score"
        report["rss_mb_idle"] = round(rss_mb(process.pid), 1)
        report["capacity"] = asyncio.run(hammer(url, 32, args.seconds, process))
        report["overload_10x"] = asyncio.run(hammer(url, 320, args.seconds, process))
        report["recovery"] = asyncio.run(hammer(url, 32, args.seconds, process))
    report["recovery_vs_capacity"] = round(report["recovery"]["answered_200_per_s"]
                                           / max(report["capacity"]["answered_200_per_s"], 1e-9), 2)
    with keel_serve(*model, "--max-queue-texts", "64") as (base, process):
        report["overload_10x_small_queue"] = asyncio.run(hammer(f"{base}/v1/score", 320, args.seconds, process))
    with keel_serve(*model, "--drain-seconds", "2") as (base, process):
        report["sigterm_under_load"] = asyncio.run(hammer(f"{base}/v1/score", 32, args.seconds, process,
                                                          sigterm_after=min(4.0, args.seconds / 3)))
        report["sigterm_under_load"]["exit_code"] = process.wait(60)

    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
