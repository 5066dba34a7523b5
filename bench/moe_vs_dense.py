"""Mixture of experts against a dense decoder with the same active parameters, for the same wall time.

    python bench/moe_vs_dense.py [--minutes 2] [--n-layer 4] [--n-embd 128] [--n-head 4] [--experts 8]
        [--top-k 2] [--seq-len 128] [--micro-batch 8] [--seeds 1337] [--parallel 2] [--corpus GLOB] [--work DIR]

Both sides are real `lmforge pretrain` runs on one tokenizer and one prepared dataset (default corpus: the
running Python's standard-library sources, as `lmforge quickstart`), the same seed, batch and schedule
shape, and the same wall-clock budget (`train.max_minutes`, which fixes each run's step count from its own
measured step time, so the faster side takes more steps; about four validation passes fall inside it,
the same share of each run). The MoE side has `--experts` experts of width
dense_ffn / top_k per layer (the default expert width); the dense peer's MLP is widened or narrowed until
its parameter count equals the MoE model's *active* count (what one token passes through: attention, the
router, top_k experts, embeddings), so both spend about the same FLOPs per token.

Reported per side: total and active parameters, steps taken, training tokens/s (median of the logged
rows) and the final validation loss; then the MoE / dense ratios of tokens/s and the validation-loss
difference. By default the two run side by side (--parallel 2, the cores split evenly), so load from
others sharing the machine hits both alike. Prints one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import log, machine, prepare_shared, run_dir_on

ROOT = Path(__file__).resolve().parent.parent


def model_keys(a: argparse.Namespace) -> dict[str, list[str]]:
    """The two sides' model.* overrides: the dense one's ffn_dim matched to the MoE one's active parameters."""
    import torch

    from lmforge.config import load_config
    from lmforge.model.transformer import Transformer, ffn_dim

    shared = [f"model.n_layer={a.n_layer}", f"model.n_embd={a.n_embd}", f"model.n_head={a.n_head}",
              f"model.max_seq_len={a.seq_len}", "model.qk_norm=true"]
    moe = [*shared, f"model.moe.experts={a.experts}", f"model.moe.top_k={a.top_k}"]

    def count(keys: list[str], active: bool) -> int:
        with torch.device("meta"):  # the vocabulary is the tokenizer's (4096) on both sides
            return Transformer(load_config(overrides=[*keys, "model.vocab_size=4096"]).model).num_params(active=active)

    base = ffn_dim(load_config(overrides=shared).model)
    target = count(moe, True)
    per_unit = 3 * a.n_embd * a.n_layer  # SwiGLU: gate, up and down weights per hidden unit
    dense_ffn = base + round((target - count([*shared, f"model.ffn_dim={base}"], False)) / per_unit)
    return {"moe": moe, "dense": [*shared, f"model.ffn_dim={dense_ffn}"]}


def launch(name: str, keys: list[str], a: argparse.Namespace, seed: int, shared: Path, work: Path,
           threads: int) -> tuple[subprocess.Popen, Path]:
    run = run_dir_on(shared, work / f"{name}-seed{seed}")
    cmd = [sys.executable, "-m", "lmforge", "pretrain", f"run_dir={run}", f"seed={seed}", *keys,
           "train.max_steps=0", f"train.max_minutes={a.minutes}", f"train.seq_len={a.seq_len}",
           f"train.micro_batch={a.micro_batch}", "train.lr=3e-3", "train.warmup_steps=20", "train.eval_every=100000",
           "train.eval_batches=20", "train.save_every=0", "train.resume=none", "train.progress=false",
           "train.log_every=10", "train.sample_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log(f"launch {name} seed {seed}: {' '.join(cmd[4:])}")
    out = open(run / "stdout.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), run


def result(run: Path) -> dict:
    from lmforge.checkpoint import latest_checkpoint, load_model

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    model = load_model(latest_checkpoint(run / "checkpoints"))
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"params": model.num_params(), "active_params": model.num_params(active=True),
            "steps": max(r["step"] for r in rows if "loss" in r),
            "val_loss": round([r["val_loss"] for r in rows if "val_loss" in r][-1], 4),
            "tokens_per_s": round(sorted(tps)[len(tps) // 2], 1) if tps else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0, help="wall-clock budget of each run")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seeds", default="1337")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (threads split among them)")
    p.add_argument("--corpus", default="")
    p.add_argument("--work", default="")
    a = p.parse_args()
    import sysconfig

    import torch

    corpus = [a.corpus] if a.corpus else [str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")]
    work = Path(a.work or tempfile.mkdtemp(prefix="moe-vs-dense-"))
    shared = prepare_shared(work, corpus, overrides=["tokenizer.vocab_size=4096", "tokenizer.max_train_bytes=2000000",
                                                     "data.val_fraction=0.05"])
    keys = model_keys(a)
    threads = max(1, (os.cpu_count() or 1) // a.parallel)
    out = {"bench": "moe_vs_dense", "minutes_per_run": a.minutes, "seq_len": a.seq_len,
           "tokens_per_step": a.micro_batch * a.seq_len, "parallel": a.parallel, "threads_per_run": threads,
           "machine": machine(torch.device("cpu")), "keys": keys, "seeds": {}}
    t0 = time.time()
    for seed in (int(s) for s in a.seeds.split(",")):
        jobs, runs = list(keys.items()), {}
        while jobs:  # `parallel` at a time; side by side by default
            batch, jobs = jobs[:a.parallel], jobs[a.parallel:]
            procs = {name: launch(name, k, a, seed, shared, work, threads) for name, k in batch}
            for name, (proc, run) in procs.items():
                if proc.wait():
                    raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}); see {run}/stdout.log")
                runs[name] = run
        r = {name: result(run) for name, run in runs.items()}
        r["moe_over_dense_tokens_per_s"] = round(r["moe"]["tokens_per_s"] / r["dense"]["tokens_per_s"], 3)
        r["val_loss_moe_minus_dense"] = round(r["moe"]["val_loss"] - r["dense"]["val_loss"], 4)
        out["seeds"][seed] = r
    out["wall_s"] = round(time.time() - t0, 1)
    out["machine"]["load_avg_1min_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
