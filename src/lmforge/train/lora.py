"""LoRA and QLoRA through `peft`, adapter checkpoints, and `lmforge merge`.

Our layers are plain nn.Linear with Hugging Face names, so `peft.get_peft_model` wraps the model
as it would a LlamaForCausalLM: the base is frozen and `lora_A`/`lora_B` are the only trainable
weights. QLoRA first turns the frozen linear weights into torchao's NF4Tensor (4-bit NormalFloat
with double-quantized scales; pure PyTorch, so it runs on CPU as on CUDA); its F.linear
dequantizes on the fly, and the adapters train in full precision on top.

An adapter checkpoint holds `adapter_config.json` + `adapter_model.safetensors` in PEFT's own
layout (so `peft.PeftModel.from_pretrained(LlamaForCausalLM..., folder)` reads it after an HF
export of the base) next to the base's config.json, tokenizer and the usual resume state. The
training loop saves and restores it through the model's `save_weights` / `load_weights` hooks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from lmforge.config import LoRAConfig
from lmforge.console import log
from lmforge.errors import LmforgeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "lmforge_adapter.json"  # what PEFT's files cannot say: the base's quantization


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_WEIGHTS).is_file()


def _peft():
    try:
        import peft
    except ImportError:
        raise LmforgeError("LoRA needs the `peft` package: pip install 'lmforge[lora]' "
                           "(or, in a source checkout, pip install -e '.[lora]')") from None
    return peft


def _adapter_model_class():
    peft = _peft()

    class AdapterModel(peft.PeftModel):
        """A PeftModel that the training loop can checkpoint: only the adapters are written."""

        base_path: str = ""
        quantize: str = ""

        @property
        def activation_checkpointing(self) -> bool:
            return self.get_base_model().activation_checkpointing

        @activation_checkpointing.setter
        def activation_checkpointing(self, value: bool) -> None:
            self.get_base_model().activation_checkpointing = value

        def save_weights(self, folder: Path) -> None:
            from safetensors.torch import save_file

            sd = peft.get_peft_model_state_dict(self)
            save_file({k: v.detach().contiguous() for k, v in sd.items()}, folder / ADAPTER_WEIGHTS,
                      metadata={"format": "pt"})
            self.peft_config["default"].base_model_name_or_path = self.base_path
            self.peft_config["default"].save_pretrained(str(folder))
            (folder / ADAPTER_META).write_text(json.dumps({"quantize": self.quantize}) + "\n", encoding="utf-8")

        def load_weights(self, folder: Path) -> None:
            from safetensors.torch import load_file

            folder = Path(folder)
            if not is_adapter_checkpoint(folder):
                raise LmforgeError(f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS}); it was not written by "
                                   "this LoRA run (use a new run_dir or train.resume=none)")
            saved = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            base = saved.get("base_model_name_or_path") or ""
            if base and Path(base).resolve() != Path(self.base_path).resolve():
                raise LmforgeError(f"cannot resume from {folder}: its adapters were trained on {base}, this run's "
                                   f"base is {self.base_path}")
            mine = self.peft_config["default"]
            for key in ("r", "lora_alpha"):
                if saved.get(key) != getattr(mine, key):
                    raise LmforgeError(f"cannot resume from {folder}: {key}={saved.get(key)} there, "
                                       f"{getattr(mine, key)} in this run")
            result = peft.set_peft_model_state_dict(self, load_file(folder / ADAPTER_WEIGHTS))
            bad = [k for k in result.unexpected_keys if "lora_" in k]
            if bad:
                raise LmforgeError(f"{folder}: adapter tensors that this model has no place for: {bad[:3]}")

    return AdapterModel


def _nf4_blocks(numel: int) -> tuple[int, int] | None:
    """(block_size, scaler_block_size) torchao accepts for a tensor of `numel`, or None."""
    block = 64
    if numel % block:
        return None
    n_blocks = numel // block
    scaler = 256
    while scaler > 1 and n_blocks % scaler:
        scaler //= 2
    return block, scaler


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor, counting the inner tensors of a quantized subclass (NF4Tensor)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quantize_nf4(model: nn.Module) -> dict:
    """Replace the linear weights of every block with frozen NF4 tensors; returns the bytes saved.

    Embeddings and the head stay in full precision (as in the QLoRA paper); they are tied and small
    next to the blocks in a large model.
    """
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        raise LmforgeError("QLoRA (lora.quantize=nf4) needs the `torchao` package: pip install 'lmforge[lora]' "
                           "(or, in a source checkout, pip install -e '.[lora]')") from None
    before = after = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or ".layers." not in f".{name}":
            continue
        w = mod.weight.detach()
        blocks = _nf4_blocks(w.numel())
        if blocks is None:
            continue
        q = NF4Tensor.from_tensor(w, *blocks)
        before += tensor_bytes(w)
        after += tensor_bytes(q)
        mod.weight = nn.Parameter(q, requires_grad=False)
    total = sum(tensor_bytes(p) for p in model.parameters())
    return {"linear_bytes_fp": before, "linear_bytes_nf4": after, "model_bytes": total,
            "saved_bytes": before - after}


def apply_lora(model: nn.Module, lc: LoRAConfig, base_path: str | Path) -> nn.Module:
    """Freeze `model` and add LoRA adapters (after NF4-quantizing the base when lc.quantize=nf4)."""
    peft = _peft()
    if lc.quantize not in ("", "nf4"):
        raise LmforgeError(f"lora.quantize: '{lc.quantize}' is not one of '' (full precision), nf4")
    if lc.r <= 0:
        raise LmforgeError(f"lora.r must be positive, got {lc.r}")
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in lc.target_modules if t not in present]
    if missing or not lc.target_modules:
        raise LmforgeError(f"lora.target_modules: {missing or '[]'} not in the model's linear layers "
                           f"({', '.join(sorted(present))})")
    if lc.quantize == "nf4":
        mem = quantize_nf4(model)
        log(f"QLoRA: frozen block weights {mem['linear_bytes_fp'] / 2**20:.2f} MiB in fp32 -> "
            f"{mem['linear_bytes_nf4'] / 2**20:.2f} MiB in NF4 (saves {mem['saved_bytes'] / 2**20:.2f} MiB; "
            f"model now {mem['model_bytes'] / 2**20:.2f} MiB)")
    config = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=list(lc.target_modules), bias="none")
    wrapped = _adapter_model_class()(model, config)
    wrapped.base_path = str(base_path)
    wrapped.quantize = lc.quantize
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA r={lc.r} alpha={lc.alpha:g} on {', '.join(lc.target_modules)}: {trainable:,} trainable of "
        f"{total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return wrapped


def base_of(folder: str | Path) -> Path:
    """The base checkpoint an adapter checkpoint was trained on."""
    cfg_file = Path(folder) / ADAPTER_CONFIG
    try:
        base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{cfg_file}: cannot read ({e})") from None
    if not base or not Path(base).is_dir():
        raise LmforgeError(f"{cfg_file}: base_model_name_or_path={base!r} is not a checkpoint folder here")
    return Path(base)


def dequantize_nf4(model: nn.Module) -> None:
    """Back to plain fp32 weights holding exactly the NF4 values the adapters were trained against."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and type(mod.weight) is not nn.Parameter:
            mod.weight = nn.Parameter(mod.weight.get_original_weight().float(), requires_grad=False)


def load_adapted(folder: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> nn.Module:
    """The model of an adapter checkpoint: base + adapters, merged into plain weights by default.

    A QLoRA adapter is applied to the base as it trained on it: NF4-quantized, then dequantized.
    """
    from safetensors.torch import load_file

    from lmforge.checkpoint import load_model

    peft = _peft()
    folder = Path(folder)
    base = load_model(base_of(folder), device=device)
    meta = folder / ADAPTER_META
    if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("quantize") == "nf4":
        quantize_nf4(base)
        dequantize_nf4(base)
    config = peft.LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    model = peft.PeftModel(base, config)
    peft.set_peft_model_state_dict(model, load_file(folder / ADAPTER_WEIGHTS, device=str(device)))
    return model.merge_and_unload().eval() if merge else model.eval()


def load_any(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A plain model from a full checkpoint or from an adapter checkpoint (merged)."""
    from lmforge.checkpoint import load_model

    return load_adapted(path, device) if is_adapter_checkpoint(path) else load_model(path, device=device)


def merge(folder: str | Path, out: str | Path) -> Path:
    """Write base + adapters as one plain checkpoint (weights only, tokenizer copied)."""
    from lmforge.checkpoint import save_checkpoint

    folder = Path(folder)
    if not is_adapter_checkpoint(folder):
        raise LmforgeError(f"{folder} is not a LoRA checkpoint (no {ADAPTER_WEIGHTS})")
    model = load_adapted(folder)
    tok = folder if (folder / "tokenizer.json").is_file() else None
    return save_checkpoint(out, model, tokenizer_dir=tok)


def cmd_merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmforge merge", description="Merge a LoRA/QLoRA adapter checkpoint into its "
                                "base: OUT is a plain checkpoint that every lmforge command and transformers load.")
    p.add_argument("checkpoint", help="adapter checkpoint folder (RUN/sft/checkpoints/step_N)")
    p.add_argument("out", help="output checkpoint folder")
    a = p.parse_args(argv)
    path = merge(a.checkpoint, a.out)
    log(f"merged {a.checkpoint} into {base_of(a.checkpoint)} -> {path}")
    return 0
