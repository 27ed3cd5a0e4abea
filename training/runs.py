"""Bookkeeping every training run shares: the work directory, resumable checkpoints and metrics.jsonl."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


def check_output_free(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it or choose another --output")


def prepare_work_directory(output: Path, resume: bool, overwrite: bool) -> Path:
    """OUTPUT.work holds checkpoints and metrics while a run is in progress; a fresh run starts it empty."""
    check_output_free(output, overwrite)
    work = output.parent / f"{output.name}.work"
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def start_run(output: Path, resume: bool, overwrite: bool, precision: str, seed: int) -> tuple[Path, Path, Any]:
    """A training run's absolute output path, its work directory (prepare_work_directory) and its Accelerator,
    with every random generator seeded."""
    from accelerate.utils import set_seed

    from keel.training.accelerator import make_accelerator

    output = Path(output).resolve()
    work = prepare_work_directory(output, resume, overwrite)
    accelerator = make_accelerator(precision)
    set_seed(seed)
    return output, work, accelerator


def end_run() -> None:
    """Close the process group that `accelerate launch` opened, before the interpreter exits: a group left to the
    interpreter's teardown can abort a rank that has finished its work ("terminate called without an active
    exception"), which fails the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def discard_work_without_checkpoints(output: Path) -> None:
    """The work directories of OUTPUT and of its restart attempts (OUTPUT.attempt-K) that hold no checkpoint."""
    attempts = output.parent.glob(f"{glob.escape(output.name)}.attempt-*.work")
    for work in [output.parent / f"{output.name}.work", *attempts]:
        if work.is_dir() and latest_checkpoint(work) is None:
            shutil.rmtree(work, ignore_errors=True)


def _checkpoints(work: Path) -> list[Path]:
    return sorted((work / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(work: Path) -> Path | None:
    found = _checkpoints(work)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, work: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    """Save model, optimiser, scheduler and RNG state (plus `extra`, JSON); a temp dir, then a rename."""
    final = work / CHECKPOINTS / f"step-{step}"
    temporary = work / CHECKPOINTS / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a crash in the middle of a save
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()  # every rank writes its own RNG state into the folder
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()  # and has written it before the folder is renamed
    if accelerator.is_main_process:
        (temporary / "step.json").write_text(json.dumps({"step": step, **(extra or {})}))
        temporary.rename(final)
        for old in _checkpoints(work)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_from(accelerator: Any, work: Path, metrics_path: Path, resume: bool) -> dict[str, Any]:
    """Load the latest checkpoint (when resuming) and drop metrics logged after it; returns its step.json."""
    state: dict[str, Any] = {"step": 0}
    checkpoint = latest_checkpoint(work) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "step.json").read_text())
    if accelerator.is_main_process:
        kept = read_metrics(metrics_path, state["step"])
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return state


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]
