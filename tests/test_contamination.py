"""The contamination report: evaluation examples planted in a corpus (English and Chinese) are found in the
training shards and nothing else is; the index does not depend on how it was chunked and is rebuilt when the
data changes; eval.exclude_contaminated scores the clean examples; prepare's data.decontaminate drops the
planted documents, after which the report finds nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from corpora import WORDS, cfg_for, chinese, english, split_texts
from test_chat import tiny_checkpoint, write_jsonl

import lmforge.eval.contamination as contamination
from lmforge.cli import main as cli_main
from lmforge.config import ConfigError, load_config
from lmforge.errors import LmforgeError
from lmforge.eval.contamination import Cleaner, NgramIndex, run_index, window_hashes
from lmforge.eval.tasks import load_task, parse_spec
from lmforge.stages import run_prepare, run_tokenizer

PLANTED = (0, 3, 5, 8)  # example 8 is the Chinese one; their documents' seeds keep them out of validation


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    return e.value.code


def questions() -> list[dict]:
    """Nine multiple-choice rows of seeded random words (no corpus holds them by chance), one Chinese, and
    one too short to hold a 13-token window."""
    rng = random.Random(99)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(22)) + "?",
             "choices": [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(3)], "answer": i % 3}
            for i in range(8)]
    rows.append({"question": chinese(60, seed=7).replace("\n", ""), "choices": ["春风", "秋月"], "answer": 1})
    rows.append({"question": "Sky?", "choices": ["blue", "red"], "answer": 0})
    return rows


def shot(row: dict) -> str:
    return row["question"] + " " + row["choices"][row["answer"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """(corpus folder, task file, rows): a book, Chinese verse, and one small file per planted example,
    each example inside a document of other lines."""
    root = tmp_path_factory.mktemp("contamination")
    src = root / "corpus"
    src.mkdir()
    (src / "book.txt").write_text(english(120_000, seed=1), encoding="utf-8")
    (src / "verse.txt").write_text(chinese(30_000, seed=2), encoding="utf-8")
    rows = questions()
    for i in PLANTED:
        (src / f"planted_{i}.txt").write_text(english(600, seed=10 + i) + "As the quiz said: " + shot(rows[i])
                                              + " and so on.\n" + english(600, seed=30 + i), encoding="utf-8")
    return src, Path(write_jsonl(root / "quiz.jsonl", rows)), rows


def prepared(root: Path, src: Path, **data) -> Path:
    run = root / "run"
    cfg = cfg_for(run, [src], **data)
    if not (run / "tokenizer").is_dir():
        run_tokenizer(cfg)
    run_prepare(cfg)
    return run


def report(run: Path, quiz: Path, *extra: str) -> dict:
    assert cli(["eval", "contamination", f"run_dir={run}", f"eval.tasks=[mc:{quiz}]", *extra]) == 0
    return json.loads((run / "eval" / "contamination-13.json").read_text(encoding="utf-8"))["tasks"]["quiz"]


def test_window_hashes_equal_windows_and_leave_out_document_ends():
    ids = np.array([5, 6, 7, 8, 1, 5, 6, 7, 8, 9], dtype=np.int64)
    h, start = window_hashes(ids, 3, eot_id=1)
    assert start.tolist() == [0, 1, 5, 6, 7]  # windows holding id 1 (the end of a document) are gone
    assert h[0] == h[2] and h[1] == h[3] and len(set(h.tolist())) == 3
    assert len(window_hashes(ids[:2], 3)[0]) == 0
    rng = np.random.default_rng(0)  # against the definition, ends anywhere (the last position too)
    ids = rng.integers(0, 6, 400)
    ids[-1] = 0
    h, start = window_hashes(ids, 5, eot_id=0)
    assert start.tolist() == [s for s in range(396) if 0 not in ids[s:s + 5]]
    whole, _ = window_hashes(ids, 5)
    assert np.array_equal(h, whole[start])
    same = {tuple(ids[s:s + 5]) for s in start}
    assert len(set(h.tolist())) == len(same)


def test_report_finds_the_planted_examples_and_nothing_else(corpus, tmp_path, capsys):
    src, quiz, rows = corpus
    run = prepared(tmp_path, src)
    train = "\n".join(split_texts(run, "train"))
    in_train = {i for i in PLANTED if shot(rows[i]) in train}
    assert in_train == set(PLANTED), "the seeds were chosen so that the hash split keeps every planted one in train"
    t = report(run, quiz)
    assert sorted(int(f["where"].rsplit(":", 1)[1]) - 1 for f in t["flagged"]) == sorted(in_train)
    assert t["examples"] == 10 and t["too_short"] == 1 and t["checked"] == 9
    assert t["contaminated"] == len(in_train) and t["share"] == pytest.approx(len(in_train) / 9)
    assert all(f["share"] > 0.5 for f in t["flagged"])  # the whole example sits inside a training document
    md = (run / "eval" / "contamination-13.md").read_text(encoding="utf-8")
    assert "| quiz | 10 | 9 | 1 |" in md and "flagged examples" in md

    # Built once: a second report reads the same index; a re-prepare (other data) makes it stale.
    stamp = (run / "data" / "ngrams-13" / "index.json").stat().st_mtime_ns
    report(run, quiz)
    assert (run / "data" / "ngrams-13" / "index.json").stat().st_mtime_ns == stamp
    (src / "extra.txt").write_text(english(3000, seed=5), encoding="utf-8")
    try:
        prepared(tmp_path, src)
    finally:
        (src / "extra.txt").unlink()
    capsys.readouterr()
    report(run, quiz)
    assert "rebuilding" in capsys.readouterr().err
    # A share threshold: the planted examples' windows are nearly all found, so a 50 % rule keeps them flagged.
    assert report(run, quiz, "eval.contamination_share=0.5")["contaminated"] == len(in_train)


def test_index_does_not_depend_on_chunking_and_holds_every_window(corpus, tmp_path, monkeypatch):
    src, _, _ = corpus
    run = prepared(tmp_path, src)
    whole = run_index(run, 13)
    monkeypatch.setattr(contamination, "CHUNK_TOKENS", 997)  # windows across many chunk edges
    small = NgramIndex.build(run / "data" / "train", tmp_path / "small", 13)
    assert whole.meta["distinct_windows"] == small.meta["distinct_windows"] > 0
    for p in range(1 << whole.bits):
        assert np.array_equal(np.fromfile(whole.part(p), np.uint64), np.fromfile(small.part(p), np.uint64))
    from lmforge.data.shards import open_shards

    shards, m = open_shards(run / "data" / "train")
    ids = np.concatenate([np.asarray(s) for s in shards]).astype(np.int64)
    h, _ = window_hashes(ids, 13, m["eot_id"])
    assert small.contains(h).all()
    rng = np.random.default_rng(0)
    assert not small.contains(rng.integers(0, 2**63, 5000, dtype=np.int64).astype(np.uint64)).any()


def test_exclude_contaminated_scores_the_clean_examples(corpus, tmp_path):
    from lmforge.eval.suite import evaluate_suite
    from lmforge.infer.loading import load_for_inference

    src, quiz, rows = corpus
    run = prepared(tmp_path, src)
    flagged = report(run, quiz)["contaminated"]
    cfg = load_config(overrides=[f"run_dir={run}", "eval.exclude_contaminated=true"])
    task = load_task(parse_spec(f"mc:{quiz}"))
    assert Cleaner(cfg)(task) == flagged and len(task.docs) == len(rows) - flagged
    model, tok, _ = load_for_inference(str(tiny_checkpoint(tmp_path / "ck")), "cpu", "fp32")
    result = evaluate_suite(model, tok, cfg, [f"mc:{quiz}"])
    assert result["tasks"]["quiz"]["n"] == len(rows) - flagged
    assert result["tasks"]["quiz"]["excluded_contaminated"] == flagged


def test_prepare_decontaminate_drops_the_documents_holding_examples(corpus, tmp_path):
    src, quiz, rows = corpus
    run = prepared(tmp_path, src, decontaminate=[f"mc:{quiz}"])
    rep = json.loads((run / "data" / "decontamination.json").read_text(encoding="utf-8"))
    assert rep["documents_dropped"] == len(PLANTED) and rep["tasks"] == {"quiz": len(rows)}
    assert {s["document"].split(":")[0].rsplit("/", 1)[-1] for s in rep["samples"]} == \
        {f"planted_{i}.txt" for i in PLANTED}
    texts = "\n".join(split_texts(run, "train") + split_texts(run, "val"))
    assert not any(shot(rows[i]) in texts for i in PLANTED) and "As the quiz said" not in texts
    assert report(run, quiz)["contaminated"] == 0


def test_bad_input_names_what_to_do(corpus, tmp_path):
    src, quiz, _ = corpus
    with pytest.raises(LmforgeError, match="no prepared training data"):
        run_index(tmp_path / "empty", 13)
    cfg = cfg_for(tmp_path / "r", [src], decontaminate=[f"mc:{quiz}"], num_tasks=2)
    with pytest.raises(ConfigError, match="data.decontaminate"):
        from lmforge.data.tasks import check_tasks

        check_tasks(cfg)
    with pytest.raises(LmforgeError, match="eval.tasks is empty"):
        contamination.report(load_config(overrides=[f"run_dir={tmp_path}"]))
