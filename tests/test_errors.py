"""Bad input stops with a clear message, a non-zero exit and no artifact that looks valid."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from spine import TINY, copy_run, lmforge, prepared_run

from lmforge.checkpoint import latest_checkpoint, load_model, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import DiskFullError
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = prepared_run(tmp_path_factory.mktemp("errors"))
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=4", "train.save_every=2")
    assert r.returncode == 0, r.stderr
    return run


def test_incomplete_checkpoint_folder(trained, tmp_path):
    ckpt = latest_checkpoint(trained / "checkpoints")
    broken = tmp_path / "step_000004"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="incomplete: model.safetensors is missing"):
        load_model(broken)
    r = lmforge("eval", f"eval.checkpoint={broken}", f"run_dir={trained}")
    assert r.returncode == 2 and "model.safetensors is missing" in r.stderr and "Traceback" not in r.stderr


def test_truncated_weights(trained, tmp_path):
    broken = tmp_path / "step_000004"
    shutil.copytree(latest_checkpoint(trained / "checkpoints"), broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="damaged or truncated"):
        load_model(broken)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(LmforgeError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        load_model(tmp_path)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16))
    good = save_checkpoint(tmp_path / "step_000001", model, trainer_state={"step": 1})
    import lmforge.checkpoint as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(DiskFullError, match="no space left on device while writing .*step_000002"):
        save_checkpoint(tmp_path / "step_000002", model, trainer_state={"step": 2})
    assert not (tmp_path / "step_000002").exists()
    assert not list(tmp_path.glob(".step_000002*")), "the temporary folder was removed"
    assert latest_checkpoint(tmp_path) == good
    load_model(good)


def test_leftovers_of_a_killed_writer_are_cleared(tmp_path):
    """A writer killed mid-build leaves .NAME.tmp-PID; one killed between its renames leaves only .NAME.old-PID."""
    import subprocess
    import sys

    from lmforge.io import AtomicDir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / f".data.tmp-{pid}").mkdir()  # half-built
    (tmp_path / f".data.old-{pid}").mkdir()  # the last complete copy, moved aside before the kill
    (tmp_path / f".data.old-{pid}" / "manifest.json").write_text("{}")
    (tmp_path / f".data.tmp-{os.getpid() + 10**7}").mkdir()  # no such process either: cleared
    (tmp_path / ".other.tmp-1").mkdir()  # another artifact's (pid 1 is alive): not ours to touch
    with AtomicDir(tmp_path / "data") as tmp:
        assert (tmp_path / "data" / "manifest.json").is_file(), "the old copy was restored first"
        (tmp / "manifest.json").write_text('{"new": true}')
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "data"]
    assert json.loads((tmp_path / "data" / "manifest.json").read_text()) == {"new": True}


def test_model_vocab_smaller_than_tokenizer(trained, tmp_path):
    run = copy_run(trained, tmp_path / "r")
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "model.vocab_size=100", "train.max_steps=1")
    assert r.returncode == 2 and "model.vocab_size=100 is smaller than the tokenizer's 512" in r.stderr
    assert not (run / "checkpoints").exists()


def test_data_from_another_tokenizer(trained, tmp_path):
    """Same vocabulary size, different tokens: the shards' token ids would silently mean other text."""
    run = copy_run(trained, tmp_path / "r")
    path = run / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["zz_new_token"] = vocab.pop(next(iter(vocab)))
    path.write_text(json.dumps(tok))
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "train.max_steps=1")
    assert r.returncode == 2 and "re-run `lmforge prepare`" in r.stderr, r.stderr


def test_pretrain_without_tokenizer(tmp_path):
    r = lmforge("pretrain", f"run_dir={tmp_path / 'empty'}", *TINY)
    assert r.returncode == 2 and "run `lmforge tokenizer`" in r.stderr


def test_unknown_command_and_key():
    r = lmforge("pretrian")
    assert r.returncode == 2 and "did you mean 'pretrain'" in r.stderr
    r = lmforge("pretrain", "train.lrr=1")
    assert r.returncode == 2 and "did you mean 'train.lr'" in r.stderr


def test_resume_with_a_different_model_is_refused(trained, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    r = lmforge("pretrain", f"run_dir={run}", *TINY, "model.n_layer=3", "train.max_steps=6")
    assert r.returncode == 2 and "model config differs" in r.stderr


def test_initial_weights_are_seeded():
    torch.manual_seed(0)
    a = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16))
    torch.manual_seed(0)
    b = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, max_seq_len=16))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
