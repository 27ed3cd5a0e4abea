"""Train a multi-head reward model from preference pairs (Bradley-Terry) and scalar ratings (regression).

Read top to bottom: data -> batches -> model -> training loop (checkpointed, resumable) -> evaluation ->
artifact (HF weights, tokenizer, ONNX fp32 + int8, keel.json manifest, metrics, curves), published atomically.
Runs on CPU, on CUDA when present, and under `accelerate launch` with several processes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import keel_core
from keel_core.artifact import (
    FORMAT_VERSION,
    MANIFEST,
    GuardThreshold,
    HeadStats,
    ModerationThreshold,
    RewardManifest,
    read_manifest,
    staged,
    write_json_atomic,
    write_text_atomic,
)
from keel_core.moderation import category_scores
from keel_core.onnx_engine import FP32_FILE, INT8_FILE, INT8_RECIPE
from keel_core.reward_model import LEGACY_HEADS_FILE, RewardModel, resolve_base_model
from keel_core.text import ModelInput
from training import onnx_export
from training.config import HEAD_ROLES, RewardConfig, build, to_dict
from training.data import DataError, DataSource, Example, PreferencePair, file_sha256, load_source
from training.evaluate import (
    Scorer,
    best_f1_threshold,
    cached,
    collate,
    encode,
    evaluate_examples,
    example_inputs,
    false_flag_threshold,
    torch_scorer,
)
from training.hardware import make_accelerator
from training.model_card import reward_model_card
from training.plots import plot_curves
from training.reward_model import freeze_lower_layers, load_tokenizer
from training.runs import append_metrics, prepare_work_directory, read_metrics, resume_from, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class HeadData:
    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    moderation: list[Example]
    guard: list[Example]


def read_sources(sources: list[DataSource], skip_bad_rows: bool) -> list[Example]:
    return [example for source in sources for example in load_source(source, skip_bad_rows)]


def load_head_data(config: RewardConfig, skip_bad_rows: bool) -> list[HeadData]:
    return [HeadData(h.name, **{role: read_sources(getattr(h, role), skip_bad_rows) for role in HEAD_ROLES})
            for h in config.heads]


def make_batches(lengths: list[list[int]], batch_size: int, seed: int) -> list[tuple[int, list[int]]]:
    """Length-grouped batches: shuffle each head's examples, sort windows of 50 batches by length, cut
    into batches, then shuffle the batches of all heads together. Returns (head index, example indices)."""
    rng = np.random.default_rng(seed)
    batches: list[tuple[int, list[int]]] = []
    window = batch_size * 50
    for head, head_lengths in enumerate(lengths):
        order = rng.permutation(len(head_lengths))
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: head_lengths[i])
            batches += [(head, chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_loss(model: torch.nn.Module, tokenizer: Any, head: int, examples: list[Example],
               encoded: list[dict], margin: float, device: torch.device) -> tuple[torch.Tensor, float | None]:
    """Loss of one single-head batch, and its pairwise accuracy (None for ratings)."""
    if isinstance(examples[0], PreferencePair):
        n = len(examples)
        batch = collate(tokenizer, [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded])
        scores = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, head]
        diff = scores[:n] - scores[n:]
        return pair_loss(diff, examples, margin), float((diff > 0).float().mean())
    batch = collate(tokenizer, [e["text"] for e in encoded])
    scores = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, head]
    return rating_loss(scores, examples), None


def pair_loss(diff: torch.Tensor, pairs: list[PreferencePair], margin: float) -> torch.Tensor:
    """diff = r_chosen - r_rejected for each pair."""
    margins = torch.tensor([p.margin + margin for p in pairs], device=diff.device, dtype=diff.dtype)
    # Bradley-Terry: L = -log sigma(r_chosen - r_rejected - margin)
    return -F.logsigmoid(diff - margins).mean()


def rating_loss(scores: torch.Tensor, ratings: list[Example]) -> torch.Tensor:
    target = torch.tensor([r.score for r in ratings], device=scores.device, dtype=scores.dtype)
    # Regression on human ratings: L = (r(x) - y)^2
    return F.mse_loss(scores, target)


def fit_detached_heads(model: RewardModel, tokenizer: Any, heads: list[HeadData], config: RewardConfig) -> None:
    """Fit each `detach` head as a linear probe on the trained backbone's features of its training data; the
    backbone is left as it is."""
    features_of = torch_scorer(model, tokenizer, config.max_length, config.training.eval_batch_size, features=True)
    for h, (head, head_config) in enumerate(zip(heads, config.heads)):
        if head_config.detach:
            features = torch.from_numpy(features_of(example_inputs(head.train)))  # pairs: chosen, rejected, ...
            weight, bias = fit_linear_probe(features, head.train, head_config.margin, model.heads.weight[h],
                                            model.heads.bias[h])
            with torch.no_grad():
                model.heads.weight[h].copy_(weight)  # copy_ moves it to the model's device
                model.heads.bias[h].copy_(bias)


def fit_linear_probe(features: torch.Tensor, examples: list[Example], margin: float, weight: torch.Tensor,
                     bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) minimising the head's training loss on fixed features plus a small L2 penalty, full batch
    with L-BFGS, from the given starting point."""
    weight = weight.detach().float().cpu().clone().requires_grad_()
    bias = bias.detach().float().cpu().clone().requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scores = features @ weight + bias
        loss = (pair_loss(scores[0::2] - scores[1::2], examples, margin)
                if isinstance(examples[0], PreferencePair) else rating_loss(scores, examples))
        loss = loss + 1e-4 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def encode_examples(tokenizer: Any, examples: list[Example], max_length: int) -> list[dict]:
    if isinstance(examples[0], PreferencePair):
        chosen = encode(tokenizer, [e.chosen_input for e in examples], max_length)
        rejected = encode(tokenizer, [e.rejected_input for e in examples], max_length)
        return [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]
    return [{"text": t} for t in encode(tokenizer, [e.input for e in examples], max_length)]


def sequence_lengths(item: dict) -> int:
    return sum(len(part["input_ids"]) for part in item.values())


def validation_accuracy(scorer: Scorer, heads: list[HeadData], names: list[str]) -> dict[str, float]:
    out = {}
    for head in heads:
        metrics = evaluate_examples(scorer, head.validation, names)[head.name]
        out[f"val_{head.name}_" + ("accuracy" if "accuracy" in metrics else "mse")] = metrics.get(
            "accuracy", metrics.get("mse"))
    return out


def train_reward(config: RewardConfig, output: Path, resume: bool = False, overwrite: bool = False,
                 skip_bad_rows: bool = False, progress: bool = True) -> dict[str, Any]:
    from accelerate.utils import set_seed

    output = Path(output).resolve()
    work = prepare_work_directory(output, resume, overwrite)
    metrics_path = work / "metrics.jsonl"

    accelerator = make_accelerator(config.training.precision)
    set_seed(config.training.seed)
    t = config.training
    names = [h.name for h in config.heads]

    # ---- model (first, so a config the backbone cannot take fails before the data is read) --------------
    model = RewardModel.from_base(config.base_model, names, config.attention_dropout)
    if t.freeze_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
    if t.freeze_layers:
        freeze_lower_layers(model.backbone, t.freeze_layers)

    # ---- data -------------------------------------------------------------------------------------------
    heads = load_head_data(config, skip_bad_rows)
    tokenizer = load_tokenizer(config.base_model, config.max_length, config.truncation_side)
    # Detached heads are fitted after training: no batches, no validation while training.
    detached = {head.name for head in config.heads if head.detach}
    trained = [head for head in heads if head.name not in detached]
    encoded = [[] if head.name in detached else encode_examples(tokenizer, head.train, config.max_length)
               for head in heads]
    lengths = [[sequence_lengths(item) for item in head_items] for head_items in encoded]
    batches_per_epoch = sum(math.ceil(len(items) / t.batch_size) for items in encoded) // accelerator.num_processes
    total_steps = t.epochs * batches_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    # ---- optimiser --------------------------------------------------------------------------------------
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": t.learning_rate}, {"params": model.heads.parameters(), "lr": t.head_learning_rate}],
        weight_decay=t.weight_decay,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    start_step = resume_from(accelerator, work, metrics_path, resume)["step"]
    if start_step:
        log.info("resumed at step %d of %d", start_step, total_steps)

    # ---- training loop -----------------------------------------------------------------------------------
    primary_prefix = f"val_{config.primary_head}_"
    unwrapped = accelerator.unwrap_model(model)
    scorer = torch_scorer(unwrapped, tokenizer, config.max_length, t.eval_batch_size)
    bar = tqdm(total=total_steps, initial=start_step, desc="train reward", unit="step",
               disable=not (progress and accelerator.is_main_process))
    started, window_losses, window_accuracies = time.time(), [], []
    epoch_plan: tuple[int, list] = (-1, [])
    model.train()
    for step in range(start_step, total_steps):
        epoch = step // batches_per_epoch
        if epoch_plan[0] != epoch:
            plan = make_batches(lengths, t.batch_size, t.seed + epoch)
            epoch_plan = (epoch, plan[accelerator.process_index :: accelerator.num_processes])
        head, indices = epoch_plan[1][step % batches_per_epoch]
        examples = [heads[head].train[i] for i in indices]
        loss, accuracy = batch_loss(model, tokenizer, head, examples, [encoded[head][i] for i in indices],
                                    config.heads[head].margin, device)
        accelerator.backward(loss * config.heads[head].weight)
        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

        window_losses.append(loss.item())
        if accuracy is not None:
            window_accuracies.append(accuracy)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window_losses):.3f}", epoch=epoch)
        row: dict[str, Any] = {}
        if done % t.log_every == 0 or done == total_steps:
            row = {"train_loss": float(np.mean(window_losses)), "lr": scheduler.get_last_lr()[0]}
            if window_accuracies:
                row["train_accuracy"] = float(np.mean(window_accuracies))
            window_losses, window_accuracies = [], []
        if t.eval_every and done % t.eval_every == 0 and done != total_steps and accelerator.is_main_process:
            row.update(validation_accuracy(scorer, trained, names))
            if t.keep_best:
                metric = next(key for key in row if key.startswith(primary_prefix))
                remember_if_best(unwrapped, work, done, metric, row[metric])
            model.train()
        if row and accelerator.is_main_process:
            append_metrics(metrics_path, {"step": done, "epoch": epoch, "elapsed_s": round(time.time() - started, 1), **row})
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != total_steps:
            save_checkpoint(accelerator, work, done)
    bar.close()
    accelerator.wait_for_everyone()
    train_seconds = time.time() - started

    manifest: dict[str, Any] = {}
    if accelerator.is_main_process:
        # Without the mixed-precision wrapper: evaluation and export run in fp32.
        unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        kept_step = restore_best(unwrapped, work, scorer, trained, names, total_steps) if t.keep_best else total_steps
        fit_detached_heads(unwrapped, tokenizer, heads, config)
        manifest = build_artifact(config, unwrapped, tokenizer, heads, output, overwrite, work, metrics_path,
                                  train_seconds, total_steps, kept_step, accelerator.mixed_precision)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return manifest


def remember_if_best(model: RewardModel, work: Path, step: int, metric: str, value: float) -> None:
    """Keep the weights with the best validation metric of the primary head (accuracy up, MSE down)."""
    record = work / "best.json"
    best = json.loads(record.read_text()) if record.exists() else None
    if best is None or is_better(metric, value, best["value"]):
        torch.save(model.state_dict(), work / "best.pt.tmp")
        (work / "best.pt.tmp").replace(work / "best.pt")
        write_json_atomic(record, {"step": step, "metric": metric, "value": value})


def is_better(metric: str, value: float, than: float) -> bool:
    return value < than if metric.endswith("mse") else value > than


def restore_best(model: RewardModel, work: Path, scorer: Scorer, heads: list[HeadData], names: list[str],
                 final_step: int) -> int:
    """Compare the final weights with the best kept ones on validation, load the better; return its step."""
    record = work / "best.json"
    if not record.exists():
        return final_step
    best = json.loads(record.read_text())
    metric = best["metric"]
    final_value = validation_accuracy(scorer, heads, names)[metric]
    if not is_better(metric, best["value"], final_value):
        return final_step
    log.info("keeping the weights of step %d (%s %.4f) over the final ones (%.4f)", best["step"], metric,
             best["value"], final_value)
    model.load_state_dict(torch.load(work / "best.pt", map_location="cpu", weights_only=True))
    return best["step"]


def build_artifact(config: RewardConfig, model: RewardModel, tokenizer: Any, heads: list[HeadData], output: Path,
                   overwrite: bool, work: Path, metrics_path: Path, train_seconds: float, steps: int,
                   kept_step: int, precision: str) -> dict[str, Any]:
    """Export ONNX, evaluate, choose normalisation and thresholds, and publish the model directory."""
    names = [h.name for h in config.heads]
    t0 = time.time()
    with staged(output, overwrite) as staging:
        model.to("cpu").save(staging)
        tokenizer.save_pretrained(staging)
        onnx_info: dict[str, Any] = {}
        int8_scorer: Scorer | None = None
        scorer = torch_scorer(model, tokenizer, config.max_length, config.training.eval_batch_size)
        if config.export.onnx:
            onnx_info, scorer, int8_scorer = export_onnx(model, tokenizer, heads, names, config, staging, scorer)
        # Every metric below is computed with the served fp32 graph (faster than torch), each text scored once.
        scorer = cached(scorer)
        normalization, moderation = normalization_and_thresholds(scorer, heads, config)
        metrics: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "steps": steps, "kept_step": kept_step,
                                    "precision": precision}
        for split in ("validation", "test"):
            metrics[split] = {head.name: evaluate_examples(scorer, getattr(head, split), names)[head.name]
                              for head in heads if getattr(head, split)}
        if int8_scorer is not None:
            onnx_info["accuracy"] = int8_accuracy(scorer, int8_scorer, heads, names)
        metrics["eval_seconds"] = round(time.time() - t0, 1)
        rows = read_metrics(metrics_path)
        (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(rows, staging / "training_curves.png", f"reward model: {', '.join(names)}")
        manifest = RewardManifest(
            base_model=config.base_model if config.base_model != "default" else "all-MiniLM-L6-v2",
            base_model_path=resolve_base_model(config.base_model), heads=names, primary_head=config.primary_head,
            max_length=config.max_length, truncation_side=config.truncation_side,
            input_names=onnx_export.onnx_input_names(tokenizer), normalization=normalization, moderation=moderation,
            onnx=onnx_info, data=data_provenance(config), config=to_dict(config), metrics=metrics)
        manifest.write(staging)
        write_text_atomic(staging / "README.md", reward_model_card(manifest, output))
    return read_manifest(output)


def reexport(directory: Path, int8: bool | None = None, skip_bad_rows: bool = False,
             data_dir: Path | None = None) -> dict[str, Any]:
    """Remake the ONNX graphs of an existing reward-model directory with this Keel's export (after an upgrade
    changed it, or to add int8), re-check them against the weights on the model's own validation and test data,
    and update keel.json. The directory is replaced atomically; weights, thresholds and metrics are kept.
    Data files gone from their recorded paths are looked for under data_dir (see find_moved_data)."""
    manifest = RewardManifest.read(directory)
    config = build(RewardConfig, manifest.config, f"{directory / MANIFEST}: config")
    config.export.onnx = True
    if int8 is not None:
        config.export.int8 = int8
    moved = find_moved_data(manifest.data, data_dir) if data_dir else {}
    for head in config.heads:
        for _, source in head.sources():
            source.path = moved.get(source.path, source.path)
    for entry in manifest.data:
        entry["path"] = moved.get(entry["path"], entry["path"])
    checked_on = [e for e in manifest.data if any(u["role"] in ("validation", "test") for u in e["uses"])
                  and e["path"] not in moved.values()]  # a moved file was just matched by its SHA-256
    for entry in checked_on:
        if Path(entry["path"]).exists() and file_sha256(entry["path"]) != entry["sha256"]:
            log.warning("%s changed since the model was trained; the export is checked on its current rows",
                        entry["path"])

    try:
        heads = [HeadData(h.name, [], read_sources(h.validation, skip_bad_rows), read_sources(h.test, skip_bad_rows),
                          [], []) for h in config.heads]
    except DataError as error:
        raise DataError(f"{error}; the new graphs are checked on the validation and test data named in "
                        f"{directory / MANIFEST}, so that file must be readable at its recorded path, or under "
                        f"`--data DIR` with the same name and contents") from error
    names = manifest.heads
    model = RewardModel.load(directory)
    tokenizer = load_tokenizer(str(directory), config.max_length, config.truncation_side)
    with staged(directory, overwrite=True) as staging:
        model.save(staging)  # a format-1 directory (heads in their own file) becomes a Hugging Face one
        for path in directory.iterdir():
            if path.name not in (FP32_FILE, INT8_FILE, MANIFEST, "README.md", LEGACY_HEADS_FILE) and not (
                    staging / path.name).exists():
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, staging / path.name)
        torch_scores = torch_scorer(model, tokenizer, config.max_length, config.training.eval_batch_size)
        info, fp32, int8_scorer = export_onnx(model, tokenizer, heads, names, config, staging, torch_scores)
        if int8_scorer is not None:
            info["accuracy"] = int8_accuracy(fp32, int8_scorer, heads, names)
        manifest.onnx = info
        manifest.config = to_dict(config)  # the export settings used, and data paths found under data_dir
        manifest.exported = {"keel_version": keel_core.__version__,
                             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest.format_version = FORMAT_VERSION
        manifest.write(staging)
        write_text_atomic(staging / "README.md", reward_model_card(manifest, directory))
    return read_manifest(directory)


def find_moved_data(entries: list[dict[str, Any]], data_dir: Path) -> dict[str, str]:
    """Recorded data paths that no longer exist (a moved clone, another machine), each mapped to the file under
    data_dir with the same name and SHA-256 as recorded, where there is one."""
    moved = {}
    for entry in entries:
        recorded = Path(entry["path"])
        if recorded.exists():
            continue
        found = next((path for path in sorted(data_dir.rglob(recorded.name)) if file_sha256(path) == entry["sha256"]),
                     None)
        if found is None:
            log.warning("%s: no file of that name and contents under %s", recorded, data_dir)
        else:
            moved[entry["path"]] = str(found.resolve())
            log.info("%s found at %s", recorded, found)
    return moved


def normalization_and_thresholds(scorer: Scorer, heads: list[HeadData], config: RewardConfig
                                 ) -> tuple[dict[str, HeadStats], dict[str, ModerationThreshold]]:
    """Per head: mean/std of raw scores on its validation data, the /v1/moderations threshold with the best F1
    (None for heads that are not moderation categories) and, given guard data, the chat guard's threshold."""
    normalization, moderation = {}, {}

    def category(texts: list[ModelInput], h: int, stats: HeadStats) -> np.ndarray:
        return category_scores((scorer(texts)[:, h] - stats.mean) / stats.std)

    for h, (head, head_config) in enumerate(zip(heads, config.heads)):
        raw = scorer(example_inputs(head.validation))[:, h]
        stats = normalization[head.name] = HeadStats(mean=float(raw.mean()), std=float(raw.std() or 1.0))
        if not head_config.moderate:
            moderation[head.name] = ModerationThreshold(threshold=None,
                                                        chosen_on="not a moderation category (moderate: false)")
        else:
            if head.moderation:
                texts, labels = example_inputs(head.moderation), [float(e.score >= 0.5) for e in head.moderation]
                basis = "labelled moderation data (score >= 0.5 = flag)"
            else:
                texts, labels = flag_examples(head.validation)
                basis = "validation data (rejected responses and below-mean ratings = flag)"
            moderation[head.name] = ModerationThreshold(
                **best_f1_threshold(category(texts, h, stats), np.array(labels)), chosen_on=basis)
        if head.guard:  # the chat guard may use a head /v1/moderations does not
            moderation[head.name].guard = GuardThreshold(
                **false_flag_threshold(category(example_inputs(head.guard), h, stats), head_config.guard_false_flags),
                chosen_on=f"benign replies (at most {head_config.guard_false_flags:.1%} flagged)")
    return normalization, moderation


def flag_examples(examples: list[Example]) -> tuple[list[ModelInput], list[float]]:
    """Stand-in moderation labels from preference data: a rejected response, or a rating below the mean rating,
    is what the head should flag; a chosen response, or a rating at or above it, is fine. (The mean, not the
    median: with 0/1 labels the median is one of the labels and would leave one class unflagged or all flagged.)"""
    pairs = [e for e in examples if isinstance(e, PreferencePair)]
    ratings = [e for e in examples if not isinstance(e, PreferencePair)]
    mean = float(np.mean([r.score for r in ratings])) if ratings else 0.0
    texts = [p.chosen_input for p in pairs] + [p.rejected_input for p in pairs] + [r.input for r in ratings]
    labels = [0.0] * len(pairs) + [1.0] * len(pairs) + [float(r.score < mean) for r in ratings]
    return texts, labels


def export_onnx(model: RewardModel, tokenizer: Any, heads: list[HeadData], names: list[str], config: RewardConfig,
                directory: Path, torch_scores: Scorer) -> tuple[dict[str, Any], Scorer, Scorer | None]:
    """Write model.onnx (and model.int8.onnx) into directory and measure max |ONNX - torch| on validation texts
    for each graph; returns the manifest's onnx info and the scorers of the fp32 and int8 (or None) graphs."""
    onnx_export.export(model, tokenizer, directory, config.export.opset, config.export.int8)
    sample = example_inputs([e for head in heads for e in head.validation[:32]])
    expected = torch_scores(sample)
    info: dict[str, Any] = {"fp32": FP32_FILE, "int8": INT8_FILE if config.export.int8 else None}
    if config.export.int8:
        info["int8_recipe"] = INT8_RECIPE
    fp32 = onnx_export.onnx_scorer(directory / FP32_FILE, tokenizer, config.max_length)
    info["fp32_max_abs_diff_vs_torch"] = float(np.abs(fp32(sample) - expected).max())
    int8 = None
    if config.export.int8:
        int8 = onnx_export.onnx_scorer(directory / INT8_FILE, tokenizer, config.max_length)
        info["int8_max_abs_diff_vs_torch"] = float(np.abs(int8(sample) - expected).max())
    return info, fp32, int8


def int8_accuracy(fp32: Scorer, int8: Scorer, heads: list[HeadData], names: list[str]) -> dict[str, Any]:
    """Pairwise accuracy of the int8 graph beside fp32, on each head's test pairs (validation if no test)."""
    out = {}
    for head in heads:
        evaluated = head.test or head.validation
        fp32_metrics = evaluate_examples(fp32, evaluated, names)[head.name]
        if "accuracy" in fp32_metrics:
            out[head.name] = {"split": "test" if head.test else "validation", "fp32": fp32_metrics["accuracy"],
                              "int8": evaluate_examples(int8, evaluated, names)[head.name]["accuracy"]}
    return out


def data_provenance(config: RewardConfig) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for head in config.heads:
        for role, source in head.sources():
            entry = seen.setdefault(source.path, {"path": source.path, "sha256": file_sha256(source.path), "uses": []})
            entry["uses"].append({"head": head.name, "role": role, "split": source.split, "limit": source.limit})
    return list(seen.values())
