"""Multi-head latent attention (MLA), as in DeepSeek-V2 / V3, with Hugging Face's parameter names.

Keys and values are not projected per head from the hidden state. One down-projection
(`kv_a_proj_with_mqa`) makes a small latent c (kv_lora_rank wide, RMS-normalised by `kv_a_layernorm`)
and one RoPE key k_r (qk_rope_head_dim wide) that every head shares; `kv_b_proj` expands c into each
head's position-free key part and its value. A query is [q_nope | q_rope] per head, from `q_proj`, or
through its own latent (`q_a_proj`, `q_a_layernorm`, `q_b_proj`) when q_lora_rank > 0. So

    score(h, t, s) = (q_nope[h,t] . k_nope[h,s] + q_rope[h,t] . k_r[s]) / sqrt(nope + rope)

and generation need keep only c and k_r per token (LatentCache), not every head's keys and values.

Two ways to compute the same attention, chosen by what is at hand:
- Expanded (training, and a prefill that starts the cache): K and V from kv_b_proj, then SDPA with
  a query/key width (nope + rope) that differs from the value width. One pass over the T tokens,
  so the expansion costs no more than the k/v projections of ordinary attention.
- Absorbed (decoding against the cache): kv_b_proj's key half is folded into the query
  (q_nope W_uk, one (nope x r) product per head and new token) and its value half into the output,
  so attention runs directly over the cached latents, as one shared key/value "head" of width
  r + rope. Re-expanding instead would push every cached latent through kv_b_proj at every step:
  r H (nope + v) multiply-adds per cached token and layer, against H (2r + rope) here (scores over
  r + rope, values over r); for DeepSeek-V3's widths 16.8 M against 139 k, over 100x fewer once the
  context is long, for a fixed H r (nope + v) per new token to fold the weights in. Measured for
  one mla-small layer and one new token on a CPU core: 3.0 ms against 35 ms with 1,024 cached
  tokens, 9.8 ms against 198 ms with 4,096.

RoPE uses lmforge's rotate-half layout. DeepSeek's released weights are interleaved
(`rope_interleave`); import permutes the rope rows of q_b_proj / q_proj and kv_a_proj_with_mqa
into halves, which leaves every q . k unchanged, and export writes rope_interleave=false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.model import cpu_kernels as kernels

# DeepSeek's latent norms keep this epsilon whatever the model's rms_norm_eps (transformers too).
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLADims:
    q_lora: int  # 0: no query latent
    kv_lora: int
    nope: int
    rope: int
    v: int

    @property
    def qk(self) -> int:
        return self.nope + self.rope


def mla_dims(cfg: ModelConfig) -> MLADims:
    """The widths MLA runs with; a 0 in the config derives from the head width d = n_embd / n_head."""
    d = cfg.n_embd // cfg.n_head
    return MLADims(q_lora=cfg.q_lora_rank, kv_lora=cfg.kv_lora_rank or 4 * d, nope=cfg.qk_nope_head_dim or d,
                   rope=cfg.qk_rope_head_dim or d // 2, v=cfg.v_head_dim or d)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes generation caches per token, all layers together: the latent and the RoPE key for MLA,
    every key/value head's keys and values otherwise."""
    if cfg.attention == "mla":
        dims = mla_dims(cfg)
        per_layer = dims.kv_lora + dims.rope
    else:
        per_layer = 2 * (cfg.n_kv_head or cfg.n_head) * (cfg.head_dim or cfg.n_embd // cfg.n_head)
    return cfg.n_layer * per_layer * dtype_bytes


# The linear layers that take Attention's q_proj / k_proj / v_proj place (LoRA's default targets them).
PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


class LatentNorm(nn.Module):
    """RMSNorm of a latent (q_a_layernorm, kv_a_layernorm), with DeepSeek's fixed epsilon."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return kernels.rms_norm(x, self.weight, LATENT_NORM_EPS)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, LATENT_NORM_EPS).to(x.dtype)


class LatentCache:
    """Generation's cache for MLA: per layer and token, [latent c | RoPE key k_r] (kv_lora_rank +
    qk_rope_head_dim values), in one buffer. The same interface as KVCache (key_mask, length,
    has_padding, select), so the engine drives either."""

    def __init__(self, n_layer: int, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.dtype = dtype
        self.c: list[Tensor | None] = [None] * n_layer
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.has_padding = False

    def update(self, layer: int, c: Tensor) -> Tensor:
        """Append c (B, T, width) at the write position; returns the layer's cache so far (B, S, width)."""
        end = self.length + c.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.c[layer] is None:
            self.c[layer] = c.new_zeros((c.shape[0], self.max_len, c.shape[2]), dtype=self.dtype)
        self.c[layer][:, self.length:end] = c
        return self.c[layer][:, :end]

    def select(self, index: Tensor) -> None:
        self.c = [c if c is None else c[index] for c in self.c]
        self.key_mask = self.key_mask[index]

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.c if c is not None)


def effective_weight(linear: nn.Module, like: Tensor) -> Tensor:
    """The (out, in) matrix a bias-free linear layer applies, in like's dtype and device: its weight when
    plain, else read off its outputs for the unit vectors (a quantized or adapter-wrapped layer computes
    with what it holds, whatever that is)."""
    if type(linear) is nn.Linear:
        return linear.weight.to(like.dtype)
    return linear(torch.eye(linear.in_features, dtype=like.dtype, device=like.device)).T


class MLAttention(nn.Module):
    """DeepSeek's attention block, in place of Attention when model.attention=mla (same forward signature)."""

    window = 0  # every MLA layer is global: the config refuses a sliding window with attention=mla
    kind = "L"  # and block-sparse layers

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.dims = dims = mla_dims(cfg)
        if dims.q_lora:
            self.q_a_proj = nn.Linear(cfg.n_embd, dims.q_lora, bias=False)
            self.q_a_layernorm = LatentNorm(dims.q_lora)
            self.q_b_proj = nn.Linear(dims.q_lora, cfg.n_head * dims.qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * dims.qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.n_embd, dims.kv_lora + dims.rope, bias=False)
        self.kv_a_layernorm = LatentNorm(dims.kv_lora)
        self.kv_b_proj = nn.Linear(dims.kv_lora, cfg.n_head * (dims.nope + dims.v), bias=False)
        self.o_proj = nn.Linear(cfg.n_head * dims.v, cfg.n_embd, bias=False)
        self.scale = 1.0 / math.sqrt(dims.qk)
        self.dropout = cfg.dropout
        # Attention's hook for another kernel (context parallel's ring) has no MLA form; it stays unset.
        self.attend = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: LatentCache | None) -> Tensor:
        B, T, _ = x.shape
        d = self.dims
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if d.q_lora else self.q_proj(x)
        q = q.view(B, T, -1, d.qk).transpose(1, 2)  # heads from the width: a tensor-parallel rank holds its own
        q_nope, q_rope = q.split([d.nope, d.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([d.kv_lora, d.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.unsqueeze(1)  # (B, 1, T, rope): one key every head shares
        q_rope, k_rope = kernels.apply_rope(q_rope, *rope), kernels.apply_rope(k_rope, *rope)
        if cache is not None:
            start = cache.length
            c = cache.update(self.layer, torch.cat([latent, k_rope.squeeze(1)], dim=-1))
            if start > 0:
                return self._absorbed(q_nope, q_rope, c, mask)
        k, v = self._expand(latent, k_rope)
        y = F.scaled_dot_product_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, attn_mask=mask,
                                           is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _expand(self, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Each head's keys [k_nope | k_r] and values (B, H, S, .) from the latents (B, S, r), k_r (B, 1, S, rope)."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, -1, self.dims.nope + self.dims.v).transpose(1, 2)
        k_nope, v = kv.split([self.dims.nope, self.dims.v], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        return k, v

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        """Attention over the cached [latent | k_r] rows c (B, S, r + rope), kv_b_proj folded into q and out."""
        d = self.dims
        B, H, T, _ = q_nope.shape
        w = effective_weight(self.kv_b_proj, q_nope).view(H, d.nope + d.v, d.kv_lora)
        w_uk, w_uv = w.split([d.nope, d.v], dim=1)  # (H, nope, r), (H, v, r)
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], dim=-1)
        # Every head reads the same latents: the heads become query rows of one shared key/value head,
        # so the scores are one (H T) x S product over the cache as it lies, with no per-head copy of it.
        S = c.shape[1]
        kc = c.unsqueeze(1).to(q.dtype)
        if mask is not None:  # the model always masks a step that continues the cache
            mask = mask.expand(B, H, T, S).reshape(B, 1, H * T, S)
        y = F.scaled_dot_product_attention(q.reshape(B, 1, H * T, -1), kc, kc[..., :d.kv_lora], attn_mask=mask,
                                           scale=self.scale)
        y = torch.einsum("bhtr,hvr->bhtv", y.view(B, H, T, d.kv_lora), w_uv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def deepseek_config(cfg: ModelConfig, intermediate_size: int) -> dict:
    """transformers' DeepseekV3 config.json for an MLA model: every layer dense (first_k_dense_replace =
    n_layer, so the routed-expert keys describe nothing built), RoPE in halves (rope_interleave false),
    no multi-token-prediction layers."""
    d = mla_dims(cfg)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": intermediate_size, "moe_intermediate_size": intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
        "first_k_dense_replace": cfg.n_layer, "n_routed_experts": 1, "n_shared_experts": 1,
        "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
        "kv_lora_rank": d.kv_lora, "q_lora_rank": d.q_lora or None, "qk_rope_head_dim": d.rope,
        "qk_nope_head_dim": d.nope, "v_head_dim": d.v, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_scaling": None,
        "rope_interleave": False, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "num_nextn_predict_layers": 0,
        "torch_dtype": "float32", "use_cache": True,
    }


def deinterleave_rope_rows(weights: dict[str, Tensor], dims: MLADims, n_head: int) -> dict[str, Tensor]:
    """DeepSeek's interleaved RoPE pairs (x0, x1), (x2, x3), ... as lmforge's halves: the rope rows of the
    query and of kv_a_proj_with_mqa reordered evens first, then odds. Rotating the reordered vector by
    halves gives exactly what transformers' interleaved rotation gives, so every score is unchanged."""
    perm = torch.cat([torch.arange(0, dims.rope, 2), torch.arange(1, dims.rope, 2)])
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            w = w.view(n_head, dims.qk, -1).clone()
            w[:, dims.nope:] = w[:, dims.nope:][:, perm]
            out[name] = w.view(n_head * dims.qk, -1)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            w = w.clone()
            w[dims.kv_lora:] = w[dims.kv_lora:][perm]
            out[name] = w
    return out
