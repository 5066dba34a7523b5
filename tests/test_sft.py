"""SFT: a tiny model overfits a handful of multi-turn, system-prompted, Chinese and English examples until
greedy decoding reproduces every reply exactly; stage plumbing (init_from, per-stage train keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.checkpoint import load_model
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

EXAMPLES = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 37 + 58?"},
                  {"role": "assistant", "content": "The answer is 95."}]},
    {"messages": [{"role": "user", "content": "计算 12 + 30 等于多少？"},
                  {"role": "assistant", "content": "答案是 42。"},
                  {"role": "user", "content": "再加 5 呢？"}, {"role": "assistant", "content": "答案是 47。"}]},
    {"prompt": "Say hello.", "completion": "hello world"},
    {"conversations": [{"from": "human", "value": "机器学习是什么？"},
                       {"from": "gpt", "value": "人工智能的一个分支。"}]},
]


def sft_config(tmp_path: Path, base: Path, data: str, *extra: str):
    return load_config(overrides=[
        f"run_dir={tmp_path / 'run'}", f"sft.data=[{data}]", f"sft.init_from={base}", "train.progress=false",
        "train.precision=fp32",
        "sft.train.seq_len=64", "sft.train.micro_batch=2", "sft.train.max_steps=60", "sft.train.lr=1e-2",
        "sft.train.warmup_steps=5", "sft.train.weight_decay=0.0", "sft.train.eval_every=0",
        "sft.train.save_every=0", "sft.train.log_every=1000", "sft.train.sample_every=0", *extra])


def greedy_replies(model, tok, conversations) -> list[str]:
    from lmforge.data.chat import render_conversation
    from lmforge.infer.engine import default_stop_ids, generate_ids
    from lmforge.infer.sampling import SamplingParams

    prompts = [render_conversation(tok, c, add_generation_prompt=True)[0] for c in conversations]
    out = generate_ids(model, prompts, SamplingParams(max_new_tokens=24, temperature=0.0),
                       stop_ids=default_stop_ids(tok))
    return [tok.decode(o) for o in out]


def test_sft_overfits_and_reproduces_every_reply(tmp_path):
    from lmforge.data.chat import read_records, sft_messages
    from lmforge.train.sft import run_sft

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", EXAMPLES)
    cfg = sft_config(tmp_path, base, data)
    result = run_sft(cfg)
    assert result.step == 60 and result.checkpoint == tmp_path / "run" / "sft" / "checkpoints" / "step_000060"
    model = load_model(result.checkpoint)
    tok = Tokenizer.load(result.checkpoint)
    # Every assistant turn, given the conversation before it, comes back token for token, then <|im_end|>.
    prompts, wants = [], []
    for r in read_records([data]):
        msgs = sft_messages(r)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompts.append(msgs[:i])
                wants.append(m["content"] + "<|im_end|>")
    assert greedy_replies(model, tok, prompts) == wants
    assert model.cfg.n_layer == 2  # the model config came from the init checkpoint, not the run defaults
    # `lmforge eval eval.task=FILE`: exact-match accuracy of greedy answers, written to RUN/eval.
    from lmforge.eval.lm import cmd_eval

    task = write_jsonl(tmp_path / "qa.jsonl", [
        {"messages": EXAMPLES[0]["messages"][:2], "answer": "95"},
        {"prompt": "计算 12 + 30 等于多少？", "answer": "42"}, {"prompt": "Say hello.", "answer": "7"}])
    assert cmd_eval([f"run_dir={tmp_path / 'run'}", f"eval.task={task}", f"eval.checkpoint={result.checkpoint}",
                     "generate.max_new_tokens=12"]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "sft-step_000060-qa.json").read_text())
    assert (report["correct"], report["total"], report["accuracy_zh"]) == (2, 3, 1.0)


def test_unpacked_padding_path_trains_too(tmp_path):
    from lmforge.train.sft import run_sft

    base = tiny_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", EXAMPLES)
    result = run_sft(sft_config(tmp_path, base, data, "sft.packing=false", "sft.train.max_steps=20",
                                "sft.train.eval_every=20", "sft.val_data=[" + data + "]"))
    assert result.metrics["val_loss"] < 4.5  # from ~6.1 (uniform over 448) in 20 steps


def test_stage_plumbing_errors(tmp_path):
    from lmforge.train.sft import prepare_stage, stage_config

    cfg = load_config(overrides=[f"run_dir={tmp_path}", "train.lr=1e-3", "sft.train.lr=5e-5"])
    assert stage_config(cfg, "sft").train.lr == 5e-5 and stage_config(cfg, "dpo").train.lr == 1e-3
    with pytest.raises(LmforgeError, match="sft.init_from='': no pretrain checkpoint"):
        prepare_stage(cfg, "sft")
    with pytest.raises(LmforgeError, match="unknown key 'sft.train.lrr'"):
        load_config(overrides=["sft.train.lrr=1"])
