"""Named model sizes and the GPT-2 architecture switch (training memory per layout: model/fit.py)."""

from __future__ import annotations

from dataclasses import replace

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

# Block choices that come with `model.arch`; a preset or explicit key can still override them.
ARCH_DEFAULTS: dict[str, dict] = {
    "llama": {},
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, norm_eps=1e-5, tie_embeddings=True),
}

PRESETS: dict[str, dict] = {
    # A few million parameters: trains on a laptop CPU in minutes.
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, max_seq_len=512),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, max_seq_len=1024),  # ~125M
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_kv_head=16, max_seq_len=1024),  # ~350M
    "large": dict(n_layer=24, n_embd=1536, n_head=16, n_kv_head=16, max_seq_len=2048),  # ~760M
    "xl": dict(n_layer=24, n_embd=2048, n_head=16, n_kv_head=16, max_seq_len=2048),  # ~1.3B
    "gpt2-small": dict(arch="gpt2", n_layer=12, n_embd=768, n_head=12, max_seq_len=1024),
    "gpt2-medium": dict(arch="gpt2", n_layer=24, n_embd=1024, n_head=16, max_seq_len=1024),
    "gpt2-large": dict(arch="gpt2", n_layer=36, n_embd=1280, n_head=20, max_seq_len=1024),
    # Sliding-window attention (model/window.py): three local layers, then one global, as nanochat / Gemma.
    "swa-tiny": dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, max_seq_len=512, sliding_window=64,
                     window_pattern="SSSL"),
    "swa-small": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, max_seq_len=4096, sliding_window=1024,
                      window_pattern="SSSL"),  # ~114M; the KV cache of 9 local layers stops at 1024 positions
}

# The vocabulary `model info` assumes when none is given: GPT-2's, padded to a multiple of 64.
DEFAULT_INFO_VOCAB = 50304


def preset_values(name: str) -> dict:
    """The key values a preset implies, arch defaults included (applied before the user's keys)."""
    if name not in PRESETS:
        raise LmforgeError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    return {**ARCH_DEFAULTS[values.get("arch", "llama")], **values}


def model_config(name: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(preset=name)
    cfg = replace(cfg, **preset_values(name))
    return replace(cfg, **overrides)
