"""One decoder-only Transformer, in the Llama / Qwen3 family, with a GPT-2 variant by config.

Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE uses
the rotate-half convention, so exporting to `transformers` is writing a config.json, not renaming
tensors. The model never mentions parallelism: FSDP, DDP, activation checkpointing and compile are applied from
outside (train/parallelize.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.model import cpu_kernels as kernels
from lmforge.model import masks
from lmforge.model.loss import IGNORE, cross_entropy_sum, token_logprobs
from lmforge.model.mla import LatentCache, MLAttention, mla_dims
from lmforge.model.moe import MoE, expert_dim, inactive_params, is_moe_layer, router_loss_sum
from lmforge.model.window import RingKV, attention_span, layer_pattern, layer_windows, local_mask


def padded_vocab(n: int, multiple: int) -> int:
    return n if multiple <= 1 else ((n + multiple - 1) // multiple) * multiple


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.n_embd // cfg.n_head


def ffn_dim(cfg: ModelConfig) -> int:
    if cfg.ffn_dim:
        return cfg.ffn_dim
    if cfg.mlp == "swiglu":  # 8/3 keeps SwiGLU's parameter count equal to a 4x GELU MLP
        return padded_vocab(int(8 * cfg.n_embd / 3), 64)
    return 4 * cfg.n_embd


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused pass each way on a CPU
            return kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as transformers does, so logits match under bf16 autocast too.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(dim, cfg.norm_eps)


def rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [f0..f(d/2-1), f0..f(d/2-1)]
    return emb.cos(), emb.sin()


def signed_sin(sin: Tensor) -> Tensor:
    """sin with its first half negated: rotate-half's sign moved from the activations to the table."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, bit for bit, with rotate_half(x) = cat(-x2, x1).

    x: (B, H, T, D); cos / sin_signed: (T, D) or (B, 1, T, D). Swapping the halves of x and negating
    the table's first half (a tiny (T, D) op) saves a negation pass over every q and k. On a CPU a
    fused kernel does it in one pass (model/cpu_kernels.py).
    """
    return kernels.apply_rope(x, cos, sin_signed)


class KVCache:
    """Preallocated keys/values for generation, shared write position for the whole batch.

    Prompts of different lengths are left-padded; `key_mask[b, j]` is False for padding so no
    query attends to it. Keeping the cache outside the model (as nanochat's engine does) leaves
    the training forward pass free of generation state.
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 windows: list[int] | None = None):
        self.dtype = dtype
        # Each layer's buffers are allocated, for all max_len positions, at its first write and take
        # their shape from those keys: under tensor parallel a rank holds only its own heads.
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.has_padding = False  # set by whoever left-pads prompts and clears key_mask entries
        # Local (sliding-window) layers keep only their window, in a ring (model/window.py); None: all dense.
        self.rings = [RingKV(w, max_len, dtype) if w else None for w in windows] if windows and any(windows) else None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.rings is not None and self.rings[layer] is not None:
            return self.rings[layer].update(k, v, self.length)
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape, dtype=self.dtype)
            self.v[layer] = v.new_zeros(shape, dtype=self.dtype)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows in `index` (drop finished sequences)."""
        self.k = [k if k is None else k[index] for k in self.k]
        self.v = [v if v is None else v[index] for v in self.v]
        self.key_mask = self.key_mask[index]
        for ring in self.rings or []:
            if ring is not None:
                ring.select(index)


def layer_masks(cfg: ModelConfig, B: int, T: int, start: int, doc_ids: Tensor | None, cache: KVCache | None,
                device: torch.device, flex: bool = False, positions: Tensor | None = None) -> dict:
    """The mask of each kind of layer (L global, S windowed, B block-sparse) for one forward of T tokens.

    None means plain causal attention (SDPA's fast is_causal path); else a boolean (B, 1, T, S) mask, or
    with `flex` (no cache) FlexAttention's BlockMask of the same pattern (model/masks.py). doc_ids keep
    packed documents apart in every kind. `positions` (B, T), where not 0.. on: block-sparse blocks follow
    the tokens' positions, not their slots (a left-padded prompt, documents restarting at 0).
    """
    kinds = set(layer_pattern(cfg))
    out: dict = {}
    slot_pos = None
    if "B" in kinds and positions is not None:  # each row's slots hold positions slot - offset
        offset = start - positions[:, :1]
        slot_pos = positions if cache is None else torch.arange(start + T, device=device).unsqueeze(0) - offset
    if flex:
        def blocks(mod: masks.MaskMod | None) -> object:
            if doc_ids is None:
                return None if mod is None else masks.block_mask(mod, B, T, device, per_row=slot_pos is not None)
            return masks.block_mask(masks.documents(doc_ids, mod or masks.causal), B, T, device, per_row=True)

        out["L"] = blocks(None)
        if "S" in kinds:
            out["S"] = blocks(masks.window(cfg.sliding_window) if T > cfg.sliding_window else None)
        if "B" in kinds:
            out["B"] = blocks(_sparse_mod(cfg, slot_pos) if _sparse_cuts(cfg, T) else None)
        return out
    if doc_ids is not None:
        out["L"] = masks.dense(masks.documents(doc_ids), B, T, T, device)
    else:
        out["L"] = None if cache is None else cache_mask(T, start, cache, device)
    if "S" in kinds:
        out["S"] = local_mask(out["L"], T, start, cfg.sliding_window, cache, device)
    if "B" in kinds:  # a dense cache, all positions in order: the pattern at the cache's positions
        out["B"] = out["L"]
        if _sparse_cuts(cfg, start + T):
            pattern = masks.dense(_sparse_mod(cfg, slot_pos), 1 if slot_pos is None else B, T, start + T, device,
                                  start)
            out["B"] = pattern if out["L"] is None else out["L"] & pattern
    return out


def _sparse_mod(cfg: ModelConfig, slot_pos: Tensor | None) -> masks.MaskMod:
    return masks.block_sparse(cfg.sparse_block, cfg.sparse_local, cfg.sparse_global, cfg.sparse_stride, slot_pos)


def _sparse_cuts(cfg: ModelConfig, length: int) -> bool:
    """Whether the block-sparse pattern hides any earlier position within `length` tokens."""
    blocks = -(-length // cfg.sparse_block)  # the last query block's earliest hidden one is local + 1 back
    return blocks - 1 >= cfg.sparse_local + cfg.sparse_global + 1 and cfg.sparse_stride != 1


def cache_mask(T: int, start: int, cache: KVCache, device: torch.device) -> Tensor | None:
    """The mask of T new tokens from position `start` over the cache: None where plain causal attention
    serves (from position 0, no padding), else a boolean (B, 1, T, start + T), causal and without padding."""
    if start == 0 and not cache.has_padding:
        return None
    S = start + T
    q_pos = torch.arange(start, S, device=device).unsqueeze(1)
    causal = torch.arange(S, device=device).unsqueeze(0) <= q_pos  # (T, S)
    return (causal.unsqueeze(0) & cache.key_mask[:, :S].unsqueeze(1)).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = head_dim(cfg)
        qkv_bias = cfg.bias or cfg.attn_qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's dimensions, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.window = layer_windows(cfg)[layer]  # 0: global or block-sparse; else a local layer's sliding window
        self.kind = layer_pattern(cfg)[layer]  # S, B or L: which of the forward's masks it takes
        self.fuse_qkv = True
        # A replacement for the attention kernel, set from outside: attend(q, k, v) -> output, called for
        # plain causal attention over the whole input (no mask, no cache), in place of SDPA.
        self.attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    @property
    def qkv(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        if self.fuse_qkv and self.training and all(type(m) is nn.Linear and type(m.weight) is nn.Parameter
                                                   for m in self.qkv):  # not adapters or NF4 weights
            # One (C, 3C) product instead of three: a wider GEMM runs nearer the machine's peak,
            # and backward gets one input gradient instead of three to add. Concatenating the
            # weights costs one small copy per step, so it is only done when training.
            ws = [m.weight for m in self.qkv]
            bs = None if self.q_proj.bias is None else torch.cat([m.bias for m in self.qkv])
            q, k, v = F.linear(x, torch.cat(ws), bs).split([w.shape[0] for w in ws], dim=-1)
        else:
            q, k, v = (m(x) for m in self.qkv)
        # Heads from the projections' width, not the config: under tensor parallel a rank holds only its own.
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.attend is not None and mask is None and cache is None:
            return self.o_proj(self.attend(q, k, v).transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """SDPA over (B, H, T, D) queries and (B, Hk, S, D) keys/values: causal without a mask, else under it;
    FlexAttention under a BlockMask (model/masks.py).

    Shared by Attention and the packed decoding step's prompt prefill (infer/decode.py)."""
    if mask is not None and not isinstance(mask, Tensor):
        return masks.flex(q, k, v, mask)
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.device.type == "cpu":
        # The CPU kernel has no GQA path with an explicit mask; expanding is cheap at these sizes.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                          enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_dim(cfg)
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            h = kernels.swiglu(self.gate_proj(x), self.up_proj(x))
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:  # GPT-2's tanh approximation, so logits match GPT2LMHeadModel ("gelu_new")
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.n_embd)
        self.self_attn = MLAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg, cfg.n_embd)
        self.mlp = MoE(cfg, layer, expert_dim(cfg, ffn_dim(cfg))) if is_moe_layer(cfg, layer) else MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside `Transformer`, mirroring transformers' `LlamaForCausalLM.model`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.n_embd)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer by the stages)")
        # An explicit head_dim need not divide n_embd, nor need MLA's explicit widths (config.check_model).
        if cfg.attention == "mha" and not cfg.head_dim and cfg.n_embd % cfg.n_head:
            raise ValueError(f"model.n_embd={cfg.n_embd} is not divisible by model.n_head={cfg.n_head}")
        n_kv = cfg.n_kv_head or cfg.n_head
        if cfg.n_head % n_kv:
            raise ValueError(f"model.n_head={cfg.n_head} is not divisible by model.n_kv_head={n_kv}")
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head_dim = head_dim(cfg)
        self.rope_dim = mla_dims(cfg).rope if cfg.attention == "mla" else self.head_dim  # the width RoPE rotates
        if cfg.pos == "rope":
            cos, sin = rope_cache(self.rope_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # --- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)  # GPT-2: scale residual projections by depth
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.zeros_(p) if self.cfg.zero_init_out else nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        if self.cfg.pos == "rope":  # buffers are not saved; recompute after to_empty()/meta init
            cos, sin = rope_cache(self.rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    # --- forward ----------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None,
                      doc_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Final-norm hidden states (B, T, C); objectives turn them into losses.

        positions: (B, T) token positions (default: 0..T-1, or continuing the cache).
        doc_ids: (B, T) document index per token for packed sequences; attention never crosses
        documents (positions should then restart at 0 per document).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        default_positions = positions is None
        if positions is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of "
                                 f"{self.cfg.max_seq_len} (model.max_seq_len)")
            positions = torch.arange(start, start + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        rope = None
        if self.cfg.pos == "learned":
            # Default positions look up one (T, C) table broadcast over the batch; through the module
            # rather than slicing its weight, so that whatever wraps the module (tensor parallel) sees it.
            x = x + self.model.embed_positions(positions[0] if default_positions else positions)
        elif default_positions:  # one (T, D) slice broadcast over the batch, not a (B, T, D) gather
            rope = (self.rope_cos[start:start + T].to(x.dtype), signed_sin(self.rope_sin[start:start + T]).to(x.dtype))
        else:
            rope = (self.rope_cos[positions].unsqueeze(1).to(x.dtype),
                    signed_sin(self.rope_sin[positions]).unsqueeze(1).to(x.dtype))
        flex = cache is None and self.cfg.attention == "mha" and masks.use_flex(
            self.cfg.attn_impl, input_ids.device, torch.is_grad_enabled(), self.cfg.dropout if self.training else 0.0)
        kind_masks = layer_masks(self.cfg, B, T, start, doc_ids, cache, input_ids.device, flex,
                                 None if default_positions else positions)
        for block in self.model.layers:
            x = block(x, rope, kind_masks[block.self_attn.kind], cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h)
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, loss_mask: Tensor | None = None,
                positions: Tensor | None = None, doc_ids: Tensor | None = None, cache: KVCache | None = None,
                logprobs: bool = False, loss_chunk: int = 0, return_hidden: bool = False) -> Tensor:
        """Logits (B, T, vocab) without labels; with labels (B, T), the loss summed over tokens.

        The loss goes through the fused chunked head + cross-entropy (model/loss.py), so training
        never holds full logits, and it is computed here rather than by the objectives because only
        inside forward are the head's weights whole: under FSDP they are shards outside it, under
        tensor parallel a vocabulary slice. labels == -100, or loss_mask False, are left out.
        logprobs=True returns per-token log p(label) (B, T) instead (0 where left out), for DPO and
        GRPO. return_hidden=True returns the final hidden states (a reward head reads them).
        """
        h = self.hidden_states(input_ids, positions, doc_ids, cache)
        if labels is None:
            return h if return_hidden else self.logits(h)
        if loss_mask is not None:
            labels = labels.masked_fill(~loss_mask.bool(), IGNORE)
        if logprobs:
            return token_logprobs(self, h, labels)
        loss = cross_entropy_sum(self, h, labels, loss_chunk)
        if self.cfg.moe.experts and self.training:  # load-balancing / z-loss, as a sum over tokens (model/moe.py)
            router = router_loss_sum(self, labels)
            loss = loss if router is None else loss + router
        return loss

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache | LatentCache:
        p = self.lm_head.weight
        if self.cfg.attention == "mla":  # MLA keeps only latents
            return LatentCache(self.cfg.n_layer, batch, max_len, dtype or p.dtype, device or p.device)
        return KVCache(self.cfg.n_layer, batch, max_len, dtype or p.dtype, device or p.device,
                       layer_windows(self.cfg))

    # --- accounting -------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """All parameters; active=True: those one token passes through (MoE: top_k of each layer's experts)."""
        n = sum(p.numel() for p in self.parameters()) - (inactive_params(self) if active else 0)
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
            if self.cfg.pos == "learned":
                n -= self.model.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per active weight (forward + backward) plus attention scores (PaLM)."""
        n = self.num_params(exclude_embeddings=True, active=True)
        if self.cfg.tie_embeddings:  # the head matmul still runs with tied weights
            n += self.lm_head.weight.numel()
        if self.cfg.attention == "mla":  # scores over nope + rope dimensions, values of v_head_dim
            dims = mla_dims(self.cfg)
            width = dims.qk + dims.v
        else:
            width = 2 * self.head_dim
        # per layer: 6 x (scores + values) multiply-adds over the positions each query sees
        return 6 * n + 6 * self.cfg.n_head * width * attention_span(self.cfg, seq_len)
