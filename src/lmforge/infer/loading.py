"""Open the checkpoint a user named, on the device and dtype asked for: model + tokenizer.

`load_for_inference` is the one loader of every command that runs a model (generate, chat, serve,
eval): any checkpoint `lmforge.checkpoint.resolve_checkpoint` accepts, full or LoRA/QLoRA adapter
(merged into its base in fp32, then cast and optionally quantized).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import resolve_checkpoint
from lmforge.errors import LmforgeError
from lmforge.infer.quant import quantize_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.lora import load_any


def pick_device(name: str = "auto") -> torch.device:
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"device '{name}' asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LmforgeError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory, same range as fp32), fp32 on CPU (bf16 matmuls are slow there)."""
    if name not in DTYPES:
        raise LmforgeError(f"unknown dtype '{name}' (use {', '.join(DTYPES)})")
    if DTYPES[name] is not None:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(ckpt: Path) -> Tokenizer:
    if not (ckpt / "tokenizer.json").is_file():
        raise LmforgeError(f"{ckpt} has no tokenizer.json: train or copy a tokenizer into the checkpoint "
                           "(checkpoints saved by lmforge carry one)")
    return Tokenizer.load(ckpt)


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "auto", quantize: str | None = None,
                       run_dir: str | Path | None = None, key: str = "") -> tuple[nn.Module, Tokenizer, Path]:
    """(model in eval mode, tokenizer, checkpoint path). `path` is anything resolve_checkpoint reads (a stage
    name needs `run_dir`). Quantizes on the CPU, then moves the result."""
    ckpt = resolve_checkpoint(path, run_dir, key)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tokenizer = load_tokenizer(ckpt)
    model = load_any(ckpt, device="cpu" if quantize else dev).to(dt)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{model.cfg.vocab_size} (model.vocab_size); they do not belong together")
    if quantize:
        model = quantize_model(model, quantize).to(dev)
    return model.eval(), tokenizer, ckpt
