"""The pieces every policy algorithm shares: chat prompts, generation, response log-probs, KL, whitening.

Sequences are laid out as [left-padded prompt | right-padded response], so every response starts at the same
column P and the log-prob of response token t comes from the logits at column P + t - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from keel.core.policy import encode_prompts, end_token_ids
from keel.core.text import Conversation


@dataclass
class Sequences:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] float: 1 on response tokens, up to and including the end token
    ended: torch.Tensor  # [B] bool: the response ended with the end token (not cut at max_new_tokens)

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def to(self, device: torch.device) -> Sequences:
        return Sequences(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask, self.ended)))

    def select(self, index: torch.Tensor | slice) -> Sequences:
        return Sequences(self.input_ids[index], self.attention_mask[index], self.response_mask[index], self.ended[index])


def response_mask_of(responses: torch.Tensor, end_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask by position, not by token: keep tokens up to and including the first end token. (The pad token
    may equal the end token, so padding cannot be told apart by its id.)"""
    is_end = torch.isin(responses, torch.tensor(end_ids, device=responses.device))
    ended = is_end.any(dim=1)
    first_end = torch.where(ended, is_end.int().argmax(dim=1), responses.shape[1] - 1)
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return (positions <= first_end.unsqueeze(1)).float(), ended



def repeated_ngram_fraction(sequences: Sequences, n: int = 3) -> torch.Tensor:
    """[B] share of each response's token n-grams that already occurred earlier in the same response: near 0 for
    ordinary text, near 1 for a loop such as "I'm sorry, I'm sorry, I'm sorry"."""
    responses = sequences.input_ids[:, sequences.prompt_length :].tolist()
    lengths = sequences.response_mask.sum(1).long().tolist()
    fractions = []
    for tokens, length in zip(responses, lengths):
        ngrams = [tuple(tokens[i : i + n]) for i in range(length - n + 1)]
        fractions.append(1.0 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0)
    return torch.tensor(fractions)

@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation],
             max_prompt_length: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False) -> tuple[Sequences, list[str]]:
    """Sample one response per conversation; returns the sequences and the decoded responses."""
    device = next(model.parameters()).device
    prompts = {k: v.to(device) for k, v in encode_prompts(tokenizer, conversations, max_prompt_length).items()}
    end_ids = end_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                    "top_k": 0}
    output = model.generate(**prompts, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=end_ids, **sampling)
    model.train(was_training)
    prompt_length = prompts["input_ids"].shape[1]
    responses = output[:, prompt_length:]
    if responses.shape[1] == 0:  # max_new_tokens 0 or an immediate stop everywhere
        responses = torch.full((len(conversations), 1), end_ids[0], device=device)
    response_mask, ended = response_mask_of(responses, end_ids)
    attention_mask = torch.cat([prompts["attention_mask"], response_mask.long()], dim=1)
    sequences = Sequences(torch.cat([prompts["input_ids"], responses], dim=1), attention_mask, response_mask, ended)
    texts = tokenizer.batch_decode(responses * response_mask.long() + tokenizer.pad_token_id * (1 - response_mask.long()),
                                   skip_special_tokens=True)
    return sequences, [t.strip() for t in texts]


def teacher_forced(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation], responses: Sequence[str],
                   max_prompt_length: int, max_response_length: int) -> Sequences:
    """Given (conversation, response) pairs as sequences, each response closed by the end token (SFT, DPO)."""
    prompts = encode_prompts(tokenizer, conversations, max_prompt_length)
    end = tokenizer.eos_token
    encoded = tokenizer([r + end for r in responses], add_special_tokens=False, truncation=True,
                        max_length=max_response_length)["input_ids"]
    width = max(len(ids) for ids in encoded)
    response_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(encoded), width))
    for row, ids in enumerate(encoded):
        response_ids[row, : len(ids)] = torch.tensor(ids)
        response_mask[row, : len(ids)] = 1.0
    ended = torch.tensor([ids[-1] == tokenizer.eos_token_id for ids in encoded])
    attention_mask = torch.cat([prompts["attention_mask"], response_mask.long()], dim=1)
    return Sequences(torch.cat([prompts["input_ids"], response_ids], dim=1), attention_mask, response_mask, ended)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token of each left-padded row."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(model: torch.nn.Module, sequences: Sequences, temperature: float = 1.0,
                      with_entropy: bool = False, with_hidden: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for every response token [B, R], plus (optionally) the policy's entropy at each
    token and the last hidden state at the columns that predict them (for a value head)."""
    width = sequences.response_mask.shape[1]
    output = model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask,
                   position_ids=position_ids(sequences.attention_mask), logits_to_keep=width + 1,
                   output_hidden_states=with_hidden, use_cache=False)
    logits = output.logits[:, :-1].float() / temperature  # column P + t - 1 predicts response token t
    targets = sequences.input_ids[:, -width:]
    # log softmax at the target only: logit - logsumexp, without a [B, R, V] log-prob tensor.
    normalizer = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normalizer
    entropy = None
    if with_entropy:  # H = logsumexp(z) - sum_v softmax(z)_v z_v
        with torch.no_grad():
            entropy = normalizer - (F.softmax(logits, -1) * logits).sum(-1)
    hidden = output.hidden_states[-1][:, -width - 1 : -1] if with_hidden else None
    return logprobs, entropy, hidden


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the mean is added back when shift_mean is False)."""
    mask = torch.ones_like(values) if mask is None else mask
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_estimates(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(pi || ref) from samples y ~ pi, with r = ref(y) / pi(y) (Schulman, 2020):
    k1 = -log r (unbiased, noisy), k2 = (log r)^2 / 2 (low variance, biased), k3 = (r - 1) - log r (unbiased, >= 0)."""
    log_ratio = reference_logprobs - logprobs
    return {"k1": -log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(log_ratio) - log_ratio}


def sequence_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """KL per response: a per-token estimate (k1 by default: unbiased, and what the KL penalty uses) summed
    over its tokens [B]."""
    return (kl_estimates(logprobs, reference_logprobs)[estimator] * mask).sum(dim=1)
