"""LAMBADA-style cloze: the last word of a passage, correct when the model would say it greedily."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.tasks.base import Doc, Task
from lmforge.eval.tasks.files import files_in, need, rows


def lambada(path: Path) -> Task:
    what = 'LAMBADA rows are {"text": a passage whose last word is to be predicted}'
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            text = need(r, "text", where, what, str).strip()
            if " " not in text:
                raise LmforgeError(f"{where}: 'text' has a single word, nothing to predict it from ({what})")
            context, word = text.rsplit(" ", 1)
            docs.append(Doc([context], [word], word, where))
    return Task("lambada", "cloze", docs)
