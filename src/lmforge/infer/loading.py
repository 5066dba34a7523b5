"""Find the checkpoint a user named, pick the device, load model + tokenizer for inference."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.errors import LmforgeError


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete one under RUN/checkpoints/."""
    from lmforge.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise LmforgeError(f"{p} does not exist: give a checkpoint folder or a run directory")
    if (p / "config.json").is_file():
        return p
    if (p / "checkpoints").is_dir():
        found = latest_checkpoint(p / "checkpoints")
        if found is None:
            raise LmforgeError(f"{p / 'checkpoints'} holds no complete checkpoint yet (train first)")
        return found
    raise LmforgeError(f"{p} is neither a checkpoint (no config.json) nor a run directory (no checkpoints/)")


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


def load_tokenizer(ckpt: Path):
    from lmforge.tokenizer import Tokenizer

    if not (ckpt / "tokenizer.json").is_file():
        raise LmforgeError(f"{ckpt} has no tokenizer.json: train or copy a tokenizer into the checkpoint "
                           "(checkpoints saved by lmforge carry one)")
    return Tokenizer.load(ckpt)


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "auto",
                       quantize: str | None = None) -> tuple[nn.Module, object, Path]:
    """(model in eval mode, tokenizer, checkpoint path). Quantizes on the CPU, then moves the result."""
    from lmforge.checkpoint import load_model

    ckpt = resolve_checkpoint(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tokenizer = load_tokenizer(ckpt)
    model = load_model(ckpt, device="cpu" if quantize else dev, dtype=dt)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{model.cfg.vocab_size} (model.vocab_size); they do not belong together")
    if quantize:
        from lmforge.infer.quant import quantize_model

        model = quantize_model(model, quantize).to(dev)
    return model.eval(), tokenizer, ckpt
