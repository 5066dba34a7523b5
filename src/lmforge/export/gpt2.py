"""GPT-2 variant (`model.arch=gpt2`) -> a `transformers` GPT2LMHeadModel folder.

lmforge keeps Llama names for every architecture (q_proj, k_proj, ... under model.layers.N), so the
GPT-2 variant needs a real mapping, unlike Llama/Qwen: GPT-2 fuses q, k and v into one `c_attn`,
and its linear layers are `Conv1D` modules that store the weight as (in, out), the transpose of
nn.Linear's (out, in).

    model.embed_tokens / embed_positions       -> transformer.wte / transformer.wpe
    model.layers.N.input_layernorm             -> transformer.h.N.ln_1
    self_attn.{q,k,v}_proj (concatenated, .T)  -> transformer.h.N.attn.c_attn
    self_attn.o_proj (.T)                      -> transformer.h.N.attn.c_proj
    post_attention_layernorm                   -> transformer.h.N.ln_2
    mlp.up_proj / mlp.down_proj (.T)           -> transformer.h.N.mlp.c_fc / c_proj
    model.norm                                 -> transformer.ln_f
    lm_head (only when untied)                 -> lm_head

`gpt2_writer` fits export/hf.py's WRITERS table (config + state map); `write_gpt2` writes a folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


def _problems(cfg: ModelConfig) -> list[str]:
    """What GPT2LMHeadModel cannot represent, each naming the lmforge key to change."""
    want = {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True, "qk_norm": False}
    out = [f"model.{k}={getattr(cfg, k)} (GPT-2 needs {v})" for k, v in want.items() if getattr(cfg, k) != v]
    if (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
        out.append(f"model.n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention; use {cfg.n_head} or 0)")
    if cfg.logit_softcap:
        out.append(f"model.logit_softcap={cfg.logit_softcap} (GPT-2 has no soft-capping; set 0)")
    if cfg.head_dim and cfg.head_dim * cfg.n_head != cfg.n_embd:
        out.append(f"model.head_dim={cfg.head_dim} (GPT-2's heads split n_embd evenly; set 0)")
    if cfg.sliding_window:
        out.append(f"model.sliding_window={cfg.sliding_window} (GPT-2 has no sliding-window attention; set 0)")
    if cfg.sparse_block:
        out.append(f"model.sparse_block={cfg.sparse_block} (GPT-2 has no block-sparse attention; set 0)")
    return out


def gpt2_config(cfg: ModelConfig) -> dict:
    """transformers config.json for GPT2LMHeadModel, plus the lmforge section (as checkpoints carry)."""
    from lmforge.model.transformer import ffn_dim

    problems = _problems(cfg)
    if problems:
        raise LmforgeError("cannot export as GPT-2: " + "; ".join(problems))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": ffn_dim(cfg),
        "activation_function": "gelu_new",  # the tanh approximation lmforge's GELU MLP uses
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "lmforge": dataclasses.asdict(cfg),
    }


def gpt2_names(sd: dict[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """Map an lmforge state dict (HF-Llama names; tied head omitted or present) to GPT-2 names."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"],
           "transformer.ln_f.bias": sd["model.norm.bias"]}
    for i in range(n_layer):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        a = src + "self_attn."
        for ln_src, ln_dst in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            for kind in ("weight", "bias"):
                out[f"{dst}{ln_dst}.{kind}"] = sd[f"{src}{ln_src}.{kind}"]
        out[dst + "attn.c_attn.weight"] = torch.cat([sd[f"{a}{p}_proj.weight"] for p in "qkv"]).T
        out[dst + "attn.c_attn.bias"] = torch.cat([sd[f"{a}{p}_proj.bias"] for p in "qkv"])
        for lin_src, lin_dst in ((a + "o_proj", "attn.c_proj"), (src + "mlp.up_proj", "mlp.c_fc"),
                                 (src + "mlp.down_proj", "mlp.c_proj")):
            out[f"{dst}{lin_dst}.weight"] = sd[lin_src + ".weight"].T
            out[f"{dst}{lin_dst}.bias"] = sd[lin_src + ".bias"]
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def gpt2_writer(cfg: ModelConfig):
    """(config.json, state map) for export/hf.py's WRITERS["gpt2"]."""
    return gpt2_config(cfg), lambda sd: gpt2_names(sd, cfg.n_layer)


def gpt2_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under GPT2LMHeadModel's names (a tied head is left out, as transformers does)."""
    from lmforge.checkpoint import model_state, unwrap

    m = unwrap(model)
    gpt2_config(m.cfg)  # raises, naming the keys, if GPT-2 cannot represent this model
    return gpt2_names(model_state(m), m.cfg.n_layer)


def write_gpt2(model: nn.Module, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained(out_dir)` loads."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import unwrap
    from lmforge.io import atomic_write, atomic_write_json

    out_dir = Path(out_dir)
    state = gpt2_state_dict(model)
    atomic_write(out_dir / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_json(out_dir / "config.json", gpt2_config(unwrap(model).cfg))
    return out_dir
