"""Every post-training stage resumes bit-exactly after a kill, as pretraining does.

For each stage: N steps straight vs. SIGKILLed right after step K (LMFORGE_FAULT=step:K) and resumed,
in real processes; the final weights must be equal, not close. GRPO (two optimizer steps per rollout
batch, so step K's checkpoint holds rollouts still to be trained on, plus a KL reference) is also
killed inside the save of step N (LMFORGE_FAULT=mid-save:step_N) before resuming again. LoRA runs
with dropout, so the restored RNG matters.

To keep the suite fast, the runs that end normally (all straight runs; all final resumes) share one
process each, and only the runs that must die get a process of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_chat import tiny_checkpoint, write_jsonl

N, K = 6, 3
COMMON = ["train.progress=false",
          "train.precision=fp32", "train.seq_len=48", "train.micro_batch=2", f"train.max_steps={N}",
          f"train.save_every={K}", "train.eval_every=0", "train.log_every=1", "train.warmup_steps=2",
          "train.lr=3e-3", "train.sample_every=0"]
STAGES = {
    "sft": ("sft", []),
    "sft-lora": ("sft", ["sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.dropout=0.2",
                         "sft.lora.target_modules=[q_proj,v_proj]"]),
    "dpo": ("dpo", ["dpo.reference=precomputed"]),
    "rm": ("rm", ["rm.val_fraction=0", "rm.center_coef=0.01"]),
    "grpo": ("grpo", ["grpo.group_size=4", "grpo.max_new_tokens=5", "grpo.iterations=2", "grpo.beta=0.1",
                      "grpo.rewards=[exact_match,length]"]),
}
DRIVER = ("import json, sys\nfrom lmforge.cli import _run\n"
          "for name, argv in json.loads(sys.argv[1]):\n    _run(name, argv)\n")


def argv(root: Path, name: str, run: str) -> tuple[str, list[str]]:
    command, extra = STAGES[name]
    data = {"sft": root / "sft.jsonl", "dpo": root / "pairs.jsonl", "rm": root / "pairs.jsonl",
            "grpo": root / "rl.jsonl"}[command]
    return command, [f"run_dir={root / run / name}", f"{command}.data=[{data}]",
                     f"{command}.init_from={root / 'base' / 'step_000000'}", *COMMON, *extra]


def run(jobs: list[tuple[str, list[str]]], fault: str = "") -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["LMFORGE_FAULT"] = fault
    else:
        env.pop("LMFORGE_FAULT", None)
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=600).returncode


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    tiny_checkpoint(root)
    write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": f"What is {i} + 2?"},
                                                   {"role": "assistant", "content": f"The answer is {i + 2}."}]}
                                     for i in range(12)])
    write_jsonl(root / "pairs.jsonl", [{"prompt": f"What is {i} + 2?", "chosen": f"The answer is {i + 2}.",
                                        "rejected": f"The answer is {i + 3}."} for i in range(12)])
    write_jsonl(root / "rl.jsonl", [{"prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(12)])
    assert run([argv(root, s, "straight") for s in STAGES]) == 0
    for s in STAGES:
        assert run([argv(root, s, "killed")], fault=f"step:{K}") == -9, s  # SIGKILL
    assert run([argv(root, "grpo", "killed")], fault=f"mid-save:step_{N:06d}") == -9
    assert run([argv(root, s, "killed") for s in STAGES]) == 0
    return root


def final_weights(root: Path, run_name: str, stage: str) -> dict:
    command = STAGES[stage][0]
    ckpt = root / run_name / stage / command / "checkpoints" / f"step_{N:06d}"
    name = "adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(ckpt / name)


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_after_kill_is_bit_exact(runs, stage):
    command = STAGES[stage][0]
    killed_dir = runs / "killed" / stage / command
    # The kill left the step-K checkpoint; the resumed run continued from it (not from scratch).
    state = json.loads((killed_dir / "checkpoints" / f"step_{N:06d}" / "trainer_state.json").read_text())
    assert state["step"] == N
    log_steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert log_steps.count(1) == 1 and log_steps.count(N) >= 1
    a, b = final_weights(runs, "straight", stage), final_weights(runs, "killed", stage)
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), f"{stage}: {k} differs after resume"
