"""Export a checkpoint as a Hugging Face model folder that `transformers` loads with no custom code.

    OUT/config.json             llama | qwen2 (q/k/v biases) | qwen3 (QK-norm), + the lmforge section
    OUT/model.safetensors       the weights (HF names already; a tied head is omitted, as HF does)
    OUT/generation_config.json  eos = <|endoftext|> and <|im_end|>
    OUT/tokenizer.json, tokenizer_config.json (chat_template inside), chat_template.jinja

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
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

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
    return problems


def llama_family_config(cfg: ModelConfig) -> dict:
    """The checkpoint's transformers config (checkpoint.hf_config), refused for variants it cannot load."""
    from lmforge.checkpoint import hf_config

    problems = _llama_family_problems(cfg)
    if problems:
        raise LmforgeError("cannot export to transformers: " + "; ".join(problems))
    return hf_config(cfg)


def llama_writer(cfg: ModelConfig) -> tuple[dict, StateMap]:
    return llama_family_config(cfg), lambda sd: sd


def gpt2_writer(cfg: ModelConfig) -> tuple[dict, StateMap]:
    from lmforge.export.gpt2 import gpt2_writer as write

    return write(cfg)


WRITERS: dict[str, Writer] = {"llama": llama_writer, "gpt2": gpt2_writer}


def writer_for(cfg: ModelConfig) -> Writer:
    if cfg.arch not in WRITERS:
        raise LmforgeError(f"model.arch={cfg.arch}: no Hugging Face writer for this architecture yet "
                           f"(available: {', '.join(WRITERS)})")
    return WRITERS[cfg.arch]


def special_ids(folder: Path) -> dict[str, int]:
    """Ids of <|endoftext|>, <|im_start|>, <|im_end|> in the folder's tokenizer.json (those present)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        return {}
    tok = HFTokenizer.from_file(str(file))
    names = {"eot": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}
    return {k: i for k, t in names.items() if (i := tok.token_to_id(t)) is not None}


def with_token_ids(config: dict, ids: dict[str, int]) -> dict:
    """config.json's bos/eos/pad: no BOS (lmforge adds none), EOS and padding = <|endoftext|>."""
    if "eot" in ids:
        config.update(bos_token_id=None, eos_token_id=ids["eot"], pad_token_id=ids["eot"])
    return config


def generation_config(ids: dict[str, int]) -> dict:
    eos = [ids[k] for k in ("eot", "im_end") if k in ids]
    out: dict = {"_from_model_config": False}
    if eos:
        out.update(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=ids["eot"] if "eot" in ids else eos[0])
    return out


def transformers_config(cfg: ModelConfig, tokenizer_dir: Path | None = None) -> dict:
    """config.json for `cfg` (+ token ids when a tokenizer folder is given)."""
    config, _ = writer_for(cfg)(cfg)
    return with_token_ids(config, special_ids(tokenizer_dir)) if tokenizer_dir else config


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the Hugging Face folder for a checkpoint; returns OUT."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import copy_tokenizer, load_model, model_state
    from lmforge.io import AtomicDir, atomic_write_json

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise LmforgeError(f"--dtype must be one of {', '.join(dtypes)}, got '{dtype}'")
    ckpt, out = Path(ckpt), Path(out)
    model = load_model(ckpt)
    config, state_map = writer_for(model.cfg)(model.cfg)
    ids = special_ids(ckpt)
    config = with_token_ids(config, ids)
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    state = {k: v.to(dtypes[dtype]).contiguous() for k, v in state_map(model_state(model)).items()}
    with AtomicDir(out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "generation_config.json", generation_config(ids))
        if (ckpt / "tokenizer.json").is_file():
            copy_tokenizer(ckpt, tmp)
            _ensure_template_in_config(tmp)
    return out


def _ensure_template_in_config(folder: Path) -> None:
    """transformers reads the template from either file; keep both in agreement for older versions."""
    from lmforge.io import atomic_write_json, atomic_write_text

    cfg_file, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    meta = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else meta.get("chat_template")
    if template:
        if meta.get("chat_template") != template:
            meta["chat_template"] = template
            atomic_write_json(cfg_file, meta)
        if not jinja.is_file():
            atomic_write_text(jinja, template)
