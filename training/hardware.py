"""Where models run, and whether bf16 pays off there.

bf16 halves memory traffic on GPUs and on CPUs whose oneDNN kernels run it natively (AVX-512, AMX, Arm BF16).
Elsewhere oneDNN emulates it, and it is far slower than fp32: on a 2-core AVX2 CPU, measured, a MiniLM
training step took 14-16x as long under bf16 autocast and SmolLM2 generation 2x as long with bf16 weights.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # the check oneDNN itself makes before it takes a native bf16 path
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


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


def fast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is fast, else fp32: for weights and autocast at inference."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return f"CPU ({torch.backends.cpu.get_cpu_capability()})"
