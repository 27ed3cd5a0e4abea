"""Scoring throughput and latency: Keel's service vs the bare ONNX engine vs a per-request pipeline peer.

    python bench/serve_bench.py --model DIR [--seconds 20] [--concurrency 32] [--moderation-model DIR]

Every contender runs in its own process (torch and ONNX Runtime thread pools interfere). The load
generator is a separate process from each server, on loopback. Texts: HH validation/test conversations of
up to 256 tokens. Prints JSON with medians of the repeated measurements and the ratios. With
--moderation-model, one more server serves both models, and /v1/moderations and /v1/score are measured on the
same texts, alternating: throughput at --concurrency and the latency of one short text at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load


def hh_texts(model: Path, count: int, max_tokens: int = 256) -> list[str]:
    from transformers import AutoTokenizer

    from keel.core.text import Message, render
    from keel.training.data import DataSource, load_source

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)  # a Keel model directory
    texts = []
    for name in ("harmless-base", "helpful-base"):
        for split in ("validation", "test"):
            for pair in load_source(DataSource(str(ROOT / f"data/hh-rlhf/{name}/test.jsonl.gz"), split=split)):
                texts += [render([*pair.context, Message("assistant", reply)]) for reply in (pair.chosen, pair.rejected)]
    texts = [t for t in texts if len(tokenizer(t)["input_ids"]) <= max_tokens]
    return texts[:count]


def short_texts(model: Path, count: int) -> list[str]:
    """Conversations of about 64 tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)  # a Keel model directory
    return [t for t in hh_texts(model, 4000) if 56 <= len(tokenizer(t)["input_ids"]) <= 72][:count]


def engine_throughput(model: Path, texts: list[str], seconds: float, backend: str) -> dict:
    """The bare engine: ONNX Runtime on the same file, tokenisation included, at several batch sizes."""
    from transformers import AutoTokenizer

    from keel.core.artifact import RewardManifest
    from keel.core.onnx_engine import onnx_session

    max_length = RewardManifest.read(model).max_length
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)  # a Keel model directory
    tokenizer.truncation_side = "left"
    session = onnx_session(model / ("model.int8.onnx" if backend == "onnx-int8" else "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    results = {}
    for batch_size in (1, 8, 16, 32, 64):
        done, began, i = 0, time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            batch = [texts[(i + k) % len(texts)] for k in range(batch_size)]
            i += batch_size
            # The service scores a bare {"text"} as the pair ("", text): tokenise the same way.
            encoded = tokenizer([""] * len(batch), batch, padding=True, truncation="longest_first",
                                max_length=max_length, return_tensors="np")
            session.run(["scores"], {n: encoded[n].astype("int64") for n in names})
            done += batch_size
        results[batch_size] = done / (time.perf_counter() - began)
    best = max(results, key=results.get)
    return {"texts_per_s_by_batch": {k: round(v, 1) for k, v in results.items()}, "best_batch": best,
            "best_texts_per_s": round(results[best], 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, ready_path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code in (200, 405):
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise TimeoutError(f"{command} did not start")


@contextmanager
def keel_serve(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`keel serve ARGS` on a free loopback port, ready; yields (base URL, process) and stops it after."""
    port = free_port()
    process = start([sys.executable, "-m", "keel", "serve", "--port", str(port), *args], port, "/readyz")
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(30)


def score_payload(text: str) -> dict:
    return {"input": [{"text": text}]}


def load(url: str, payload: Callable[[str], dict], texts: list[str], concurrency: int, seconds: float) -> dict:
    payloads = [payload(t) for t in texts]
    asyncio.run(run_load(url, payloads[:64], 4, 2.0))  # warm-up
    return asyncio.run(run_load(url, payloads, concurrency, seconds)).summary()


def server_runs(command: list[str], port: int, ready: str, texts: list[str], short: list[str], args,
                path: str = "/v1/score", payload: Callable[[str], dict] = score_payload) -> dict:
    process = start(command, port, ready)
    url = f"http://127.0.0.1:{port}{path}"
    try:
        runs = [load(url, payload, texts, args.concurrency, args.seconds) for _ in range(args.repeats)]
        latency = [load(url, payload, short, 1, args.seconds / 2) for _ in range(args.repeats)]
    finally:
        process.terminate()
        process.wait(30)
    return {"throughput_runs": runs, "texts_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "short_p50_ms_runs": [r["p50_ms"] for r in latency],
            "short_p50_ms": statistics.median(r["p50_ms"] for r in latency)}


def moderation_payload(text: str) -> dict:
    return {"input": text}


def moderation_vs_score(command: list[str], port: int, texts: list[str], short: list[str], args) -> dict:
    """/v1/moderations against /v1/score in one server on the same texts, alternating, with per-repeat ratios."""
    process = start(command, port, "/readyz")
    base = f"http://127.0.0.1:{port}"
    runs = []
    try:
        for _ in range(args.repeats):
            score = load(f"{base}/v1/score", score_payload, texts, args.concurrency, args.seconds)
            moderation = load(f"{base}/v1/moderations", moderation_payload, texts, args.concurrency, args.seconds)
            score_short = load(f"{base}/v1/score", score_payload, short, 1, args.seconds / 2)
            moderation_short = load(f"{base}/v1/moderations", moderation_payload, short, 1, args.seconds / 2)
            runs.append({"score_texts_per_s": score["requests_per_s"],
                         "moderation_texts_per_s": moderation["requests_per_s"],
                         "score_short_p50_ms": score_short["p50_ms"], "moderation_short_p50_ms": moderation_short["p50_ms"]})
    finally:
        process.terminate()
        process.wait(30)
    return {"runs": runs,
            "throughput_ratio": statistics.median(r["moderation_texts_per_s"] / r["score_texts_per_s"] for r in runs),
            "short_latency_ratio": statistics.median(r["moderation_short_p50_ms"] / r["score_short_p50_ms"]
                                                     for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="Keel reward-model directory")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per contender (median reported)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx-int8", "onnx"],
                        help="engine of Keel and of the bare engine (auto: as `keel serve` picks on this CPU)")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-peer", action="store_true", help="skip the pipeline peer")
    parser.add_argument("--infinity-bin", help="path to an `infinity_emb` executable (installed in its own venv: it "
                        "pins older transformers and numpy) to serve the same backbone's embeddings as a peer")
    parser.add_argument("--serve-args", default="", help="extra `keel serve` flags, e.g. '--max-batch-tokens 4096'")
    parser.add_argument("--skip-engine", action="store_true", help="skip the bare engine")
    parser.add_argument("--moderation-model", type=Path, help="also compare /v1/moderations with /v1/score")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    model = args.model.resolve()
    if args.backend == "auto":
        from keel.core.runtime import choose_backend

        args.backend = choose_backend(model)
    texts = hh_texts(model, 2000)
    if args.engine_only:  # child process: the bare engine alone
        runs = [engine_throughput(model, texts, args.seconds / 5, args.backend) for _ in range(args.repeats)]
        print(json.dumps({"runs": runs, "best_texts_per_s": statistics.median(r["best_texts_per_s"] for r in runs)}))
        return
    short = short_texts(model, 200)
    report: dict = {"texts": len(texts), "mean_chars": round(statistics.fmean(map(len, texts))), "cpus": os.cpu_count(),
                    "concurrency": args.concurrency, "backend": args.backend}
    if not args.skip_engine:
        engine = subprocess.run([sys.executable, __file__, "--model", str(model), "--engine-only", "--seconds",
                             str(args.seconds), "--repeats", str(args.repeats), "--backend", args.backend],
                                capture_output=True, text=True, check=True)
        report["engine"] = json.loads(engine.stdout.strip().splitlines()[-1])
    port = free_port()
    report["keel"] = server_runs([sys.executable, "-m", "keel", "serve", "--model", str(model), "--port",
                                  str(port), "--backend", args.backend, "--moderation-model", "none",
                                  *args.serve_args.split()], port, "/readyz", texts, short, args)
    if args.moderation_model:
        port = free_port()
        report["moderation_vs_score"] = moderation_vs_score(
            [sys.executable, "-m", "keel", "serve", "--model", str(model), "--port", str(port), "--backend",
             args.backend, "--moderation-model", str(args.moderation_model), *args.serve_args.split()], port,
            texts, short, args)
    if not args.skip_peer:
        port = free_port()
        report["peer_pipeline"] = server_runs([sys.executable, str(ROOT / "bench" / "peer_server.py"), str(model),
                                               str(port)], port, "/v1/score", texts, short, args)
        report["keel_vs_peer"] = round(report["keel"]["texts_per_s"] / report["peer_pipeline"]["texts_per_s"], 2)
    if args.infinity_bin:
        from keel.core.reward_model import resolve_base_model

        backbone = resolve_base_model("default")
        port = free_port()
        report["infinity_emb"] = server_runs(
            [args.infinity_bin, "v2", "--model-id", backbone, "--engine", "torch", "--device", "cpu", "--host",
             "127.0.0.1", "--port", str(port)], port, "/health", texts, short, args, path="/embeddings",
            payload=lambda text: {"model": backbone, "input": [text]})
        report["keel_vs_infinity"] = round(report["keel"]["texts_per_s"] / report["infinity_emb"]["texts_per_s"], 2)
    if "engine" in report:
        report["keel_vs_engine"] = round(report["keel"]["texts_per_s"] / report["engine"]["best_texts_per_s"], 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
