"""Token-level losses shared by the objectives.

The language-modelling loss fuses the head matmul with cross-entropy (`linear_cross_entropy`):
chunk by chunk of tokens it computes the logits, the loss, and at once the gradients of the
hidden states and of the head, then drops the logits. The full (tokens x vocab) fp32 logits are
never kept for the backward pass, which with a 50k-150k vocabulary would outweigh all the blocks'
activations; and because the gradient is formed in place from the softmax, it is also faster than
log_softmax + nll_loss + their backward (fewer passes over the logits, no recomputation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from lmforge.model.cpu_kernels import softmax_xent_

IGNORE = -100
# Tokens per chunk when none is given: 1024 x vocab fp32 logits stay in a CPU's last-level cache for
# small vocabularies, and a chunk is still a large matmul on a GPU; measured fastest on CPU at vocab
# 4k and 50k (bench/README.md).
AUTO_CHUNK = 1024


def _ce_sum(model, h: Tensor, targets: Tensor) -> Tensor:
    logits = model.logits(h).float()
    return _whole(F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                  ignore_index=IGNORE, reduction="sum"))


def _whole(t: Tensor) -> Tensor:
    """A plain tensor of a loss computed from vocab-sharded logits (tensor parallel's `loss_parallel`).

    That loss is already reduced over the vocabulary, the same on every rank (Replicate): taking it out
    of its DTensor moves no data, and the sums the caller forms stay plain tensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t


_cpu_buffer: Tensor | None = None


def _cpu_logits(rows: int, vocab: int) -> Tensor:
    """A (rows, vocab) fp32 CPU buffer kept from call to call.

    A chunk's logits are 16 MB at vocab 4k and 200 MB at 50k. Allocated afresh, each chunk of each
    step makes the kernel map and zero that many new pages (at nanoGPT's shape ~50,000 page faults
    and 0.1 s per step); GPUs have a caching allocator for this, a CPU process does not.
    """
    global _cpu_buffer
    if _cpu_buffer is None or _cpu_buffer.numel() < rows * vocab:
        _cpu_buffer = None  # free the old one first
        _cpu_buffer = torch.empty(rows * vocab, dtype=torch.float32)
    return _cpu_buffer[: rows * vocab].view(rows, vocab)


def free_cpu_logits_buffer() -> None:
    """Drop the buffer `_cpu_logits` keeps (after training; and so that a memory measurement counts it)."""
    global _cpu_buffer
    _cpu_buffer = None


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(softcap(h_t W^T), y_t), with dL/dh and dL/dW formed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, softcap: float,
                dtype: torch.dtype) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):  # matmuls run in `dtype`, the rest in fp32
            for i in range(0, h.shape[0], chunk):
                hc, t = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                if dtype == torch.float32 and h.device.type == "cpu":
                    z = torch.mm(hc, w.T, out=_cpu_logits(hc.shape[0], w.shape[0]))
                else:
                    z = (hc @ w.T).float()
                fused = None if softcap > 0 else softmax_xent_(z, t, IGNORE)
                if fused is not None:  # CPU kernel: z is now softmax - onehot, ignored rows zeroed
                    total += fused
                    if not (want_h or want_w):
                        continue
                    g, masked = z.to(dtype), False  # zero rows of g already give ignored tokens no gradient
                else:
                    if softcap > 0:
                        th = z.div_(softcap).tanh_()
                        z = th * softcap
                    logp = torch.log_softmax(z, dim=-1)
                    del z
                    valid = (t != IGNORE).unsqueeze(1)
                    safe = t.clamp_min(0).unsqueeze(1)
                    total -= (logp.gather(1, safe) * valid).sum()
                    if not (want_h or want_w):
                        continue
                    g = logp.exp_()  # softmax, in place
                    g.scatter_add_(1, safe, -valid.to(g.dtype))  # minus one-hot(target)
                    if softcap > 0:
                        g.mul_(1 - th * th)
                    g = g.to(dtype)
                    # Ignored positions get no gradient: zero their rows of h (tokens x C), cheaper
                    # than their rows of g (tokens x vocab). Pretraining has none, and on a CPU asking
                    # costs nothing (on a GPU it would be a sync, so there the mask is always applied).
                    masked = not (hc.device.type == "cpu" and bool(valid.all()))
                if want_h:
                    out = grad_h[i:i + chunk]
                    if masked:
                        out.copy_((g @ w) * valid)
                    elif out.dtype != dtype:  # bf16 matmul under autocast, fp32 gradient buffer
                        out.copy_(g @ w)
                    else:
                        torch.mm(g, w, out=out)
                if want_w:
                    hv = hc * valid.to(hc.dtype) if masked else hc
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(g.T, hv)
                    else:
                        grad_w += (g.T @ hv).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.repeatable = _repeatable
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # The gradients were formed in forward and are scaled here in place: a copy of the head's
        # gradient would be another vocab x C buffer (77 MB at 50k x 384) per step. So this
        # backward can run once per forward, which is all training does.
        grad_h, grad_w = ctx.saved_tensors
        if ctx.repeatable:  # zero-bubble pipeline schedules run backward twice (inputs, then weights)
            gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
            gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
            return gh, gw, None, None, None, None
        if getattr(ctx, "done", False):
            raise RuntimeError("backward through linear_cross_entropy twice (retain_graph) needs repeatable_backward()")
        ctx.done = True
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


_repeatable = False


@contextlib.contextmanager
def repeatable_backward() -> Iterator[None]:
    """Losses made inside may be differentiated more than once, at the cost of copying their gradients.

    The fused loss scales the gradients it formed in forward in place, so one backward is all it
    allows; zero-bubble pipeline schedules (ZBV, DualPipeV) split backward into an input pass and a
    weight pass through the same graph.
    """
    global _repeatable
    was, _repeatable = _repeatable, True
    try:
        yield
    finally:
        _repeatable = was


def _plain_head(model) -> nn.Linear | None:
    """The model's head if it is a plain bias-free Linear on an ordinary tensor, else None.

    Quantized (NF4), sharded (DTensor) or adapted heads fall back to the unfused path.
    """
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.bias is None and type(head.weight) is nn.Parameter:
        return head
    return None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 0, softcap: float = 0.0
                         ) -> Tensor:
    """Sum of token cross-entropies of logits softcap(h @ weight.T), never keeping all logits.

    h: (..., C), targets: (...) with -100 ignored. chunk: tokens per chunk (0: AUTO_CHUNK). Under
    autocast the matmuls run in the autocast dtype and the softmax in fp32, like the unfused path.
    """
    hf, tf = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: the Function would still see requires_grad and form grads
        hf, weight = hf.detach(), weight.detach()
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    chunk = chunk if chunk > 0 else AUTO_CHUNK
    return _LinearCrossEntropy.apply(hf, weight, tf, chunk, softcap, dtype)


def cross_entropy_sum(model, h: Tensor, targets: Tensor, chunk: int = 0) -> Tensor:
    """Sum of token cross-entropies (targets == -100 ignored); h: (B, T, C) final hidden states.

    chunk: tokens per chunk of the fused head + loss (0: AUTO_CHUNK). Heads that cannot be fused
    (quantized, sharded) take the unfused path, checkpointed per chunk when chunk > 0.
    """
    head = _plain_head(model)
    if head is not None:
        softcap = float(getattr(getattr(model, "cfg", None), "logit_softcap", 0.0) or 0.0)
        return linear_cross_entropy(h, head.weight, targets, chunk, softcap)
    if chunk <= 0 and isinstance(getattr(getattr(model, "lm_head", None), "weight", None), DTensor):
        chunk = AUTO_CHUNK  # a tensor-parallel head: a slice of the vocabulary, still never all tokens' logits
    if chunk <= 0 or h.shape[0] * h.shape[1] <= chunk:
        return _ce_sum(model, h, targets)
    hf, tf = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, hf.shape[0], chunk):
        total = total + checkpoint(_ce_sum, model, hf[i:i + chunk], tf[i:i + chunk], use_reentrant=False)
    return total


def token_logprobs(model, h: Tensor, targets: Tensor) -> Tensor:
    """log p(target_t | prefix) per position, (B, T); positions with target -100 give 0.

    Written as minus the unreduced cross-entropy (log_softmax then a gather, the same arithmetic),
    because that is what vocab-sharded logits have a parallel form for (`loss_parallel`).
    """
    logits = model.logits(h).float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return -_whole(nll).view(targets.shape)
