"""The built-in sequence-to-sequence tasks: reverse or sort a list of words (the t5 demos,
recipes/t5-sort.yaml and recipes/t5-reverse.yaml).

Lists of 3 to 8 distinct words from a fixed 32-word vocabulary are drawn from a generator seeded by
`demo.seed`; the held-out test lists are drawn first and no training list equals one of them. Distinct
words keep each output word's place unambiguous, which a 1 M-parameter model needs. The `sort` and
`reverse` stages each write RUN/<task>/:

    train.jsonl  {"source": "sort: w1 w2 ... wn", "target": the words in alphabetical order}, demo.n_train
                 of them ("reverse: ..." -> "wn ... w2 w1")
    test.jsonl   the same, demo.n_test held-out lists (`lmforge eval eval.files=[...]` scores exact match)
    text.jsonl   {"text": ...} of every training source and target, for the run's tokenizer

and then train the run's tokenizer on text.jsonl (with T5's sentinels when model.arch=t5).

Sorting needs no positions: the output is fixed by which words the source holds, which cross-attention
reads as a bag. Reversing needs each word's distance from the end, which T5 can only work out through
its relative biases, and it learns far more slowly (README: "Encoder-decoder").
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from lmforge.config import Config
from lmforge.console import log
from lmforge.io import atomic_write_text

WORDS = ("apple", "river", "stone", "cloud", "green", "house", "music", "paper", "light", "sugar", "tiger",
         "ocean", "bread", "chair", "dream", "earth", "flame", "grape", "honey", "index", "juice", "knife",
         "lemon", "mango", "night", "olive", "piano", "queen", "radio", "snake", "table", "water")
FILES = ("train.jsonl", "test.jsonl", "text.jsonl")


TASKS = {"reverse": lambda words: list(reversed(words)), "sort": sorted}


def example(task: str, words: list[str]) -> dict:
    return {"source": f"{task}: " + " ".join(words), "target": " ".join(TASKS[task](words))}


def make_lists(task: str, seed: int, n_train: int, n_test: int, min_words: int = 3, max_words: int = 8
               ) -> tuple[list[dict], list[dict]]:
    """(train, test) examples; every test list is unseen in training (as a list: for sort, as a set too)."""
    rng = random.Random(seed)

    def draw() -> tuple[str, ...]:
        return tuple(rng.sample(WORDS, rng.randint(min_words, max_words)))

    def key(words: tuple[str, ...]) -> tuple[str, ...]:  # a sorted list is fixed by its set of words
        return tuple(sorted(words)) if task == "sort" else words

    test: dict[tuple[str, ...], tuple[str, ...]] = {}
    while len(test) < n_test:
        words = draw()
        test.setdefault(key(words), words)
    train = []
    while len(train) < n_train:
        words = draw()
        if key(words) not in test:
            train.append(words)
    return [example(task, list(w)) for w in train], [example(task, list(w)) for w in test.values()]


def task_dir(cfg: Config, task: str) -> Path:
    return cfg.run_path / task


def run_task(cfg: Config, task: str) -> Path:
    """The recipe stage: the task's files, then the run's tokenizer trained on its text."""
    from lmforge.stages import _done_tokenizer, run_tokenizer

    d = task_dir(cfg, task)
    if not all((d / name).is_file() for name in FILES):
        train, test = make_lists(task, cfg.demo.seed, cfg.demo.n_train, cfg.demo.n_test)
        text = [{"text": t} for ex in train for t in (ex["source"], ex["target"])]
        for name, rows in zip(FILES, (train, test, text)):
            atomic_write_text(d / name, "".join(json.dumps(r) + "\n" for r in rows))
        log(f"{task} task: {len(train)} training and {len(test)} held-out word lists -> {d}")
    sub = copy.deepcopy(cfg)
    sub.data.sources = [str(d / "text.jsonl")]
    sub.tokenizer.sources = []
    if not _done_tokenizer(sub):
        run_tokenizer(sub)
    return d


def done_task(cfg: Config, task: str) -> bool:
    from lmforge.stages import _done_tokenizer

    return all((task_dir(cfg, task) / name).is_file() for name in FILES) and _done_tokenizer(cfg)


def run_reverse(cfg: Config) -> Path:
    return run_task(cfg, "reverse")


def done_reverse(cfg: Config) -> bool:
    return done_task(cfg, "reverse")


def run_sort(cfg: Config) -> Path:
    return run_task(cfg, "sort")


def done_sort(cfg: Config) -> bool:
    return done_task(cfg, "sort")
