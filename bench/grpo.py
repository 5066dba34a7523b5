"""GRPO rollouts: lmforge's `grpo` stage against TRL's GRPOTrainer (generating with transformers), one run.

Both sides start from one checkpoint: a small model that lmforge pretrains for a few steps on Python's
standard library, exported to a transformers folder for TRL (the same weights: export is lossless).
Same prompts, group size, new-token budget, temperature 1.0, no KL reference, a length reward, the
same thread count, each side in its own process. Reported per side: rollout tokens/s (tokens sampled
/ seconds spent sampling them) and the whole GRPO step time (sampling, scoring, the policy update);
then lmforge / TRL for both. TRL is installed for this benchmark only: `pip install trl`.

    python bench/grpo.py --out bench/results/cpu-2core/grpo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from common import log, machine, prepare_shared, run_dir_on

ROOT = Path(__file__).resolve().parent.parent

# Runs in its own process: TRL's GRPOTrainer on the exported folder, generation timed around
# model.generate (the call TRL makes to sample a batch of completions without vLLM).
TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a["hf"])
tok.pad_token = tok.pad_token or tok.eos_token
model = AutoModelForCausalLM.from_pretrained(a["hf"], dtype=torch.float32)
prompts = [json.loads(line)["prompt"] for line in open(a["prompts"])]
data = Dataset.from_list([{"prompt": p} for p in prompts])
gen = {"seconds": 0.0, "tokens": 0}
real_generate = model.generate

def timed_generate(*args, **kw):
    t0 = time.perf_counter()
    out = real_generate(*args, **kw)
    gen["seconds"] += time.perf_counter() - t0
    ids = kw.get("input_ids", args[0] if args else None)
    new = out[:, ids.shape[1]:]
    gen["tokens"] += int((new != tok.pad_token_id).sum())  # padding after an early EOS is not sampled
    return out

model.generate = timed_generate
steps = []

class StepClock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        steps.append(time.perf_counter() - self.t0)

def length(completions, **kw):
    return [float(len(c)) / 100 for c in completions]

cfg = GRPOConfig(output_dir=a["out"], per_device_train_batch_size=a["prompts_per_step"] * a["group"],
                 num_generations=a["group"], max_completion_length=a["new_tokens"], temperature=1.0,
                 max_steps=a["steps"], learning_rate=1e-5, beta=0.0, logging_steps=1, report_to="none",
                 save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
trainer = GRPOTrainer(model=model, reward_funcs=length, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[StepClock()])
trainer.train()
print("@@@" + json.dumps({"rollout_tokens_per_s": gen["tokens"] / gen["seconds"], "generated": gen["tokens"],
                          "step_s": steps}))
"""


def base_checkpoint(work: Path, shared: Path, threads: int) -> Path:
    """A briefly pretrained `tiny`-shaped model (it samples text rather than uniform noise)."""
    run = run_dir_on(shared, work / "base")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    _run([sys.executable, "-m", "lmforge", "pretrain", f"run_dir={run}", "model.preset=tiny", "train.seq_len=128",
          "train.max_steps=40", "train.save_every=40", "train.eval_every=0", "train.resume=none",
          "train.progress=false", "train.precision=fp32"], env)
    return run / "checkpoints" / "step_000040"


def _run(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed:\n{r.stderr[-3000:]}")


def write_prompts(path: Path, n: int) -> Path:
    lines = [ln.strip() for ln in (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
             if len(ln.strip()) > 20]
    path.write_text("".join(json.dumps({"prompt": lines[i * 7 % len(lines)][:60], "answer": ""}) + "\n"
                            for i in range(n)))
    return path


def run_lmforge(a: argparse.Namespace, ckpt: Path, prompts: Path, work: Path, shared: Path) -> dict:
    run = run_dir_on(shared, work / "lmforge")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    cmd = [sys.executable, "-m", "lmforge", "grpo", f"run_dir={run}", f"grpo.init_from={ckpt}",
           f"grpo.data=[{prompts}]", f"grpo.group_size={a.group}", f"grpo.max_new_tokens={a.new_tokens}",
           "grpo.rewards=[length]", "grpo.beta=0", "grpo.temperature=1.0", f"train.micro_batch={a.prompts_per_step}",
           f"train.max_steps={a.steps}", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
           "train.progress=false", "train.sample_every=0", "train.precision=fp32", "train.lr=1e-5",
           "train.seq_len=128", "train.resume=none"]
    log(f"lmforge: {' '.join(cmd[3:])}")
    _run(cmd, env)
    rows = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "rollout_tokens_per_s" in r]
    times = [r["time"] for r in rows]  # wall clock at each logged step (train.log_every=1)
    steps = [b - a_ for a_, b in zip(times, times[1:])]
    return {"rollout_tokens_per_s": _median([r["rollout_tokens_per_s"] for r in rows[1:] or rows]),
            "step_s": _median(steps) if steps else None, "steps_logged": len(rows)}


def run_trl(a: argparse.Namespace, hf: Path, prompts: Path, work: Path) -> dict:
    args = {"hf": str(hf), "prompts": str(prompts), "out": str(work / "trl"), "threads": a.threads,
            "group": a.group, "new_tokens": a.new_tokens, "steps": a.steps, "prompts_per_step": a.prompts_per_step}
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    log("trl: GRPOTrainer on the exported folder")
    r = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(args)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"TRL run failed (is trl installed? pip install trl):\n{r.stderr[-3000:]}")
    got = json.loads(r.stdout.split("@@@")[-1])
    return {"rollout_tokens_per_s": got["rollout_tokens_per_s"], "step_s": _median(got["step_s"][1:] or got["step_s"]),
            "generated": got["generated"]}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return round(xs[len(xs) // 2], 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="")
    p.add_argument("--out", default="")
    a = p.parse_args()
    from lmforge.export.hf import export_hf

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-grpo-"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shared = prepare_shared(work, [str(stdlib / "*.py")], overrides=["tokenizer.vocab_size=4096",
                                                                     "tokenizer.max_train_bytes=2000000"])
    t0 = time.time()
    ckpt = base_checkpoint(work, shared, a.threads)
    hf = work / "hf"
    export_hf(ckpt, hf)
    prompts = write_prompts(work / "prompts.jsonl", 4 * a.prompts_per_step * a.steps)
    lm = run_lmforge(a, ckpt, prompts, work, shared)
    trl = run_trl(a, hf, prompts, work)
    out = {"bench": "grpo", "machine": machine(torch.device("cpu")), "threads": a.threads, "group": a.group,
           "prompts_per_step": a.prompts_per_step, "new_tokens": a.new_tokens, "steps": a.steps,
           "lmforge": lm, "trl": trl,
           "rollout_ratio_lmforge_over_trl": round(lm["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"], 3),
           "step_time_ratio_trl_over_lmforge": (round(trl["step_s"] / lm["step_s"], 3)
                                                if lm["step_s"] and trl["step_s"] else None),
           "wall_s": round(time.time() - t0, 1)}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
