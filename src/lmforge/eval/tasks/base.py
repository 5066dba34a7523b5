"""The one Task interface every benchmark family implements: documents in, requests out, a score.

A reader turns a published file into `Doc`s (one per question). A Task turns each Doc into
requests — (context, continuation) pairs to score by log-likelihood, or a prompt to answer
greedily — and scores what the model returned. Adding a benchmark is one reader in one module.

Three kinds, as lm-evaluation-harness has them:
- "mc": one request per choice; the choice with the highest log-likelihood is the answer.
  `acc` takes the raw sum, `acc_norm` divides it by the choice's length in characters (lm-eval's
  `completion_len`, the choice without the " " delimiter), and `acc_bytes` by its UTF-8 bytes.
- "cloze": one request, correct when every continuation token is the greedy one (LAMBADA's acc).
- "gen": a greedy reply, cut at the task's stop strings, compared after answer extraction.
- "code": n completions run against the task's tests in a subprocess (code.py): pass@k.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

FEWSHOT_DELIMITER = "\n\n"  # between worked examples, as lm-eval


@dataclass
class Doc:
    """One question. For "mc": `contexts` holds one context shared by all `choices`, or one per choice
    (Winogrande's partial scoring: the option goes in the context, the rest of the sentence is scored);
    `gold` is the index of the right choice. For "cloze" and "gen": one context, `gold` the answer text."""

    contexts: list[str]
    choices: list[str]
    gold: int | str
    where: str  # file:line, for messages and per-example results
    delimiter: str = " "  # between context and continuation
    continuation: str = ""  # mc with one context per choice: the text scored after each
    description: str = ""  # opens this doc's prompt, before any few-shot examples (MMLU's subject line)
    program_head: str = ""  # code: what precedes the completion in the program run (HumanEval's prompt)
    target: str = ""  # code: the tests; gen: the worked answer a few-shot prompt shows (GSM8K's solution); "": gold

    def context(self, i: int = 0) -> str:
        return self.contexts[i if len(self.contexts) > 1 else 0]

    def shot(self) -> str:
        """This document as a worked example in a few-shot prompt: its context and its right answer."""
        if isinstance(self.gold, int) and self.continuation:
            return self.context(self.gold) + self.delimiter + self.continuation
        if isinstance(self.gold, int):
            return self.context(self.gold) + self.delimiter + self.choices[self.gold]
        return self.context() + self.delimiter + (self.target or str(self.gold))


@dataclass
class Task:
    name: str  # as reported: hellaswag, arc_easy, mmlu, ...
    kind: str  # mc | cloze | gen
    docs: list[Doc]
    fewshot_pool: list[Doc] = field(default_factory=list)  # train/dev split; empty: the other docs
    stop: tuple[str, ...] = (FEWSHOT_DELIMITER,)  # gen: where a reply ends
    extract: Callable[[str], str | None] = lambda s: s.strip()  # gen: the answer inside a reply
    metric: str = ""  # the figure reported and averaged into CORE; "": acc_norm (mc), acc (cloze), exact_match (gen)

    @property
    def main_metric(self) -> str:
        return self.metric or {"mc": "acc_norm", "cloze": "acc", "gen": "exact_match", "code": "pass@1"}[self.kind]

    @property
    def baseline(self) -> float:
        """Accuracy of guessing at random: 1/choices for multiple choice, 0 for open answers."""
        if self.kind != "mc" or not self.docs:
            return 0.0
        return float(np.mean([1.0 / len(d.choices) for d in self.docs]))


# --- answer extraction ------------------------------------------------------------------------------

NUMBER = re.compile(r"-?[$0-9.,]*[0-9]+")
HASH_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def normalise_number(s: str) -> str:
    """"1,234.00" and "$1234" both read 1234, so formatting is not an error."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f == int(f) else str(f)


def extract_hash(reply: str) -> str | None:
    """GSM8K's strict answer: the number after `#### `."""
    m = HASH_ANSWER.search(reply)
    return normalise_number(m.group(1)) if m else None


def extract_last_number(reply: str) -> str | None:
    found = NUMBER.findall(reply)
    return normalise_number(found[-1]) if found else None


def extract_regex(pattern: str) -> Callable[[str], str | None]:
    """The first group of `pattern` (or the whole match) in a reply."""
    rx = re.compile(pattern)

    def extract(reply: str) -> str | None:
        m = rx.search(reply)
        if not m:
            return None
        return (m.group(1) if rx.groups else m.group(0)).strip()
    return extract


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "exact": lambda s: s.strip(), "hash": extract_hash, "last_number": extract_last_number}


# --- scoring ------------------------------------------------------------------------------------------

def score_mc(doc: Doc, lls: list[float]) -> dict[str, float]:
    """acc / acc_norm / acc_bytes of one question from its choices' log-likelihoods (lm-eval's arithmetic)."""
    ll = np.asarray(lls, dtype=np.float64)
    chars = np.asarray([float(len(c)) for c in doc.choices])
    nbytes = np.asarray([float(len(c.encode("utf-8"))) for c in doc.choices])
    gold = doc.gold
    return {"acc": float(np.argmax(ll) == gold), "acc_norm": float(np.argmax(ll / chars) == gold),
            "acc_bytes": float(np.argmax(ll / nbytes) == gold)}


def score_gen(task: Task, doc: Doc, reply: str) -> dict[str, float]:
    """exact_match of the extracted answer; numbers compared after normalising ("1,000" == "1000")."""
    got = task.extract(reply)
    want = str(doc.gold).strip()
    if got is not None and NUMBER.fullmatch(want):
        got, want = normalise_number(got), normalise_number(want)
    return {"exact_match": float(got is not None and got == want)}


def cut_at_stop(reply: str, stop: tuple[str, ...]) -> str:
    ends = [reply.find(s) for s in stop if s and s in reply]
    return reply[:min(ends)] if ends else reply
