"""Shared helpers for the pretraining-spine tests: a tiny corpus, tokenizer and prepared run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from lmforge.config import load_config

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A ~200 kB corpus of real Python: enough for a 512-token BPE and a few hundred steps.
CORPUS_FILES = ["json/decoder.py", "json/encoder.py", "json/__init__.py", "textwrap.py", "string.py",
                "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "shlex.py", "glob.py", "keyword.py",
                "abc.py", "numbers.py", "queue.py", "sched.py", "copy.py"]

# A model small enough that a step takes milliseconds on one CPU core.
TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=64",
        "train.seq_len=32", "train.micro_batch=4", "train.lr=3e-3", "train.warmup_steps=5", "train.eval_every=0",
        "train.log_every=1", "train.progress=false", "train.keep_last=5"]


def make_corpus(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for rel in CORPUS_FILES:
        src = STDLIB / rel
        if src.is_file():
            shutil.copy(src, dst / rel.replace("/", "_"))
    return dst


def prepared_run(root: Path) -> Path:
    """tokenizer + shards under root/run (built in-process through the real stages)."""
    from lmforge.stages import run_prepare, run_tokenizer

    corpus = make_corpus(root / "corpus")
    run = root / "run"
    cfg = load_config(overrides=[f"run_dir={run}", f"data.sources=[{corpus}]", "tokenizer.vocab_size=512",
                                 "data.val_fraction=0.15", "data.workers=1"])
    run_tokenizer(cfg)
    run_prepare(cfg)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    """A fresh run directory with the prepared tokenizer and data but no checkpoints."""
    dst.mkdir(parents=True)
    for name in ("tokenizer", "data"):
        shutil.copytree(src / name, dst / name)
    return dst


def lmforge(*args: str, env: dict | None = None, timeout: int = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (so a SIGKILL hits a real process)."""
    full_env = {k: v for k, v in os.environ.items() if k != "LMFORGE_FAULT"}
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
