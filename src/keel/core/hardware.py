"""What this machine offers models: a CUDA GPU, fast bf16, fast int8.

bf16 halves memory traffic on GPUs and on CPUs whose oneDNN kernels run it natively (AVX-512, AMX, Arm BF16).
Elsewhere oneDNN emulates it, and it is far slower than fp32 (docs/experiments.md has the measurements).

torch is imported inside the functions that need it: a serving install has no torch, and there the answer to
"is there a GPU?" is no.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's or a Kubernetes
    pod's CPU limit), rounded up. os.cpu_count() is the node's, which oversubscribes a limited pod."""
    import math
    import os

    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "max 100000" or "200000 100000"
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1: -1 means no limit
            limit_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            quota = limit_us / period_us if limit_us > 0 and period_us > 0 else None
        except (OSError, ValueError):
            quota = None
    return max(1, min(count, math.ceil(quota)) if quota else count)


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def has_cuda() -> bool:
    if not has_torch():
        return False
    if Path("/proc").is_dir() and not Path("/proc/driver/nvidia").exists():
        return False  # Linux without the NVIDIA driver: no CUDA device, known without importing torch (~180 MB)
    import torch

    return torch.cuda.is_available()


def pick_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_is_fast(device: torch.device) -> bool:
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:  # the check oneDNN itself makes before it takes a native bf16 path
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


def fast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is fast, else fp32: for weights and autocast at inference."""
    import torch

    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def describe(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return f"CPU ({torch.backends.cpu.get_cpu_capability()})"


# CPU features with which ONNX Runtime's int8 kernels are both exact and fast: VNNI or AMX on x86, the
# dot-product extension on Arm (/proc/cpuinfo names).
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def int8_is_fast(cpuinfo: str | None = None) -> bool:
    """Whether the int8 graph should outrun the fp32 one on this CPU.

    Without VNNI, ONNX Runtime's exact int8 kernels (see keel.core.onnx_engine.onnx_session) gain nothing over
    fp32 (bench/int8_bench.py measures both).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: Apple silicon has the dot-product extension; elsewhere fp32 is the safe guess
            return platform.machine() == "arm64"
    flags = {flag for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & INT8_DOT_PRODUCT_FLAGS)
