"""Sliding-window (local / global) attention: which layers are local, their masks, and their KV cache.

`model.sliding_window = W` makes the layers `model.window_pattern` marks S local: the query at position i
attends to keys j with i - W < j <= i (W positions, its own included), the convention of transformers'
Mistral / Qwen2 / Qwen3 `sliding_window`, so exported logits match. L layers keep full causal attention.
The pattern repeats over the layers (SSSL on 12 layers: 9 local, 3 global); an empty pattern makes every
layer local, as Mistral and transformers' default `layer_types` do.

Training goes through SDPA: a local layer gets a boolean band mask only when the sequence is longer than
the window (else the band is the causal mask and the fast is_causal path stays); a packed-SFT document
mask is intersected with the band. Global layers get exactly the mask the dense model builds.

Generation: a local layer's cache is a ring of W slots (`RingKV`), so its memory stops growing at W
positions. Its keys come back in one of three shapes, and `local_mask` builds the matching mask:
- while the sequence still fits in the window, slots 0..end-1 in order: the dense cache's layout and mask;
- one new token past the window: all W slots (slot s holds the latest position p = s mod W);
- a chunk of several tokens past the window: the ring's positions in order, then the chunk's own keys.

This module imports only torch and the config, so the model, the cache and export can all use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import masks
from lmforge.model.mla import kv_cache_bytes_per_token


def layer_pattern(cfg: ModelConfig) -> str:
    """The letter of every layer: S (sliding window), B (block-sparse, model/masks.py) or L (global).

    An empty pattern makes every layer local: windowed with a sliding_window, else block-sparse with a
    sparse_block, else global.
    """
    default = "S" if cfg.sliding_window else "B" if cfg.sparse_block else "L"
    return ((cfg.window_pattern or default) * cfg.n_layer)[:cfg.n_layer]


def layer_windows(cfg: ModelConfig) -> list[int]:
    """Each layer's window: cfg.sliding_window for a local (S) layer, 0 for the others."""
    return [cfg.sliding_window if k == "S" else 0 for k in layer_pattern(cfg)]


def shortest_pattern(kinds: str) -> str:
    """The shortest pattern whose repetition gives `kinds` (SLSLSL -> SL), so an import reads as it was written."""
    for n in range(1, len(kinds) + 1):
        if ((kinds[:n]) * len(kinds))[:len(kinds)] == kinds:
            return kinds[:n]
    return kinds


def local_mask(dense: Tensor | None, T: int, start: int, window: int, cache, device: torch.device) -> Tensor | None:
    """The mask of a local layer, given the mask the dense model built for this forward (None: causal).

    Matches the keys RingKV.update returns for the same (start, T); see the module's docstring.
    """
    end = start + T
    if cache is None:
        if T <= window:  # the band is wider than the sequence: plain causal (or the document mask)
            return dense
        b = masks.dense(masks.window(window), 1, T, T, device)
        return b if dense is None else dense & b
    if end <= window:  # the ring still holds every position in order, like the dense cache
        return dense
    if T == 1:  # every slot holds one of the W latest positions; only padding is left out
        slots = torch.arange(window, device=device)
        pos = start - (start - slots) % window
        if not cache.has_padding:
            return torch.ones(1, 1, 1, window, dtype=torch.bool, device=device)
        return cache.key_mask[:, pos].view(-1, 1, 1, window)
    lo = max(0, start - window)
    pos = torch.arange(lo, end, device=device)
    q = torch.arange(start, end, device=device).unsqueeze(1)
    m = (pos <= q) & (pos > q - window)  # (T, S)
    return (m.unsqueeze(0) & cache.key_mask[:, pos].unsqueeze(1)).unsqueeze(1)


class RingKV:
    """One local layer's keys and values in W slots: position p lives in slot p mod W."""

    def __init__(self, window: int, max_len: int, dtype: torch.dtype):
        self.window = window
        self.size = min(window, max_len)  # a window past the context never fills
        self.dtype = dtype
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store the new keys (B, H, T, D) at positions start.. and return the keys local_mask describes."""
        T, W = k.shape[2], self.window
        end = start + T
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.size, k.shape[3])
            self.k, self.v = k.new_zeros(shape, dtype=self.dtype), v.new_zeros(shape, dtype=self.dtype)
        if end <= W:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            return self.k[:, :, :end], self.v[:, :, :end]
        if T == 1:
            self.k[:, :, start % W] = k[:, :, 0]
            self.v[:, :, start % W] = v[:, :, 0]
            return self.k, self.v
        old = torch.arange(max(0, start - W), start, device=k.device) % W
        keys = torch.cat([self.k[:, :, old], k.to(self.dtype)], dim=2)
        values = torch.cat([self.v[:, :, old], v.to(self.dtype)], dim=2)
        slots = torch.arange(end - W, end, device=k.device) % W
        self.k[:, :, slots] = keys[:, :, -W:]
        self.v[:, :, slots] = values[:, :, -W:]
        return keys, values

    def select(self, index: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]


def cache_bytes(cache) -> int:
    """Bytes held by a KVCache's keys and values (dense buffers and rings alike)."""
    tensors = [t for t in (*cache.k, *cache.v) if t is not None]
    tensors += [t for r in cache.rings or [] if r is not None for t in (r.k, r.v) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_cache_bytes(cfg: ModelConfig, length: int, bytes_per_value: int = 2) -> int:
    """KV-cache bytes of one sequence of `length` tokens: local layers stop at their window."""
    per_position = kv_cache_bytes_per_token(cfg, bytes_per_value) // cfg.n_layer  # MLA: its latent
    return sum(per_position * (min(length, w) if w else length) for w in layer_windows(cfg))


def attention_span(cfg: ModelConfig, seq_len: int) -> float:
    """Key positions per query summed over the layers (for FLOPs): a local layer counts at most its window,
    a block-sparse one the pairs its pattern computes (whole visible blocks) per query."""
    sparse = 0.0
    if "B" in layer_pattern(cfg):
        sparse = masks.sparse_visible(cfg.sparse_block, cfg.sparse_local, cfg.sparse_global, cfg.sparse_stride,
                                      seq_len) / seq_len
    return sum(sparse if k == "B" else min(seq_len, w) if w else seq_len
               for k, w in zip(layer_pattern(cfg), layer_windows(cfg), strict=True))


# --- Hugging Face ---------------------------------------------------------------------------------------

def hf_layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if w else "full_attention" for w in layer_windows(cfg)]


def hf_window_fields(cfg: ModelConfig, model_type: str) -> dict | None:
    """The config.json keys that give the transformers family `model_type` our windows; None: it has none.

    Llama has no sliding window, but Ministral is Llama (no biases) with per-layer `layer_types`; Qwen2 and
    Qwen3 take `use_sliding_window` + `layer_types` (with explicit layer types max_window_layers is unused).
    """
    types = hf_layer_types(cfg)
    if model_type == "llama":
        if cfg.bias:
            return None
        return {"architectures": ["MinistralForCausalLM"], "model_type": "ministral",
                "sliding_window": cfg.sliding_window, "layer_types": types}
    if model_type in ("qwen2", "qwen3"):
        return {"use_sliding_window": True, "sliding_window": cfg.sliding_window,
                "max_window_layers": types.index("sliding_attention"), "layer_types": types}
    return None


def window_from_hf(hf: dict, where: str) -> tuple[int, str]:
    """(sliding_window, window_pattern) of a transformers config: ministral, qwen2 or qwen3 layer types."""
    mt, n = hf.get("model_type"), hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if window is None:
        return 0, ""
    if not isinstance(window, int) or window <= 0:
        raise LmforgeError(f"{where}: sliding_window={window!r} must be a positive integer")
    types = hf.get("layer_types")
    if types is None:  # what transformers derives without layer_types
        first = hf.get("max_window_layers", 28) if mt in ("qwen2", "qwen3") else 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise LmforgeError(f"{where}: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                           f"{n} layers, got {types!r}")
    kinds = "".join("S" if t == "sliding_attention" else "L" for t in types)
    if "S" not in kinds:
        return 0, ""
    return window, shortest_pattern(kinds)
