"""LoRA and QLoRA through `peft`, adapter checkpoints, and `lmforge merge`.

Our layers are plain nn.Linear with Hugging Face names, so `peft.get_peft_model` wraps the model
as it would a LlamaForCausalLM: the base is frozen and `lora_A`/`lora_B` are the only trainable
weights. QLoRA first turns the frozen linear weights into torchao's NF4Tensor (4-bit NormalFloat
with double-quantized scales; pure PyTorch, so it runs on CPU as on CUDA); its F.linear
dequantizes on the fly, and the adapters train in full precision on top.

An adapter checkpoint holds `adapter_config.json` + `adapter_model.safetensors` in PEFT's own
layout next to the base's config.json, tokenizer and the usual resume state. The training loop
saves and restores it through the model's `save_weights` / `load_weights` hooks. Every command
that reads a checkpoint opens one through `load_any`: base + adapters, merged.

Where the base is: adapter_config.json's `base_model_name_or_path` is absolute (PEFT and
transformers resolve it against the current directory, so only an absolute path works from
anywhere: `peft.AutoPeftModelForCausalLM.from_pretrained(folder)` loads the checkpoint as it is,
the base being a transformers folder itself). lmforge_adapter.json also records the base relative
to the adapter folder, and lmforge tries that one first: when a whole run is moved or copied, the
relative path finds the base that moved with it (for a copy, the copy's own base, not the
original that may since have been pruned or retrained); the absolute one still finds a base
outside the run, or the base of an adapter folder copied alone. A candidate counts only when its
model config equals the one the adapters were trained on.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_model,
    read_model_config,
    resolve_checkpoint,
    save_checkpoint,
)
from lmforge.config import LoRAConfig
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.model.mla import PROJECTIONS as MLA_PROJECTIONS

ADAPTER_META = "lmforge_adapter.json"  # what PEFT's files cannot say: the base's quantization, its relative path


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_WEIGHTS).is_file()


def _peft():
    # peft imports torchao, whose import registers enums with torch's pytree and logs one deprecation
    # warning per enum through torch's logger: noise on every LoRA run that the user can do nothing about.
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        import peft
    except ImportError:
        raise LmforgeError("LoRA needs the `peft` package: pip install 'lmforge[lora]' "
                           "(or, in a source checkout, pip install -e '.[lora]')") from None
    finally:
        pytree.setLevel(level)
    return peft


def _adapter_model_class():
    peft = _peft()

    class AdapterModel(peft.PeftModel):
        """A PeftModel that the training loop can checkpoint: only the adapters are written."""

        base_path: str = ""
        quantize: str = ""

        def save_weights(self, folder: Path, state: dict | None = None) -> None:
            """state: the whole state dict when the caller gathered it (FSDP shards it otherwise)."""
            sd = peft.get_peft_model_state_dict(self, state_dict=state)
            save_file({k: v.detach().contiguous() for k, v in sd.items()}, folder / ADAPTER_WEIGHTS,
                      metadata={"format": "pt"})
            write_adapter_config(self.peft_config["default"], folder, Path(self.base_path))
            meta = {"quantize": self.quantize, "base": relative_base(Path(self.base_path), folder)}
            (folder / ADAPTER_META).write_text(json.dumps(meta) + "\n", encoding="utf-8")

        def load_weights(self, folder: Path) -> None:
            folder = Path(folder)
            if not is_adapter_checkpoint(folder):
                raise LmforgeError(f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS}); it was not written by "
                                   "this LoRA run (use a new run_dir or train.resume=none)")
            saved = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            base = base_of(folder)  # found the way every command finds it, so a moved run resumes too
            if base.resolve() != Path(self.base_path).resolve():
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
    targets = list(lc.target_modules)
    if targets == LoRAConfig().target_modules:
        if getattr(model.cfg, "attention", "mha") == "mla":
            # The default names Attention's q/k/v projections; latent attention has its own (model/mla.py).
            targets = [t for t in targets if t not in ("q_proj", "k_proj", "v_proj")]
            targets += [t for t in MLA_PROJECTIONS if t in present]
        absent = [t for t in targets if t not in present]
        if absent:
            # An MoE layer's experts are stacked 3-D weights, not linear layers: the default adapts the
            # rest (attention, dense and shared-expert MLPs) and says what it left out.
            log(f"LoRA: the model has no linear {', '.join(absent)} layers (mixture-of-experts MLPs hold their "
                "experts as stacked weights, which LoRA does not adapt); adapting the others")
            targets = [t for t in targets if t in present]
    missing = [t for t in targets if t not in present]
    if missing or not targets:
        raise LmforgeError(f"lora.target_modules: {missing or '[]'} not in the model's linear layers "
                           f"({', '.join(sorted(present))})")
    if lc.quantize == "nf4":
        mem = quantize_nf4(model)
        log(f"QLoRA: frozen block weights {mem['linear_bytes_fp'] / 2**20:.2f} MiB in fp32 -> "
            f"{mem['linear_bytes_nf4'] / 2**20:.2f} MiB in NF4 (saves {mem['saved_bytes'] / 2**20:.2f} MiB; "
            f"model now {mem['model_bytes'] / 2**20:.2f} MiB)")
    config = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=targets, bias="none")
    wrapped = _adapter_model_class()(model, config)
    wrapped.base_path = str(base_path)
    wrapped.quantize = lc.quantize
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA r={lc.r} alpha={lc.alpha:g} on {', '.join(targets)}: {trainable:,} trainable of "
        f"{total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return wrapped


def write_adapter_config(config, folder: Path, base: Path) -> None:
    """adapter_config.json as PEFT's Auto classes need it: an absolute base path and the CAUSAL_LM task."""
    config = copy.copy(config)
    config.base_model_name_or_path = str(base.resolve())
    config.task_type = "CAUSAL_LM"
    config.save_pretrained(str(folder))


def copy_adapter(folder: Path, dst: Path, base: Path) -> None:
    """The adapter files of the checkpoint `folder`, written into `dst` as adapters of `base`."""
    shutil.copy2(folder / ADAPTER_WEIGHTS, dst / ADAPTER_WEIGHTS)
    write_adapter_config(_peft().LoraConfig.from_pretrained(str(folder)), dst, base)


def relative_base(base: Path, folder: Path) -> str | None:
    """The base as seen from the adapter folder (resolved first, so `..` means what the file system means)."""
    try:
        return os.path.relpath(base.resolve(), folder.resolve())
    except ValueError:  # another drive on Windows: only the absolute path can say where it is
        return None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{file}: cannot read ({e}); the adapter checkpoint is damaged") from None


def base_of(folder: str | Path) -> Path:
    """The base checkpoint an adapter checkpoint was trained on: relative to the adapter first, then absolute."""
    folder = Path(folder)
    cfg_file = folder / ADAPTER_CONFIG
    given = _read_json(cfg_file).get("base_model_name_or_path") or ""
    meta = _read_json(folder / ADAPTER_META) if (folder / ADAPTER_META).is_file() else {}
    # resolve(): `..` as the file system means it (the relative path was computed between resolved paths)
    candidates = ([(folder / meta["base"]).resolve()] if meta.get("base") else []) + ([Path(given)] if given else [])
    if not candidates:
        raise LmforgeError(f"{cfg_file}: base_model_name_or_path is empty; the adapter does not say its base")
    trained_on = read_model_config(folder)
    mismatched = []
    for base in candidates:
        if (base / "config.json").is_file():
            if read_model_config(base) == trained_on:
                return base
            mismatched.append(str(base))
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    if mismatched:
        raise LmforgeError(f"{folder}: the checkpoint at {mismatched[0]} is not the base these adapters were trained "
                           f"on (its model config differs from {folder / 'config.json'})")
    raise LmforgeError(f"{folder}: its base checkpoint is not where the adapter says ({tried}); put the base back "
                       f"there, or set base_model_name_or_path in {cfg_file} to where it is now")


def dequantize_nf4(model: nn.Module) -> None:
    """Back to plain fp32 weights holding exactly the NF4 values the adapters were trained against."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and type(mod.weight) is not nn.Parameter:
            mod.weight = nn.Parameter(mod.weight.get_original_weight().float(), requires_grad=False)


def adapter_base(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The base as the adapters were trained on it: for QLoRA, NF4-quantized and then dequantized."""
    folder = Path(folder)
    base = load_model(base_of(folder), device=device)
    meta = folder / ADAPTER_META
    if meta.is_file() and _read_json(meta).get("quantize") == "nf4":
        quantize_nf4(base)
        dequantize_nf4(base)
    return base


def load_adapted(folder: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> nn.Module:
    """The model of an adapter checkpoint: base + adapters, merged into plain weights by default."""
    peft = _peft()
    folder = Path(folder)
    base = adapter_base(folder, device)
    config = peft.LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    model = peft.PeftModel(base, config)
    peft.set_peft_model_state_dict(model, load_file(folder / ADAPTER_WEIGHTS, device=str(device)))
    return model.merge_and_unload().eval() if merge else model.eval()


def load_any(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The plain model of any checkpoint folder: a full one as it is, an adapter one merged into its base.

    Every command that reads a checkpoint (eval, generate, chat, serve, export, a stage's init_from)
    loads through here, so an adapter checkpoint works wherever a full one does.
    """
    if is_adapter_checkpoint(path):
        model = load_adapted(path, device)
        meta = Path(path) / ADAPTER_META
        kind = "QLoRA" if meta.is_file() and _read_json(meta).get("quantize") == "nf4" else "LoRA"
        log(f"[dim]{path}: {kind} adapters merged into their base {base_of(path)}[/]")
        return model
    return load_model(path, device=device)


def merge(folder: str | Path, out: str | Path) -> Path:
    """Write base + adapters as one plain checkpoint (weights only, tokenizer copied)."""
    folder = resolve_checkpoint(folder)
    if not is_adapter_checkpoint(folder):
        raise LmforgeError(f"{folder} is not a LoRA checkpoint (no {ADAPTER_WEIGHTS})")
    model = load_adapted(folder)
    tok = folder if (folder / "tokenizer.json").is_file() else None
    return save_checkpoint(out, model, tokenizer_dir=tok)


def cmd_merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmforge merge", description="Merge a LoRA/QLoRA adapter checkpoint into its "
                                "base: OUT is a plain checkpoint that every lmforge command and transformers load.")
    p.add_argument("checkpoint", help="adapter checkpoint folder (RUN/sft/checkpoints/step_N), or its stage folder "
                   "(RUN/sft: the latest)")
    p.add_argument("out", help="output checkpoint folder")
    a = p.parse_args(argv)
    folder = resolve_checkpoint(a.checkpoint)
    path = merge(folder, a.out)
    log(f"merged {folder} into {base_of(folder)} -> {path}")
    return 0
