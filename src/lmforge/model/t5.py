"""The encoder-decoder family (T5 v1.1), with Hugging Face T5ForConditionalGeneration's parameter names.

An encoder stack reads the source bidirectionally; a decoder stack reads the target causally and
attends to the encoder's output (cross-attention). Positions are not embedded: block 0 of each
stack owns a learned bias per head and relative-distance bucket (`relative_attention_bias`), added
to the attention scores of every block of that stack. The encoder's buckets tell left from right;
the decoder's only look back. Distances up to num_buckets / 4 (bidirectional) get a bucket each,
longer ones share logarithmically wider buckets up to max_distance, as HF T5 computes them.
Scores are not divided by sqrt(d): T5 folds that into the initialisation of q (std (d_model d_kv)^-1/2).

The MLP is gated GELU (v1.1's "gated-gelu": wo(gelu_tanh(wi_0 x) * wi_1 x)); norms are T5LayerNorm,
which is RMSNorm. With tied embeddings the decoder output is scaled by d_model^-1/2 before the
head, as T5 does. The names equal transformers' (encoder.block.0.layer.0.SelfAttention.q.weight,
...), so export writes config.json and the weights as they are.

Generation keeps the decoder's self-attention keys/values per step (T5Cache) and the encoder's
cross-attention keys/values, computed once from the encoder output, for every step after.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.model.loss import IGNORE, cross_entropy_sum, token_logprobs
from lmforge.model.transformer import RMSNorm


def decoder_layers(cfg: ModelConfig) -> int:
    return cfg.n_decoder_layer or cfg.n_layer


def t5_head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.n_embd // cfg.n_head


def t5_ffn_dim(cfg: ModelConfig) -> int:
    """d_ff when model.ffn_dim=0: 8/3 of the width, a multiple of 64, as SwiGLU (the same parameter count)."""
    if cfg.ffn_dim:
        return cfg.ffn_dim
    return ((int(8 * cfg.n_embd / 3) + 63) // 64) * 64


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """The bucket of each key-minus-query distance, as transformers' T5Attention._relative_position_bucket."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class T5Attention(nn.Module):
    """Self- or cross-attention; the first self-attention of a stack also owns its relative position bias."""

    def __init__(self, cfg: ModelConfig, has_relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.n_head, self.d_kv = cfg.n_head, t5_head_dim(cfg)
        inner = self.n_head * self.d_kv
        self.q = nn.Linear(cfg.n_embd, inner, bias=False)
        self.k = nn.Linear(cfg.n_embd, inner, bias=False)
        self.v = nn.Linear(cfg.n_embd, inner, bias=False)
        self.o = nn.Linear(inner, cfg.n_embd, bias=False)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.dropout = cfg.dropout
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_buckets, self.n_head)

    def compute_bias(self, q_len: int, k_len: int, offset: int, device: torch.device) -> Tensor:
        """(1, H, q_len, k_len) bias; query i sits at position offset + i (decoding with a cache)."""
        context = torch.arange(offset, offset + q_len, dtype=torch.long, device=device)[:, None]
        memory = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(memory - context, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, -1, self.d_kv).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, T, C); bias: scores' additive bias (mask included); kv: keys/values already in heads."""
        B, T, _ = x.shape
        q = self.heads(self.q(x))
        k, v = kv if kv is not None else (self.heads(self.k(x)), self.heads(self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, has_relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias, bidirectional)
        self.layer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, False, True)
        self.layer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = t5_ffn_dim(cfg)
        self.wi_0 = nn.Linear(cfg.n_embd, d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.n_embd, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, cfg.n_embd, bias=False)
        self.p = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # transformers' "gelu_new"
        return self.wo(F.dropout(h, self.p, self.training))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


class T5Block(nn.Module):
    """layer[0] self-attention, (decoder: layer[1] cross-attention), then the MLP, each pre-norm and residual."""

    def __init__(self, cfg: ModelConfig, index: int, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.p = cfg.dropout
        parts: list[nn.Module] = [T5LayerSelfAttention(cfg, index == 0, not is_decoder)]
        if is_decoder:
            parts.append(T5LayerCrossAttention(cfg))
        parts.append(T5LayerFF(cfg))
        self.layer = nn.ModuleList(parts)

    def forward(self, x: Tensor, mask: Tensor, offset: int = 0, bias: Tensor | None = None,
                enc: Tensor | None = None, cross_bias: Tensor | None = None, cache: T5Cache | None = None,
                index: int = 0) -> tuple[Tensor, Tensor]:
        """(output, the scores' bias). Block 0 makes the bias from its relative position table and `mask`
        (additive: padding or causality), the later blocks take it from there, as in transformers. Every
        weight is read inside the block's own forward, so FSDP gathers it (block 0 holds the table)."""
        drop = lambda t: F.dropout(t, self.p, self.training)  # noqa: E731
        sa = self.layer[0]
        attn = sa.SelfAttention
        T = x.shape[1]
        if bias is None:
            bias = attn.compute_bias(T, offset + T, offset, x.device) + mask
        h = sa.layer_norm(x)
        self_kv = cross_kv = None
        if cache is not None:  # decoding: this step's keys/values joined to the earlier ones
            k, v = attn.heads(attn.k(h)), attn.heads(attn.v(h))
            if cache.k[index] is not None:
                k, v = torch.cat([cache.k[index], k], dim=2), torch.cat([cache.v[index], v], dim=2)
            cache.k[index], cache.v[index] = k, v
            self_kv = (k, v)
            if cache.cross[index] is None:  # the encoder output's keys/values, once
                cache.cross[index] = cross_keys(self.layer[1].EncDecAttention, enc)
            cross_kv = cache.cross[index]
        x = x + drop(attn(h, bias, self_kv))
        if self.is_decoder:
            ca = self.layer[1]
            if cross_kv is None:
                cross_kv = cross_keys(ca.EncDecAttention, enc)
            x = x + drop(ca.EncDecAttention(ca.layer_norm(x), cross_bias, cross_kv))
        ff = self.layer[-1]
        return x + drop(ff.DenseReluDense(ff.layer_norm(x))), bias


def cross_keys(attn: T5Attention, enc: Tensor) -> tuple[Tensor, Tensor]:
    return attn.heads(attn.k(enc)), attn.heads(attn.v(enc))


class T5Stack(nn.Module):
    """`encoder` or `decoder` of T5ForConditionalGeneration (the token embedding is the model's `shared`)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.block = nn.ModuleList(T5Block(cfg, i, is_decoder) for i in range(n_layer))
        self.final_layer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)

    @property
    def bias_module(self) -> T5Attention:
        """The attention that owns this stack's relative position table."""
        return self.block[0].layer[0].SelfAttention


def padding_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, 1, 1, S) additive bias: 0 where mask is True, the dtype's minimum where it is padding."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask.bool(), torch.finfo(dtype).min)[:, None, None, :]


class T5Cache:
    """Decoding state: each decoder layer's self-attention keys/values so far, and its cross-attention
    keys/values of the encoder output, computed once at the first step."""

    def __init__(self, n_layer: int):
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.cross_bias: Tensor | None = None
        self.length = 0

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows in `index` (drop finished sequences)."""
        self.k = [k if k is None else k[index] for k in self.k]
        self.v = [v if v is None else v[index] for v in self.v]
        self.cross = [c if c is None else (c[0][index], c[1][index]) for c in self.cross]
        if self.cross_bias is not None:
            self.cross_bias = self.cross_bias[index]


class T5(nn.Module):
    """T5ForConditionalGeneration: forward(input_ids, labels=...) is the loss summed over target tokens."""

    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer by the stages)")
        if cfg.decoder_start_id < 0:
            raise ValueError("model.decoder_start_id must be set (the stages take the tokenizer's <|endoftext|>)")
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.encoder = T5Stack(cfg, cfg.n_layer, is_decoder=False)
        self.decoder = T5Stack(cfg, decoder_layers(cfg), is_decoder=True)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def reset_parameters(self) -> None:
        """transformers' T5PreTrainedModel._init_weights at factor 1: with no 1/sqrt(d) in the scores,
        the scale of q, k and v is what keeps attention logits of order one."""
        d, d_kv, H = self.cfg.n_embd, t5_head_dim(self.cfg), self.cfg.n_head
        d_ff = t5_ffn_dim(self.cfg)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 2)[-2] if "." in name else name
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name == "shared.weight":
                nn.init.normal_(p, 0.0, 1.0)
            elif name == "lm_head.weight":
                nn.init.normal_(p, 0.0, d ** -0.5)
            elif leaf == "q":
                nn.init.normal_(p, 0.0, (d * d_kv) ** -0.5)
            elif leaf in ("k", "v", "wi_0", "wi_1", "relative_attention_bias"):
                nn.init.normal_(p, 0.0, d ** -0.5)
            elif leaf == "o":
                nn.init.normal_(p, 0.0, (H * d_kv) ** -0.5)
            elif leaf == "wo":
                nn.init.normal_(p, 0.0, d_ff ** -0.5)
            else:
                raise AssertionError(f"no initialisation for {name}")

    # --- the two stacks --------------------------------------------------------------------------
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, C); attention_mask (B, S) is False at padding."""
        x = F.dropout(self.shared(input_ids), self.cfg.dropout, self.training)
        mask = padding_bias(attention_mask, x.dtype)
        mask = x.new_zeros(1, 1, 1, input_ids.shape[1]) if mask is None else mask
        bias = None
        for block in self.encoder.block:
            x, bias = block(x, mask, bias=bias)
        return F.dropout(self.encoder.final_layer_norm(x), self.cfg.dropout, self.training)

    def decode(self, decoder_input_ids: Tensor, enc: Tensor, attention_mask: Tensor | None = None,
               cache: T5Cache | None = None) -> Tensor:
        """Decoder output (B, T, C), scaled for the head when the embeddings are tied."""
        B, T = decoder_input_ids.shape
        start = cache.length if cache is not None else 0
        x = F.dropout(self.shared(decoder_input_ids), self.cfg.dropout, self.training)
        dev = decoder_input_ids.device
        causal = torch.arange(start + T, device=dev)[None, :] <= torch.arange(start, start + T, device=dev)[:, None]
        mask = torch.zeros(causal.shape, dtype=x.dtype, device=dev).masked_fill(~causal, torch.finfo(x.dtype).min)
        if cache is not None and cache.cross_bias is not None:
            cross_bias = cache.cross_bias
        else:
            cross_bias = padding_bias(attention_mask, x.dtype)
            if cross_bias is None:
                cross_bias = x.new_zeros(1, 1, 1, enc.shape[1])
            if cache is not None:
                cache.cross_bias = cross_bias
        bias = None
        for i, block in enumerate(self.decoder.block):
            x, bias = block(x, mask, start, bias, enc, cross_bias, cache, i)
        if cache is not None:
            cache.length += T
        h = F.dropout(self.decoder.final_layer_norm(x), self.cfg.dropout, self.training)
        return h * self.cfg.n_embd ** -0.5 if self.cfg.tie_embeddings else h

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for `labels`: the start id, then the labels one step later (-100 read as the start id)."""
        start = torch.full_like(labels[:, :1], self.cfg.decoder_start_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE, self.cfg.decoder_start_id)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, loss_mask: Tensor | None = None,
                attention_mask: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                logprobs: bool = False, loss_chunk: int = 0, return_hidden: bool = False) -> Tensor:
        """Logits (B, T, vocab) of the decoder without labels; with labels (B, T), the loss summed over them.

        decoder_input_ids default to the labels shifted right (transformers does the same), so a
        batch is (source ids, their mask, target ids); labels == -100 or loss_mask False are left out.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs labels or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels)
        h = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        if labels is None:
            return h if return_hidden else self.logits(h)
        if loss_mask is not None:
            labels = labels.masked_fill(~loss_mask.bool(), IGNORE)
        if logprobs:
            return token_logprobs(self, h, labels)
        return cross_entropy_sum(self, h, labels, loss_chunk)

    def new_cache(self, batch: int = 0, max_len: int = 0, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> T5Cache:
        return T5Cache(decoder_layers(self.cfg))

    # --- accounting ------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return [*self.encoder.block, *self.decoder.block]

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.shared.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, counting source and target tokens alike at seq_len each.

        A source token passes through the encoder's weights, a target token through the decoder's and
        the head: 6 per weight each (forward + backward), so per token of the two, half their sum; plus
        the attention scores (PaLM): self-attention in both stacks, and cross-attention over the source.
        """
        enc = sum(p.numel() for p in self.encoder.parameters())
        dec = sum(p.numel() for p in self.decoder.parameters()) + self.lm_head.weight.numel()
        width = 2 * t5_head_dim(self.cfg) * self.cfg.n_head
        attn = width * seq_len * (self.cfg.n_layer + 2 * decoder_layers(self.cfg))
        return 6 * (enc + dec) / 2 + 6 * attn / 2


def t5_hf_config(cfg: ModelConfig) -> dict:
    """transformers' T5Config for `cfg` (config.json of a checkpoint and of an export)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.n_embd,
        "d_kv": t5_head_dim(cfg),
        "d_ff": t5_ffn_dim(cfg),
        "num_layers": cfg.n_layer,
        "num_decoder_layers": decoder_layers(cfg),
        "num_heads": cfg.n_head,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "decoder_start_token_id": cfg.decoder_start_id,
        "n_positions": cfg.max_seq_len,
        "torch_dtype": "float32",
        "use_cache": True,
    }
