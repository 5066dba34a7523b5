"""Named model sizes and the GPT-2 architecture switch (training memory per layout: model/fit.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

from lmforge.config import ModelConfig, MoEConfig
from lmforge.errors import LmforgeError

# Block choices that come with `model.arch`; a preset or explicit key can still override them.
ARCH_DEFAULTS: dict[str, dict] = {
    "llama": {},
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, norm_eps=1e-5, tie_embeddings=True),
    # T5 v1.1: relative position bias, gated GELU, untied head (model/t5.py)
    "t5": dict(pos="relative", mlp="gated-gelu", norm_eps=1e-6, tie_embeddings=False),
}

PRESETS: dict[str, dict] = {
    # A few million parameters: trains on a laptop CPU in minutes.
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, max_seq_len=512),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, max_seq_len=1024),  # ~125M
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_kv_head=16, max_seq_len=1024),  # ~350M
    "large": dict(n_layer=24, n_embd=1536, n_head=16, n_kv_head=16, max_seq_len=2048),  # ~760M
    "xl": dict(n_layer=24, n_embd=2048, n_head=16, n_kv_head=16, max_seq_len=2048),  # ~1.3B
    # DeepSeek's multi-head latent attention (model/mla.py). mla-tiny is the CPU-test size.
    "mla-tiny": dict(attention="mla", n_layer=2, n_embd=128, n_head=4, kv_lora_rank=64, q_lora_rank=64,
                     qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_seq_len=256),
    # "small"'s blocks with DeepSeek-V2-Lite's proportions: no query latent (at this size it would save
    # only activation memory), a 256-wide latent cached per token: 6.9 KB/token in bf16 against small's 36.9 KB.
    "mla-small": dict(attention="mla", n_layer=12, n_embd=768, n_head=12, kv_lora_rank=256, q_lora_rank=0,
                      qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_seq_len=1024),
    # Sliding-window attention (model/window.py): three local layers, then one global, as nanochat / Gemma.
    "swa-tiny": dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, max_seq_len=512, sliding_window=64,
                     window_pattern="SSSL"),
    "swa-small": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, max_seq_len=4096, sliding_window=1024,
                      window_pattern="SSSL"),  # ~114M; the KV cache of 9 local layers stops at 1024 positions
    # Mixture of experts (model/moe.py), Qwen3-MoE shaped: QK-norm, GQA, fine-grained experts, top-k renormalised.
    "moe-tiny": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, qk_norm=True, max_seq_len=256,
                     moe=MoEConfig(experts=8, top_k=2)),  # CPU tests
    # Qwen3-30B-A3B's shape scaled down (48 -> 12 layers, 2048 -> 768 wide, 128 -> 64 experts, top 8)
    "moe-small": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, qk_norm=True, tie_embeddings=False,
                      max_seq_len=2048, rope_theta=1e6, moe=MoEConfig(experts=64, top_k=8, expert_dim=256)),
    # Encoder-decoder (model/t5.py). t5-tiny is the CPU-test size; t5-small is google/t5-v1_1-small's shape
    # (8 + 8 blocks, 512 wide, 6 heads of 64, d_ff 1024).
    "t5-tiny": dict(arch="t5", n_layer=2, n_embd=64, n_head=4, ffn_dim=128, max_seq_len=128, relative_buckets=16,
                    relative_max_distance=64),
    "t5-small": dict(arch="t5", n_layer=8, n_embd=512, n_head=6, head_dim=64, ffn_dim=1024, max_seq_len=512),
    "gpt2-small": dict(arch="gpt2", n_layer=12, n_embd=768, n_head=12, max_seq_len=1024),
    "gpt2-medium": dict(arch="gpt2", n_layer=24, n_embd=1024, n_head=16, max_seq_len=1024),
    "gpt2-large": dict(arch="gpt2", n_layer=36, n_embd=1280, n_head=20, max_seq_len=1024),
}

# The vocabulary `model info` assumes when none is given: GPT-2's, padded to a multiple of 64.
DEFAULT_INFO_VOCAB = 50304


def preset_values(name: str) -> dict:
    """The key values a preset implies, arch defaults included (applied before the user's keys)."""
    if name not in PRESETS:
        raise LmforgeError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESETS[name])  # a MoEConfig inside is the caller's to change
    return {**ARCH_DEFAULTS[values.get("arch", "llama")], **values}


def model_config(name: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(preset=name)
    cfg = replace(cfg, **preset_values(name))
    return replace(cfg, **overrides)
