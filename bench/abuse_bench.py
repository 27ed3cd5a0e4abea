"""One client saturates the service; does another client still get served? (issue: hostile and unlucky clients)

    python bench/abuse_bench.py --model DIR [--policy default] [--seconds 20]

`keel serve` runs on loopback with two API keys: the heavy client's and the small client's. For scoring and
then for chat, the small client sends one small request at a time, first to the idle server, then while the
heavy client keeps --heavy-connections connections busy with the largest requests the settings allow (256
texts to score; chats at the cost limit, n * best_of * max_tokens = --max-request-tokens). Reported: the
small client's p50/p99 latency idle and under load, its 429s, the heavy client's statuses, and one batch's
time from the server's metrics (scoring: engine seconds per text times the texts in a batch; chat: the mean
generation batch). Target: loaded p99 <= 2 x idle p99 + one batch's time, and no 429 for the small client.
A scoring "batch" here is one turn of the fair queue: one text on a CPU (--texts-per-turn), 4 x
--max-batch-size texts where batches hold more than one text (GPU).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from threading import Event

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import keel_serve

HEAVY, SMALL = "heavy-client-key", "small-client-key"


def sample(metrics: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def encoded(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def small_client(url: str, body: dict, seconds: float) -> dict:
    """One request at a time for `seconds`: latencies of the 200s and a count of every status."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    stop = time.perf_counter() + seconds
    content = json.dumps(body).encode()  # once: the clients share the server's two cores
    with httpx.Client(timeout=600, headers=encoded(SMALL)) as http:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            response = http.post(url, content=content)
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - began)
    return {"requests": sum(statuses.values()), "statuses": dict(statuses),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99)}


def flood(url: str, content: bytes, connections: int, honour_retry_after: bool, stop: Event,
          statuses: dict[str, int]) -> None:
    """The heavy client: `connections` threads, each sending `content` until `stop` (run in its own process, so
    the small client's timings do not include waiting for this client's threads to release the GIL)."""
    counts: Counter[str] = Counter()

    def connection() -> None:
        with httpx.Client(timeout=600, headers=encoded(HEAVY)) as http:
            while not stop.is_set():
                status = str(http.post(url, content=content).status_code)
                counts[status] += 1
                if status == "429":  # a hostile client retries at once; the openai client waits Retry-After (1 s)
                    time.sleep(1.0 if honour_retry_after else 0.05)

    threads = [threading.Thread(target=connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses.update(counts)


def under_load(url: str, small_body: dict, heavy_body: dict, connections: int, seconds: float,
               honour_retry_after: bool) -> tuple[dict, dict]:
    """The small client's figures while the heavy client keeps `connections` requests in flight."""
    with multiprocessing.Manager() as manager:
        stop, statuses = manager.Event(), manager.dict()
        heavy = multiprocessing.Process(target=flood, args=(url, json.dumps(heavy_body).encode(), connections,
                                                            honour_retry_after, stop, statuses))
        heavy.start()
        time.sleep(2.0)  # the flood's backlog builds first
        small = small_client(url, small_body, seconds)
        stop.set()
        heavy.join(600)
        return small, dict(statuses)


def phase(name: str, base: str, path: str, small_body: dict, heavy_body: dict, args: argparse.Namespace,
          batch_seconds: Callable[[str, str], float]) -> dict:
    url = base + path
    small_client(url, small_body, 2.0)  # warm-up
    idle = small_client(url, small_body, args.seconds)
    before = httpx.get(f"{base}/metrics").text
    loaded, heavy = under_load(url, small_body, heavy_body, args.heavy_connections, args.seconds,
                               args.honour_retry_after)
    batch = batch_seconds(before, httpx.get(f"{base}/metrics").text)
    bound = 2 * idle["p99_ms"] + 1000 * batch
    result = {"idle": idle, "loaded": loaded, "heavy_statuses": heavy, "batch_ms": 1000 * batch,
              "target_p99_ms": bound, "p99_met": loaded["p99_ms"] <= bound,
              "no_429_met": loaded["statuses"].get("429", 0) == 0}
    print(f"{name}: small client idle p50/p99 {idle['p50_ms']:.0f}/{idle['p99_ms']:.0f} ms, under load "
          f"{loaded['p50_ms']:.0f}/{loaded['p99_ms']:.0f} ms ({loaded['statuses']}); heavy client {heavy}; "
          f"one batch {1000 * batch:.0f} ms; target p99 <= {bound:.0f} ms: "
          f"{'met' if result['p99_met'] and result['no_429_met'] else 'MISSED'}", flush=True)
    return result


def scoring_batch_seconds(texts_per_batch: int) -> Callable[[str, str], float]:
    def seconds(before: str, after: str) -> float:
        engine = sample(after, "keel_inference_seconds_sum") - sample(before, "keel_inference_seconds_sum")
        texts = sample(after, "keel_batch_size_sum") - sample(before, "keel_batch_size_sum")
        return engine / max(texts, 1) * texts_per_batch

    return seconds


def generation_batch_seconds(before: str, after: str) -> float:
    total = sample(after, "keel_generation_request_seconds_sum") - sample(before, "keel_generation_request_seconds_sum")
    count = sample(after, "keel_generation_request_seconds_count") - sample(before, "keel_generation_request_seconds_count")
    return total / max(count, 1)


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split()) if "flags" in info else set()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return f"{model.group(1) if model else platform.processor()} ({', '.join(simd)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="Keel reward-model directory")
    parser.add_argument("--policy", default="default", help="policy served for chat (default: SmolLM2-135M)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds the small client measures, per phase")
    parser.add_argument("--heavy-connections", type=int, default=8, help="requests the heavy client keeps in flight")
    parser.add_argument("--max-request-tokens", type=int, default=512,
                        help="the server's chat cost limit, at which the heavy client's chats are made")
    parser.add_argument("--texts-per-turn", type=int, default=1,
                        help="texts in one turn of the scoring queue: 1 on a CPU, 4 x max batch size on a GPU")
    parser.add_argument("--honour-retry-after", action="store_true",
                        help="the heavy client waits Retry-After after a 429 (default: retries after 50 ms)")
    parser.add_argument("--phases", default="scoring,chat", help="which phases to run (default: scoring,chat)")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        keys = Path(scratch) / "keys"
        keys.write_text(f"{HEAVY}\n{SMALL}\n")
        serve_args = ["--model", str(args.model), "--moderation-model", "none", "--policy", args.policy,
                      "--api-keys-file", str(keys), "--guard", "off", "--max-request-tokens", str(args.max_request_tokens),
                      "--max-tokens-limit", str(args.max_request_tokens), "--log-level", "warning"]
        with keel_serve(*serve_args) as (base, _):
            settings = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {SMALL}"}).json()
            print(f"CPU: {cpu()}; models: {[m['id'] for m in settings['data']]}", flush=True)
            small_score = {"input": [{"text": "How do I bake a loaf of bread?"}]}
            heavy_score = {"input": [{"prompt": f"Question {i}: how do I look after a sourdough starter?",
                                      "response": "Feed it flour and water every day, keep it warm, and discard "
                                      f"half before each feeding; step {i}."} for i in range(256)]}
            results = {"cpu": cpu()}
            if "scoring" in args.phases:
                results["scoring"] = phase("scoring", base, "/v1/score", small_score, heavy_score, args,
                                           scoring_batch_seconds(args.texts_per_turn))
            message = [{"role": "user", "content": "Give me three tips for a job interview."}]
            small_chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
            heavy_chat = {"messages": message, "n": 2, "best_of": 2, "max_tokens": args.max_request_tokens // 4}
            if "chat" in args.phases:
                results["chat"] = phase("chat", base, "/v1/chat/completions", small_chat, heavy_chat, args,
                                        generation_batch_seconds)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
