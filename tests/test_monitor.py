"""`lmforge monitor`: a snapshot of a run from its files — a finished tiny run, a held lock, a live metrics file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spine import TINY, copy_run, lmforge, prepared_run

from lmforge import cli, monitor

HOLD_LOCK = r"""
import fcntl, json, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0)
f.write(json.dumps({"pid": os.getpid(), "host": sys.argv[2], "started": time.time() - 300,
                    "command": "lmforge pretrain run_dir=R"}))
f.flush()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real tiny pretraining run of 20 steps: checkpoints at 10 and 20, eval and a sample at the end."""
    root = tmp_path_factory.mktemp("monitor")
    run = copy_run(prepared_run(root), root / "done")
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=20", "train.save_every=10",
                "train.eval_every=20", "train.eval_batches=2", "train.sample_every=20", "train.log_every=5")
    assert r.returncode == 0, r.stderr
    return run


def once(path: Path) -> str:
    r = lmforge("monitor", str(path), "--once")
    assert r.returncode == 0, r.stderr
    return r.stdout


def hold_lock(folder: Path, host: str = "") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / "lmforge.lock"), host or socket.gethostname()],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_finished_run(finished_run):
    out = once(finished_run)
    assert "finished" in out
    assert "step 20 / 20 (100.0%)" in out  # total from the checkpoint's trainer_state.json
    assert "step_000010" in out and "step_000020" in out and "resumable" in out
    assert " MB" in out or " KB" in out  # sizes on disk
    assert "val_loss" in out and "sample at step 20" in out
    assert "ETA" not in out  # nothing left to wait for


def test_held_lock_is_running_then_stopped(finished_run, tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    now = time.time()
    rows = [{"step": s, "time": now - 2 * (50 - s), "loss": 5.0 - s / 50, "lr": 1e-3, "tokens": 128 * s,
             "tokens_per_s": 64.0, "total_steps": 500, "eta_s": 2.0 * (500 - s)} for s in range(5, 51, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(finished_run / "checkpoints" / "step_000010", run / "checkpoints" / "step_000010")
    (run / "checkpoints" / ".step_000050.tmp-99999").mkdir()  # a save in progress
    p = hold_lock(run)
    try:
        out = once(run)
        assert f"running — pid {p.pid} on {socket.gethostname()}, lock held" in out
        assert "command      lmforge pretrain run_dir=R" in out and "(5 min ago)" in out  # the lock's "started"
        assert "step 50 / 500 (10.0%)" in out and "ETA 0:14:" in out  # eta_s of the last row, less its age
        assert "step_000050" in out and "being written" in out
    finally:
        p.kill()
        p.wait()
    out = once(run)
    assert f"stopped — pid {p.pid}" in out and "has exited" in out
    assert "ETA" not in out

    # another machine's lock: the pid cannot be checked from here, the flock still can
    p = hold_lock(run, host="gpu-node-7")
    try:
        assert f"running — pid {p.pid} on gpu-node-7, lock held" in once(run)
    finally:
        p.kill()
        p.wait()
    assert "lock released" in once(run)


def test_metrics_tail_reads_new_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = monitor.MetricsTail(path)
    tail.update()  # no file yet
    assert tail.step == 0
    path.write_text(json.dumps({"step": 10, "time": 100.0, "loss": 4.0}) + "\n" + '{"step": 20, "ti')
    tail.update()
    assert tail.step == 10 and tail.latest["loss"] == (10, 4.0)
    with open(path, "a") as f:  # the rest of the half-written line arrives
        f.write('me": 120.0, "loss": 3.5}\n{"step": 20, "val_loss": 3.9}\n{"step": 20, "sample": "x = 1"}\n')
    tail.update()
    assert tail.step == 20 and tail.latest["loss"] == (20, 3.5) and tail.best_val == (3.9, 20)
    assert tail.sample == (20, "x = 1") and tail.seconds_per_step() == pytest.approx(2.0)
    path.write_text(json.dumps({"step": 5, "time": 50.0, "loss": 6.0}) + "\n")  # truncated by a resume
    tail.update()
    assert tail.step == 5 and tail.best_val is None


def test_no_lock_file_uses_the_age_of_the_last_row(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    now = time.time()
    rows = [{"step": s, "time": now - 1000 + 10 * s, "loss": 3.0, "lr": 1e-3} for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "lmforge.yaml").write_text("train:\n  max_steps: 100\n  max_minutes: 0\n")
    snap = monitor.take_snapshot(run, monitor.MetricsTail(run / "metrics.jsonl"), now=now)
    assert snap.live.state == "probably stopped" and snap.total == 100 and snap.eta_s is None
    snap = monitor.take_snapshot(run, monitor.MetricsTail(run / "metrics.jsonl"), now=now - 890)
    assert snap.live.state == "probably running"
    assert snap.eta_s == pytest.approx(90 * 10.0)  # from the seconds per step of the rows


def test_a_run_folder_shows_its_active_stage(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 100, "time": 1.0, "loss": 3.0}) + "\n")
    time.sleep(0.01)
    (run / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 7, "time": 2.0, "loss": 1.5}) + "\n")
    os.utime(run / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))
    folder, others = monitor.pick_folder(run)
    assert folder == run / "sft" and others == [run]
    with pytest.raises(SystemExit) as e:
        cli.main(["monitor", str(run), "--once"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert str(run / "sft") in out and "step 7" in out and "also here" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["monitor", str(tmp_path / "missing"), "--once"])
    assert e.value.code == 2 and "no such run folder" in capsys.readouterr().err
