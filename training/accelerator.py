"""Training precision and the accelerate Accelerator for this machine (detection itself is keel.core.hardware)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from keel.core.hardware import bf16_is_fast, describe, pick_device

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator on the GPU when there is one, else the CPU, training in `precision` resolved for it."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(precision, pick_device()))


def resolve_precision(setting: str, device: torch.device) -> str:
    """The mixed-precision mode to train with: "auto" is bf16 where it is fast and "no" (fp32) elsewhere."""
    fast = bf16_is_fast(device)
    if setting == "auto":
        log.info("precision auto: %s on this %s", "bf16" if fast else "fp32", describe(device))
        return "bf16" if fast else "no"
    if setting == "bf16" and not fast:
        log.warning("precision bf16 on this %s is emulated and several times slower than fp32; "
                    "set training.precision to auto or no", describe(device))
    return setting
