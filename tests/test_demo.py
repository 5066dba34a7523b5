"""The post-training demo: its generated task (right answers, held-out problems kept out of every other file,
preference pairs that differ only in the result) and its eval stages, which score through the benchmark suite
and agree with `eval.task=arith` reply for reply."""

from __future__ import annotations

import json
import re

import pytest
from test_chat import tiny_checkpoint, write_jsonl

from lmforge.config import Config
from lmforge.data.demo import make_demo, solve
from lmforge.errors import LmforgeError

PROBLEM = re.compile(r"(\d+) ([+-]) (\d+)")


def problem(text: str) -> tuple[int, str, int]:
    """(a, op, b) of a question or answer sentence ("What is 12 plus 5?" / "12 减 5 ..." read as words too)."""
    t = text.replace(" plus ", " + ").replace(" minus ", " - ").replace(" 加 ", " + ").replace(" 减 ", " - ")
    a, op, b = PROBLEM.search(t).groups()
    return int(a), op, int(b)


def test_three_digit_problems_are_right_held_out_and_paired_on_the_result_only():
    rows = make_demo(seed=3, max_digits=3, n_train=300, n_test=100, n_pretrain=2000)
    test = {problem(r["prompt"]) for r in rows["test.jsonl"]}
    assert len(test) == 100
    for r in rows["test.jsonl"] + rows["rl.jsonl"]:
        a, op, b = problem(r["prompt"])
        assert int(r["answer"]) == solve(a, op, b) >= 0 and max(a, b) < 1000
    assert max(max(problem(r["prompt"])[::2]) for r in rows["test.jsonl"]) >= 100  # three digits do occur
    seen = [problem(line) for text in rows["pretrain.jsonl"] for line in text.splitlines()]
    seen += [problem(r["messages"][0]["content"]) for r in rows["sft.jsonl"]]
    seen += [problem(r["prompt"]) for r in rows["dpo.jsonl"] + rows["rl.jsonl"]]
    assert not test & set(seen)
    for r in rows["dpo.jsonl"]:
        a, op, b = problem(r["prompt"])
        right, wrong = (int(re.findall(r"\d+", s)[-1]) for s in (r["chosen"], r["rejected"]))
        assert right == solve(a, op, b) != wrong >= 0
        (head, tail), (head_r, tail_r) = (s.split(" = ") for s in (r["chosen"], r["rejected"]))
        assert head == head_r and tail.replace(str(right), "#") == tail_r.replace(str(wrong), "#")


def test_fewer_sft_demonstrations_change_nothing_else():
    """demo.n_sft keeps the first demonstrations; the test, pretraining, DPO and GRPO files stay identical,
    so runs that differ in it compare SFT data alone."""
    full = make_demo(seed=3, max_digits=3, n_train=300, n_test=100, n_pretrain=2000)
    few = make_demo(seed=3, max_digits=3, n_train=300, n_test=100, n_pretrain=2000, n_sft=40)
    assert few["sft.jsonl"] == full["sft.jsonl"][:40] and len(full["sft.jsonl"]) == 300
    assert all(few[k] == full[k] for k in ("pretrain.jsonl", "dpo.jsonl", "rl.jsonl", "test.jsonl"))
    with pytest.raises(LmforgeError, match=r"demo.n_sft=301 is more than demo.n_train=300"):
        make_demo(seed=3, max_digits=3, n_train=300, n_test=100, n_pretrain=2000, n_sft=301)


def test_eval_stage_scores_through_the_suite_and_agrees_with_the_arith_task(tmp_path):
    from lmforge.eval.tasks import evaluate_task
    from lmforge.stages import STAGES

    base = tiny_checkpoint(tmp_path)
    run = tmp_path / "run"
    (run / "demo").mkdir(parents=True)
    write_jsonl(run / "demo" / "test.jsonl", [{"prompt": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(6)]
                + [{"prompt": f"{i} 加 3 等于多少？", "answer": str(i + 3)} for i in range(6)])
    ckpt = run / "sft" / "checkpoints" / base.name
    ckpt.parent.mkdir(parents=True)
    base.rename(ckpt)
    cfg = Config()
    cfg.run_dir, cfg.device, cfg.generate.max_new_tokens, cfg.eval.batch_size = str(run), "cpu", 8, 5
    run_stage, done = STAGES["eval-sft"]
    assert not done(cfg)
    ours = run_stage(cfg)
    assert done(cfg)
    bench = json.loads((run / "eval" / f"bench-sft-{ckpt.name}.json").read_text())
    assert set(bench["tasks"]) == {"arith", "test.jsonl"} and bench["chat"]
    assert (run / "eval" / f"bench-sft-{ckpt.name}.md").is_file()
    cfg.eval.task, cfg.eval.checkpoint = "arith", str(ckpt)
    theirs = evaluate_task(cfg)  # the task's own scorer: the same prompts, replies and figures
    assert [e["reply"] for e in ours["examples"]] == [e["reply"] for e in theirs["examples"]]
    assert ours["accuracy"] == theirs["accuracy"] == bench["tasks"]["test.jsonl"]["acc"]
    assert ours["total"] == 12 and ours["accuracy_en"] == theirs["accuracy_en"]
