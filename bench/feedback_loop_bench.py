"""Proof that the feedback loop closes: serve traffic, let simulated annotators label it through the labelling
API, export, retrain with one added config line, and score held-out data the default models never saw.

    python bench/feedback_loop_bench.py --work DIR [--parts moderation,preferences] [--noise 0.1]
                                        [--queue-budgets 100,300,500,1000] [--random-budgets 100,300,1000]
                                        [--queue-random-rate 0.5] [--annotators-per-item 3]
                                        [--rescore-at 300] [--train-seeds 0,1,2] [--feedback-rows 0]
                                        [--preference-set pandalm|hh-rejection-sampled|truthfulqa]
                                        [--preference-budget 1000] [--preference-start served|fresh]
                                        [--preference-repeat 3] [--out FILE]

Moderation (ConvAbuse, CC BY 4.0: users' messages to conversational agents, abusive by majority of its annotators,
mapped to `harassment`; never in the default moderation model's data):
1. Its train and valid files are the traffic: every message is sent to `keel serve --feedback-db` (SQLite) as a
   /v1/moderations request and recorded. Its test file is the held-out set.
2. Two arms, each with its own server and store: the labelling queue (GET /v1/label/next, the page's own API)
   and random selection (random recorded responses). The simulated annotator answers POST /v1/label/answers with
   `harassment` from the dataset's label (flipped with probability --noise), other categories left unlabelled.
   With --rescore-at N, the queue arm retrains at N labels and re-scores the store with that model (`keel
   feedback rescore`), so its later picks are what the retrained model is unsure of: the loop closed once.
   With --annotators-per-item k, k annotators (each with a key) answer each item in turn, the store's majority
   is what the export keeps, and a budget of N answers labels N / k items.
   `--feedback-queue-pool` covers all the traffic, so the queue's first N picks are what it selects for N labels;
   --queue-random-rate of them are random (`--feedback-random-rate`), the rest the most uncertain.
3. After N labels (each budget), `keel feedback export`, then `keel train moderation` with the default config
   plus the export (`--set 'train+={path: .../moderation.jsonl, feedback: true}'`): all of it, since ConvAbuse's
   test file is the held-out set here, repeated to at least 1,000 rows an epoch (`min_rows`, --feedback-rows);
   --train-seeds retrains each export with several training seeds and reports their mean.
4. Each model scores ConvAbuse's test messages (AUPRC of `harassment`) and OpenAI's moderation samples of the
   default config's test fold (AUPRC of any harm, the served rule), beside the default model.
Preferences (--preference-set; none of these sets is in the default reward model's data):
- `pandalm`: PandaLM's human test set (Apache-2.0): instruction, two responses, three human annotators; pairs with
  a majority winner.
- `hh-rejection-sampled`: HH-RLHF's helpful-rejection-sampled test file (MIT): both replies sampled from one
  model, the crowdworker's choice between them; best-of-n traffic as Keel's chat records it.
- `truthfulqa`: TruthfulQA (Apache-2.0): a question, its best true answer and one false answer (a common
  misconception); the true one wins. A team whose standard is factual correctness, which the default reward
  model was not trained for (its data are HH's helpfulness and harmlessness choices).
1. A scripted upstream answers a chat completion for a pair's conversation with its two responses as the n = 2
   candidates; `keel serve --upstream` ranks them (best_of 2) and records both with their rewards. Half the pairs
   (by a hash of the first user turn) are traffic, the other half the held-out test.
2. The simulated annotator labels pairwise units from the queue (GET /v1/label/next?task=pairwise) by the set's
   label (flipped with probability --noise), up to --preference-budget answers.
3. `keel train reward` with the default config plus the export's train split in the `helpful` head (each row
   --preference-repeat times), fine-tuning the served model (`init_from`, a quarter of the learning rate) or,
   with --preference-start fresh, from the base model as the default run does.
4. Accuracy of the helpful head on the held-out pairs (and on HH helpful-base's test pairs, to show what it
   costs), default model against retrained.
Work is kept in --work: a model already trained there is reused. Prints JSON; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import gzip
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abuse_bench import cpu  # noqa: E402
from bench.moderation_bench import Judge, held_out  # noqa: E402
from bench.serve_bench import free_port, keel_serve  # noqa: E402
from keel.core.bundled import default_model_dir  # noqa: E402
from keel.core.runtime import ModerationRuntime, RewardRuntime  # noqa: E402
from keel.core.text import parse_transcript  # noqa: E402
from keel.training.config import DEFAULT_MODERATION_CONFIG, DEFAULT_REWARD_CONFIG, load_config  # noqa: E402
from keel.training.data import DataSource, load_source  # noqa: E402
from keel.training.evaluation.metrics import average_precision  # noqa: E402
from keel.training.evaluation.sets import truthfulqa  # noqa: E402
from keel.training.moderation.config import ModerationConfig  # noqa: E402
from keel.training.moderation.data import any_harm_labels  # noqa: E402
from keel.training.reward.config import RewardConfig  # noqa: E402

DATA = Path("/work/shared/data")
CATEGORY = "harassment"
# Fine-tuning a trained model: a quarter of the default run's backbone rate, and heads that are already trained
# no faster than the backbone
FINE_TUNING = ["training.learning_rate=5.0e-5", "training.head_learning_rate=5.0e-5"]


# ---- data ---------------------------------------------------------------------------------------------------

def convabuse(path: Path) -> list[tuple[str, bool]]:
    """(user message, abusive): abusive when more than half of the annotators who rated it gave a negative
    (abusive) score; empty messages are left out."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labelled = []
    for row in rows:
        votes = []
        for annotator in range(1, 9):
            score = next((s for s in ("1", "0", "-1", "-2", "-3") if row.get(f"Annotator{annotator}_is_abuse.{s}")
                          == "1"), None)
            if score is not None:
                votes.append(score.startswith("-"))
        if row["user"].strip() and votes:
            labelled.append((row["user"], sum(votes) > len(votes) / 2))
    return labelled


def pandalm(path: Path) -> list[dict]:
    """PandaLM pairs with a majority winner: the conversation before the reply, the two responses as shown, and
    the winner (1 or 2)."""
    pairs = []
    with gzip.open(path, "rt") as handle:
        rows = json.load(handle)
    for row in rows:
        winner, count = collections.Counter(row[f"annotator{i}"] for i in (1, 2, 3)).most_common(1)[0]
        responses = (row["response1"], row["response2"])
        if count >= 2 and winner in (1, 2) and all(isinstance(r, str) and r.strip() for r in responses):
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            pairs.append({"messages": [{"role": "user", "content": prompt}], "responses": responses,
                          "winner": winner})
    return pairs


def hh_pairs(path: Path) -> list[dict]:
    """HH pairs as best-of-2 candidates: the shared conversation, the two final replies in an order drawn by a
    hash of the conversation, and the crowdworker's choice as the winner."""
    pairs = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
            if (chosen[:-1] != rejected[:-1] or chosen[-1].role != "assistant" or rejected[-1].role != "assistant"
                    or chosen[-1].content == rejected[-1].content):
                continue
            pairs.append(candidates([{"role": m.role, "content": m.content} for m in chosen[:-1]],
                                    chosen[-1].content, rejected[-1].content))
    return pairs


def truthfulqa_pairs(root: Path) -> list[dict]:
    """TruthfulQA questions as best-of-2 candidates: the best true answer against one of the false ones (drawn
    by a hash of the question), the true one the winner: a team whose standard is factual correctness."""
    pairs = []
    for item in truthfulqa(root):
        false = item.options[item.meta["incorrect_from"]:]
        question = item.conversation[0].content
        wrong = false[hashlib.sha256(question.encode()).digest()[2] % len(false)]
        pairs.append(candidates([{"role": "user", "content": question}], item.options[item.correct[0]], wrong))
    return pairs


def candidates(messages: list[dict], chosen: str, rejected: str) -> dict:
    """A pair as the upstream's two choices, in an order drawn by a hash of the conversation, and its winner."""
    first_is_chosen = hashlib.sha256(json.dumps(messages).encode()).digest()[1] < 128
    return {"messages": messages, "responses": (chosen, rejected) if first_is_chosen else (rejected, chosen),
            "winner": 1 if first_is_chosen else 2}


PREFERENCE_SETS = {
    "pandalm": lambda: pandalm(DATA / "pandalm-human-testset/testset-v1.json.gz"),
    "hh-rejection-sampled": lambda: hh_pairs(DATA / "hh-rlhf/helpful-rejection-sampled/test.jsonl.gz"),
    "truthfulqa": lambda: truthfulqa_pairs(DATA),
}


def chosen_and_rejected(pair: dict) -> tuple[str, str]:
    return pair["responses"][pair["winner"] - 1], pair["responses"][2 - pair["winner"]]


def conversation_key(messages: list[dict]) -> str:
    """The user and assistant turns of a conversation (the server may add a system prompt upstream)."""
    return json.dumps([[m["role"], m["content"]] for m in messages if m["role"] != "system"])


def half(text: str) -> str:
    return "traffic" if hashlib.sha256(text.encode()).digest()[0] < 128 else "test"


# ---- serving, labelling and export ----------------------------------------------------------------------------

def send_all(base: str, path: str, bodies: list[dict], workers: int = 8, headers: dict | None = None) -> list[dict]:
    with httpx.Client(base_url=base, timeout=120, headers=headers) as client, ThreadPoolExecutor(workers) as pool:
        def post(body: dict) -> dict:
            response = client.post(path, json=body)
            response.raise_for_status()
            return response.json()
        return list(pool.map(post, bodies))


def wait_recorded(base: str, count: int, headers: dict | None = None) -> None:
    """Until the recorder has stored `count` items in the fresh store (it writes in batches, off the event loop)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if httpx.get(f"{base}/v1/feedback/stats", timeout=60, headers=headers).json()["store"]["items"] >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"the store did not record {count} items")


def export(db: str, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "keel", "feedback", "export", "--db", db, "--out", str(out), "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "datasheet.json").read_text())


def train(kind: str, output: Path, overrides: list[str], args: argparse.Namespace) -> Path:
    if not (output / "keel.json").exists():
        subprocess.run([sys.executable, "-m", "keel", "train", kind, "--output", str(output), "--overwrite",
                        *[f"--set={o}" for o in overrides + args.train_set]], check=True)
    return output


def labelling_store(db: str, traffic: int, args: argparse.Namespace) -> list[str]:
    """`keel serve` flags of an arm's store: a queue pool over all the traffic, no gold, the bench's random rate."""
    return ["--feedback-db", db, "--feedback-queue-pool", str(traffic + 1), "--feedback-gold-rate", "0",
            "--feedback-random-rate", str(args.queue_random_rate)]


def annotator_keys(folder: Path, k: int) -> tuple[list[str], list[dict]]:
    """`keel serve` flags for k simulated annotators (a keys file of `name:key` lines, k answers per item), and
    each annotator's request headers; none for k = 1 (one anonymous annotator, no keys)."""
    if k == 1:
        return [], [{}]
    keys = {f"annotator-{j}": f"bench-{j}-{random.Random(j).getrandbits(64):016x}" for j in range(1, k + 1)}
    (folder / "annotators.txt").write_text("".join(f"{name}:{key}\n" for name, key in keys.items()))
    return (["--annotator-keys-file", str(folder / "annotators.txt"), "--feedback-annotations-per-item", str(k)],
            [{"Authorization": f"Bearer {key}"} for key in keys.values()])


def answer(client: httpx.Client, body: dict) -> None:
    client.post("/v1/label/answers", json=body).raise_for_status()


# ---- moderation -------------------------------------------------------------------------------------------------

def moderation_labels(arm: str, args: argparse.Namespace, traffic: list[tuple[str, bool]], budgets: list[int]
                      ) -> dict[int, Path]:
    """Serve the traffic to a fresh store, label it by the arm's selection, export at each budget."""
    folder = args.work / f"moderation-{arm}"
    exports = {n: folder / f"export-{n}" for n in budgets}
    if all((e / "moderation.jsonl").exists() for e in exports.values()):
        return exports
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "feedback.db").unlink(missing_ok=True)
    db = f"sqlite:///{folder / 'feedback.db'}"
    rng = random.Random(f"{args.seed}-{arm}")
    k = args.annotators_per_item
    flags, headers = annotator_keys(folder, k)
    with keel_serve(*labelling_store(db, len(traffic), args), *flags) as (base, _):
        responses = send_all(base, "/v1/moderations", [{"input": text} for text, _ in traffic], headers=headers[0])
        truth = {r["id"]: label for r, (_, label) in zip(responses, traffic)}
        wait_recorded(base, len(truth), headers[0])
        order = rng.sample(sorted(truth), -(-max(budgets) // k)) if arm == "random" else []
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(httpx.Client(base_url=base, timeout=120, headers=h)) for h in headers]
            # Budgets count answers: the annotators take turns, so with k of them each item gets k answers (the
            # queue finishes begun units first), each flipped on its own, and the export keeps their majority.
            for done in range(1, max(budgets) + 1):
                client = clients[(done - 1) % k]
                if arm == "queue":
                    item = client.get("/v1/label/next", params={"task": "moderation"}).json()["item"]
                    item_id, index = item["id"], item["index"]
                else:
                    item_id, index = order[(done - 1) // k], 0
                label = truth[item_id] != (rng.random() < args.noise)
                answer(client, {"task": "moderation", "item_id": item_id, "index": index,
                                "categories": {CATEGORY: label}})
                if done in exports:
                    export(db, exports[done])
                if arm == "queue" and done in args.rescore_at:
                    # The loop closed once: retrain on the labels so far, and let the queue's next picks be
                    # what the retrained model is unsure of (`keel feedback rescore`)
                    model = retrained(arm, done, exports[done], args)
                    subprocess.run([sys.executable, "-m", "keel", "feedback", "rescore", "--db", db, "--model",
                                    str(model)], check=True, stdout=subprocess.DEVNULL)
    return exports


def retrained(arm: str, n: int, export_folder: Path, args: argparse.Namespace, seed: int = 0) -> Path:
    """The default moderation model retrained with an arm's export of n labels and training seed `seed` (reused if
    already trained). The export gives at least --feedback-rows rows an epoch (`min_rows`), so that a small one is
    not drowned by the default data."""
    rows = args.feedback_rows
    name = f"moderation-{arm}-{n}" + (f"-seed{seed}" if seed else "") + (f"-rows{rows}" if rows else "")
    return train("moderation", args.work / "models" / name,
                 [f"train+={{path: {export_folder / 'moderation.jsonl'}, feedback: true, min_rows: {rows}}}",
                  f"training.seed={seed}"], args)


def moderation_scores(model: Path, test: list[tuple[str, bool]], openai: list) -> dict:
    runtime = ModerationRuntime(model)
    values = runtime.scored([("", text) for text, _ in test]).values
    harmful = np.array([label for _, label in test])
    judge = Judge(model)
    any_harm, _, _ = judge(openai)
    openai_harmful = any_harm_labels(openai) == 1  # every OpenAI test row is labelled in some category
    return {"convabuse_test_auprc": round(average_precision(values[:, runtime.categories.index(CATEGORY)], harmful), 4),
            "convabuse_test_positive_rate": round(float(harmful.mean()), 3),
            "openai_test_auprc": round(average_precision(any_harm, openai_harmful), 4)}


def moderation_part(args: argparse.Namespace) -> dict:
    traffic = (convabuse(DATA / "convabuse/ConvAbuseEMNLPtrain.csv.gz")
               + convabuse(DATA / "convabuse/ConvAbuseEMNLPvalid.csv"))
    test = convabuse(DATA / "convabuse/ConvAbuseEMNLPtest.csv")
    openai = held_out(load_config(ModerationConfig, DEFAULT_MODERATION_CONFIG), "openai-moderation")
    report: dict = {"traffic": len(traffic), "traffic_abusive": sum(label for _, label in traffic),
                    "test": len(test), "noise": args.noise, "queue_random_rate": args.queue_random_rate,
                    "annotators_per_item": args.annotators_per_item, "rescore_at": args.rescore_at,
                    "train_seeds": args.train_seeds, "feedback_rows": args.feedback_rows,
                    "default": moderation_scores(default_model_dir("moderation"), test, openai), "arms": {}}
    for arm, budgets in (("queue", args.queue_budgets), ("random", args.random_budgets)):
        exports = moderation_labels(arm, args, traffic, budgets)
        for n, folder in exports.items():
            rows = [json.loads(line) for line in (folder / "moderation.jsonl").open()]
            seeds = {seed: moderation_scores(retrained(arm, n, folder, args, seed), test, openai)
                     for seed in args.train_seeds}
            means = {key: round(float(np.mean([scores[key] for scores in seeds.values()])), 4)
                     for key in seeds[args.train_seeds[0]]}
            report["arms"].setdefault(arm, {})[n] = {
                "answers": n, "labels": len(rows), "labelled_abusive": sum(bool(r[CATEGORY]) for r in rows), **means,
                **({"by_training_seed": seeds} if len(seeds) > 1 else {})}
            print(json.dumps({arm: {n: report["arms"][arm][n]}}), flush=True)
    default = report["default"]
    queue, randomly = report["arms"].get("queue", {}), report["arms"].get("random", {})
    if 300 in queue:
        report["queue_300_gain"] = round(queue[300]["convabuse_test_auprc"] - default["convabuse_test_auprc"], 4)
        report["queue_300_openai_change"] = round(queue[300]["openai_test_auprc"] - default["openai_test_auprc"], 4)
    if 1000 in randomly:
        goal = randomly[1000]["convabuse_test_auprc"]
        reached = [n for n in sorted(queue) if queue[n]["convabuse_test_auprc"] >= goal]
        report["queue_labels_to_reach_random_1000"] = reached[0] if reached else None
    return report


# ---- preferences --------------------------------------------------------------------------------------------------

def scripted_upstream(pairs: list[dict]) -> tuple[str, uvicorn.Server]:
    """An OpenAI-compatible server answering a pair's conversation with its two responses as the choices."""
    by_conversation = {conversation_key(pair["messages"]): pair["responses"] for pair in pairs}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def complete(body: dict) -> dict:
        responses = by_conversation[conversation_key(body["messages"])]
        choices = [{"index": i, "message": {"role": "assistant", "content": responses[i % 2]},
                    "finish_reason": "stop"} for i in range(body.get("n", 1))]
        return {"id": "scripted", "object": "chat.completion", "created": 0, "model": "scripted", "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def preference_labels(args: argparse.Namespace, traffic: list[dict]) -> tuple[Path, int]:
    folder = args.work / f"preferences-{args.preference_set}"
    out = folder / "export"
    if (out / "preferences.jsonl").exists():
        return out, json.loads((folder / "answered.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "feedback.db").unlink(missing_ok=True)
    db = f"sqlite:///{folder / 'feedback.db'}"
    rng = random.Random(f"{args.seed}-preferences")
    upstream, server = scripted_upstream(traffic)
    wins = {chosen_and_rejected(pair) for pair in traffic}
    answered = 0
    try:
        with keel_serve("--upstream", upstream, *labelling_store(db, len(traffic), args)) as (base, _):
            bodies = [{"messages": pair["messages"], "best_of": 2, "max_tokens": 512} for pair in traffic]
            send_all(base, "/v1/chat/completions", bodies, workers=4)
            wait_recorded(base, len(bodies))
            with httpx.Client(base_url=base, timeout=120) as client:
                while answered < args.preference_budget:
                    item = client.get("/v1/label/next", params={"task": "pairwise"}).json()["item"]
                    if item is None:
                        break
                    first, second = item["candidates"]
                    shown = (first["text"], second["text"])
                    if shown not in wins and shown[::-1] not in wins:
                        winner: int | str = "skip"
                    else:
                        winner = 1 if shown in wins else 2
                        if rng.random() < args.noise:
                            winner = 3 - winner
                    answer(client, {"task": "pairwise", "item_id": item["id"], "first": first["id"],
                                    "second": second["id"], "winner": winner})
                    answered += 1
        export(db, out)
        (folder / "answered.json").write_text(json.dumps(answered))
    finally:
        server.should_exit = True
    return out, answered


def pair_accuracy(model: Path, head: str, pairs_file: Path, split: str = "all") -> float:
    runtime = RewardRuntime(model)
    pairs = load_source(DataSource(path=str(pairs_file), split=split))
    chosen = runtime.scored([p.chosen_input for p in pairs]).values[:, runtime.heads.index(head)]
    rejected = runtime.scored([p.rejected_input for p in pairs]).values[:, runtime.heads.index(head)]
    return round(float((chosen > rejected).mean()), 4)


def preference_part(args: argparse.Namespace) -> dict:
    halves: dict[str, list[dict]] = {"traffic": [], "test": []}
    for pair in PREFERENCE_SETS[args.preference_set]():
        halves[half(pair["messages"][0]["content"])].append(pair)
    traffic = halves["traffic"]
    test_file = args.work / f"{args.preference_set}-test.jsonl"
    with test_file.open("w") as handle:
        for pair in halves["test"]:
            chosen, rejected = chosen_and_rejected(pair)
            handle.write(json.dumps({"prompt": pair["messages"], "chosen": [{"role": "assistant", "content": chosen}],
                                     "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    out, answered = preference_labels(args, traffic)
    rows = sum(1 for _ in (out / "preferences.jsonl").open())
    feedback = [f"heads.1.train+={{path: {out / 'preferences.jsonl'}, where: {{split: train}}, "
                f"repeat: {args.preference_repeat}}}"]
    served = default_model_dir("reward")
    # served: fine-tune the served model (docs/feedback.md's recipe); fresh: the default config's full run
    start = ([f"init_from={served}", *FINE_TUNING] if args.preference_start == "served" else [])
    model = train("reward", args.work / "models" / f"reward-{args.preference_set}-{args.preference_start}",
                  feedback + start, args)
    hh = load_config(RewardConfig, DEFAULT_REWARD_CONFIG).heads[1].test[0].path
    report = {"set": args.preference_set, "traffic_pairs": len(traffic), "test_pairs": len(halves["test"]),
              "answers": answered, "exported_pairs": rows, "noise": args.noise,
              "queue_random_rate": args.queue_random_rate, "start": args.preference_start,
              "repeat": args.preference_repeat, "overrides": feedback + start + args.train_set}
    for name, directory in (("default", served), ("retrained", model)):
        report[name] = {"held_out_accuracy": pair_accuracy(directory, "helpful", test_file),
                        "hh_helpful_test_accuracy": pair_accuracy(directory, "helpful", Path(hh), "test")}
    report["gain_points"] = round(100 * (report["retrained"]["held_out_accuracy"]
                                         - report["default"]["held_out_accuracy"]), 2)
    return report


def budgets(text: str) -> list[int]:
    return sorted({int(n) for n in text.split(",") if n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for stores, exports and retrained models")
    parser.add_argument("--parts", default="moderation,preferences", help="comma-separated: moderation, preferences")
    parser.add_argument("--queue-budgets", type=budgets, default=[100, 300, 500, 1000],
                        help="label counts at which the queue arm is exported and retrained")
    parser.add_argument("--random-budgets", type=budgets, default=[100, 300, 1000],
                        help="label counts at which the random arm is exported and retrained")
    parser.add_argument("--queue-random-rate", type=float, default=0.5,
                        help="the queue arm's share of random picks (keel serve --feedback-random-rate)")
    parser.add_argument("--preference-budget", type=int, default=1000, help="pairwise answers at most")
    parser.add_argument("--preference-set", choices=sorted(PREFERENCE_SETS), default="pandalm",
                        help="the preference data whose best-of-2 traffic is labelled (see above)")
    parser.add_argument("--preference-start", choices=["served", "fresh"], default="served",
                        help="retrain the reward model by fine-tuning the served one, or from the base model")
    parser.add_argument("--preference-repeat", type=int, default=3,
                        help="each exported preference this many times an epoch (the source's `repeat`)")
    parser.add_argument("--noise", type=float, default=0.0, help="probability that a simulated answer is flipped")
    parser.add_argument("--annotators-per-item", type=int, default=1,
                        help="moderation part: k simulated annotators answer each item (each flipped with "
                        "probability --noise on its own; the export keeps the majority); budgets count answers")
    parser.add_argument("--rescore-at", type=budgets, default=[],
                        help="moderation queue arm: at these label counts (each also a --queue-budgets entry), "
                        "retrain on the labels so far and re-score the store with that model (keel feedback "
                        "rescore) before labelling on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random arm and of the label noise")
    parser.add_argument("--train-seeds", type=budgets, default=[0],
                        help="moderation part: retrain each export with each of these training seeds and report "
                        "the mean (and each seed)")
    parser.add_argument("--feedback-rows", type=int, default=1000,
                        help="moderation part: repeat each export until it gives at least N training rows an epoch "
                        "(the source's min_rows; 0: once, as before 2026-12-07)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra --set for every retraining (a smoke test: training.max_steps=3)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.annotators_per_item < 1:
        parser.error("--annotators-per-item must be 1 or more")
    if not set(args.rescore_at) <= set(args.queue_budgets):
        parser.error("each --rescore-at count must also be a --queue-budgets entry (its export is retrained on)")
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu()}
    parts = args.parts.split(",")
    if "moderation" in parts:
        report["moderation"] = moderation_part(args)
    if "preferences" in parts:
        report["preferences"] = preference_part(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
