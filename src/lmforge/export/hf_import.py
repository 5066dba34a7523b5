"""Import a local Hugging Face Llama / Qwen2 / Qwen3 / Ministral / dense DeepSeek-V3 folder as an lmforge checkpoint.

The tensor names are already ours, so importing is reading config.json into a ModelConfig,
checking every tensor against the model that config describes, and writing a checkpoint
(weights in fp32, the training precision of master weights). Tokenizer files are copied when
present. Sliding windows come in as model.sliding_window + window_pattern (model/window.py).
Anything our Transformer cannot compute exactly (RoPE scaling, an activation other than SiLU, ...)
is an error naming the config key:
an import that silently changes the function would be worse than none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from lmforge.config import ModelConfig, MoEConfig
from lmforge.errors import LmforgeError
from lmforge.model.mla import deinterleave_rope_rows, mla_dims
from lmforge.model.window import window_from_hf

# ministral: Llama with per-layer sliding windows
SUPPORTED = ("llama", "qwen2", "qwen3", "ministral", "qwen3_moe", "deepseek_v3", "t5")


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if "full_attention" in params:  # per-layer-type parameters (newer transformers)
        params = params["full_attention"]
    for key, section in (("rope_scaling", scaling), ("rope_parameters", params)):
        kind = section.get("rope_type", section.get("type", "default"))
        if kind not in ("default", None):
            raise LmforgeError(f"{where}: {key}.rope_type='{kind}' is not supported (only plain RoPE); "
                               "the imported model would compute something else")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LmforgeError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    return float(theta)


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise LmforgeError(f"{where}: model_type='{mt}' is not supported; lmforge imports {', '.join(SUPPORTED)}")
    if mt == "t5":
        return _t5_config(hf, where)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if not isinstance(hf.get(key), int):
            raise LmforgeError(f"{where}: '{key}' is missing or not an integer")
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{where}: hidden_act='{hf['hidden_act']}' is not supported (SwiGLU uses silu)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if mt == "deepseek_v3":
        return _deepseek_config(hf, where)
    head_dim = hf.get("head_dim") or 0
    if not isinstance(head_dim, int) or head_dim < 0 or head_dim % 2:
        raise LmforgeError(f"{where}: head_dim={head_dim!r} must be a positive even integer (RoPE rotates pairs)")
    if not head_dim and n_embd % n_head:
        raise LmforgeError(f"{where}: hidden_size={n_embd} is not a multiple of num_attention_heads={n_head} "
                           "and there is no head_dim")
    if head_dim == n_embd // n_head and not n_embd % n_head:
        head_dim = 0  # the default: keep the config plain
    window, pattern = window_from_hf(hf, where)
    bias = attn_qkv_bias = qk_norm = False
    if mt == "ministral":
        pass  # Llama with no biases
    elif mt == "llama":
        if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
            raise LmforgeError(f"{where}: attention_bias={hf.get('attention_bias')} with mlp_bias={hf.get('mlp_bias')} "
                               "is not supported (lmforge's `bias` covers both or neither)")
        bias = bool(hf.get("attention_bias"))
    elif mt == "qwen2":
        attn_qkv_bias = True
    else:
        qk_norm = True
        if hf.get("attention_bias"):
            raise LmforgeError(f"{where}: attention_bias=true is not supported for {mt} (bias on o_proj too)")
    moe = _moe_from_hf(hf, where) if mt == "qwen3_moe" else MoEConfig()
    return ModelConfig(
        preset="", arch="llama", moe=moe, vocab_size=hf["vocab_size"], pad_vocab_to=1, n_layer=hf["num_hidden_layers"],
        n_embd=n_embd, n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=head_dim,
        ffn_dim=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        pos="rope", rope_theta=_rope_theta(hf, where), qk_norm=qk_norm, bias=bias, attn_qkv_bias=attn_qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings") or 2048), init_std=float(hf.get("initializer_range", 0.02)),
        sliding_window=window, window_pattern=pattern if pattern != "S" else "",
    )


def _t5_config(hf: dict, where: str) -> ModelConfig:
    """T5 v1.1 (gated-gelu); the original T5's ReLU MLP is refused by name. tie_word_embeddings absent or true
    is the original tied head, whose decoder output transformers scales by d_model^-1/2 (model/t5.py does too)."""
    for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise LmforgeError(f"{where}: '{key}' is missing or not an integer")
    if hf.get("feed_forward_proj", "relu") != "gated-gelu":
        raise LmforgeError(f"{where}: feed_forward_proj={hf.get('feed_forward_proj', 'relu')!r} is not supported; "
                           "lmforge's t5 is T5 v1.1 (gated-gelu)")
    start = hf.get("decoder_start_token_id")
    return ModelConfig(
        preset="", arch="t5", pos="relative", mlp="gated-gelu", vocab_size=hf["vocab_size"], pad_vocab_to=1,
        n_layer=hf["num_layers"], n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"],
        n_embd=hf["d_model"], n_head=hf["num_heads"], head_dim=hf["d_kv"], ffn_dim=hf["d_ff"],
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        max_seq_len=hf.get("n_positions") or 512, init_std=0.02,
        decoder_start_id=start if isinstance(start, int) else hf.get("pad_token_id") or 0)


def _deepseek_config(hf: dict, where: str) -> ModelConfig:
    """DeepSeek-V3 with every layer dense: multi-head latent attention (model/mla.py) and a SwiGLU MLP."""
    n_layer = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 3)
    if first_dense is None or first_dense < n_layer:
        raise LmforgeError(f"{where}: first_k_dense_replace={first_dense} < num_hidden_layers={n_layer}: the later "
                           "layers are mixture-of-experts, which lmforge's MLA model does not have (dense only)")
    if hf.get("attention_bias"):
        raise LmforgeError(f"{where}: attention_bias=true is not supported (lmforge's MLA has no biases)")
    for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise LmforgeError(f"{where}: '{key}' is missing or not a positive integer")
    if hf["qk_rope_head_dim"] % 2:
        raise LmforgeError(f"{where}: qk_rope_head_dim={hf['qk_rope_head_dim']} must be even (RoPE rotates pairs)")
    return ModelConfig(
        preset="", arch="llama", attention="mla", vocab_size=hf["vocab_size"], pad_vocab_to=1, n_layer=n_layer,
        n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"], mlp="swiglu",
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), pos="rope", rope_theta=_rope_theta(hf, where),
        kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank") or 0,
        qk_rope_head_dim=hf["qk_rope_head_dim"], qk_nope_head_dim=hf["qk_nope_head_dim"], v_head_dim=hf["v_head_dim"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings") or 2048), init_std=float(hf.get("initializer_range", 0.02)),
    )


def _moe_from_hf(hf: dict, where: str) -> MoEConfig:
    """Qwen3-MoE's experts: every layer sparse but the first `mlp_only_layers`, as lmforge lays them out."""
    n_layer, dense = hf["num_hidden_layers"], sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise LmforgeError(f"{where}: mlp_only_layers={dense} is not supported (only the first layers may be dense)")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise LmforgeError(f"{where}: decoder_sparse_step={hf['decoder_sparse_step']} is not supported (1 only)")
    if "num_local_experts" in hf:  # transformers 5 writes num_experts under this name
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise LmforgeError(f"{where}: '{key}' is missing or not a positive integer")
    if len(dense) >= n_layer:
        raise LmforgeError(f"{where}: mlp_only_layers makes every layer dense")
    return MoEConfig(experts=hf["num_experts"], top_k=hf["num_experts_per_tok"], expert_dim=hf["moe_intermediate_size"],
                     first_dense_layers=len(dense), norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                     aux_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors or its shards (never pickle: .bin files are refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise LmforgeError(f"{index}: not a valid safetensors index ({e})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        raise LmforgeError(f"{folder} has only pytorch_model.bin (a pickle); lmforge loads safetensors only. "
                           "Convert it with transformers: model.save_pretrained(dir, safe_serialization=True)")
    else:
        raise LmforgeError(f"{folder}: no model.safetensors (or sharded index) found")
    out: dict[str, Tensor] = {}
    for name in files:
        try:
            out.update(load_file(folder / name))
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"{folder / name}: cannot be read ({e})") from None
    return out


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Write an lmforge checkpoint at OUT from the Hugging Face folder SRC; returns OUT."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.export.hf import transformers_config
    from lmforge.io import atomic_write_json, read_json
    from lmforge.model.spec import build_model
    from lmforge.model.transformer import rope_cache

    src, out = Path(src), Path(out)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise LmforgeError(f"{src} is not a Hugging Face model folder: config.json is missing")
    hf = read_json(cfg_file)
    cfg = model_config_from_hf(hf, str(cfg_file))
    weights = read_weights(src)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        weights.pop("lm_head.weight", None)  # some saves include the tied copy
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.arch == "t5":  # copies of `shared`, and a bias old T5 checkpoints kept that transformers ignores
        for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"):
            weights.pop(k, None)
    if cfg.attention == "mla":
        # Multi-token-prediction modules sit after the last layer; transformers skips them too.
        weights = {k: v for k, v in weights.items()
                   if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= cfg.n_layer)}
        if hf.get("rope_interleave", True):  # transformers' default, and DeepSeek's released weights
            weights = deinterleave_rope_rows(weights, mla_dims(cfg), cfg.n_head)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise LmforgeError(f"{src}: weights do not match config.json: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise LmforgeError(f"{src}: tensor {k} has shape {tuple(weights[k].shape)}, "
                               f"config.json implies {tuple(v.shape)}")
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if cfg.pos == "rope":
        cos, sin = rope_cache(model.rope_dim, cfg.max_seq_len, cfg.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    has_tok = (src / "tokenizer.json").is_file()

    def write_config(tmp: Path) -> None:  # qwen2-aware config.json with the token ids
        atomic_write_json(tmp / "config.json", transformers_config(cfg, src if has_tok else None))

    return save_checkpoint(out, model, tokenizer_dir=src if has_tok else None, extra=write_config)
