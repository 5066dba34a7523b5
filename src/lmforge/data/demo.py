"""The built-in verifiable task: multi-digit addition and subtraction, asked in English and Chinese.

Problems are drawn from a seeded generator (`demo.seed`, not the run's seed, so runs with different
training seeds share one test set). The held-out test problems are drawn first and excluded from
everything else, the pretraining text included, so the accuracy after each stage is measured on
problems no stage has seen. The DPO and GRPO problems come next, also kept out of every other file.

`lmforge run recipes/posttrain-demo.yaml` calls `run_demo` first; it writes RUN/demo/:

    pretrain.jsonl  arithmetic text (equations and worded questions with answers) for pretraining
    sft.jsonl       {"messages": [user question, assistant answer]}
    dpo.jsonl       {"prompt", "chosen": right answer, "rejected": a plausible wrong one}
    rl.jsonl        {"prompt", "answer"}: GRPO prompts with the exact answer for the reward
    test.jsonl      {"prompt", "answer"}: the held-out set `lmforge eval eval.task=arith` scores
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from lmforge.config import Config
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text

EN_QUESTIONS = {"+": ["What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?"],
                "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?"]}
ZH_QUESTIONS = {"+": ["计算 {a} + {b} 等于多少？", "{a} 加 {b} 等于多少？"],
                "-": ["计算 {a} - {b} 等于多少？", "{a} 减 {b} 等于多少？"]}
# Each answer first writes the equation out, then states the result: one step of worked reasoning that
# lets the chat-format stages use the bare-equation skill pretraining teaches (a model this small
# cannot carry a sum across the words of a question and a chat template in one jump).
EN_ANSWER = "{a} {op} {b} = {c}. The answer is {c}."
ZH_ANSWER = "{a} {op} {b} = {c}，答案是 {c}。"
FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "rl.jsonl", "test.jsonl")


def draw(rng: random.Random, max_digits: int) -> tuple[int, str, int]:
    """(a, op, b): each operand has 1..max_digits digits; subtraction keeps the result >= 0."""
    a = rng.randrange(10 ** rng.randint(1, max_digits))
    b = rng.randrange(10 ** rng.randint(1, max_digits))
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def question(rng: random.Random, a: int, op: str, b: int, c: int | None = None) -> tuple[str, str]:
    """(question, answer sentence) in English or Chinese, half and half; `c` overrides the result
    (a wrong answer for preference pairs)."""
    c = solve(a, op, b) if c is None else c
    if rng.random() < 0.5:
        return rng.choice(EN_QUESTIONS[op]).format(a=a, b=b), EN_ANSWER.format(a=a, op=op, b=b, c=c)
    return rng.choice(ZH_QUESTIONS[op]).format(a=a, b=b), ZH_ANSWER.format(a=a, op=op, b=b, c=c)


def wrong(rng: random.Random, c: int) -> int:
    """A plausible mistake: off by one, a lost or extra carry (±10), or a digit slip."""
    while True:
        w = c + rng.choice([-1, 1, -10, 10, -2, 2, -100, 100])
        if w >= 0 and w != c:
            return w


def make_demo(seed: int, max_digits: int, n_train: int, n_test: int, n_pretrain: int,
              n_sft: int = 0) -> dict[str, list]:
    """All demo files' rows, as lists (pretrain rows are texts; the others are JSON objects).

    `n_sft` keeps only the first n_sft SFT demonstrations (0: all n_train). All n_train are still drawn,
    so every other file is the same whatever n_sft is: runs that differ in it differ in nothing else.
    """
    if n_sft > n_train:
        raise LmforgeError(f"demo.n_sft={n_sft} is more than demo.n_train={n_train}: the SFT demonstrations are "
                           "the first n_sft of the n_train drawn (raise demo.n_train or lower demo.n_sft)")
    rng = random.Random(seed)
    space = (10 ** max_digits) ** 2  # about how many distinct problems exist per operator
    if n_test > space // 4 or n_test + 2 * n_train > space // 2:
        raise LmforgeError(f"demo.n_test={n_test} and demo.n_train={n_train} are too many for "
                           f"max_digits={max_digits}; the held-out test, DPO and GRPO problems must stay a small "
                           "part of all problems (raise demo.max_digits)")
    test: dict[tuple, None] = {}
    while len(test) < n_test:
        test[draw(rng, max_digits)] = None
    # The DPO pairs' and GRPO's problems are kept out of the pretraining text too: on problems it has
    # seen, the model answers from memory, and preferences or rewards there teach little of the
    # skill the test set measures.
    held = dict(test)

    def unseen(n: int) -> list[tuple[int, str, int]]:
        new: dict[tuple, None] = {}
        while len(new) < n:
            p = draw(rng, max_digits)
            if p not in held:
                new[p] = held[p] = None
        return list(new)

    dpo, rl = unseen(n_train), unseen(n_train)

    def fresh() -> tuple[int, str, int]:
        while True:
            p = draw(rng, max_digits)
            if p not in held:
                return p

    out: dict[str, list] = {name: [] for name in FILES}
    for a, op, b in test:
        q, _ = question(rng, a, op, b)
        out["test.jsonl"].append({"prompt": q, "answer": str(solve(a, op, b))})
    lines = []
    for _ in range(n_pretrain):
        a, op, b = fresh()
        if rng.random() < 0.75:  # mostly bare equations: the densest signal for learning to add and subtract
            lines.append(f"{a} {op} {b} = {solve(a, op, b)}")
        else:
            q, ans = question(rng, a, op, b)
            lines.append(f"{q} {ans}")
    out["pretrain.jsonl"] = ["\n".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    for _ in range(n_train):
        a, op, b = fresh()
        q, ans = question(rng, a, op, b)
        out["sft.jsonl"].append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    if n_sft:
        del out["sft.jsonl"][n_sft:]
    for a, op, b in dpo:
        w = wrong(rng, solve(a, op, b))
        state = rng.getstate()  # the same wording for the right and the wrong answer
        q, ans = question(rng, a, op, b)
        rng.setstate(state)
        _, bad = question(rng, a, op, b, c=w)
        out["dpo.jsonl"].append({"prompt": q, "chosen": ans, "rejected": bad})
    for a, op, b in rl:
        q, _ = question(rng, a, op, b)
        out["rl.jsonl"].append({"prompt": q, "answer": str(solve(a, op, b))})
    return out


def demo_dir(cfg: Config) -> Path:
    return cfg.run_path / "demo"


def write_demo(cfg: Config) -> Path:
    """Write the demo's JSONL files into RUN/demo/ (each atomically); returns the folder."""
    d = demo_dir(cfg)
    dc = cfg.demo
    rows = make_demo(dc.seed, dc.max_digits, dc.n_train, dc.n_test, dc.n_pretrain, dc.n_sft)
    for name, items in rows.items():
        objs = [{"text": t} for t in items] if name == "pretrain.jsonl" else items
        atomic_write_text(d / name, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))
    log(f"demo task: {len(rows['test.jsonl'])} held-out problems, {len(rows['sft.jsonl'])} SFT demonstrations, "
        f"{dc.n_train} DPO pairs and {dc.n_train} GRPO prompts, "
        f"{dc.n_pretrain} lines of pretraining text -> {d}")
    return d


def run_demo(cfg: Config) -> Path:
    """The recipe stage: demo files, then the run's tokenizer and data shards trained on its text.

    The tokenizer and prepare stages run on a copy of the config whose sources are the demo's
    pretraining text, so the recipe needs no paths that depend on run_dir.
    """
    from lmforge.stages import _done_prepare, _done_tokenizer, run_prepare, run_tokenizer

    d = demo_dir(cfg)
    if not all((d / name).is_file() for name in FILES):
        write_demo(cfg)
    sub = copy.deepcopy(cfg)
    sub.data.sources = [str(d / "pretrain.jsonl")]
    sub.tokenizer.sources = []
    if not _done_tokenizer(sub):
        run_tokenizer(sub)
    if not _done_prepare(sub):
        run_prepare(sub)
    return d


def done_demo(cfg: Config) -> bool:
    d = demo_dir(cfg)
    from lmforge.stages import _done_prepare, _done_tokenizer

    return all((d / name).is_file() for name in FILES) and _done_tokenizer(cfg) and _done_prepare(cfg)
