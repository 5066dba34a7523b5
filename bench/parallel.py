"""Parallel layouts on CPU processes: tokens/s and per-process memory of each, against one process, in one run.

    python bench/parallel.py [--steps 30] [--out bench/results/cpu-2core/parallel.json]

Each layout trains the same model on the same data and global batch through the real CLI
(`torchrun -m lmforge pretrain parallel.*=...`). Per layout: tokens/s (median of the logged
windows after the first few steps), the trainer's own count of weights + gradients + optimizer
state per process (`state_mb`, local shards only), and the peak resident memory of rank 0. A
layout this version refuses is recorded with its message. Ratios are against the single process
(tokens/s) and against DDP (state per process): FSDP2 on 2 processes should hold about half.

On one machine the processes share its cores, so tokens/s measures communication and sharding
overheads, not scaling; CPU offload moves state to host memory, which on a CPU is the same memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from common import log, machine

LAYOUTS = {
    "single": (1, []),
    "ddp": (2, ["parallel.dp_replicate=2"]),
    "fsdp2": (2, []),
    "fsdp2_offload": (2, ["parallel.fsdp_cpu_offload=true"]),
    "tp": (2, ["parallel.tp=2"]),
    "pp": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "cp": (2, ["parallel.cp=2"]),
}
MODEL = ["model.n_layer=4", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=4", "model.max_seq_len=256",
         "model.tie_embeddings=false"]


def prepare(root: Path) -> Path:
    """A tokenizer and shards from the standard library's own sources (every machine has them)."""
    corpus = root / "corpus"
    corpus.mkdir()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]:
        shutil.copy(p, corpus / p.name)
    run = root / "base"
    for cmd in (["tokenizer", "tokenizer.vocab_size=4096"], ["prepare", "data.workers=1"]):
        subprocess.run([sys.executable, "-m", "lmforge", *cmd, f"run_dir={run}", f"data.sources=[{corpus}]",
                        "data.val_fraction=0.02"], check=True, capture_output=True)
    return run


def train(base: Path, root: Path, name: str, procs: int, layout: list[str], steps: int) -> dict:
    run = root / name
    run.mkdir()
    for sub in ("tokenizer", "data"):
        shutil.copytree(base / sub, run / sub)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs)), "PYTHONUNBUFFERED": "1"}
    args = ["pretrain", f"run_dir={run}", *MODEL, *layout, "train.seq_len=256", "train.micro_batch=4",
            "train.batch_tokens=2048", f"train.max_steps={steps}", "train.save_every=0", "train.eval_every=0",
            "train.log_every=2", "train.progress=false", "train.warmup_steps=5"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "lmforge", *args]
    log(f"{name}: {' '.join(layout) or 'one process'}")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # lmforge's own refusal ("lmforge pretrain: error: ..."), or a crash
        refusal = [x for x in r.stderr.splitlines() if x.startswith("lmforge ") and " error: " in x]
        if refusal:
            return {"procs": procs, "layout": layout, "refused": refusal[-1].strip()}
        crash = [x for x in r.stderr.splitlines() if "Error" in x and "ChildFailedError" not in x]
        return {"procs": procs, "layout": layout, "failed": (crash[-1] if crash else r.stderr[-500:]).strip()}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in rows if "tokens_per_s" in m]
    state = next(m["state_mb"] for m in rows if "state_mb" in m)
    tps = [m["tokens_per_s"] for m in rows if m["step"] > 6]
    return {"procs": procs, "layout": layout, "tokens_per_s": round(statistics.median(tps), 1),
            "state_mb_per_process": state, "rank0_peak_rss_gb": round(max(m["memory_gb"] for m in rows), 3),
            "final_loss": round(rows[-1]["loss"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="")
    a = p.parse_args()
    from lmforge.doctor import cpu_info

    name, flags = cpu_info()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = prepare(root)
        results = {k: train(base, root, k, procs, layout, a.steps) for k, (procs, layout) in LAYOUTS.items()}
    single, ddp = results["single"], results["ddp"]
    for r in results.values():
        if "tokens_per_s" in r:
            r["tokens_per_s_vs_single"] = round(r["tokens_per_s"] / single["tokens_per_s"], 3)
            if "state_mb_per_process" in ddp:
                r["state_vs_ddp"] = round(r["state_mb_per_process"] / ddp["state_mb_per_process"], 3)
    out = {"bench": "parallel", "model": MODEL, "global_batch_tokens": 2048, "steps": a.steps,
           "machine": {**machine(torch.device("cpu")), "cpu_model": name,
                       "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})},
           "results": results}
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    for k, r in results.items():
        if "refused" in r or "failed" in r:
            log(f"{k:<14} {'refused' if 'refused' in r else 'FAILED'}: {r.get('refused') or r['failed']}")
        else:
            log(f"{k:<14} {r['tokens_per_s']:>9,.0f} tok/s ({r.get('tokens_per_s_vs_single', 1):.2f}x)  "
                f"state {r['state_mb_per_process']:>7.1f} MB/process ({r.get('state_vs_ddp', float('nan')):.2f}x DDP)"
                f"  rss {r['rank0_peak_rss_gb']:.2f} GB  loss {r['final_loss']}")


if __name__ == "__main__":
    main()
