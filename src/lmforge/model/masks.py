"""Attention masks written once, as index functions, and turned into SDPA's or FlexAttention's masks.

A mask is a function `mod(b, h, q, k) -> bool` of the batch row, head, query and key positions, the
form `torch.nn.attention.flex_attention` takes. Each pattern the models use is one such function:
causal, a sliding window (model/window.py), packed documents (SFT: attention never crosses examples)
and block-sparse layers (below). From the same function come
- a boolean (B, 1, T, S) mask for SDPA (`dense`): the function evaluated on broadcast index tensors;
- a FlexAttention `BlockMask` (`block_mask`), whose kernel skips the key blocks a query block never
  sees and needs no T x T tensor, so packed documents and long windows keep a fused kernel on a GPU.

Both give the same attention (tests/test_masks.py holds them to each other). Where FlexAttention runs
is decided per forward by `use_flex`: `model.attn_impl=auto` takes it on CUDA whenever a layer needs a
mask (plain causal attention stays on SDPA's flash path); `flex` also on a CPU, where PyTorch has no
backward for it, so only for forwards without gradients (evaluation, scoring); `sdpa` never. The first
use on a device compiles it; if that fails, the run says so once and stays on SDPA.

Block-sparse layers (letter B in `model.window_pattern`) see, in blocks of `model.sparse_block` tokens:
their own block (causally), the `model.sparse_local` blocks before it, the first `model.sparse_global`
blocks (global "sink" tokens every query reads, as in BigBird / Longformer), and with
`model.sparse_stride = s` every s-th block (the last of each s, Sparse Transformer's fixed pattern).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from lmforge.console import log

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return k <= q


def window(size: int) -> MaskMod:
    """Causal within the `size` latest positions, the query's own included (transformers' convention)."""
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k <= q) & (q - k < size)
    return mod


def block_sparse(block: int, local: int, first: int, stride: int, slot_pos: Tensor | None = None) -> MaskMod:
    """The block-sparse pattern of the module docstring, over token positions: `slot_pos` (B, S) gives the
    position of each query/key index where they differ (left-padded prompts, packed documents)."""
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if slot_pos is None:
            qb, kb = q // block, k // block
        else:
            qb, kb = slot_pos[b, q] // block, slot_pos[b, k] // block
        see = (qb - kb <= local) | (kb < first)
        if stride:
            see = see | (kb % stride == stride - 1)
        return (k <= q) & see
    return mod


def documents(doc_ids: Tensor, inner: MaskMod = causal) -> MaskMod:
    """`inner` within each packed document of (B, T) `doc_ids`; never across two."""
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return inner(b, h, q, k) & (doc_ids[b, q] == doc_ids[b, k])
    return mod


def dense(mod: MaskMod, B: int, T: int, S: int, device: torch.device | str, start: int = 0) -> Tensor:
    """(B, 1, T, S) boolean: `mod` at queries start..start+T-1 over keys 0..S-1, for SDPA."""
    b = torch.arange(B, device=device).view(B, 1, 1)
    h = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(start, start + T, device=device).view(1, T, 1)
    k = torch.arange(S, device=device).view(1, 1, S)
    return mod(b, h, q, k).expand(B, T, S).unsqueeze(1)


def block_mask(mod: MaskMod, B: int, T: int, device: torch.device | str, per_row: bool):
    """FlexAttention's BlockMask of `mod` over T queries and T keys (a row-independent mod: one for all rows)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mod, B if per_row else None, None, T, T, device=device)


def sparse_visible(block: int, local: int, first: int, stride: int, seq_len: int) -> int:
    """Query-key pairs a block-sparse layer computes over `seq_len` tokens (for FLOPs): the pattern counted."""
    n = -(-seq_len // block)
    qb = torch.arange(n).view(n, 1)
    kb = torch.arange(n).view(1, n)
    see = ((qb - kb <= local) | (kb < first) | ((kb % stride == stride - 1) if stride else False)) & (kb < qb)
    sizes = torch.full((n,), block)
    sizes[-1] = seq_len - block * (n - 1)
    off = int((see * sizes.view(n, 1) * sizes.view(1, n)).sum())  # whole blocks below the diagonal
    return off + int((sizes * (sizes + 1) // 2).sum())  # each diagonal block, causally


# --- where FlexAttention runs --------------------------------------------------------------------------

COMPILE = True  # tests set False: the unfused FlexAttention gives the same numbers without a compile


def use_flex(impl: str, device: torch.device, grad: bool, dropout: float) -> bool:
    """Whether this forward's masked layers go through FlexAttention (see the module docstring)."""
    if impl == "sdpa" or dropout > 0:  # FlexAttention has no attention dropout
        return False
    if device.type == "cuda":
        return _works(device.type, COMPILE)
    if impl != "flex" or device.type != "cpu":
        return False
    if grad:
        _say_once("model.attn_impl=flex: PyTorch's FlexAttention has no backward on a CPU, so training's masked "
                  "layers stay on SDPA (the same results); evaluation and scoring use FlexAttention")
        return False
    return _works(device.type, COMPILE)


@functools.cache
def _say_once(text: str) -> None:
    log(f"[yellow]{text}[/yellow]")


@functools.cache
def _flex(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None) if compiled else flex_attention


@functools.cache
def _works(device: str, compiled: bool) -> bool:
    """One small call, compiled as the real ones will be: False (and a line saying why) where it fails."""
    try:
        q = torch.randn(1, 2, 128, 16, device=device)
        _call(q, q, q, block_mask(window(32), 1, 128, device, per_row=False), compiled)
        return True
    except Exception as e:  # a missing compiler, an unsupported GPU or PyTorch: SDPA gives the same result
        _say_once(f"FlexAttention does not run on {device} here ({type(e).__name__}: {str(e)[:200]}); masked "
                  "attention stays on SDPA with dense masks")
        return False


def flex(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """FlexAttention of (B, H, T, D) queries over (B, Hk, T, D) keys/values under a BlockMask."""
    return _call(q, k, v, mask, COMPILE)


def _call(q: Tensor, k: Tensor, v: Tensor, mask, compiled: bool) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    if not compiled:
        import warnings

        with warnings.catch_warnings():  # "called without torch.compile(): unfused", the point when COMPILE is off
            warnings.simplefilter("ignore", UserWarning)
            return _flex(False)(q, k, v, block_mask=mask, enable_gqa=gqa)
    return _flex(True)(q, k, v, block_mask=mask, enable_gqa=gqa)
