"""Export a checkpoint as a Hugging Face model folder that `transformers` loads with no custom code.

    OUT/config.json             llama | qwen2 (q/k/v biases) | qwen3 (QK-norm), + the lmforge section
    OUT/model.safetensors       the weights (HF names already; a tied head is omitted, as HF does)
    OUT/generation_config.json  eos = <|endoftext|> and <|im_end|>
    OUT/tokenizer.json, tokenizer_config.json (chat_template inside), chat_template.jinja

A LoRA / QLoRA checkpoint is exported merged (one plain model), or with `--adapter` as a PEFT
folder that `peft.AutoPeftModelForCausalLM.from_pretrained(OUT)` loads:

    OUT/adapter_config.json, adapter_model.safetensors   the adapters; base_model_name_or_path = OUT/base
    OUT/base/                                            the base as above, as the adapters were trained
                                                         on it (QLoRA: its NF4 values, dequantized)
    OUT/tokenizer files                                  (AutoPeftModel reads the tokenizer from OUT)

base_model_name_or_path is absolute (PEFT resolves it against the current directory): after
moving OUT, export again or load with PeftModel.from_pretrained(AutoModelForCausalLM(OUT/base), OUT).

Each architecture has a writer in WRITERS: it checks the config, returns the transformers config
and maps the state dict. Llama-family weights need no mapping (our names and RoPE layout are
transformers'); a GPT-2 writer (GPT2LMHeadModel: Conv1D transposes, renames) plugs in beside it.
A variant transformers cannot represent is an error naming the lmforge key to change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.checkpoint import copy_tokenizer, generation_config, hf_config, model_state, token_ids
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import AtomicDir, atomic_write_json, atomic_write_text
from lmforge.model import moe
from lmforge.model.spec import spec_for
from lmforge.tokenizer import Tokenizer
from lmforge.train.lora import adapter_base, copy_adapter, is_adapter_checkpoint, load_any

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

StateMap = Callable[[dict[str, Tensor]], dict[str, Tensor]]
Writer = Callable[[ModelConfig], tuple[dict, StateMap]]


def _llama_family_problems(cfg: ModelConfig) -> list[str]:
    problems = []
    if cfg.logit_softcap:
        problems.append(f"model.logit_softcap={cfg.logit_softcap}: transformers' Llama/Qwen models have no "
                        "logit soft-capping (set it to 0)")
    if cfg.mlp != "swiglu":
        problems.append(f"model.mlp={cfg.mlp}: transformers' Llama/Qwen MLP is SwiGLU only")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm}: transformers' Llama/Qwen use RMSNorm")
    if cfg.pos != "rope":
        problems.append(f"model.pos={cfg.pos}: transformers' Llama/Qwen use RoPE")
    if cfg.qk_norm and (cfg.bias or cfg.attn_qkv_bias):
        key = "model.bias" if cfg.bias else "model.attn_qkv_bias"
        problems.append(f"{key}=true with model.qk_norm: Qwen3 puts biases on q/k/v/o together (attention_bias) "
                        "and never on the MLP, which does not match")
    if cfg.sparse_block:
        problems.append(f"model.sparse_block={cfg.sparse_block}: no transformers decoder has block-sparse attention "
                        "layers (export a model without B layers in model.window_pattern)")
    if cfg.sliding_window and cfg.bias:
        problems.append(f"model.sliding_window={cfg.sliding_window} with model.bias=true: transformers' sliding-window "
                        "models (Ministral, Qwen2, Qwen3) have no biases on o_proj and the MLP")
    if cfg.moe.experts and cfg.attention == "mla":
        problems.append(f"model.moe.experts={cfg.moe.experts} with model.attention=mla: the DeepSeek-V3 export "
                        "writes dense layers only (set model.moe.experts=0, or use multi-head attention for Qwen3-MoE)")
    elif cfg.moe.experts:
        problems += moe.hf_problems(cfg)
    return problems


def llama_family_config(cfg: ModelConfig) -> dict:
    """The checkpoint's transformers config (checkpoint.hf_config), refused for variants it cannot load."""
    problems = _llama_family_problems(cfg)
    if problems:
        raise LmforgeError("cannot export to transformers: " + "; ".join(problems))
    return hf_config(cfg)


def llama_writer(cfg: ModelConfig) -> tuple[dict, StateMap]:
    return llama_family_config(cfg), lambda sd: sd


def t5_writer(cfg: ModelConfig) -> tuple[dict, StateMap]:
    """T5ForConditionalGeneration: the names are transformers' already; the shared embedding stands for
    encoder.embed_tokens and decoder.embed_tokens, which transformers ties to it on load."""
    return hf_config(cfg), lambda sd: sd


def writer_for(cfg: ModelConfig) -> Writer:
    """The architecture's Hugging Face writer, as its model spec names it."""
    return spec_for(cfg).fn("hf_writer")


def checkpoint_tokenizer(folder: Path) -> Tokenizer | None:
    return Tokenizer.load(folder) if (folder / "tokenizer.json").is_file() else None


def transformers_config(cfg: ModelConfig, tokenizer_dir: Path | None = None) -> dict:
    """config.json for `cfg` (+ the bos / eos / pad ids of the tokenizer in `tokenizer_dir`, when given)."""
    config, _ = writer_for(cfg)(cfg)
    tok = checkpoint_tokenizer(Path(tokenizer_dir)) if tokenizer_dir else None
    return {**config, **token_ids(tok)} if tok is not None else config


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "fp32", adapter: bool = False) -> Path:
    """Write the Hugging Face folder for a checkpoint (an adapter checkpoint merged, or as a PEFT folder
    with `adapter`); returns OUT."""
    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    ckpt, out = Path(ckpt), Path(out)
    if adapter:
        return export_peft(ckpt, out, dtype)
    model = load_any(ckpt)
    with AtomicDir(out) as tmp:
        write_hf_folder(model, ckpt, tmp, dtype)
    return out


def export_peft(ckpt: Path, out: Path, dtype: str = "fp32") -> Path:
    """OUT = the adapters (PEFT's files) + OUT/base, the base they were trained on, exported."""
    if not is_adapter_checkpoint(ckpt):
        raise LmforgeError(f"--adapter: {ckpt} is not a LoRA/QLoRA checkpoint (no adapter_model.safetensors); "
                           "export it without --adapter")
    base = adapter_base(ckpt)
    final = out.resolve()  # adapter_config.json names the base where it will be after the rename
    with AtomicDir(out) as tmp:
        write_hf_folder(base, ckpt, tmp / "base", dtype)
        copy_adapter(ckpt, tmp, final / "base")
        if (ckpt / "tokenizer.json").is_file():  # else AutoPeftModel asks the Hub for one
            copy_tokenizer(ckpt, tmp)
            _ensure_template_in_config(tmp)
    return out


def write_hf_folder(model: nn.Module, ckpt: Path, folder: Path, dtype: str) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer of `ckpt`, into `folder`."""
    config, state_map = writer_for(model.cfg)(model.cfg)
    tok = checkpoint_tokenizer(ckpt)
    if tok is not None:
        config.update(token_ids(tok))
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state_map(model_state(model)).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)
    atomic_write_json(folder / "generation_config.json", generation_config(tok))
    if tok is not None:
        copy_tokenizer(ckpt, folder)
        _ensure_template_in_config(folder)


def _ensure_template_in_config(folder: Path) -> None:
    """transformers reads the template from either file; keep both in agreement for older versions."""
    cfg_file, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    meta = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else meta.get("chat_template")
    if template:
        if meta.get("chat_template") != template:
            meta["chat_template"] = template
            atomic_write_json(cfg_file, meta)
        if not jinja.is_file():
            atomic_write_text(jinja, template)
