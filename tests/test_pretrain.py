"""The training loop end to end: loss falls, resume is bit-exact after a real kill (layouts: test_parallel.py)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from spine import TINY, assert_same_weights, copy_run, lmforge, prepared_run

from lmforge.checkpoint import latest_checkpoint, list_checkpoints, load_model
from lmforge.quickstart import unigram_loss


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return prepared_run(tmp_path_factory.mktemp("spine"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def test_loss_falls_and_eval_reports(base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "r")
    bench = tmp_path / "bench.jsonl"  # benchmarks scored beside the validation loss
    bench.write_text("".join(json.dumps({"question": f"Q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                             for i in range(4)))
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=150", "train.micro_batch=16",
                "train.eval_every=150", "train.save_every=150", "train.log_every=10",
                f"eval.train_tasks=[mc:{bench}:as=toy]")
    assert r.returncode == 0, r.stderr
    rows = [m for m in metrics(run) if "loss" in m]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert first > math.log(512) - 0.5  # starts near uniform over the vocabulary
    val = [m for m in metrics(run) if "val_loss" in m][-1]
    # clearly below what a model ignoring context reaches
    assert val["val_loss"] < unigram_loss(run / "data") - 0.5, val
    assert last < first - 1.0 and 0 < val["val_bpb"] < 8
    assert val["bench_toy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and val["bench_core"] == 2 * val["bench_toy"] - 1
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_000150"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "optimizer/.metadata", "trainer_state.json", "rng.pt", "lmforge.yaml"):
        assert (ckpt / name).is_file(), name
    # eval on the prepared split reproduces the loop's validation loss (same windows when all are used)
    r = lmforge("eval", f"run_dir={run}", "eval.seq_len=32", "eval.batch_size=4")
    assert r.returncode == 0, r.stderr
    out = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert abs(out["loss"] - val["val_loss"]) < 0.05 and out["bits_per_byte"] > 0


@pytest.mark.parametrize("fault", ["step:13", "mid-save:step_000016"])
def test_resume_after_kill_is_bit_exact(base_run, tmp_path, fault):
    common = [*TINY, "train.max_steps=24", "train.save_every=8"]
    straight = copy_run(base_run, tmp_path / "straight")
    assert lmforge("pretrain", f"run_dir={straight}", *common).returncode == 0

    killed = copy_run(base_run, tmp_path / "killed")
    r = lmforge("pretrain", f"run_dir={killed}", *common, env={"LMFORGE_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    done = list_checkpoints(killed / "checkpoints")
    # killed after step 13: steps 8 saved; killed while saving step 16: that save must not count
    assert [p.name for p in done] == ["step_000008"]
    load_model(done[-1])  # the last good checkpoint loads
    if fault.startswith("mid-save"):
        assert list((killed / "checkpoints").glob(".step_000016.tmp-*")), "the interrupted save left its temp dir"

    r = lmforge("pretrain", f"run_dir={killed}", *common)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr
    assert_same_weights(straight / "checkpoints" / "step_000024", killed / "checkpoints" / "step_000024")
    assert not list((killed / "checkpoints").glob(".step_*.tmp-*")), "leftovers of the crashed save were cleared"
    # the metrics file reads as one clean run: every step once, losses equal to the straight run's
    a = {m["step"]: m["loss"] for m in metrics(straight) if "loss" in m}
    b = {m["step"]: m["loss"] for m in metrics(killed) if "loss" in m}
    assert a == b


def test_accumulation_equals_large_batch(base_run, tmp_path):
    """micro_batch 4 x accum 2 follows the same trajectory as micro_batch 8 x accum 1."""
    runs = []
    for name, micro in (("big", 8), ("accum", 4)):
        run = copy_run(base_run, tmp_path / name)
        r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=6", "train.save_every=6",
                    f"train.micro_batch={micro}", "train.batch_tokens=256")
        assert r.returncode == 0, r.stderr
        runs.append([m["loss"] for m in metrics(run) if "loss" in m])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_eval_on_raw_text_files_and_tensorboard(base_run, tmp_path):
    import tensorboard  # noqa: F401  (a dev dependency: never skipped)
    run = copy_run(base_run, tmp_path / "r")
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=3", "train.save_every=3",
                "train.tensorboard=true")
    assert r.returncode == 0, r.stderr
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    text = tmp_path / "notes.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    r = lmforge("eval", f"run_dir={run}", f"eval.files=[{text}]", "eval.seq_len=32")
    assert r.returncode == 0, r.stderr
    out = json.loads(next((run / "eval").glob("*-files.json")).read_text())
    assert out["data"] == "files" and out["tokens"] > 0 and out["bits_per_byte"] > 0


def test_quickstart_end_to_end(tmp_path):
    """The quickstart on a small corpus and a one-minute budget: finishes in time, leaves a usable run."""
    import time

    from spine import make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    t0 = time.perf_counter()
    r = lmforge("quickstart", "--data", str(corpus), "--minutes", "1", "--run-dir", str(tmp_path / "qs"),
                "model.n_layer=2", "model.n_embd=64", "tokenizer.vocab_size=512", "train.micro_batch=8",
                "train.seq_len=64", "train.eval_every=50", "train.eval_batches=4", timeout=240)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "validation loss" in r.stderr and "unigram baseline" in r.stderr and "sample at step" in r.stderr
    assert elapsed < 60 + 30, elapsed  # the budget, plus interpreter start-up and the final report
    ckpt = latest_checkpoint(tmp_path / "qs" / "checkpoints")
    assert ckpt is not None and (ckpt / "tokenizer.json").is_file()
    # the run directory remembers its settings: continuing needs only run_dir
    r = lmforge("pretrain", f"run_dir={tmp_path / 'qs'}", "train.max_minutes=0",
                f"train.max_steps={int(ckpt.name.split('_')[1]) + 2}", "train.progress=false")
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr


def test_a_short_time_budget_still_validates_during_training():
    """A budget that fits fewer steps than eval_every would show one validation loss, at the end;
    it gets about four during training instead, and the step count accounts for their cost."""
    from lmforge.config import TrainConfig
    from lmforge.train.loop import _fit_budget

    tc = TrainConfig(eval_every=100, eval_batches=16)
    total, every, per_step = _fit_budget(tc, train_step_s=0.5, accum=1, step=11, left_s=40.0)
    assert every < 100 and 3 <= total // every <= 5
    assert per_step > 0.5 and total == 11 + int(40.0 / per_step)
    # a budget long enough for the configured interval keeps it
    total, every, _ = _fit_budget(tc, train_step_s=0.5, accum=1, step=11, left_s=600.0)
    assert every == 100 and total > 1000
    assert _fit_budget(TrainConfig(eval_every=0), 0.5, 1, 11, 40.0)[1] == 0  # no validation stays none


def test_a_time_budget_is_a_limit(base_run, tmp_path, monkeypatch):
    """When the machine slows down after the step count was fitted, the run stops at the budget
    (with its final evaluation and checkpoint), not at the fitted count."""
    from lmforge.config import load_config
    from lmforge.stages import run_pretrain
    from lmforge.train import loop

    run = copy_run(base_run, tmp_path / "r")
    monkeypatch.setattr(loop, "_fit_budget", lambda tc, *a, **k: (10**6, 0, 1e-3))  # a fit far too optimistic
    cfg = load_config(overrides=[f"run_dir={run}", *TINY, "train.max_minutes=0.03", "train.max_steps=1000",
                                 "train.save_every=0"])
    result = run_pretrain(cfg)
    assert 11 < result.step < 10**6
    assert result.checkpoint is not None and result.checkpoint.name == f"step_{result.step:06d}"
    assert json.loads((result.checkpoint / "trainer_state.json").read_text())["elapsed"] < 0.03 * 60 + 5
