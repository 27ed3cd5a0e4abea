"""Continuous batching on CPU: Keel's own scheduler (keel.service.generation.PolicyRuntime) vs transformers'
continuous-batching manager (`generate_batch`, paged KV cache), on the same prompts and token budget.

    python bench/batching_bench.py [--policy default] [--requests 8] [--max-tokens 64] [--runs 3]

Greedy decoding of `--requests` chat prompts, each engine warmed first; the two alternate, `--runs` times, and
the report gives generated tokens per second of each and the median of the runs' ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.abuse_bench import cpu
from keel.core.text import Message
from keel.service.generation import PolicyRuntime
from keel.service.sampling import Row, Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="default", help="policy directory or HF path (default: SmolLM2)")
    parser.add_argument("--requests", type=int, default=8, help="prompts generated together")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply at most")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each engine")
    parser.add_argument("--output", type=Path, default=Path("runs/batching-bench.json"), help="the report (JSON)")
    args = parser.parse_args()
    from transformers import GenerationConfig

    runtime = PolicyRuntime(args.policy)
    questions = [f"Tell me about topic number {i} in a few sentences." for i in range(args.requests)]
    rows = [Row((Message("user", q),), Sampling(temperature=0.0, max_tokens=args.max_tokens)) for q in questions]
    prompts = [list(runtime.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                          tokenize=True, return_dict=True)["input_ids"])
               for q in questions]
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=runtime.end_ids,
                              pad_token_id=runtime.tokenizer.pad_token_id)

    def keel() -> float:
        began = time.perf_counter()
        tokens = sum(g.completion_tokens for g in runtime.generate(rows))
        return tokens / (time.perf_counter() - began)

    def transformers_manager() -> float:
        began = time.perf_counter()
        with torch.no_grad():
            out = runtime.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False,
                                               persistent_manager=True, warmup=False)
        tokens = sum(len(o.generated_tokens) for o in out.values())
        return tokens / (time.perf_counter() - began)

    runtime.warm_up()
    keel()
    with torch.no_grad():
        runtime.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False,
                                     persistent_manager=True)
    runs = [(keel(), transformers_manager()) for _ in range(args.runs)]
    report = {"policy": args.policy, "cpu": cpu(), "date": time.strftime("%Y-%m-%d"), "requests": args.requests,
              "max_tokens": args.max_tokens,
              "runs": [{"keel_tokens_per_s": k, "transformers_tokens_per_s": t} for k, t in runs],
              "keel_vs_transformers": statistics.median(k / t for k, t in runs)}
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
