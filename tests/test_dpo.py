"""DPO: each loss against hand-computed values, log 2 when the policy is its reference, the three ways of
keeping the reference agree, and training separates chosen from rejected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train.dpo import dpo_loss

# Chosen and rejected differ in a way a 2-layer model picks up in a few steps.
PAIRS = [{"prompt": f"What is {i} + {j}?", "chosen": f"The answer is {i + j}.", "rejected": "no idea"}
         for i in range(6) for j in range(4)]


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_losses_against_hand_computed_values():
    # Policy equal to the reference: h = 0, so sigmoid gives log 2, hinge 1, IPO (1 / 2 beta)^2.
    same = t(-5.0, -0.5), t(-7.0, -2.0)
    assert torch.allclose(dpo_loss(*same, *same, 0.1, "sigmoid"), t(math.log(2), math.log(2)))
    assert torch.allclose(dpo_loss(*same, *same, 0.1, "hinge"), t(1.0, 1.0))
    assert torch.allclose(dpo_loss(*same, *same, 0.1, "ipo"), t(25.0, 25.0))
    # h = (-1 - -2) - (-3 - -2) = 2.
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    assert dpo_loss(*args, 0.5, "sigmoid").item() == pytest.approx(math.log1p(math.exp(-1.0)))  # -log sigmoid(1)
    assert dpo_loss(*args, 0.5, "hinge").item() == pytest.approx(0.0)
    assert dpo_loss(*args, 0.1, "hinge").item() == pytest.approx(0.8)
    assert dpo_loss(*args, 0.5, "ipo").item() == pytest.approx(1.0)  # (2 - 1)^2
    assert dpo_loss(*args, 0.1, "ipo").item() == pytest.approx(9.0)  # (2 - 5)^2
    with pytest.raises(LmforgeError, match="dpo.loss: 'kto'"):
        dpo_loss(*args, 0.1, "kto")


def dpo_config(tmp_path: Path, base: Path, data: str, name: str, *extra: str):
    return load_config(overrides=[
        f"run_dir={tmp_path / name}", f"dpo.data=[{data}]", f"dpo.init_from={base}", "train.progress=false",
        "train.precision=fp32",
        "dpo.train.seq_len=32", "dpo.train.micro_batch=4", "dpo.train.max_steps=12", "dpo.train.lr=3e-3",
        "dpo.train.warmup_steps=1", "dpo.train.eval_every=12", "dpo.train.save_every=0", "dpo.train.log_every=1",
        f"dpo.val_data=[{data}]", "dpo.beta=0.5", *extra])  # validation = the training pairs: it measures the fit


def first_row(run: Path) -> dict:
    return json.loads((run / "dpo" / "metrics.jsonl").read_text().splitlines()[0])


def test_first_step_is_log2_reference_modes_agree_and_training_separates_pairs(tmp_path):
    from lmforge.checkpoint import load_model
    from lmforge.train.dpo import run_dpo

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    results = {ref: run_dpo(dpo_config(tmp_path, base, data, ref, f"dpo.reference={ref}"))
               for ref in ("copy", "precomputed")}
    for ref in results:
        row = first_row(tmp_path / ref)
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
        assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # A frozen copy and precomputed log-probabilities are the same reference: same training.
    a, b = (load_model(results[r].checkpoint).state_dict() for r in ("copy", "precomputed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    m = results["copy"].metrics  # 12 steps of 4 pairs: two passes over the 24 pairs
    assert m["val_rewards/accuracies"] > 0.9 and m["val_rewards/margins"] > 0 and m["val_loss"] < math.log(2)


def test_ipo_and_hinge_train(tmp_path):
    from lmforge.train.dpo import run_dpo

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for loss, start in (("ipo", 1.0), ("hinge", 1.0)):  # IPO with beta 0.5: (0 - 1)^2
        r = run_dpo(dpo_config(tmp_path, base, data, loss, f"dpo.loss={loss}", "dpo.train.max_steps=8",
                               "dpo.train.eval_every=8"))
        assert first_row(tmp_path / loss)["loss"] == pytest.approx(start, abs=1e-4)
        assert r.metrics["val_loss"] < start


def test_sft_coef_adds_the_chosen_replys_per_token_nll(tmp_path):
    from lmforge.train.dpo import run_dpo

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run_dpo(dpo_config(tmp_path, base, data, "rpo", "dpo.sft_coef=0.5", "dpo.train.max_steps=1",
                       "dpo.train.eval_every=0"))
    row = first_row(tmp_path / "rpo")
    assert row["nll/chosen"] > 1.0  # an untrained model: several nats per token
    assert row["loss"] == pytest.approx(math.log(2) + 0.5 * row["nll/chosen"], abs=1e-5)
    with pytest.raises(LmforgeError, match="dpo.sft_coef must be >= 0"):
        run_dpo(dpo_config(tmp_path, base, data, "bad", "dpo.sft_coef=-1"))
