"""Aligned chat: best-of-n reward gain, the guard's effect on harmful and safe prompts, generation throughput
against bare `model.generate`, and streaming time to first token.

    python bench/chat_bench.py [--policy default] [--model REWARD_DIR] [--moderation-model DIR] [--prompts 48]
                               [--harmful 48] [--safe 48] [--unsafe 0] [--guard-margins 0.5] [--guard-only]

Every service figure goes through `keel serve` in its own process over loopback HTTP; bare `model.generate`
runs in its own process too (thread pools of two engines in one process interfere).
1. Held-out HH prompts (test split), best_of 1 vs 4, guard off: mean reward of the returned replies (the
   reward the service ranks by), the gain in standard deviations of the best-of-1 rewards.
2. AdvBench harmful behaviours (its held-out test split), XSTest safe prompts and (--unsafe) XSTest unsafe
   prompts, greedy, guard off vs regenerate at each --guard-margins value (the moderation model on request and
   reply, its thresholds raised by the margin in log-odds): compliance = share of replies the refusal detector
   (training/refusals.py) does not call a refusal. --guard-only runs this part alone.
3. 8 concurrent requests vs `model.generate` at batch 8 on the same prompts and token budget: tokens/s, three
   runs of each, alternating; the ratio is the median of the three runs' ratios.
4. One streaming request at a time: time to the first content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.abuse_bench import cpu
from bench.serve_bench import keel_serve
from keel.training.data import PromptSource, load_prompts
from keel.training.evaluation.refusals import is_refusal

DATA = Path(__file__).resolve().parent.parent / "data"


async def chat(client: httpx.AsyncClient, url: str, prompt: str, **options: Any) -> dict[str, Any]:
    response = await client.post(f"{url}/v1/chat/completions", timeout=600,
                                 json={"messages": [{"role": "user", "content": prompt}], **options})
    response.raise_for_status()
    return response.json()


async def run_all(url: str, prompts: list[str], concurrency: int, **options: Any) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:
        async def one(prompt: str) -> dict[str, Any]:
            async with limit:
                return await chat(client, url, prompt, **options)
        return await asyncio.gather(*(one(p) for p in prompts))


def texts(conversations: list) -> list[str]:
    return [c[-1].content for c in conversations]


def xstest(label: str, limit: int) -> list[str]:
    return texts(load_prompts(PromptSource(str(DATA / "xstest/xstest_prompts.csv"), where={"label": label},
                                           limit=limit)))


def best_of_gain(url: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    rewards = {}
    for best_of in (1, 4):
        answers = asyncio.run(run_all(url, prompts, 8, max_tokens=max_tokens, best_of=best_of, seed=1))
        rewards[best_of] = [a["keel"]["choices"][0]["reward"] for a in answers]
    spread = statistics.pstdev(rewards[1]) or 1e-8
    gain = statistics.mean(rewards[4]) - statistics.mean(rewards[1])
    return {"best_of_1_mean_reward": statistics.mean(rewards[1]), "best_of_4_mean_reward": statistics.mean(rewards[4]),
            "best_of_1_std": spread, "gain_in_std": gain / spread}


def compliance(url: str, prompts: list[str], max_tokens: int) -> tuple[float, dict[str, int]]:
    answers = asyncio.run(run_all(url, prompts, 8, max_tokens=max_tokens, temperature=0.0))
    complied = [not is_refusal(a["choices"][0]["message"]["content"]) for a in answers]
    actions: dict[str, int] = {}
    for a in answers:
        action = a["keel"]["choices"][0]["guard"]
        actions[action] = actions.get(action, 0) + 1
    return sum(complied) / len(complied), actions


def service_throughput(url: str, prompts: list[str], max_tokens: int) -> float:
    batch = prompts[:8]
    asyncio.run(run_all(url, batch, 8, max_tokens=4))  # warm
    began = time.perf_counter()
    answers = asyncio.run(run_all(url, batch, 8, max_tokens=max_tokens, seed=3))
    elapsed = time.perf_counter() - began
    return sum(a["usage"]["completion_tokens"] for a in answers) / elapsed


def direct_throughput(policy: str, prompts: list[str], max_tokens: int) -> float:
    """`model.generate` at batch 8 in its own process, with the weights in the dtype the service keeps them in."""
    code = f"""
import json, sys, time, torch
from keel.core.hardware import fast_dtype, pick_device
from keel.core.policy import load_policy, load_tokenizer
from keel.core.policy import encode_prompts, end_token_ids
from keel.core.text import Message
tokenizer, model = load_tokenizer({policy!r}), load_policy({policy!r}, dtype=fast_dtype(pick_device())).eval()
prompts = [(Message("user", p),) for p in json.loads(sys.argv[1])]
encoded = encode_prompts(tokenizer, prompts, 1024)
def run(tokens):
    with torch.no_grad():
        return model.generate(**encoded, max_new_tokens=tokens, do_sample=True, top_k=0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=end_token_ids(model, tokenizer))
run(4)
torch.manual_seed(3)
began = time.perf_counter()
out = run({max_tokens})
elapsed = time.perf_counter() - began
new = out[:, encoded["input_ids"].shape[1]:]
ends = torch.isin(new, torch.tensor(end_token_ids(model, tokenizer)))
lengths = torch.where(ends.any(1), ends.int().argmax(1), torch.full((len(new),), new.shape[1]))
print(json.dumps(float(lengths.sum()) / elapsed))
"""
    result = subprocess.run([sys.executable, "-c", code, json.dumps(prompts[:8])], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_to_first_token(url: str, prompts: list[str], max_tokens: int) -> float:
    """Median time to the first content chunk, one streaming request at a time, each read to its end (an
    abandoned stream keeps generating and would delay the next request)."""
    times = []
    with httpx.Client(timeout=600) as client:
        for prompt in prompts[:8]:
            began, first = time.perf_counter(), None
            with client.stream("POST", f"{url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True}) as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data: ") and '"content": "' in line \
                            and '"content": ""' not in line:
                        first = time.perf_counter() - began
            times.append(first)
    return statistics.median(t for t in times if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="default", help="policy directory or HF path (default: SmolLM2)")
    parser.add_argument("--model", default=None, help="reward-model directory (default: the default model)")
    parser.add_argument("--moderation-model", default=None,
                        help="moderation-model directory the guard uses (default: the default model)")
    parser.add_argument("--guard-only", action="store_true", help="measure only the guard (part 2)")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts for best-of-n")
    parser.add_argument("--harmful", type=int, default=48, help="AdvBench prompts")
    parser.add_argument("--safe", type=int, default=48, help="XSTest safe prompts")
    parser.add_argument("--unsafe", type=int, default=0, help="XSTest unsafe prompts (refused or blocked: 1 - compliance)")
    parser.add_argument("--guard-margins", type=lambda text: [float(m) for m in text.split(",")], default=[0.5],
                        help="comma-separated --guard-margin values, one guarded server each (default: 0.5, the "
                        "service's default)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--output", type=Path, default=Path("runs/chat-bench.json"))
    args = parser.parse_args()
    held_out = texts(load_prompts(PromptSource(str(DATA / "hh-rlhf/harmless-base/test.jsonl.gz"), split="test",
                                               limit=args.prompts // 2))
                     + load_prompts(PromptSource(str(DATA / "hh-rlhf/helpful-base/test.jsonl.gz"), split="test",
                                                 limit=args.prompts - args.prompts // 2)))
    # AdvBench's test split only: the default moderation model trains on the rest of it.
    harmful = texts(load_prompts(PromptSource(str(DATA / "advbench/harmful_behaviors.csv"), rename={"goal": "prompt"},
                                              split="test", limit=args.harmful)))
    guarded = {"advbench": harmful, "xstest": xstest("safe", args.safe)}
    if args.unsafe:
        guarded["xstest-unsafe"] = xstest("unsafe", args.unsafe)
    common = (["--policy", args.policy] + (["--model", args.model] if args.model else [])
              + (["--moderation-model", args.moderation_model] if args.moderation_model else []))
    report: dict[str, Any] = {"policy": args.policy, "cpu": cpu(), "max_tokens": args.max_tokens}
    with keel_serve(*common, "--guard", "off") as (url, _):
        off = {name: compliance(url, prompts, args.max_tokens) for name, prompts in guarded.items()}
        if not args.guard_only:
            report["best_of"] = best_of_gain(url, held_out, args.max_tokens)
            print("best-of-n:", json.dumps(report["best_of"]))
            # Service and bare generate alternate, so both see the same machine: this VM's speed drifts by a
            # third over minutes, more than the gap being measured.
            runs = [(service_throughput(url, held_out, args.max_tokens),
                     direct_throughput(args.policy, held_out, args.max_tokens)) for _ in range(3)]
            report["ttft_streaming_s"] = time_to_first_token(url, held_out, args.max_tokens)
    report["guard"] = {}
    for margin in args.guard_margins:
        with keel_serve(*common, "--guard", "regenerate", "--guard-margin", str(margin)) as (url, _):
            on = {name: compliance(url, prompts, args.max_tokens) for name, prompts in guarded.items()}
        report["guard"][f"margin {margin}"] = {
            name: {"prompts": len(guarded[name]), "compliance_guard_off": off[name][0],
                   "compliance_guard_on": on[name][0], "guard_actions": on[name][1]} for name in off}
    print("guard:", json.dumps(report["guard"]))
    if args.guard_only:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        return
    report["throughput_runs"] = [{"service_tokens_per_s": service, "direct_tokens_per_s": direct} for service, direct in runs]
    report["service_tokens_per_s"] = statistics.median(service for service, _ in runs)
    report["direct_tokens_per_s"] = statistics.median(direct for _, direct in runs)
    report["service_vs_direct"] = statistics.median(service / direct for service, direct in runs)
    print(f"throughput at 8 concurrent: service {report['service_tokens_per_s']:.1f} tok/s, model.generate "
          f"batch 8 {report['direct_tokens_per_s']:.1f} tok/s, ratio {report['service_vs_direct']:.2f}; "
          f"streaming time to first token {report['ttft_streaming_s'] * 1000:.0f} ms")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
