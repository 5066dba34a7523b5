"""Helpers the training benchmarks share: spreads, the matmul ceiling, machine facts, HF twins.

Kept to what more than one bench needs; each bench stays readable on its own.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    """Progress goes to stderr: stdout carries only the one JSON object."""
    print(msg, file=sys.stderr, flush=True)


def spread(values: list[float], digits: int = 3) -> dict:
    """Median with min/max: on a shared machine the spread is part of the result."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    """What the figures depend on, recorded beside them (load average: others sharing the CPU)."""
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return out


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> list[float]:
    """GFLOP/s of repeated (n x n) @ (n x n) matmuls for about `seconds`, one value per matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # first call: allocation, kernel selection
    sync(device)
    rates = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return rates


def hf_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A `transformers` model of identical shape holding the same weights as an lmforge model.

    LlamaForCausalLM (Qwen3 with QK-norm) for the default architecture, GPT2LMHeadModel for
    model.arch=gpt2, through the same config/state mapping `lmforge export` writes, so a twin that
    differed in shape would fail to load rather than be timed.
    """
    import transformers

    cfg = model.cfg
    if cfg.arch == "gpt2":
        from lmforge.export.gpt2 import gpt2_config, gpt2_state_dict

        conf = {k: v for k, v in gpt2_config(cfg).items() if k != "lmforge"}
        twin = transformers.GPT2LMHeadModel(transformers.GPT2Config(**conf))
        missing, unexpected = twin.load_state_dict(gpt2_state_dict(model), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_embeddings]
    else:
        from lmforge.export.hf import llama_family_config

        conf = {k: v for k, v in llama_family_config(cfg).items() if k != "lmforge"}
        twin = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**conf))
        missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"transformers twin does not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return twin


def prepare_shared(work: Path, corpus: list[str], recipe: str | None = None,
                   overrides: list[str] | None = None) -> Path:
    """Tokenizer + prepared shards once, in WORK/shared (reused when present), for runs that compare models."""
    from lmforge.config import load_config
    from lmforge.stages import run_prepare, run_tokenizer

    shared = work / "shared"
    cfg = load_config(recipe, [f"run_dir={shared}", *(overrides or [])])
    cfg.data.sources = corpus
    if not (shared / "tokenizer" / "tokenizer.json").is_file():
        run_tokenizer(cfg)
    if not (shared / "data" / "train" / "manifest.json").is_file():
        run_prepare(cfg)
    return shared


def run_dir_on(shared: Path, run: Path) -> Path:
    """A run directory that reads the shared tokenizer and shards (symlinked), with no metrics of an earlier run."""
    run.mkdir(parents=True, exist_ok=True)
    for sub in ("tokenizer", "data"):
        if not (run / sub).exists():
            (run / sub).symlink_to(shared / sub, target_is_directory=True)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    return run
