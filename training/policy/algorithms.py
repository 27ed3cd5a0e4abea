"""The policy-tuning algorithms `keel train NAME` runs. A new algorithm is one module (its loss beside its
equation, as rloo.py) and its default config, plus one entry here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.training.config import CONFIGS


@dataclass(frozen=True)
class Algorithm:
    summary: str  # `keel train --help` shows it
    entry_point: str  # "module:function"; imported only when the algorithm runs (torch is slow to import)
    default_config: Path
    on_policy: bool = True  # samples its own replies while training (training.restarts reads them)

    def load(self) -> Callable[..., dict[str, Any]]:
        module, function = self.entry_point.split(":")
        return getattr(importlib.import_module(module), function)


ALGORITHMS = {
    "sft": Algorithm("supervised fine-tuning on demonstrations", "keel.training.policy.sft:train_sft",
                     CONFIGS / "sft.yaml", on_policy=False),
    "reinforce": Algorithm("REINFORCE with a moving-average baseline and a KL penalty",
                           "keel.training.policy.reinforce:train_reinforce", CONFIGS / "reinforce.yaml"),
    "rloo": Algorithm("RLOO: k samples per prompt, leave-one-out baseline, KL penalty (the default RLHF run)",
                      "keel.training.policy.rloo:train_rloo", CONFIGS / "rloo.yaml"),
    "ppo": Algorithm("PPO: clipped surrogate, value head, GAE, per-token KL penalty (fixed or adaptive)",
                     "keel.training.policy.ppo:train_ppo", CONFIGS / "ppo.yaml"),
    "dpo": Algorithm("DPO: direct preference optimisation on preference pairs (offline, no reward model)",
                     "keel.training.policy.dpo:train_dpo", CONFIGS / "dpo.yaml", on_policy=False),
}
