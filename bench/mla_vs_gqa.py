"""Validation loss of multi-head latent attention against grouped-query attention of the same parameter budget.

    python bench/mla_vs_gqa.py [--steps 300] [--n-layer 4] [--n-embd 128] [--n-head 4] [--kv-head 2]
        [--kv-lora 64] [--rope 16] [--seq-len 128] [--seeds 1337] [--corpus GLOB] [--work DIR]

Both sides are real `lmforge pretrain` runs on one tokenizer and one prepared dataset (default corpus:
the running Python's standard-library sources, as `lmforge quickstart`), the same seed, steps, batch
and schedule. The peer is the same decoder with GQA (n_kv_head key/value heads); the difference in
attention parameters is given to its MLP (ffn_dim), so both train the same number of weights.

Reported per side: parameters, the KV cache per token generation keeps (16-bit), training tokens/s
(the two run one after the other, so load on a shared machine moves it) and the final validation
loss. Prints one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import log, machine, prepare_shared, run_dir_on

ROOT = Path(__file__).resolve().parent.parent


def model_keys(a: argparse.Namespace) -> dict[str, list[str]]:
    """The two sides' model.* overrides, the GQA one's MLP widened to the MLA one's parameter count."""
    import torch

    from lmforge.config import load_config
    from lmforge.model.transformer import Transformer, ffn_dim

    shared = [f"model.n_layer={a.n_layer}", f"model.n_embd={a.n_embd}", f"model.n_head={a.n_head}",
              f"model.max_seq_len={a.seq_len}"]
    d = a.n_embd // a.n_head
    mla = [*shared, "model.attention=mla", f"model.kv_lora_rank={a.kv_lora}", f"model.qk_rope_head_dim={a.rope}",
           f"model.qk_nope_head_dim={d - a.rope}", f"model.v_head_dim={d}"]
    gqa = [*shared, f"model.n_kv_head={a.kv_head}"]
    with torch.device("meta"):  # the vocabulary is the tokenizer's (4096); it is the same on both sides
        n_mla, n_gqa = (Transformer(load_config(overrides=[*keys, "model.vocab_size=4096"]).model).num_params()
                        for keys in (mla, gqa))
    base_ffn = ffn_dim(load_config(overrides=gqa).model)
    extra = round((n_mla - n_gqa) / a.n_layer / (3 * a.n_embd))  # SwiGLU: 3 weights per hidden unit
    gqa.append(f"model.ffn_dim={base_ffn + extra}")
    mla.append(f"model.ffn_dim={base_ffn}")
    return {"mla": mla, "gqa": gqa}


def train(name: str, keys: list[str], a: argparse.Namespace, seed: int, shared: Path, work: Path) -> dict:
    from lmforge.checkpoint import load_model
    from lmforge.model.mla import kv_cache_bytes_per_token

    run = run_dir_on(shared, work / f"{name}-seed{seed}")
    cmd = [sys.executable, "-m", "lmforge", "pretrain", f"run_dir={run}", f"seed={seed}", *keys,
           f"train.max_steps={a.steps}", f"train.seq_len={a.seq_len}", "train.micro_batch=8", "train.lr=3e-3",
           "train.warmup_steps=20", f"train.eval_every={a.steps}", "train.eval_batches=20",
           f"train.save_every={a.steps}", "train.resume=none", "train.progress=false", "train.log_every=10"]
    log(f"{name} seed {seed}: {' '.join(cmd[4:])}")
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    model = load_model(run / "checkpoints" / f"step_{a.steps:06d}")
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"params": model.num_params(), "kv_cache_bytes_per_token_16bit": kv_cache_bytes_per_token(model.cfg),
            "val_loss": round([r["val_loss"] for r in rows if "val_loss" in r][-1], 4),
            "tokens_per_s": round(sorted(tps)[len(tps) // 2], 1) if tps else None,
            "wall_s": round(time.time() - t0, 1), "keys": keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--kv-head", type=int, default=2, help="the GQA side's key/value heads")
    p.add_argument("--kv-lora", type=int, default=64, help="the MLA side's latent width")
    p.add_argument("--rope", type=int, default=16, help="the MLA side's RoPE width per head")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seeds", default="1337")
    p.add_argument("--corpus", default="")
    p.add_argument("--work", default="")
    a = p.parse_args()
    import sysconfig

    corpus = [a.corpus] if a.corpus else [str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")]
    work = Path(a.work or tempfile.mkdtemp(prefix="mla-vs-gqa-"))
    shared = prepare_shared(work, corpus, overrides=["tokenizer.vocab_size=4096", "tokenizer.max_train_bytes=2000000",
                                                     "data.val_fraction=0.05"])
    keys = model_keys(a)
    import torch

    out = {"bench": "mla_vs_gqa", "steps": a.steps, "seq_len": a.seq_len, "tokens_per_step": 8 * a.seq_len,
           "machine": machine(torch.device("cpu")), "seeds": {}}
    for seed in (int(s) for s in a.seeds.split(",")):
        out["seeds"][seed] = {name: train(name, k, a, seed, shared, work) for name, k in keys.items()}
    out["val_loss_mla_minus_gqa"] = [round(r["mla"]["val_loss"] - r["gqa"]["val_loss"], 4)
                                     for r in out["seeds"].values()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
