"""The built-in sequence-to-sequence task: reverse a list of words (the t5 demo, recipes/t5-reverse.yaml).

Lists of 3 to 8 distinct words from a fixed 32-word vocabulary are drawn from a generator seeded by
`demo.seed`; the held-out test lists are drawn first and no training list equals one of them. Distinct
words keep each output word's place in the source unambiguous, which a 1 M-parameter model needs. The stage writes
RUN/reverse/:

    train.jsonl  {"source": "reverse: w1 w2 ... wn", "target": "wn ... w2 w1"}, demo.n_train of them
    test.jsonl   the same, demo.n_test held-out lists (`lmforge eval eval.files=[...]` scores exact match)
    text.jsonl   {"text": ...} of every training source and target, for the run's tokenizer

and then trains the run's tokenizer on text.jsonl (with T5's sentinels when model.arch=t5).
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


def example(words: list[str]) -> dict:
    return {"source": "reverse: " + " ".join(words), "target": " ".join(reversed(words))}


def make_reverse(seed: int, n_train: int, n_test: int, min_words: int = 3, max_words: int = 8
                 ) -> tuple[list[dict], list[dict]]:
    """(train, test) examples; every test list is unseen in training."""
    rng = random.Random(seed)

    def draw() -> tuple[str, ...]:
        return tuple(rng.sample(WORDS, rng.randint(min_words, max_words)))

    test: dict[tuple[str, ...], None] = {}
    while len(test) < n_test:
        test[draw()] = None
    train = []
    while len(train) < n_train:
        words = draw()
        if words not in test:
            train.append(words)
    return [example(list(w)) for w in train], [example(list(w)) for w in test]


def reverse_dir(cfg: Config) -> Path:
    return cfg.run_path / "reverse"


def run_reverse(cfg: Config) -> Path:
    """The recipe stage: the task's files, then the run's tokenizer trained on its text."""
    from lmforge.stages import _done_tokenizer, run_tokenizer

    d = reverse_dir(cfg)
    if not all((d / name).is_file() for name in FILES):
        train, test = make_reverse(cfg.demo.seed, cfg.demo.n_train, cfg.demo.n_test)
        text = [{"text": t} for ex in train for t in (ex["source"], ex["target"])]
        for name, rows in zip(FILES, (train, test, text)):
            atomic_write_text(d / name, "".join(json.dumps(r) + "\n" for r in rows))
        log(f"reverse task: {len(train)} training and {len(test)} held-out word lists -> {d}")
    sub = copy.deepcopy(cfg)
    sub.data.sources = [str(d / "text.jsonl")]
    sub.tokenizer.sources = []
    if not _done_tokenizer(sub):
        run_tokenizer(sub)
    return d


def done_reverse(cfg: Config) -> bool:
    from lmforge.stages import _done_tokenizer

    return all((reverse_dir(cfg) / name).is_file() for name in FILES) and _done_tokenizer(cfg)
