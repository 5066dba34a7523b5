"""Sampling parameters and the logits processing every sampler in lmforge shares.

The order follows transformers' `generate` (repetition penalty, temperature, top-k, top-p), so a
setting means the same thing here as in the tools people compare us with. Temperature 0 means
greedy decoding: the arg-max after the repetition penalty, with no randomness at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 0.95  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in prompt or output
    stop: list[str] = field(default_factory=list)  # stop strings (text level): output is cut before them
    seed: int | None = None  # None: nondeterministic unless a generator is passed

    def check(self) -> None:
        """Raise LmforgeError naming the field when a value makes no sense."""
        if self.max_new_tokens < 0:
            raise LmforgeError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LmforgeError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise LmforgeError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LmforgeError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LmforgeError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty as transformers applies it: divide positive logits, multiply negative ones.

    `seen` is a (B, V) boolean mask of tokens already in each row's prompt or output.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always >= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """fp32 logits ready for arg-max (greedy) or softmax sampling; filtered entries are -inf."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = filter_top_k(logits, params.top_k)
    return filter_top_p(logits, params.top_p)


def sample_next(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """(B,) next token ids from (B, V) logits."""
    processed = process_logits(logits, params, seen)
    if params.greedy:
        return processed.argmax(dim=-1)
    return sample_categorical(processed.softmax(dim=-1), generator)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B,) one draw per row of the (B, V) probabilities, by inverting the row's CDF at a uniform.

    One uniform per row: `torch.multinomial` draws an exponential for every vocabulary entry (its
    CPU generator makes about 50 M a second), which made it 97 % of a sampled decoding step's
    sampling (1.4 ms against 0.04 ms for 16 x 4096). Zero-probability tokens are never drawn: the
    CDF is flat over them and `right=True` picks the entry whose interval holds u.
    """
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u within rounding of the total can fall past the end: take the row's last possible token then.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last)
