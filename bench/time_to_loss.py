"""Wall-clock time to a validation loss: lmforge's default recipe against the nanoGPT-style baseline.

    python bench/time_to_loss.py [--minutes 3] [--seeds 1337,1338] [--corpus GLOB] [--parallel 2]
        [--recipe recipes/tiny.yaml] [--baseline recipes/gpt2-baseline.yaml]
        [--set key=value ...] [--set-baseline key=value ...] [--work DIR]

Both sides are real `lmforge pretrain` runs (subprocesses) on one shared tokenizer and one prepared
dataset (default corpus: the running Python's standard-library sources, as `lmforge quickstart`),
each with the same wall-clock budget (`train.max_minutes`, which also sets its schedule's length).
Validation loss is read from each run's metrics.jsonl. The baseline's final validation loss is the
target; the result is the time each run needed to reach it (linear interpolation between
evaluations) and the speed-up, baseline time / lmforge time, per seed.

Time is wall-clock from launching the process (imports and model building included) minus the
time spent in periodic evaluations, which both sides run identically and which are not training.
On a machine with few cores both runs go side by side (--parallel 2, threads split evenly), so
load from other users hits both alike; --parallel 1 runs them one after the other with all cores.

Prints one JSON object; progress goes to stderr.
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

from common import log, prepare_shared, run_dir_on, spread

ROOT = Path(__file__).resolve().parent.parent


def launch(name: str, recipe: str, sets: list[str], seed: int, minutes: float, shared: Path, work: Path,
           threads: int) -> tuple[subprocess.Popen, Path, float]:
    run = run_dir_on(shared, work / f"{name}-seed{seed}")
    cmd = [sys.executable, "-m", "lmforge", "pretrain", recipe, f"run_dir={run}", f"seed={seed}",
           f"train.max_minutes={minutes}", "train.resume=none", "train.save_every=0", "train.progress=false",
           *sets]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = open(run / "stdout.log", "w")
    log(f"launch {name} seed {seed}: {' '.join(cmd[3:])}")
    t0 = time.time()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), run, t0


def curve(run: Path, t0: float) -> list[dict]:
    """[{step, t, val_loss}] with t = seconds since launch minus the evaluations before it."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_t = {r["step"]: r["time"] for r in rows if "loss" in r}
    out, eval_s = [], 0.0
    for r in rows:
        if "val_loss" not in r:
            continue
        # The loop logs the training row, then evaluates, then logs val_loss at the same step.
        eval_s += max(0.0, r["time"] - train_t.get(r["step"], r["time"]))
        out.append({"step": r["step"], "t": round(r["time"] - t0 - eval_s, 2), "val_loss": round(r["val_loss"], 4)})
    return out


def time_to(points: list[dict], target: float) -> float | None:
    """First time the validation loss reaches `target`, interpolated between evaluations."""
    prev = None
    for p in points:
        if p["val_loss"] <= target:
            if prev is None:
                return p["t"]
            frac = (prev["val_loss"] - target) / max(prev["val_loss"] - p["val_loss"], 1e-12)
            return prev["t"] + frac * (p["t"] - prev["t"])
        prev = p
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget of each run")
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--corpus", action="append", default=None, help="file/folder/glob; default: stdlib *.py")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    ap.add_argument("--baseline", default=str(ROOT / "recipes" / "gpt2-baseline.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for the lmforge run")
    ap.add_argument("--set-baseline", action="append", default=[], help="key=value for the baseline run")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (threads split among them)")
    ap.add_argument("--work", default="", help="working folder (kept); default: a temporary one")
    args = ap.parse_args()

    from lmforge.quickstart import default_corpus

    corpus = args.corpus or [default_corpus()]
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-ttl-"))
    t_prep = time.perf_counter()
    shared = prepare_shared(work, corpus, args.recipe)
    prep_s = time.perf_counter() - t_prep
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    jobs = [(seed, name, recipe, sets) for seed in seeds
            for name, recipe, sets in (("lmforge", args.recipe, args.sets),
                                       ("baseline", args.baseline, args.set_baseline))]
    done: dict[tuple[int, str], tuple[Path, float]] = {}
    running: list[tuple[subprocess.Popen, tuple[int, str], Path, float]] = []
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            seed, name, recipe, sets = jobs.pop(0)
            proc, run, t0 = launch(name, recipe, sets, seed, args.minutes, shared, work, threads)
            running.append((proc, (seed, name), run, t0))
        time.sleep(2)
        if hasattr(os, "getloadavg"):
            load.append(os.getloadavg()[0])
        for item in list(running):
            proc, key, run, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode:
                    raise SystemExit(f"{key[1]} seed {key[0]} failed (exit {proc.returncode}); see {run}/stdout.log")
                done[key] = (run, t0)
                log(f"done {key[1]} seed {key[0]}")

    per_seed, speedups = [], []
    for seed in seeds:
        curves = {name: curve(*done[(seed, name)]) for name in ("lmforge", "baseline")}
        target = curves["baseline"][-1]["val_loss"]
        t_lm, t_base = time_to(curves["lmforge"], target), time_to(curves["baseline"], target)
        speedup = round(t_base / t_lm, 3) if t_lm and t_base else None
        if speedup:
            speedups.append(speedup)
        per_seed.append({"seed": seed, "target_val_loss": target,
                         "lmforge_final_val_loss": curves["lmforge"][-1]["val_loss"],
                         "time_to_target_s": {"lmforge": t_lm and round(t_lm, 1),
                                              "baseline": t_base and round(t_base, 1)},
                         "speedup": speedup,
                         "steps": {k: v[-1]["step"] for k, v in curves.items()}, "curves": curves})
    result = {"bench": "time_to_loss", "corpus": corpus, "minutes_per_run": args.minutes,
              "recipe": args.recipe, "baseline": args.baseline, "set": args.sets, "set_baseline": args.set_baseline,
              "parallel": args.parallel, "threads_per_run": threads, "cpu_cores": os.cpu_count(),
              "load_avg_1min": spread(load, 2) if load else None, "prepare_s": round(prep_s, 1),
              "speedup": spread(speedups) if speedups else None,
              "fraction_of_baseline_time": spread([1 / s for s in speedups]) if speedups else None,
              "seeds": per_seed, "work": str(work)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
