"""Shared helpers for the pretraining-spine tests: a tiny corpus, tokenizer and prepared run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import load_config

if TYPE_CHECKING:
    from lmforge.model.transformer import Transformer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A ~200 kB corpus of real Python: enough for a 512-token BPE and a few hundred steps.
CORPUS_FILES = ["json/decoder.py", "json/encoder.py", "json/__init__.py", "textwrap.py", "string.py",
                "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "shlex.py", "glob.py", "keyword.py",
                "abc.py", "numbers.py", "queue.py", "sched.py", "copy.py"]

# A model small enough that a step takes milliseconds on one CPU core.
TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=64",
        "train.seq_len=32", "train.micro_batch=4", "train.lr=3e-3", "train.warmup_steps=5", "train.eval_every=0",
        "train.log_every=1", "train.progress=false", "train.keep_last=5",
        # Pinned: `auto` measures bf16 against fp32 on this CPU, and pinned losses must not depend on the machine.
        "train.precision=fp32"]


# Each family variant of the decoder the parallel plans cover, as overrides of one tiny model (the
# torchrun check scripts of tests/test_parallel.py and tests/test_cp.py build them with tiny_model).
VARIANTS = {"llama": [],
            "qwen3": ["model.qk_norm=true", "model.tie_embeddings=false", "model.attn_qkv_bias=true",
                      "model.logit_softcap=30"],
            "gpt2": ["model.arch=gpt2", "model.norm=layernorm", "model.pos=learned", "model.mlp=gelu",
                     "model.bias=true"]}
# Variants only tensor parallel covers (context parallel refuses sliding windows); layer 0 global, layer 1 local.
TP_VARIANTS = {**VARIANTS, "swa": ["model.sliding_window=8", "model.window_pattern=LS"]}


def tiny_model(variant: str) -> tuple[Transformer, Transformer]:
    """Two copies of one variant's 2-layer, 64-wide model with the same weights: (reference, to transform)."""
    import torch

    from lmforge.model.transformer import Transformer

    cfg = load_config(overrides=["model.vocab_size=128", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                                 "model.n_kv_head=2", "model.max_seq_len=64", *TP_VARIANTS[variant]]).model
    torch.manual_seed(0)
    ref, other = Transformer(cfg), Transformer(cfg)
    other.load_state_dict(ref.state_dict())
    return ref, other


def run_check(script: Path, procs: int) -> subprocess.CompletedProcess:
    """A check script under torchrun on `procs` CPU processes, able to import this module."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={procs}", str(script)], env=env, capture_output=True, text=True,
                          timeout=300)


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
    # PYTHONFAULTHANDLER: a crash in a native library (a signal, not an exception) still prints each thread's
    # Python stack, so a rare one in CI can be traced.
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


# Runs several CLI commands one after the other in one (torchrun) launch: starting Python, torch and
# gloo costs more than a tiny model's ten steps, so tests that need many short runs share launches.
# Rank 0 marks where each job's output starts and what it returned; a job's error is reported and the
# next job runs (the process group stays up between jobs).
BATCH_DRIVER = """
import json, os, sys, traceback
from lmforge.cli import _run
from lmforge.errors import LmforgeError
main = os.environ.get("RANK", "0") == "0"
for label, argv in json.loads(sys.argv[1]):
    if main:
        print(f"@@@ job {label}", file=sys.stderr, flush=True)
    try:
        code = _run(argv[0], argv[1:])
    except LmforgeError as e:
        print(f"lmforge {argv[0]}: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        traceback.print_exc()
        code = 1
    if main:
        print(f"@@@ rc {code}", file=sys.stderr, flush=True)
"""


def lmforge_batch(jobs: dict[str, list[str]], torchrun: int = 0, timeout: int = 900) -> dict[str, tuple[int, str]]:
    """Each job's (return code, stderr), for jobs {label: [command, key=value, ...]} run in one launch.

    A job the launch never reached (an earlier one hung or killed the launch) gets return code -1 and the
    launch's last output, so each test still fails with the reason."""
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_FAULT"}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    launch = [sys.executable] if not torchrun else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={torchrun}"]
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "batch_driver.py"
        driver.write_text(BATCH_DRIVER)
        try:
            r = subprocess.run([*launch, str(driver), json.dumps(list(jobs.items()))], env=env, capture_output=True,
                               text=True, timeout=timeout)
            err = r.stderr
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            err += f"\n(the launch timed out after {timeout} s)"
    out: dict[str, tuple[int, str]] = {}
    for part in err.split("@@@ job ")[1:]:
        label, _, body = part.partition("\n")
        text, _, rc = body.rpartition("@@@ rc ")
        out[label] = (int(rc.split()[0]), text) if rc else (-1, body)
    return {label: out.get(label, (-1, err[-3000:])) for label in jobs}


def losses(run: Path) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical weights."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), f"{k} differs between {a} and {b}"


def assert_resume_exact(base_run: Path, root: Path, args: list[str], kill_after: int, last: int) -> tuple[Path, Path]:
    """`lmforge pretrain *args` straight, and SIGKILLed right after step `kill_after` then resumed, end equal.

    Equal means the same loss at every step and bit-identical weights at step `last`. The killed run
    needs a process of its own; the straight run and the resume share one launch. Returns both runs.
    """
    straight, killed = copy_run(base_run, root / "straight"), copy_run(base_run, root / "killed")
    r = lmforge("pretrain", f"run_dir={killed}", *args, env={"LMFORGE_FAULT": f"step:{kill_after}"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    done = lmforge_batch({"straight": ["pretrain", f"run_dir={straight}", *args],
                          "resumed": ["pretrain", f"run_dir={killed}", *args]})
    assert done["straight"][0] == 0, done["straight"][1][-3000:]
    assert done["resumed"][0] == 0 and "resumed" in done["resumed"][1], done["resumed"][1][-3000:]
    step = f"step_{last:06d}"
    assert_same_weights(straight / "checkpoints" / step, killed / "checkpoints" / step)
    assert losses(straight) == losses(killed)
    return straight, killed
