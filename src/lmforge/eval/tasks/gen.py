"""Generative benchmarks: a greedy reply, its answer extracted, compared by exact match.

GSM8K ({question, answer ending in "#### N"}, scored on the number after "#### " as lm-eval's
strict match) and the generic {"prompt", "answer"} JSONL (extraction chosen per task: exact,
last_number, hash, or a regex).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.tasks.base import EXTRACTORS, Doc, Task, extract_hash, extract_regex
from lmforge.eval.tasks.files import files_in, need, rows


def gsm8k(path: Path) -> Task:
    what = 'GSM8K rows are {"question", "answer": a worked solution ending in "#### N"}'
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            solution = need(r, "answer", where, what, str)
            gold = extract_hash(solution)
            if gold is None:
                raise LmforgeError(f"{where}: 'answer' has no '#### N' final answer ({what})")
            docs.append(Doc([f"Question: {need(r, 'question', where, what, str)}\nAnswer:"], [], gold, where,
                            target=solution))
    return Task("gsm8k", "gen", docs, stop=("\n\n", "Question:"), extract=extract_hash)


def generic_gen(path: Path, extract: str = "exact") -> Task:
    """The user's own: {"prompt", "answer"}; `extract` is exact, last_number, hash or regex=PATTERN."""
    what = 'generative rows are {"prompt", "answer"}'
    if extract.startswith("regex="):
        extractor = extract_regex(extract[len("regex="):])
    elif extract in EXTRACTORS:
        extractor = EXTRACTORS[extract]
    else:
        raise LmforgeError(f"extract={extract!r}: use one of {', '.join(EXTRACTORS)} or regex=PATTERN")
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            docs.append(Doc([need(r, "prompt", where, what, str)], [], str(need(r, "answer", where, what)), where))
    return Task(path.stem, "gen", docs, stop=("\n\n",), extract=extractor)
