"""`keel train ALGORITHM`, with restarts: when an attempt's own training log misses a check, train again with
another seed, and keep the first attempt that passes, or else the closest (`closest`).

An RL run learns a behaviour only if it samples it early enough to reinforce it. With Keel's refusal recipe
(configs/rloo-harm.yaml) one seed refuses harm and another, with the same settings, never samples a refusal before
its KL budget ends it (docs/experiments.md, issue 34). The check reads what the run logged about its samples of
train prompts (metrics.jsonl's evasive_SOURCE), never a held-out or test prompt:
- evasive_harmful: the refusal-or-hedge share on prompt sources marked harmful, which must reach
  min_evasive_harmful (the refusal was found);
- evasive_ordinary: the same share on the other sources, which must stay under max_evasive_ordinary (it did not
  spread to requests that should be answered).
Each is the mean over the sources a step sampled, averaged over the last `last_steps` training steps.

Attempt k trains into OUTPUT.attempt-k with seed + 1000 k; the kept one becomes OUTPUT, its keel.json lists every
attempt, and the others are removed. With --resume, finished attempts are kept and the interrupted one resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keel.core.artifact import PolicyManifest, publish
from keel.training.config import ConfigError
from keel.training.policy.algorithms import ALGORITHMS
from keel.training.policy.config import PolicyConfig, RestartConfig
from keel.training.policy.run import prompt_source_name
from keel.training.runs import check_output_free, read_metrics

log = logging.getLogger(__name__)
SEED_STRIDE = 1000  # attempt k trains with seed + SEED_STRIDE * k


def train_policy(algorithm: str, config: PolicyConfig, output: Path, resume: bool = False, overwrite: bool = False,
                 **run_options: Any) -> dict[str, Any]:
    """Train `algorithm` once, or, with training.restarts, up to its attempts; returns the kept policy's manifest
    (empty on processes other than the main one under `accelerate launch`)."""
    entry = ALGORITHMS[algorithm]
    train = entry.load()
    restarts = config.training.restarts
    if restarts is None:
        return train(config, output, resume=resume, overwrite=overwrite, **run_options)
    if not entry.on_policy:
        raise ConfigError(f"training.restarts reads the replies a run samples; {algorithm} samples none (use it with "
                          "reinforce, rloo or ppo, or set training.restarts=null)")
    from accelerate import PartialState

    output = Path(output).resolve()
    check_output_free(output, overwrite)
    harmful = {prompt_source_name(s) for s in config.prompts.train if s.harmful}
    ordinary = {prompt_source_name(s) for s in config.prompts.train if not s.harmful}
    attempts: list[dict[str, Any]] = []
    for k in range(restarts.attempts):
        seed = config.training.seed + SEED_STRIDE * k
        directory = attempt_directory(output, k)
        if not (resume and (directory / "keel.json").exists()):  # a finished attempt is kept on --resume
            attempt_config = dataclasses.replace(config, training=dataclasses.replace(config.training, seed=seed))
            train(attempt_config, directory, resume=resume, overwrite=True, **run_options)
        shares = evasive_shares(read_metrics(directory / "metrics.jsonl"), harmful, ordinary, restarts.last_steps)
        attempt = {"seed": seed, **shares, "accepted": passes(shares, restarts),
                   "train_seconds": PolicyManifest.read(directory).train_seconds}
        attempts.append(attempt)
        if attempt["accepted"]:
            break
        log.warning("attempt %d of %d missed training.restarts (evasive on harmful prompts %.3f, wanted >= %s; on "
                    "others %.3f, wanted <= %s)%s", k + 1, restarts.attempts, shares["evasive_harmful"],
                    restarts.min_evasive_harmful, shares["evasive_ordinary"], restarts.max_evasive_ordinary,
                    "" if k + 1 == restarts.attempts else f"; training again with seed {seed + SEED_STRIDE}")
    kept = next((k for k, a in enumerate(attempts) if a["accepted"]), closest(attempts, restarts))
    state = PartialState()
    state.wait_for_everyone()  # every process has read the attempts' logs before they move
    if not state.is_main_process:
        return {}
    chosen = attempt_directory(output, kept)
    manifest = PolicyManifest.read(chosen)
    manifest.attempts = [{**a, "kept": k == kept} for k, a in enumerate(attempts)]
    manifest.write(chosen)
    publish(chosen, output, overwrite)
    for k in range(len(attempts)):
        shutil.rmtree(attempt_directory(output, k), ignore_errors=True)
    return manifest.to_json()


def attempt_directory(output: Path, attempt: int) -> Path:
    return output.parent / f"{output.name}.attempt-{attempt}"


def evasive_shares(rows: Sequence[dict[str, Any]], harmful: Collection[str], ordinary: Collection[str],
                   last_steps: int) -> dict[str, float]:
    """The policy's refusal-or-hedge share on harmful and on other train prompts: each step's mean over the sources
    it sampled, averaged over the last `last_steps` logged training steps (0 where none was sampled)."""
    steps = [row for row in rows if any(key.startswith("evasive_") for key in row)][-last_steps:]

    def share(names: Collection[str]) -> float:
        per_step = [np.mean(found) for row in steps
                    if (found := [row[f"evasive_{name}"] for name in names if f"evasive_{name}" in row])]
        return float(np.mean(per_step)) if per_step else 0.0

    return {"evasive_harmful": share(harmful), "evasive_ordinary": share(ordinary)}


def closest(attempts: Sequence[dict[str, Any]], restarts: RestartConfig) -> int:
    """When no attempt passes: the one with the most evasion on harmful prompts among those that kept it off the
    others, else the one with the least on the others. A refusal that spread to ordinary requests is the worse
    failure: ranked by the difference of the two shares, run 17 of issue 34 kept an attempt that refused 35% of
    ordinary requests over one that had learnt little (docs/experiments.md)."""
    within = [k for k, a in enumerate(attempts) if a["evasive_ordinary"] <= restarts.max_evasive_ordinary]
    if within:
        return max(within, key=lambda k: attempts[k]["evasive_harmful"])
    return min(range(len(attempts)), key=lambda k: attempts[k]["evasive_ordinary"])


def passes(shares: dict[str, float], restarts: RestartConfig) -> bool:
    return (shares["evasive_harmful"] >= restarts.min_evasive_harmful
            and shares["evasive_ordinary"] <= restarts.max_evasive_ordinary)
