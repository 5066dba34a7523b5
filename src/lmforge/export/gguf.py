"""Export a checkpoint to one GGUF file for llama.cpp and the tools built on it.

    lmforge export gguf CKPT OUT.gguf --type f16|q8_0|q4_0

CKPT may be any checkpoint lmforge reads; a LoRA / QLoRA one is written merged into its base.

Written with the `gguf` package (llama.cpp's own Python writer), following what llama.cpp's
convert_hf_to_gguf.py does for the same Hugging Face model, so llama.cpp reads our file exactly
as it reads a converted Llama / Qwen2 / Qwen3:

- Architecture: `llama`; `qwen3` when QK-norm is on; `qwen2` when only q/k/v carry biases; `qwen3moe`
  for mixture-of-experts models Qwen3-MoE can hold (router ffn_gate_inp, experts ffn_{gate,up,down}_exps,
  keys expert_count / expert_used_count / expert_feed_forward_length, see `tensor_names`).
- RoPE layout. Our weights (like transformers') rotate halves of each head: (x_i, x_{i+D/2}).
  llama.cpp's `llama` graph rotates adjacent pairs (x_2i, x_2i+1), so the converter permutes the
  rows of q_proj / k_proj (and their biases) within every head; we do the same permutation
  (`rope_permute`: view each head's rows as (2, D/2), swap to (D/2, 2)), with the KV head count for
  k_proj. The `qwen2` / `qwen3` graphs use the rotate-half ("NEOX") RoPE, so nothing is permuted.
- Metadata: context/embedding/feed-forward lengths, block count, head counts, key/value length,
  RoPE base and dimension count, RMS-norm epsilon, vocab size, file type.
- Tokenizer: model "gpt2" (byte-level BPE) with the pre-tokenizer llama.cpp knows by name for the
  tokenizer's split rule ("qwen2" for lmforge's own tokenizers, whose split regex is Qwen2's;
  "llama-bpe" for Llama-3's; "gpt-2" for GPT-2's), every token string with its type (special added
  tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the merges, EOS = the token that
  ends every document, BOS = the tokenizer's BOS (added when its post-processor adds it; else the EOS,
  not added), padding, EOT = <|im_end|> when the tokenizer has it, and the chat template. The model's
  vocabulary is padded past the tokenizer's; the padding rows get "[PAD<id>]" tokens of type UNUSED,
  as the converter writes them. llama.cpp re-implements each split rule by name, so a tokenizer whose
  rule it cannot be told (an adopted sentencepiece or tiktoken one) is refused, not written wrong.
- Types: 1-D tensors (norm weights, biases) are always F32. f16: every matrix F16. q8_0: every
  matrix Q8_0. q4_0: block matrices Q4_0, while the token embedding and the output matrix stay
  Q8_0 (they are the most sensitive; llama.cpp's quantizer also keeps the output at higher
  precision). Quantization is `gguf.quants`, i.e. llama.cpp's reference rounding. A matrix whose
  row length is not a multiple of the 32-value block falls back to F16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmforge.checkpoint import model_state
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write
from lmforge.model.moe import expert_dim, hf_problems, is_moe_layer
from lmforge.model.spec import spec_for
from lmforge.model.transformer import ffn_dim
from lmforge.model.transformer import head_dim as model_head_dim
from lmforge.tokenizer import QWEN2_PATTERN, Tokenizer
from lmforge.train.lora import load_any

TYPES = ("f16", "q8_0", "q4_0")


def gguf_arch(cfg: ModelConfig) -> str:
    problems = []
    if not spec_for(cfg).gguf_names or cfg.mlp != "swiglu" or cfg.norm != "rmsnorm" or cfg.pos != "rope":
        problems.append(f"model.arch={cfg.arch} / mlp={cfg.mlp} / norm={cfg.norm} / pos={cfg.pos}: GGUF export "
                        "covers the Llama family (SwiGLU, RMSNorm, RoPE)")
    if cfg.attention == "mla":
        problems.append("model.attention=mla: GGUF export writes llama.cpp's llama/qwen graphs, not its deepseek2 "
                        "graph (export to Hugging Face and convert that with llama.cpp's convert_hf_to_gguf.py)")
    if cfg.logit_softcap:
        problems.append(f"model.logit_softcap={cfg.logit_softcap}: llama.cpp's llama/qwen graphs have no soft-capping")
    if cfg.bias:
        problems.append("model.bias=true: GGUF export supports biases on q/k/v only (model.attn_qkv_bias, Qwen2)")
    if cfg.qk_norm and cfg.attn_qkv_bias:
        problems.append("model.attn_qkv_bias=true with model.qk_norm: llama.cpp's qwen3 graph has no q/k/v biases")
    if cfg.sliding_window:
        problems.append(f"model.sliding_window={cfg.sliding_window}: the llama / qwen GGUF graphs written here have "
                        "no sliding window")
    if cfg.sparse_block:
        problems.append(f"model.sparse_block={cfg.sparse_block}: llama.cpp has no block-sparse attention layers")
    if cfg.moe.experts:
        problems += moe_problems(cfg)
    if problems:
        raise LmforgeError("cannot export to GGUF: " + "; ".join(problems))
    if cfg.moe.experts:
        return "qwen3moe"
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attn_qkv_bias else "llama"


def moe_problems(cfg: ModelConfig) -> list[str]:
    """What llama.cpp's qwen3moe graph cannot run of an MoE config: what Qwen3-MoE cannot hold, and two things
    its graph fixes (every layer sparse; the top-k weights renormalised, as build_moe_ffn is called there)."""
    out = hf_problems(cfg)
    if cfg.moe.first_dense_layers:
        out.append(f"model.moe.first_dense_layers={cfg.moe.first_dense_layers}: llama.cpp's qwen3moe graph makes "
                   "every layer a mixture-of-experts layer")
    if not cfg.moe.norm_topk_prob:
        out.append("model.moe.norm_topk_prob=false: llama.cpp's qwen3moe graph always renormalises the top-k "
                   "routing weights")
    return out


def rope_permute(w: Tensor, n_head: int) -> Tensor:
    """Rows of each head from rotate-half order to adjacent-pair order (llama.cpp's `llama` RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_names(cfg: ModelConfig) -> dict[str, str | tuple[str, ...]]:
    """lmforge (HF) name -> GGUF name; a tuple of names cuts the tensor into that many equal parts along its
    rows (an MoE layer's gate_up_proj (E, 2 * expert_dim, C) is llama.cpp's ffn_gate_exps and ffn_up_exps).

    MoE layers (qwen3moe, as convert_hf_to_gguf.py writes Qwen3MoeForCausalLM): the router `mlp.gate.weight`
    (E, C) is ffn_gate_inp, and the 3-D expert stacks keep their (E, rows, cols) layout, which GGUF lists
    reversed: ffn_gate_exps / ffn_up_exps {C, expert_dim, E}, ffn_down_exps {expert_dim, C, E}."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if cfg.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": "attn_q_norm.weight",
                          "self_attn.k_norm.weight": "attn_k_norm.weight"})
    if cfg.attn_qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                          "self_attn.v_proj.bias": "attn_v.bias"})
    sparse = {k: v for k, v in per_layer.items() if not k.startswith("mlp.")}
    sparse.update({"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.gate_up_proj": ("ffn_gate_exps.weight",
                   "ffn_up_exps.weight"), "mlp.experts.down_proj": "ffn_down_exps.weight"})
    for i in range(cfg.n_layer):
        for ours, theirs in (sparse if is_moe_layer(cfg, i) else per_layer).items():
            names[f"model.layers.{i}.{ours}"] = (tuple(f"blk.{i}.{t}" for t in theirs) if isinstance(theirs, tuple)
                                                  else f"blk.{i}.{theirs}")
    return names


def _qtype(name: str, arr: np.ndarray, kind: str):
    from gguf import GGMLQuantizationType as Q

    if arr.ndim == 1:
        return Q.F32
    if kind == "f16":
        return Q.F16
    if arr.shape[-1] % 32:
        return Q.F16
    if kind == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        return Q.Q4_0
    return Q.Q8_0


# llama.cpp's names for the split rules it implements, by the regex of a tokenizer.json's Split step.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama-bpe"}


def pre_tokenizer_name(data: dict, file: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or an error saying why none fits."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
    splits = [p.get("pattern", {}).get("Regex") for p in steps if p.get("type") == "Split"]
    hint = ("; export it with `lmforge export hf` and convert that folder with llama.cpp's convert_hf_to_gguf.py, "
            "which recognises tokenizers by their output")
    if not byte_level or data.get("model", {}).get("byte_fallback"):
        raise LmforgeError(f"{file}: not a byte-level BPE tokenizer (a converted sentencepiece one?); lmforge's GGUF "
                           "writer handles byte-level BPE only" + hint)
    if not splits and byte_level[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if len(splits) == 1 and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    raise LmforgeError(f"{file}: its split regex is not one lmforge can name for llama.cpp (known: lmforge's own "
                       "= Qwen2's, Llama-3's, GPT-2's)" + hint)


def tokenizer_metadata(folder: Path, n_vocab: int) -> dict:
    """tokens, token types, merges, special ids and pre-tokenizer, the way llama.cpp's converter derives them."""
    import gguf

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise LmforgeError(f"{folder} has no tokenizer.json: a GGUF file must carry its tokenizer")
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise LmforgeError(f"{file}: model.type='{model.get('type')}'; GGUF export handles byte-level BPE only")
    pre = pre_tokenizer_name(data, file)
    tok = Tokenizer.load(folder)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise LmforgeError(f"{file}: token id {max(vocab.values())} does not fit the model's vocab of {n_vocab}")
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif by_id[i] in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[by_id[i]].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "template": tok.chat_template, "pre": pre,
            "eos": tok.eot_id, "bos": tok.bos_id if tok.bos_id is not None else tok.eot_id, "add_bos": tok.add_bos,
            "pad": tok.tok.token_to_id(tok.pad_token), "im_end": tok.im_end_id}


def export_gguf(ckpt: str | Path, out: str | Path, kind: str = "f16") -> Path:
    """Write OUT (atomically); returns its path."""
    try:
        import gguf
        from gguf import quants
    except ImportError:
        raise LmforgeError("GGUF export needs the `gguf` package: pip install 'lmforge[gguf]'") from None

    if kind not in TYPES:
        raise LmforgeError(f"--type must be one of {', '.join(TYPES)}, got '{kind}'")
    ckpt, out = Path(ckpt), Path(out)
    model = load_any(ckpt)  # an adapter checkpoint is written merged into its base
    cfg = model.cfg
    arch = gguf_arch(cfg)
    tok = tokenizer_metadata(ckpt, cfg.vocab_size)
    head_dim = model_head_dim(cfg)
    n_kv = cfg.n_kv_head or cfg.n_head
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(ckpt.resolve().name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(ffn_dim(cfg))
        if cfg.moe.experts:  # the keys convert_hf_to_gguf.py writes for Qwen3MoeForCausalLM
            w.add_expert_count(cfg.moe.experts)
            w.add_expert_used_count(cfg.moe.top_k)
            w.add_expert_feed_forward_length(expert_dim(cfg, ffn_dim(cfg)))
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        w.add_bos_token_id(tok["bos"])
        w.add_eos_token_id(tok["eos"])
        w.add_pad_token_id(tok["pad"] if tok["pad"] is not None else tok["eos"])
        if tok["im_end"] is not None:
            w.add_eot_token_id(tok["im_end"])
        w.add_add_bos_token(tok["add_bos"])
        if tok["template"]:
            w.add_chat_template(tok["template"])
        names = spec_for(cfg).fn("gguf_names")(cfg)
        for ours, t in model_state(model).items():
            if ours not in names:
                raise LmforgeError(f"internal: no GGUF name for tensor {ours}")
            t = t.detach().float()
            if arch == "llama" and ".self_attn.q_proj." in ours:
                t = rope_permute(t, cfg.n_head)
            elif arch == "llama" and ".self_attn.k_proj." in ours:
                t = rope_permute(t, n_kv)
            targets, arr = names[ours], t.cpu().numpy()
            parts = [(targets, arr)] if isinstance(targets, str) else zip(targets, np.split(arr, len(targets), -2))
            for name, arr in parts:
                arr = np.ascontiguousarray(arr)
                qtype = _qtype(name, arr, kind)
                if qtype == gguf.GGMLQuantizationType.F32:
                    w.add_tensor(name, arr.astype(np.float32))
                elif qtype == gguf.GGMLQuantizationType.F16:
                    w.add_tensor(name, arr.astype(np.float16))
                else:
                    w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    with torch.no_grad():
        atomic_write(out, write)
    return out
