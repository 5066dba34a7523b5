"""Reward model: the Bradley-Terry loss on known scores, training to full pairwise accuracy, a checkpoint
that transformers' LlamaForSequenceClassification scores identically, and its use as a GRPO reward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.config import load_config
from lmforge.train.reward import bradley_terry, reply_labels

PAIRS = [{"prompt": f"Is {i} even?", "chosen": f"Let me check {i}: yes, it is.", "rejected": "no idea"}
         for i in range(24)]


def test_bradley_terry_against_hand_computed_values():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) with d = 1 and d = -1.
    torch.testing.assert_close(bradley_terry(rc, rr), torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.e)]))
    # margin 0.5: d = 0.5 and -1.5; centring 0.1 * (rc + rr)^2 adds 0.9 and 0.1.
    want = torch.tensor([math.log1p(math.exp(-0.5)) + 0.9, math.log1p(math.exp(1.5)) + 0.1])
    torch.testing.assert_close(bradley_terry(rc, rr, 0.5, 0.1), want)
    # Equal scores: log 2 whatever they are (without centring).
    torch.testing.assert_close(bradley_terry(torch.tensor([3.0]), torch.tensor([3.0])), torch.tensor([math.log(2)]))


def test_reward_model_trains_saves_and_matches_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmforge.data.chat import render_conversation
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.reward import ModelReward, load_reward_model, run_rm

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = load_config(overrides=[
        f"run_dir={tmp_path / 'run'}", f"rm.data=[{data}]", f"rm.init_from={base}", "rm.val_fraction=0.25",
        "train.progress=false",
        "train.precision=fp32", "rm.train.seq_len=48", "rm.train.micro_batch=4", "rm.train.max_steps=15",
        "rm.train.lr=3e-3", "rm.train.warmup_steps=1", "rm.train.eval_every=15", "rm.train.save_every=0",
        "rm.train.log_every=1"])
    result = run_rm(cfg)
    assert result.metrics["val_accuracy"] == 1.0 and result.metrics["val_pairs"] >= 3
    first = json.loads((tmp_path / "run" / "rm" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"}
    report = json.loads((tmp_path / "run" / "eval" / "rm-step_000015-pairs.json").read_text())
    assert report["val_accuracy"] == 1.0

    ckpt = result.checkpoint
    hf = json.loads((ckpt / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    rm = load_reward_model(ckpt)
    tok = Tokenizer.load(ckpt)
    msgs = [{"role": "user", "content": "Is 7 even?"}, {"role": "assistant", "content": "no idea"}]
    ids = torch.tensor([render_conversation(tok, msgs)[0]])
    ours = rm.rewards(ids, torch.tensor([ids.shape[1]]))
    theirs = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()(ids).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # As a GRPO reward: the good reply scores above the bad one.
    reward = ModelReward(ckpt, tok, torch.device("cpu"))
    prompt = [{"role": "user", "content": "Is 30 even?"}]
    good, bad = reward(["Let me check 30: yes, it is.", "no idea"], [{}, {}], prompts=[prompt, prompt])
    assert good > bad


def test_margin_field_must_be_a_number(tmp_path):
    from test_chat import tiny_tokenizer

    from lmforge.data.chat import read_records
    from lmforge.errors import LmforgeError
    from lmforge.train.reward import encode_pairs

    recs = read_records([write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b",
                                                             "margin": "big"}])])
    with pytest.raises(LmforgeError, match=r"m.jsonl:1: field 'margin' must be a number"):
        encode_pairs(tiny_tokenizer(), recs, 64, 0.0)


def test_likelihood_score_adds_the_replys_log_probs_and_survives_save_and_load(tmp_path):
    """rm.score=likelihood: the head's score plus sum log p of the reply tokens under the model's own LM head,
    computed here from full logits by hand; the saved checkpoint and the GRPO reward give the same number."""
    from lmforge.data.chat import render_conversation
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.reward import ModelReward, load_reward_model, run_rm

    base = tiny_checkpoint(tmp_path)
    pairs = [{"prompt": f"Is {i} a number?", "chosen": "yes", "rejected": "no"} for i in range(40)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = load_config(overrides=[
        f"run_dir={tmp_path / 'run'}", f"rm.data=[{data}]", f"rm.init_from={base}", "rm.val_fraction=0.25",
        "rm.score=likelihood", "train.progress=false", "train.precision=fp32", "rm.train.seq_len=48",
        "rm.train.micro_batch=8", "rm.train.max_steps=10", "rm.train.lr=3e-3", "rm.train.warmup_steps=1",
        "rm.train.eval_every=10", "rm.train.save_every=0", "rm.train.log_every=1"])
    result = run_rm(cfg)
    assert result.metrics["val_accuracy"] == 1.0
    rm = load_reward_model(result.checkpoint)
    assert rm.likelihood and json.loads((result.checkpoint / "config.json").read_text())["lmforge_reward_score"] \
        == "likelihood"
    tok = Tokenizer.load(result.checkpoint)
    prompt = [{"role": "user", "content": "Is 30 even?"}]
    ids, mask = render_conversation(tok, prompt + [{"role": "assistant", "content": "no idea"}])
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = Transformer.forward(rm, x).log_softmax(-1)[0]
        h = Transformer.forward(rm, x, return_hidden=True)[0, -1]
    by_hand = rm.score(h).item() + sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
    assert rm.rewards(x, torch.tensor([len(ids)]), torch.tensor([reply_labels(ids, mask)])).item() \
        == pytest.approx(by_hand, abs=1e-4)
    (value,) = ModelReward(result.checkpoint, tok, torch.device("cpu"))(["no idea"], [{}], prompts=[prompt])
    assert value == pytest.approx(by_hand, abs=1e-4)
