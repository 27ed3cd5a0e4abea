"""What a reward model measures of itself when it is published (keel.training.encoder.publish does the rest):
held-out metrics per head, normalisation and thresholds (calibration.py), and the int8 graph's accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keel.core.artifact import RewardManifest
from keel.core.reward_model import RewardModel, resolve_base_model
from keel.core.text import ModelInput
from keel.training.config import to_dict
from keel.training.encoder import onnx_export
from keel.training.encoder.publish import Exported, publish
from keel.training.encoder.scoring import Scorer
from keel.training.reward.calibration import normalization_and_thresholds
from keel.training.reward.config import RewardConfig
from keel.training.reward.data import HeadData, data_provenance
from keel.training.reward.model_card import reward_model_card
from keel.training.reward.objectives import evaluate_examples, example_inputs


def publish_reward_model(config: RewardConfig, model: RewardModel, tokenizer: Any, heads: list[HeadData],
                         output: Path, overwrite: bool, metrics_path: Path, run: dict[str, Any]) -> RewardManifest:
    """Export ONNX, evaluate, choose normalisation and thresholds, and publish the model directory."""
    names = [h.name for h in config.heads]

    def describe(exported: Exported) -> RewardManifest:
        # Every metric below is computed with the served fp32 graph (faster than torch), each text scored once.
        normalization, moderation = normalization_and_thresholds(exported.scorer, heads, config)
        metrics: dict[str, Any] = dict(run)
        for split in ("validation", "test"):
            metrics[split] = {head.name: evaluate_examples(exported.scorer, getattr(head, split), names)[head.name]
                              for head in heads if getattr(head, split)}
        if exported.int8 is not None:
            exported.onnx["accuracy"] = int8_accuracy(exported.scorer, exported.int8, heads, names)
        return RewardManifest(
            base_model=config.base_model_name,
            base_model_path=resolve_base_model(config.base_model), heads=names, primary_head=config.primary_head or names[0],
            max_length=config.max_length, truncation_side=config.truncation_side,
            input_names=onnx_export.onnx_input_names(tokenizer), normalization=normalization, moderation=moderation,
            onnx=exported.onnx, data=data_provenance(config), config=to_dict(config), metrics=metrics)

    return publish(model, tokenizer, output, overwrite, max_length=config.max_length, export=config.export,
                   eval_batch_size=config.training.eval_batch_size, sample=validation_sample(heads),
                   metrics_path=metrics_path, title=f"reward model: {', '.join(names)}", describe=describe,
                   card=reward_model_card)


def validation_sample(heads: list[HeadData]) -> list[ModelInput]:
    """The texts ONNX graphs are checked against torch on: up to 32 validation examples of every head."""
    return example_inputs([e for head in heads for e in head.validation[:32]])


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
