"""Multiple-choice benchmarks, read from their published files, prompted as lm-evaluation-harness does.

HellaSwag (ctx / ctx_a+ctx_b, endings, label), ARC (AI2's nested question{stem, choices} and the
Hugging Face flat variant), PIQA (goal, sol1, sol2, label or the sibling -labels.lst), Winogrande
(partial scoring), MMLU (Hendrycks' header-less csv folders and HF jsonl), C-Eval / CMMLU (csv with
their own headers), and the generic {"question", "choices", "answer"} JSONL.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.tasks.base import Doc, Task
from lmforge.eval.tasks.files import files_in, need, pick, rows

LETTERS = "ABCDEFGHIJ"


def _index(answer: object, labels: list[str], where: str, key: str) -> int:
    """A gold answer given as an index, a label ("B", "2") or the choice's text -> its index."""
    if isinstance(answer, bool):
        raise LmforgeError(f"{where}: '{key}' should be an index or a label, got {answer!r}")
    if isinstance(answer, int | float) and int(answer) == answer and 0 <= int(answer) < len(labels):
        return int(answer)
    s = str(answer).strip()
    if s in labels:
        return labels.index(s)
    if s.isdigit() and 0 <= int(s) < len(labels):
        return int(s)
    raise LmforgeError(f"{where}: '{key}' is {answer!r}, not one of the choices {labels}")


def _pool_split(path: Path, names: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(files to evaluate, few-shot files) of a benchmark folder laid out as published: test/ (or val/)
    beside dev/; a single file or a flat folder evaluates everything and draws shots from itself."""
    if path.is_dir():
        for name in names:
            if (path / name).is_dir() and (path / "dev").is_dir():
                return files_in(path / name), files_in(path / "dev")
    return files_in(path), []


def _subject(file: Path) -> str:
    """"high_school_physics_test.csv" -> "high school physics" (MMLU's, C-Eval's and CMMLU's file names)."""
    return re.sub(r"_(test|val|dev|train|validation)$", "", file.stem).replace("_", " ")


# --- readers: one per published format ------------------------------------------------------------------

def hellaswag(path: Path) -> Task:
    def preprocess(text: str) -> str:  # lm-eval's: WikiHow's bracketed artifacts out
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    what = "HellaSwag rows are {ctx (or ctx_a, ctx_b), endings: [4 strings], label}"
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            if "ctx_a" in r:
                ctx = need(r, "ctx_a", where, what) + " " + str(r.get("ctx_b", "")).capitalize()
            else:
                ctx = need(r, "ctx", where, what, str)
            if r.get("activity_label"):
                ctx = r["activity_label"] + ": " + ctx
            endings = [preprocess(e) for e in need(r, "endings", where, what, list)]
            gold = _index(need(r, "label", where, what), [str(i) for i in range(len(endings))], where, "label")
            docs.append(Doc([preprocess(ctx)], endings, gold, where))
    return Task("hellaswag", "mc", docs)


def arc(path: Path, name: str = "arc") -> Task:
    what = "ARC rows are {question: {stem, choices: [{label, text}]}, answerKey} or {question, choices: {text, label}}"
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            q = need(r, "question", where, what)
            if isinstance(q, dict):
                stem, choices = need(q, "stem", where, what), need(q, "choices", where, what, list)
                texts = [need(c, "text", where, what) for c in choices]
                labels = [str(need(c, "label", where, what)) for c in choices]
            else:
                choices = need(r, "choices", where, what, dict)
                stem, texts = q, list(need(choices, "text", where, what, list))
                labels = [str(x) for x in need(choices, "label", where, what, list)]
            gold = _index(need(r, "answerKey", where, what), labels, where, "answerKey")
            docs.append(Doc([f"Question: {stem}\nAnswer:"], texts, gold, where))
    return Task(name, "mc", docs)


def piqa(path: Path) -> Task:
    what = "PIQA rows are {goal, sol1, sol2, label}, or the label on line N of the sibling <name>-labels.lst"
    docs = []
    for file in files_in(path, (".jsonl", ".json", ".parquet")):
        labels_file = file.with_name(file.stem + "-labels.lst")
        labels = labels_file.read_text().split() if labels_file.is_file() else None
        for n, (where, r) in enumerate(rows(file)):
            label = r.get("label", labels[n] if labels and n < len(labels) else None)
            if label is None:
                need(r, "label", where, what)
            sols = [need(r, "sol1", where, what, str), need(r, "sol2", where, what, str)]
            docs.append(Doc([f"Question: {need(r, 'goal', where, what, str)}\nAnswer:"], sols,
                            _index(label, ["0", "1"], where, "label"), where))
    return Task("piqa", "mc", docs)


def winogrande(path: Path) -> Task:
    """Partial scoring: each option fills the blank in the context, and the likelihood of the rest of the
    sentence (the same for both) decides."""
    what = "Winogrande rows are {sentence with one _, option1, option2, answer: 1 or 2}"
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            sentence = need(r, "sentence", where, what, str)
            if "_" not in sentence:
                raise LmforgeError(f"{where}: 'sentence' has no _ blank for the options ({what})")
            i = sentence.index("_")
            options = [need(r, "option1", where, what, str), need(r, "option2", where, what, str)]
            gold = _index(need(r, "answer", where, what), ["1", "2"], where, "answer")
            docs.append(Doc([sentence[:i] + o for o in options], options, gold, where,
                            continuation=sentence[i + 1:].strip()))
    return Task("winogrande", "mc", docs, metric="acc")  # lm-eval reports acc only


def _four(question: str, options: list[str], answer_cue: str, question_cue: str = "") -> str:
    return question_cue + question.strip() + "".join(f"\n{LETTERS[j]}. {o}" for j, o in enumerate(options)) \
        + "\n" + answer_cue


def _lettered(path: Path, name: str, description: str, answer_cue: str, question_cue: str = "",
              splits: tuple[str, ...] = ("test", "val")) -> Task:
    """MMLU-shaped benchmarks: a question, options A-D, the answer a letter; one file per subject.
    `splits`: the folders evaluated, first found first (C-Eval publishes test/ without answers: val/)."""
    what = f"{name} rows are question, A, B, C, D, answer (csv) or {{question, choices: [4], answer}} (jsonl)"
    evaluate, shots = _pool_split(path, splits)

    def read(files: list[Path]) -> list[Doc]:
        docs = []
        for file in files:
            for where, r in rows(file, header=None):
                if isinstance(r, list):  # Hendrycks' csv: no header
                    if len(r) < 6:
                        raise LmforgeError(f"{where}: {len(r)} columns, expected 6 ({what})")
                    q, options, answer = r[0], r[1:5], r[5]
                elif "choices" in r:
                    q, options, answer = need(r, "question", where, what), need(r, "choices", where, what, list), \
                        need(r, "answer", where, what)
                else:
                    q = pick(r, ("question", "题目", "问题"), where, what)
                    options = [pick(r, (c,), where, what) for c in "ABCD"]
                    answer = pick(r, ("answer", "答案"), where, what)
                labels = list(LETTERS[:len(options)])
                subject = r.get("subject") if isinstance(r, dict) and r.get("subject") else _subject(file)
                gold = _index(answer, labels, where, "answer")
                docs.append(Doc([_four(q, options, answer_cue, question_cue)], labels, gold, where,
                                description=description.format(subject=subject.replace("_", " "))))
        return docs

    return Task(name, "mc", read(evaluate), read(shots), metric="acc")  # letters: acc_norm == acc


def mmlu(path: Path) -> Task:
    return _lettered(path, "mmlu", "The following are multiple choice questions (with answers) about {subject}.\n\n",
                     "Answer:")


def ceval(path: Path) -> Task:
    return _lettered(path, "ceval", "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：",
                     splits=("val", "test"))


def cmmlu(path: Path) -> Task:
    return _lettered(path, "cmmlu", "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
                     "答案：", "题目：")


def generic_mc(path: Path) -> Task:
    """The user's own: {"question", "choices": [...], "answer": index, letter or the choice's text}."""
    what = 'multiple-choice rows are {"question", "choices": [strings], "answer": index, letter or text}'
    docs = []
    for file in files_in(path):
        for where, r in rows(file):
            q = need(r, "question", where, what, str)
            choices = [str(c) for c in need(r, "choices", where, what, list)]
            answer = need(r, "answer", where, what)
            if isinstance(answer, str) and answer in choices:
                gold = choices.index(answer)
            else:
                gold = _index(answer, list(LETTERS[:len(choices)]), where, "answer")
            docs.append(Doc([q], choices, gold, where))
    return Task(path.stem, "mc", docs)
