"""What reward and moderation models share in their configs: the training loop's settings and the export's."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 16  # pairs (or ratings) per optimiser step
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3  # the freshly initialised heads learn faster than the backbone
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop early after this many steps (None: run all epochs)
    freeze_embeddings: bool = True  # the word-embedding matrix is half of MiniLM; freezing it speeds steps
    freeze_layers: int = 0  # also fix the embeddings and the lowest N transformer layers: backward stops above them
    precision: str = "auto"  # auto | bf16 | fp16 | no: mixed-precision autocast (auto: bf16 where it is fast)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # validation accuracy every N steps (0: only at the end)
    keep_best: bool = True  # publish the weights with the best primary-head validation metric, not the last
    checkpoint_every: int = 100  # resumable checkpoint every N steps (0: never)
    eval_batch_size: int = 64


@dataclasses.dataclass
class ExportConfig:
    onnx: bool = True  # write model.onnx (ONNX Runtime-optimised fp32)
    int8: bool = True  # write model.int8.onnx (dynamic, per-channel int8)
    opset: int = 17
