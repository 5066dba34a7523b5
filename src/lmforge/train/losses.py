"""Token-level losses shared by the objectives.

Cross-entropy can run over chunks of tokens so the full (tokens x vocab) fp32 logits never exist
at once: with a 150k vocabulary they would outweigh the whole model's activations. Each chunk is
checkpointed, so its logits are recomputed in the backward pass instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _ce_sum(model, h: Tensor, targets: Tensor) -> Tensor:
    logits = model.logits(h).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def cross_entropy_sum(model, h: Tensor, targets: Tensor, chunk: int = 0) -> Tensor:
    """Sum of token cross-entropies (targets == -100 ignored); h: (B, T, C) final hidden states."""
    if chunk <= 0 or h.shape[0] * h.shape[1] <= chunk:
        return _ce_sum(model, h, targets)
    hf, tf = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, hf.shape[0], chunk):
        total = total + checkpoint(_ce_sum, model, hf[i:i + chunk], tf[i:i + chunk], use_reentrant=False)
    return total


def token_logprobs(model, h: Tensor, targets: Tensor) -> Tensor:
    """log p(target_t | prefix) per position, (B, T); positions with target -100 give 0."""
    logits = model.logits(h).float()
    safe = targets.clamp_min(0)
    lp = torch.gather(F.log_softmax(logits, dim=-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return lp * (targets != IGNORE)
