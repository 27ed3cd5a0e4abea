"""`keel export reward`: remake an existing reward model's ONNX graphs with this Keel, re-checked on its own data."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import keel
from keel.core.artifact import (
    FORMAT_VERSION,
    MANIFEST,
    RewardManifest,
    file_sha256,
    staged,
    write_text_atomic,
)
from keel.core.onnx_engine import FP32_FILE, INT8_FILE
from keel.core.reward_model import LEGACY_HEADS_FILE, RewardModel
from keel.training.config import build, to_dict
from keel.training.data import DataError
from keel.training.encoder.optim import load_tokenizer
from keel.training.encoder.publish import export_onnx
from keel.training.encoder.scoring import torch_scorer
from keel.training.reward.config import RewardConfig
from keel.training.reward.data import HeadData, find_moved_data, read_examples
from keel.training.reward.model_card import reward_model_card
from keel.training.reward.publish import int8_accuracy, validation_sample

log = logging.getLogger(__name__)


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
        heads = [HeadData(h.name, [], read_examples(h.validation, skip_bad_rows), read_examples(h.test, skip_bad_rows),
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
        info, fp32, int8_scorer = export_onnx(model, tokenizer, validation_sample(heads), config.export,
                                              config.max_length, staging, torch_scores)
        if int8_scorer is not None:
            info["accuracy"] = int8_accuracy(fp32, int8_scorer, heads, names)
        manifest.onnx = info
        manifest.config = to_dict(config)  # the export settings used, and data paths found under data_dir
        manifest.exported = {"keel_version": keel.__version__,
                             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest.format_version = FORMAT_VERSION
        manifest.write(staging)
        write_text_atomic(staging / "README.md", reward_model_card(manifest, directory))
    return manifest.to_json()
