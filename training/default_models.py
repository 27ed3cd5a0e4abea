"""The default reward and moderation models: where they live, and training (or re-exporting) them when
`keel serve` or a reward function asks for one and it is absent."""

from __future__ import annotations

import logging
from pathlib import Path

from keel.core.artifact import RewardManifest
from keel.core.onnx_engine import int8_outdated
from keel.training.config import BUNDLED_DATA, DEFAULT_MODERATION_CONFIG, DEFAULT_REWARD_CONFIG, load_config
from keel.training.data import DataError
from keel.training.moderation.config import ModerationConfig
from keel.training.moderation.train import train_moderation
from keel.training.reward.config import RewardConfig
from keel.training.reward.reexport import reexport
from keel.training.reward.train import train_reward

log = logging.getLogger(__name__)


def ensure_default_model(directory: Path) -> Path:
    """Train the default reward model into directory if it is not there yet (progress bar on stderr); re-export
    its ONNX graphs if an older Keel made its int8 graph with another recipe."""
    if (directory / "keel.json").exists():
        if int8_outdated(RewardManifest.read(directory).onnx):
            log.info("the default model's int8 graph was made by an older Keel: re-exporting it "
                     "(2-3 minutes on 2 CPU cores)")
            try:  # the default model's data is Keel's own, wherever this copy of Keel now lives
                reexport(directory, data_dir=BUNDLED_DATA)
            except DataError as error:
                log.warning("kept the default model's graphs as they are: %s", error)
        return directory
    log.info("no model at %s: training the default reward model first (10-35 minutes on 2 CPU cores, by CPU)",
             directory)
    work = directory.parent / f"{directory.name}.work"
    train_reward(load_config(RewardConfig, DEFAULT_REWARD_CONFIG), directory, resume=work.exists())
    return directory


def ensure_default_moderation_model(directory: Path) -> Path:
    """Train the default moderation model into directory if it is not there yet (progress bar on stderr)."""
    if not (directory / "keel.json").exists():
        log.info("no model at %s: training the default moderation model first (about 10 minutes on 2 CPU cores)",
                 directory)
        work = directory.parent / f"{directory.name}.work"
        train_moderation(load_config(ModerationConfig, DEFAULT_MODERATION_CONFIG), directory, resume=work.exists())
    return directory
