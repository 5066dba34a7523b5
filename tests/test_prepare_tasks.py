"""`prepare` as many tasks plus a merge gives exactly what one `prepare` gives: shards, order, splits, dedup."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from corpora import english
from spine import make_corpus

from lmforge.config import ConfigError, FilterConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.stages import run_prepare, run_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tasks")
    code = make_corpus(root / "code")
    prose = root / "prose"
    prose.mkdir()
    for i in range(7):
        (prose / f"book{i}.txt").write_text(english(3000 + 1000 * i, seed=i), encoding="utf-8")
    # exact duplicates inside one file's neighbourhood and across what become different tasks
    (prose / "book9_copy.txt").write_text((prose / "book0.txt").read_text(), encoding="utf-8")
    shutil.copy(code / "textwrap.py", prose / "zz_textwrap_copy.txt")
    # near-duplicates in the last task of textwrap.py (the first): every 100th word reversed (same length,
    # so the documents are cut at the same places)
    words = (code / "textwrap.py").read_text().split(" ")
    (prose / "zzz_textwrap_near.txt").write_text(" ".join(w[::-1] if i % 100 == 7 else w for i, w in enumerate(words)),
                                                 encoding="utf-8")
    # PII for data.pii, and lines the C4 line filter drops, in a task of its own
    (prose / "book5_contacts.txt").write_text("\n".join(
        f"Write to clerk{i}@example.org or reach host 10.0.{i}.7 for the ledger of year {1900 + i}." if i % 3 else
        f"cookie policy {i}" for i in range(60)), encoding="utf-8")
    run = root / "tok"
    cfg = load_config(overrides=[f"run_dir={run}", f"data.sources=[{code},{prose}]", "tokenizer.vocab_size=400"])
    run_tokenizer(cfg)
    return code, prose, run / "tokenizer"


def _run(root: Path, tokenizer: Path, sources) -> Path:
    run = root
    run.mkdir(parents=True, exist_ok=True)
    (run / "tokenizer").symlink_to(tokenizer)
    return run


def _cfg(run: Path, sources, **data):
    cfg = load_config(overrides=[f"run_dir={run}", "data.workers=1", "data.val_fraction=0.2",
                                 "data.max_doc_bytes=2048", "data.shard_tokens=5000"])
    cfg.data.sources = copy.deepcopy(sources)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _files(run: Path) -> dict[str, bytes]:
    data = run / "data"
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


def _prepare_in_tasks(run: Path, sources, n: int, **data) -> None:
    for i in reversed(range(n)):  # any order: tasks are independent
        run_prepare(_cfg(run, sources, num_tasks=n, task_index=i, **data))
    run_prepare(_cfg(run, sources, num_tasks=n, merge=True, **data))


@pytest.mark.parametrize("mixture,near,filters", [(False, False, False), (True, False, False), (False, True, False),
                                                  (False, False, True)],
                         ids=["plain", "mixture", "near-dedup", "filters"])
def test_one_task_or_three_give_identical_shards(corpus, tmp_path, mixture, near, filters):
    """Also with data.near_dedup: the merge clusters every task's signatures as one scan would, so the
    near-duplicates dropped, dedup.json (clusters, example pairs and their texts) and the shards are equal.
    With filters and PII masking, the tasks' filters.json add up to one prepare's, samples included."""
    code, prose, tok = corpus
    sources = [str(code), str(prose)]
    if mixture:
        sources = [{"path": str(code), "name": "code", "weight": 0.6}, {"path": str(prose), "name": "prose"}]
        sources[1]["weight"] = 0.4
    extra: dict = {"near_dedup": near}
    if filters:
        extra.update(pii=True, filters=FilterConfig(lines=True, min_chars=1500))
    one = _run(tmp_path / "one", tok, sources)
    run_prepare(_cfg(one, sources, **extra))
    three = _run(tmp_path / "three", tok, sources)
    _prepare_in_tasks(three, sources, 3, **extra)
    a, b = _files(one), _files(three)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("manifest.json"):
            ma, mb = json.loads(a[name]), json.loads(b[name])
            ma.pop("tokenizer"), mb.pop("tokenizer")  # the run folder's own path
            assert ma == mb
        else:
            assert a[name] == b[name], name
    m = json.loads(a["train/manifest.json"])
    # dedup across tasks, several shards (filtered by line rules, the .txt copy of textwrap.py is no copy)
    assert m["duplicates_dropped"] >= (1 if filters else 2) and len(m["shards"]) > 2
    assert not (three / "data" / "tasks").exists()
    assert ("mixture" in m) == mixture
    assert ("dedup.json" in a) == near
    assert ("filters.json" in a) == filters
    if filters:
        report = json.loads(a["filters.json"])
        assert report["filters"]["lines"]["lines"] >= 20 and report["filters"]["min_chars"]["documents"] > 0
        assert report["pii"]["email"] >= 20 and len(report["filters"]["lines"]["samples"]) == 5
        assert m["filtered"] == {k: {"documents": v["documents"], "bytes": v["bytes"]}
                                 for k, v in report["filters"].items()}
        assert m["pii_masked"] == report["pii"]
    if near:
        report = json.loads(a["dedup.json"])
        assert m["near_duplicates_dropped"] == report["near_duplicates"] > 0 and report["example_pairs"]
        assert all(e["kept_text"] and e["dropped_source"] for e in report["example_pairs"])
        from lmforge.data.prepare import source_groups
        from lmforge.data.tasks import corpus_files, task_slice

        files = corpus_files(source_groups(_cfg(three, sources).data)[0])
        task_of = {str(f[1]): i for i in range(3) for f in task_slice(files, i, 3)}
        pair = next(e for e in report["example_pairs"] if "zzz_textwrap_near" in e["dropped_source"])
        kept, dropped = (pair[f"{k}_source"].rsplit(":", 1)[0] for k in ("kept", "dropped"))
        assert kept.endswith("textwrap.py") and pair["similarity"] < 1
        assert task_of[kept] != task_of[dropped]  # the pair was found across tasks


def test_a_tiny_corpus_gets_its_forced_val_document_in_tasks_too(corpus, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 20, encoding="utf-8")
    _, _, tok = corpus
    one = _run(tmp_path / "one", tok, [str(docs)])
    run_prepare(_cfg(one, [str(docs)], val_fraction=0.001))
    two = _run(tmp_path / "two", tok, [str(docs)])
    _prepare_in_tasks(two, [str(docs)], 2, val_fraction=0.001)
    assert _files(one).keys() == _files(two).keys() and "val/manifest.json" in _files(one)
    for k, v in _files(one).items():
        if not k.endswith(".json"):
            assert _files(two)[k] == v, k


def test_task_errors(corpus, tmp_path):
    code, _, tok = corpus
    run = _run(tmp_path / "r", tok, [str(code)])
    with pytest.raises(ConfigError) as e:
        run_prepare(_cfg(run, [str(code)], num_tasks=2, task_index=2))
    assert e.value.key == "data.task_index"
    run_prepare(_cfg(run, [str(code)], num_tasks=2, task_index=0))
    with pytest.raises(LmforgeError, match="task 1 of 2 has not finished"):
        run_prepare(_cfg(run, [str(code)], num_tasks=2, merge=True))
    with pytest.raises(LmforgeError, match="other settings"):
        run_prepare(_cfg(run, [str(code)], num_tasks=2, task_index=1, val_fraction=0.3))
        run_prepare(_cfg(run, [str(code)], num_tasks=2, merge=True))
