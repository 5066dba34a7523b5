"""Runs that stay consistent: failed commands, fresh starts, second processes and kills leave a run that a
plain `lmforge pretrain run_dir=RUN` continues correctly; throughput counts the tokens really processed.

Crashes and second processes are real processes (tests/spine.py's `lmforge`); everything else runs the CLI
in this process (`cli`), which is faster and writes the same files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from spine import TINY, copy_run, lmforge, prepared_run
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.checkpoint import latest_checkpoint, list_checkpoints, load_model, resume_target, save_checkpoint
from lmforge.cli import config_from_args, main
from lmforge.errors import LmforgeError
from lmforge.rundir import Aside, finish_interrupted, lock_holder


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return prepared_run(tmp_path_factory.mktemp("runs"))


def cli(*args: str) -> int:
    """The CLI in this process: its exit code (1 for an exception a process would die of)."""
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    except Exception:  # noqa: BLE001 (a crash is a failed command too)
        return 1
    return 0


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(path) if "loss" in r}


def saved_train(run: Path) -> dict:
    return yaml.safe_load((run / "lmforge.yaml").read_text())["train"]


# --- 1. a failed command leaves the run as it was ----------------------------------------------------

def test_a_failed_command_does_not_change_the_run_config(base_run, tmp_path, monkeypatch, capsys):
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=2", "train.save_every=2") == 0
    saved = (run / "lmforge.yaml").read_text()
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as where it is not installed
    for bad in ("train.wandb=true", "train.lr=-1", "model.n_embd=0"):
        assert cli("pretrain", f"run_dir={run}", bad, "train.max_steps=4") != 0, bad
        assert (run / "lmforge.yaml").read_text() == saved, f"{bad} was written into the run's config"
        assert not (run / "lmforge.lock").exists() and not (run / "previous").exists()
    capsys.readouterr()
    assert cli("pretrain", f"run_dir={run}", "train.max_steps=4") == 0  # the plain restart works
    assert f"resumed from {run / 'checkpoints' / 'step_000002'}" in capsys.readouterr().err
    assert latest_checkpoint(run / "checkpoints").name == "step_000004"
    assert saved_train(run)["max_steps"] == 4 and not saved_train(run)["wandb"]


# --- 2 and 3. a fresh start is done once, and moves the earlier run aside ---------------------------------

def test_a_fresh_start_moves_the_old_run_aside_and_a_restart_resumes_it(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=6", "train.save_every=2") == 0
    old = losses(run / "metrics.jsonl")
    old_final = load_file(run / "checkpoints" / "step_000006" / "model.safetensors")

    # A fresh start with another seed, killed after step 3 (its step 2 saved).
    r = lmforge("pretrain", f"run_dir={run}", "train.resume=none", "seed=7", env={"LMFORGE_FAULT": "step:3"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    (aside,) = (run / "previous").iterdir()
    assert f"moved checkpoints/step_000002..step_000006 (3), metrics.jsonl of the earlier run to {aside}" in r.stderr
    assert [p.name for p in list_checkpoints(aside / "checkpoints")] == ["step_000002", "step_000004", "step_000006"]
    assert losses(aside / "metrics.jsonl") == old
    assert json.loads((aside / "moved.json").read_text())["reason"].startswith("train.resume=none")
    # generate, eval, init_from and resume now see only the new run's checkpoint
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000002"]
    assert saved_train(run)["resume"] == "auto"

    capsys.readouterr()
    assert cli("pretrain", f"run_dir={run}") == 0  # the plain restart after the crash
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in capsys.readouterr().err
    new = rows(run / "metrics.jsonl")
    assert [m["step"] for m in new if "loss" in m] == [1, 2, 3, 4, 5, 6]  # each step once: one run
    assert new[0]["loss"] != old[1]  # and it is the seed-7 run, not the old one
    new_final = load_file(run / "checkpoints" / "step_000006" / "model.safetensors")
    assert not torch.equal(new_final["model.embed_tokens.weight"], old_final["model.embed_tokens.weight"])
    assert sorted(p.name for p in (run / "previous").iterdir()) == [aside.name]


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=6", "train.save_every=2") == 0
    old = losses(run / "metrics.jsonl")
    back = run / "checkpoints" / "step_000002"
    assert cli("pretrain", f"run_dir={run}", f"train.resume={back}", "train.max_steps=3") == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000002", "step_000003"]
    (aside,) = (run / "previous").iterdir()
    assert [p.name for p in list_checkpoints(aside / "checkpoints")] == ["step_000004", "step_000006"]
    assert losses(aside / "metrics.jsonl") == old  # a copy of the whole file; the run's own drops steps > 2
    assert sorted(losses(run / "metrics.jsonl")) == [1, 2, 3]
    assert saved_train(run)["resume"] == "auto"


def test_a_fresh_start_that_fails_before_its_first_step_puts_the_old_run_back(base_run, tmp_path, monkeypatch):
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=2", "train.save_every=2") == 0
    before = (run / "metrics.jsonl").read_text()
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert cli("pretrain", f"run_dir={run}", "train.resume=none", "train.wandb=true") == 2
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000002"]
    assert (run / "metrics.jsonl").read_text() == before and not (run / "previous").exists()


def test_a_stage_fresh_start_sets_its_checkpoints_and_their_eval_results_aside(tmp_path):
    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"{i} + 2?"},
                                                              {"role": "assistant", "content": str(i + 2)}]}
                                                for i in range(12)])
    run = tmp_path / "run"
    args = ["sft", f"run_dir={run}", f"sft.data=[{data}]", f"sft.init_from={base}", "train.progress=false",
            "train.precision=fp32",
            "train.seq_len=48", "train.micro_batch=2", "train.max_steps=2", "train.save_every=2", "train.eval_every=0",
            "train.sample_every=0", "train.log_every=1"]
    assert cli(*args) == 0
    (run / "eval").mkdir()
    ours = run / "eval" / "sft-step_000002-arith.json"
    ours.write_text(json.dumps({"accuracy": 0.5, "checkpoint": str(run / "sft" / "checkpoints" / "step_000002")}))
    theirs = run / "eval" / "pretrain-step_000002-arith.json"
    theirs.write_text(json.dumps({"accuracy": 0.1, "checkpoint": str(run / "checkpoints" / "step_000002")}))
    assert cli(*args, "sft.train.resume=none", "seed=3") == 0
    (aside,) = (run / "previous").iterdir()  # one place per run, the run's layout kept
    assert (aside / "sft" / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    assert (aside / "sft" / "metrics.jsonl").is_file()
    assert (aside / "eval" / ours.name).is_file() and not ours.exists()  # `lmforge run` would skip eval-sft
    assert theirs.is_file()  # the pretraining checkpoint's result is not this stage's
    assert [p.name for p in list_checkpoints(run / "sft" / "checkpoints")] == ["step_000002"]
    assert not (run / "sft" / "previous").exists()


def test_an_interrupted_move_aside_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "r"
    for step in (2, 4):
        (out / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    aside = Aside(out, [out / "checkpoints" / "step_000002", out / "checkpoints" / "step_000004",
                        out / "metrics.jsonl"], reason="test")
    staging = out / "previous" / ".20250101-000000.tmp-999999999"  # a dead mover, killed after one rename
    staging.mkdir(parents=True)
    (staging / "moved.json").write_text(json.dumps({"final": "20250101-000000", "copied": [], "moved": [
        str(p) for p in aside.move]}))
    (staging / "checkpoints").mkdir()
    os.replace(out / "checkpoints" / "step_000002", staging / "checkpoints" / "step_000002")
    finish_interrupted(out)
    done = out / "previous" / "20250101-000000"
    assert sorted(p.name for p in (done / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert (done / "metrics.jsonl").is_file() and not (out / "metrics.jsonl").exists()
    assert list((out / "checkpoints").iterdir()) == [] and [p.name for p in (out / "previous").iterdir()] == [done.name]


def test_a_fresh_start_saved_by_an_older_version_is_not_inherited(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "lmforge.yaml").write_text("train:\n  resume: none\n  lr: 0.01\n")
    cfg = config_from_args([f"run_dir={run}"])
    assert cfg.train.resume == "auto" and cfg.train.lr == 0.01
    assert config_from_args([f"run_dir={run}", "train.resume=none"]).train.resume == "none"


# --- 4. one process per output folder ---------------------------------------------------------------------

def test_a_second_process_on_the_same_run_is_refused(base_run, tmp_path, capsys):
    from lmforge.config import load_config
    from lmforge.stages import run_prepare

    run = copy_run(base_run, tmp_path / "r")
    lock = run / "lmforge.lock"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LMFORGE_FAULT", None)
    with open(tmp_path / "a.log", "w") as log_file:
        a = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", f"run_dir={run}", *TINY,
                              "train.max_steps=1000000", "train.save_every=0", "train.log_every=1000"],
                             env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()) and a.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lock.is_file(), (tmp_path / "a.log").read_text()
        info = json.loads(lock.read_text())
        assert sorted(info) == ["command", "host", "pid", "started"]
        assert info["pid"] == a.pid and info["host"] == socket.gethostname()
        assert abs(info["started"] - time.time()) < 300
        assert info["command"][:2] == ["lmforge", "pretrain"] and f"run_dir={run}" in info["command"]
        assert lock_holder(run) == info

        r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=2")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"in use by another run: pid {a.pid} on host {socket.gethostname()}" in r.stderr
        # prepare would rewrite the shards under the running pretraining: refused as well
        with pytest.raises(LmforgeError, match=f"pid {a.pid} on host"):
            run_prepare(load_config(overrides=[f"run_dir={run}"]))
    finally:
        a.kill()
        a.wait()
    assert lock.is_file() and lock_holder(run) is None  # a killed holder leaves its file, not its lock
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=2") == 0, capsys.readouterr().err
    assert not lock.exists()  # released (and removed) when the run ends


# --- 5. pruning survives a kill ---------------------------------------------------------------------------

def test_a_kill_inside_prune_leaves_no_half_deleted_checkpoint(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "r")
    ck = run / "checkpoints"
    common = [*TINY, "train.max_steps=6", "train.save_every=2", "train.keep_last=1"]
    r = lmforge("pretrain", f"run_dir={run}", *common, env={"LMFORGE_FAULT": "mid-prune:step_000002"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    # killed while deleting step 2 (after saving step 4): its remains are hidden, never taken for a checkpoint
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_000004"]
    (remains,) = ck.glob(".step_000002.del-*")
    assert not list(remains.glob("*.safetensors")) and (remains / "config.json").is_file()
    assert [p.name for p in list_checkpoints(ck)] == ["step_000004"]
    load_model(ck / "step_000004")
    assert cli("pretrain", f"run_dir={run}", *common) == 0
    assert "resumed from" in capsys.readouterr().err
    assert sorted(p.name for p in ck.iterdir()) == ["step_000006"]  # the remains were cleared


# --- 6. throughput counts the tokens really processed -----------------------------------------------------

def _rendered(tok, messages: list[dict]) -> int:
    from lmforge.data.chat import render_conversation

    return len(render_conversation(tok, messages)[0])  # ids of the whole conversation


def _check_mfu(rows_: list[dict], flops_tok: float) -> None:
    for r in (r for r in rows_ if "tokens_per_s" in r):
        achieved = flops_tok * (r["tokens_per_s"] + r.get("generated_tokens_per_s", 0.0) / 3)
        assert r["mfu"] == pytest.approx(achieved / r["mfu_peak_flops"], rel=1e-6) and r["mfu"] <= 1.0


def test_post_training_stages_count_the_tokens_they_process(tmp_path):
    from lmforge.data.chat import render_conversation
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.reward import RewardModel

    base = tiny_checkpoint(tmp_path)
    tok = Tokenizer.load(tmp_path / "tokenizer")
    model = load_model(base)
    common = ["train.progress=false", "train.precision=fp32", "train.micro_batch=2", "train.eval_every=0",
              "train.log_every=1", "train.warmup_steps=1", "train.sample_every=0", "train.save_every=0"]
    questions = [f"What is {i} + {i * 37}?" for i in range(12)]  # different lengths: padded batches
    answers = [f"It is {i + i * 37}." for i in range(12)]

    logged: list[tuple[list[dict], float]] = []

    def stage(name: str, data: list[dict], steps: int, *extra: str, seq_len: int = 48, flops=model) -> list[dict]:
        path = write_jsonl(tmp_path / f"{name}.jsonl", data)
        run = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
        command = name.split("-")[0]
        assert cli(command, f"run_dir={run}", f"{command}.data=[{path}]", f"{command}.init_from={base}", *common,
                   f"train.max_steps={steps}", f"train.seq_len={seq_len}", *extra) == 0
        out = rows(run / command / "metrics.jsonl")
        logged.append((out, flops.flops_per_token(seq_len)))
        return out

    # SFT, one epoch of 12 padded examples: every example's inputs once
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(questions, answers)]
    out = stage("sft", [{"messages": m} for m in chats], 6, "sft.packing=false")
    assert out[-1]["tokens"] == sum(_rendered(tok, m) - 1 for m in chats)
    # SFT packed: identical examples of length n, rows of seq_len 2n + 1 hold two each
    n = _rendered(tok, chats[0]) - 1
    out = stage("sft", [{"messages": chats[0]}] * 12, 3, "sft.packing=true", seq_len=2 * n + 1)
    assert [r["tokens"] for r in out] == [4 * n, 8 * n, 12 * n]
    # DPO and RM: a pair is two rows, chosen and rejected, each counted without its padding
    pairs = [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in zip(questions, answers)]
    both = [[[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[k]}]
             for k in ("chosen", "rejected")] for p in pairs]
    out = stage("dpo", pairs, 6, "dpo.reference=precomputed")
    assert out[-1]["tokens"] == sum(_rendered(tok, c) - 1 + _rendered(tok, j) - 1 for c, j in both)
    out = stage("rm", pairs, 6, "rm.val_fraction=0", flops=RewardModel.from_policy(model, tok.eot_id))
    assert out[-1]["tokens"] == sum(_rendered(tok, c) + _rendered(tok, j) for c, j in both)
    # GRPO: generated tokens apart from trained ones (prompt + completion, the last token not fed back)
    group = 4
    prompt = [{"role": "user", "content": questions[0]}]
    p_len = len(render_conversation(tok, prompt, add_generation_prompt=True)[0])
    out = stage("grpo", [{"prompt": questions[0], "answer": "0"}] * 12, 3, f"grpo.group_size={group}",
                "grpo.max_new_tokens=5")
    generated = trained = 0
    for r in out:
        step_generated = round(r["completion_length"] * 2 * group)
        generated += step_generated
        trained += 2 * group * (p_len - 1) + step_generated
        assert r["generated_tokens"] == generated and r["tokens"] == trained
        assert r["generated_tokens_per_s"] > 0 and r["tokens_per_s"] > 0
    for out, flops_tok in logged:  # MFU from the same counts as tokens/s
        _check_mfu(out, flops_tok)


def test_the_progress_line_shows_generated_and_trained_rates(capsys):
    from lmforge.train.loop import _Progress

    row = {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 2500.0, "generated_tokens_per_s": 800.0, "mfu": 0.1,
           "memory_gb": 1.0}
    _Progress(enabled=True).update(3, 10, row, 5.0)
    assert "gen 800 tok/s  train 2,500 tok/s  MFU 10.0%" in capsys.readouterr().err


# --- 7. MFU never passes 100 % ----------------------------------------------------------------------------

def test_the_matmul_ceiling_is_the_highest_rate_seen():
    from lmforge.train.mfu import MatmulCeiling

    probes = iter([100.0, 250.0, 120.0])
    c = MatmulCeiling(torch.device("cpu"), None, measure=lambda device, dtype: next(probes))
    assert c.mfu(50.0) == 0.5 and c.flops == 100.0
    assert c.mfu(200.0) == pytest.approx(0.8) and c.flops == 250.0  # re-measured: the earlier probe read low
    assert c.mfu(400.0) == 1.0 and c.flops == 400.0  # the probe (120) stayed below what training did
    assert c.describe() == "MFU against a measured fp32 matmul peak of 400 FLOP/s"


def test_mfu_stays_below_100_percent_when_the_first_probe_read_low(base_run, tmp_path, monkeypatch, capsys):
    from lmforge.train import loop, mfu

    probes = iter([1e3])  # the first probe ran while another process had the cores; later ones are real

    def low_then_real(device, dtype):
        return next(probes, None) or real(device, dtype)

    real = mfu.peak_flops
    monkeypatch.setattr(mfu, "peak_flops", low_then_real)
    monkeypatch.setattr(loop, "peak_flops", low_then_real, raising=False)
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=3", "train.save_every=3") == 0
    out = [r for r in rows(run / "metrics.jsonl") if "mfu" in r]
    assert out and all(0 < r["mfu"] <= 1.0 for r in out)
    assert out[-1]["mfu_peak_flops"] > 1e6  # the re-measured ceiling
    err = capsys.readouterr().err
    assert "MFU against a measured fp32 matmul peak of 1 kFLOP/s" in err  # said at the start
    assert "MFU ceiling raised from 1 kFLOP/s to" in err


# --- 8. a resume path that is not a checkpoint ------------------------------------------------------------

def test_train_resume_names_what_the_path_is(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=2", "train.save_every=2") == 0
    ck = run / "checkpoints"
    with pytest.raises(LmforgeError, match=r"train.resume=.*step_000009: .*step_000009 does not exist; "
                                           r"checkpoints in .*checkpoints: step_000002"):
        resume_target(str(ck / "step_000009"), ck)
    with pytest.raises(LmforgeError, match=r"is a run or checkpoints folder, not a checkpoint; its latest "
                                           r"resumable checkpoint is .*step_000002"):
        resume_target(str(run), ck)
    with pytest.raises(LmforgeError, match="is a run or checkpoints folder"):
        resume_target(str(ck), ck)
    weights_only = save_checkpoint(tmp_path / "w" / "step_000001", load_model(ck / "step_000002"))
    with pytest.raises(LmforgeError, match=r"is a weights-only checkpoint .* train.init_from="):
        resume_target(str(weights_only), ck)
    with pytest.raises(LmforgeError, match="is a file, not a checkpoint folder"):
        resume_target(str(run / "lmforge.yaml"), ck)
    assert resume_target(str(ck / "step_000002"), ck) == ck / "step_000002"
    capsys.readouterr()
    assert cli("pretrain", f"run_dir={run}", f"train.resume={tmp_path / 'nope'}") == 2
    err = capsys.readouterr().err
    assert f"train.resume={tmp_path / 'nope'}: {tmp_path / 'nope'} does not exist" in err
    assert "trainer_state.json" not in err


# --- 9. metrics rows say how far the run is -----------------------------------------------------------------

def test_metrics_rows_carry_total_steps_and_eta(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "r")
    assert cli("pretrain", f"run_dir={run}", *TINY, "train.max_steps=4", "train.save_every=4",
               "train.log_every=2") == 0
    logged = [r for r in rows(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["total_steps"] == 4 for r in logged)
    assert logged[0]["eta_s"] >= 0 and logged[-1]["eta_s"] == 0
