"""`lmforge quickstart --data FILE` on a user's own text: one English book, one Chinese file, code.

Each run takes seconds: a tiny model and `train.max_steps`, which quickstart honours instead of its
wall-clock budget.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from corpora import LIMIT, chinese, code_folder, english, split_texts
from infer_helpers import one_thread  # noqa: F401 (fixture)

from lmforge.data.shards import read_manifest
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError
from lmforge.quickstart import _generate_line, cmd_quickstart
from lmforge.stages import data_prompt
from lmforge.tokenizer import Tokenizer

# A model and schedule small enough that a quickstart run takes seconds.
TINY_QS = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.max_seq_len=64", "tokenizer.vocab_size=384",
           "train.seq_len=64", "train.micro_batch=8", "train.max_steps=12", "train.eval_every=6",
           "train.eval_batches=2", "train.warmup_steps=2", "train.log_every=6", "train.progress=false",
           "data.workers=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def quickstart(data: Path, run: Path, *extra: str) -> None:
    assert cmd_quickstart(["--data", str(data), "--run-dir", str(run), *TINY_QS, *extra]) == 0


def val_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


def test_quickstart_on_one_english_file(tmp_path, capsys, monkeypatch):
    """A 2 MB book, one sentence per line: ~60 documents, train and val, a prompt from the text."""
    book = tmp_path / "book.txt"
    book.write_text(english(2_000_000, seed=7), encoding="utf-8")
    docs = list(iter_documents([str(book)]))
    assert 60 <= len(docs) <= 64 and all(len(d.text) <= LIMIT and d.text.endswith("\n") for d in docs)
    assert "".join(d.text for d in docs) == book.read_text(encoding="utf-8")
    assert docs[1].line == docs[0].text.count("\n") + 1

    monkeypatch.chdir(tmp_path)  # the file given by a relative path
    quickstart(Path("book.txt"), tmp_path / "qs")
    err = capsys.readouterr().err
    run = tmp_path / "qs"
    assert [r["step"] for r in val_rows(run)] == [6, 12]  # validation loss during training
    assert "bits per byte" in err and "validation loss" in err
    val = read_manifest(run / "data" / "val")
    assert val["documents"] >= 1 and val["max_doc_bytes"] == LIMIT and val["decoding"] == []
    assert read_manifest(run / "data" / "train")["documents"] + val["documents"] == len(docs)
    assert set(split_texts(run, "val")) <= {d.text for d in docs}
    # the tokenizer held out exactly the documents that became the validation split (same rule, same hash)
    assert json.loads((run / "tokenizer" / "report.json").read_text())["held_out_documents"] == val["documents"]

    prompt = data_prompt(Tokenizer.load(run / "tokenizer"), run / "data")
    first_val = split_texts(run, "val")[0]
    assert first_val.startswith(prompt) and len(prompt.split()) >= 3 and prompt[-1].isalpha()
    assert first_val[len(prompt)] in " .?!"  # ends at the end of a word
    assert f"sample at step 12:\n{prompt}" in err and "def " not in err
    line = next(x for x in err.splitlines() if x.startswith("generate:"))
    assert shlex.split(line)[-2:] == ["--prompt", prompt]
    saved = (tmp_path / "qs" / "lmforge.yaml").read_text()
    assert str(book) in saved  # absolute: the run directory finds its text from anywhere
    # the quickstart ends by drawing the run's curves and saying where they are
    png = run / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run / "plots" / "curves.html").is_file()
    assert f"curves:     {png}" in err

    # the same run directory with other data: refused, since it would mix two runs
    other = tmp_path / "other.txt"
    other.write_text(english(100_000, seed=8), encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"holds a run trained on other data \(data.sources=.*book\.txt"):
        quickstart(other, tmp_path / "qs")


def test_quickstart_on_one_chinese_file(tmp_path, capsys):
    verse = tmp_path / "诗.txt"
    verse.write_text(chinese(800_000, seed=9), encoding="utf-8")
    quickstart(verse, tmp_path / "qs")
    err = capsys.readouterr().err
    run = tmp_path / "qs"
    assert [r["step"] for r in val_rows(run)] == [6, 12] and "bits per byte" in err
    assert read_manifest(run / "data" / "train")["documents"] >= 20
    val = split_texts(run, "val")
    assert val and all("\ufffd" not in t and t.endswith("。\n") for t in val)  # cut between lines
    prompt = data_prompt(Tokenizer.load(run / "tokenizer"), run / "data")
    assert 8 <= len(prompt) <= 10 and "\ufffd" not in prompt and val[0].startswith(prompt)  # 32 bytes at most
    line = next(x for x in err.splitlines() if x.startswith("generate:"))
    assert shlex.split(line)[-1] == prompt


def test_quickstart_on_code_with_a_markup_like_prompt(tmp_path, capsys):
    """A folder of code, and a sample holding what the console would read as markup ([/...])."""
    folder = code_folder(tmp_path / "code")
    quickstart(folder, tmp_path / "qs", "data.val_fraction=0.2", r"train.sample_prompt=re.compile(r'[/\]')")
    err = capsys.readouterr().err
    assert val_rows(tmp_path / "qs") and "sample at step 12:\nre.compile(r'[/\\]')" in err
    assert shlex.split(next(x for x in err.splitlines() if x.startswith("generate:")))[-1] == r"re.compile(r'[/\]')"


def test_quickstart_with_too_little_text_stops_before_training(tmp_path):
    tiny = tmp_path / "note.txt"
    tiny.write_text("A short note.\nJust two lines.\n", encoding="utf-8")
    with pytest.raises(LmforgeError) as e:
        quickstart(tiny, tmp_path / "qs")
    msg = " ".join(str(e.value).split())
    assert msg.startswith("too little text for quickstart: 30 bytes in 1 document(s), ")
    assert "a validation split needs a document of its own" in msg and msg.endswith("Nothing was trained.")
    # one file: it must be long enough to be cut into two documents of up to data.max_doc_bytes
    assert re.search(r"take [\d,]+ tokens: give about 66 KB of text, in at least 2 documents \(a file is cut "
                     r"into documents of at most data.max_doc_bytes=32,768 bytes\)", msg), msg
    assert not (tmp_path / "qs" / "checkpoints").exists() and not (tmp_path / "qs" / "metrics.jsonl").exists()

    # enough documents, but the validation split is shorter than one sequence
    few = tmp_path / "few.txt"
    few.write_text(english(40_000, seed=2), encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"too little .* holds [\d,]+ tokens, fewer than one (sequence|step)"):
        quickstart(few, tmp_path / "qs2", "train.seq_len=4096", "model.max_seq_len=4096")
    assert not (tmp_path / "qs2" / "checkpoints").exists()


def test_generate_line_is_safe_for_a_shell():
    for prompt in ["it's \"quoted\"", "-starts with a dash", "中文 'q' $HOME `x`", "tab\there"]:
        words = shlex.split(_generate_line(Path("runs/my run/step_1"), prompt))
        assert words[2] == "runs/my run/step_1"
        assert words[3:] == ["--prompt", prompt] or words[3:] == [f"--prompt={prompt}"]
